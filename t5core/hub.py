"""Loading by name: `t5core.load("flan-t5-base")`, a hub repo id, or a local folder.

Only the files t5core needs are downloaded (config, weights, tokenizer), through
huggingface-hub and its cache; offline mode (`HF_HUB_OFFLINE=1`) is honoured.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import AttentionMode

# Short names for the public checkpoints.
ALIASES: dict[str, str] = {}
for _size in ("small", "base", "large", "3b", "11b"):
    ALIASES[f"t5-{_size}"] = f"google-t5/t5-{_size}"
for _size in ("small", "base", "large", "xl", "xxl"):
    ALIASES[f"flan-t5-{_size}"] = f"google/flan-t5-{_size}"
    ALIASES[f"t5-v1_1-{_size}"] = f"google/t5-v1_1-{_size}"
    ALIASES[f"mt5-{_size}"] = f"google/mt5-{_size}"
    ALIASES[f"byt5-{_size}"] = f"google/byt5-{_size}"
for _size in ("small", "base", "xl", "xxl"):
    ALIASES[f"umt5-{_size}"] = f"google/umt5-{_size}"
for _kind in ("local", "tglobal"):
    for _size in ("base", "large", "xl"):
        ALIASES[f"long-t5-{_kind}-{_size}"] = f"google/long-t5-{_kind}-{_size}"

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"]
SAFETENSORS_FILES = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


class HubError(RuntimeError):
    """The model could not be found locally or fetched from the hub."""


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder for a name, repo id or path (downloading what is missing)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    repo_id = ALIASES.get(name, name)
    if "/" not in repo_id:
        raise HubError(
            f"{name!r} is neither a folder nor a known model name. Known names: "
            f"{', '.join(sorted(ALIASES))}; or pass a hub repo id like 'google/flan-t5-base'."
        )
    return _download(repo_id)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=CONFIG_FILES + TOKENIZER_FILES + SAFETENSORS_FILES))
        if not any(folder.glob("*.safetensors")):  # old repos ship only pytorch_model.bin
            folder = Path(snapshot_download(repo_id, allow_patterns=CONFIG_FILES + TOKENIZER_FILES + BIN_FILES))
    except RepositoryNotFoundError:
        raise HubError(f"the hub has no repository {repo_id!r} (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id!r} is not in the local hub cache and the hub cannot be reached "
            f"(offline mode: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Connect to the "
            "internet once to download it, copy a checkpoint folder here and pass its path, or set "
            "HF_HOME to a cache that holds it."
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise HubError(f"downloading {repo_id!r} failed: {e}. Check the network, or pass a local folder.") from None
    return folder


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attention: str | AttentionMode | None = None,
    encoder_only: bool = False,
    local_radius: int | None = None,
    global_block_size: int | None = None,
    block_size: int | None = None,
    num_global: int | None = None,
):
    """Load a model and its tokenizer: `model, tokenizer = t5core.load("flan-t5-base")`.

    name_or_path: a short name (see `ALIASES`), a hub repo id, or a local checkpoint folder.
    dtype: None keeps the checkpoint's dtype. attention: the encoder self-attention mode,
    "basic", "flash", "local", "block" or "transient-global" (docs/sparse.md); None = the
    checkpoint's own (LongT5: local or transient-global), else "flash" on CUDA and "basic" on
    the CPU. The decoder is dense.
    local_radius, global_block_size, block_size, num_global: sparse-mode parameters.
    encoder_only: build a `T5Encoder` (the decoder weights are ignored).
    """
    from t5core.tokenizer import load_tokenizer
    from t5core.weights import load_checkpoint

    folder = resolve(name_or_path)
    model = load_checkpoint(
        folder,
        encoder_only=encoder_only,
        dtype=dtype,
        device=device,
        attention=attention,
        local_radius=local_radius,
        global_block_size=global_block_size,
        block_size=block_size,
        num_global=num_global,
    )
    return model, load_tokenizer(folder)
