"""Load an original T5-family checkpoint folder into a t5core model.

The model is built on the `meta` device and the checkpoint's tensors are assigned to it
one by one (`load_state_dict(assign=True)`), so loading never holds two copies. Every key
and shape is checked against the model from the file headers *before* any tensor is
read: a bad checkpoint raises `CheckpointError` listing every problem and no model is
returned half-built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from t5core.config import AttentionMode, T5Config
from t5core.model import T5, T5Encoder, cast_model
from t5core.sparse import derive_global_weights

from .keymap import EMBEDDING_KEYS, EMBEDDING_PARAM, IGNORED_KEYS, to_t5core

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files or keys, unexpected keys, bad shapes."""


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors (single or sharded), else .bin."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{folder / index} is not a valid shard index: {e}") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shards that are not in {folder}: {missing}")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} or {PYTORCH_BIN_INDEX}"
    )


class CheckpointReader:
    """Reads tensor names/shapes (headers only) and tensors from safetensors or .bin files."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._open: dict[Path, object] = {}  # safetensors handles by file
        for path in files:
            for name, shape in self._read_header(path):
                self.shapes[name] = shape
                self._where[name] = path

    def _read_header(self, path: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                # Kept open (memory-mapped) for `get`: one open per file, not one per tensor.
                self._open[path] = f = safe_open(str(path), framework="pt")
                for name in f.keys():
                    yield name, tuple(f.get_slice(name).get_shape())
            except Exception as e:  # safetensors raises its own SafetensorError / OSError
                raise CheckpointError(f"cannot read {path}: {e} (is the file truncated or corrupt? re-download it)") from None
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: {e}") from None
            for name, tensor in state.items():
                self._bin[name] = tensor
                yield name, tuple(tensor.shape)

    def get(self, name: str) -> torch.Tensor:
        if name in self._bin:
            return self._bin[name]
        return self._open[self._where[name]].get_tensor(name)


def plan_assignment(
    reader_shapes: dict[str, tuple[int, ...]],
    model: nn.Module,
    model_type: str,
    encoder_only: bool,
    encoder_attention_type: str | None = None,
    derivable: frozenset[str] = frozenset(),
) -> tuple[dict[str, str], bool]:
    """Map every model parameter to a checkpoint key; check keys and shapes.

    Returns ({t5core name: checkpoint name}, head_in_checkpoint). Raises CheckpointError
    naming all missing keys, unexpected keys and shape mismatches at once. Parameters in
    `derivable` may be absent (the caller initialises them).
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    plan: dict[str, str] = {}
    unexpected: list[str] = []
    for key in reader_shapes:
        if key in EMBEDDING_KEYS or key in IGNORED_KEYS:
            continue
        if encoder_only and (key.startswith("decoder.") or key.startswith("lm_head.")):
            continue  # the reference's T5EncoderModel ignores them too
        ours = to_t5core(key, model_type, encoder_attention_type)
        if ours is None or ours not in expected:
            unexpected.append(key)
        else:
            plan[ours] = key
    embedding = next((k for k in EMBEDDING_KEYS if k in reader_shapes), None)
    if embedding is not None:
        plan[EMBEDDING_PARAM] = embedding
    head_in_checkpoint = "lm_head.weight" in plan
    if not encoder_only and not head_in_checkpoint and embedding is not None:
        plan["lm_head.weight"] = embedding  # tied head: the embedding serves as the output layer
    missing = sorted(name for name in expected if name not in plan and name not in derivable)
    mismatched = [
        f"{plan[name]}: checkpoint {list(reader_shapes[plan[name]])} vs model {list(shape)}"
        for name, shape in expected.items()
        if name in plan and reader_shapes[plan[name]] != shape
    ]
    problems = []
    if missing:
        names = [_checkpoint_name_hint(m, model_type, encoder_attention_type) for m in missing]
        problems.append(f"missing keys ({len(missing)}): {_short(names)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched)}")
    if problems:
        hint = ""
        if any("global_" in k for k in unexpected):
            hint = (
                " The checkpoint has transient-global weights: load it with attention='transient-global' "
                "(or attention=None, a LongT5 checkpoint's own mode)."
            )
        elif mismatched or missing:
            hint = " Does config.json match these weights?"
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems) + "." + hint)
    return plan, head_in_checkpoint


def _checkpoint_name_hint(t5core_name: str, model_type: str, encoder_attention_type: str | None) -> str:
    from .keymap import to_checkpoint

    if t5core_name == EMBEDDING_PARAM:
        return " or ".join(EMBEDDING_KEYS)
    return to_checkpoint(t5core_name, model_type, encoder_attention_type) or t5core_name


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def default_dense_attention(device: str | torch.device, head_dim: int) -> AttentionMode:
    """`flash` where its kernel runs (CUDA, head dims that are powers of two in [16, 128]), else `basic`.

    Both compute the same function; on the GPU the kernel is the fast, linear-memory one.
    """
    kernel_head_dim = 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0
    return AttentionMode.FLASH if torch.device(device).type == "cuda" and kernel_head_dim else AttentionMode.BASIC


def load_checkpoint(
    folder: str | os.PathLike,
    *,
    encoder_only: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attention: str | AttentionMode | None = None,
    local_radius: int | None = None,
    global_block_size: int | None = None,
    block_size: int | None = None,
    num_global: int | None = None,
) -> T5 | T5Encoder:
    """Load a checkpoint folder (config.json + weights) into `T5` (or `T5Encoder`).

    dtype: None keeps the checkpoint's dtype; fp16 keeps `ffn.wo` in fp32 (see model.py).
    attention: the encoder self-attention mode (basic, flash, local, block, transient-global);
    None = the checkpoint's own (LongT5: its encoder_attention_type), else `flash` on CUDA and
    `basic` elsewhere (see `default_dense_attention`). The decoder stays dense. The sparse parameters override the config's (docs/sparse.md).
    Transient-global weights a checkpoint lacks are initialised, with one warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    config = T5Config.from_file(
        folder,
        attention=attention,
        local_radius=local_radius,
        global_block_size=global_block_size,
        block_size=block_size,
        num_global=num_global,
    )
    if attention is None and config.attention is AttentionMode.BASIC:
        config = config.replace(attention=default_dense_attention(device, config.d_kv))
    reader = CheckpointReader(checkpoint_files(folder))
    with torch.device("meta"):
        model = (T5Encoder if encoder_only else T5)(config)
    global_names = frozenset(  # transient-global weights: initialised when the checkpoint lacks them
        n for n, _ in model.named_parameters() if n.startswith("encoder.global_") or ".global_norm." in n
    )
    plan, head_in_checkpoint = plan_assignment(
        reader.shapes, model, config.model_type, encoder_only, config.checkpoint_encoder_attention, global_names
    )
    fp32_names = {n for n, _ in model.named_parameters() if n.endswith("ffn.wo.weight")} if dtype == torch.float16 else set()

    state: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}  # checkpoint key -> tensor, so a tied head shares storage
    for name, key in plan.items():
        if key not in loaded:
            tensor = reader.get(key)
            target = torch.float32 if name in fp32_names else (dtype or tensor.dtype)
            loaded[key] = tensor.to(device=device, dtype=target)
        state[name] = loaded[key]
    state.update(derive_global_weights(state, sorted(global_names - plan.keys()), config))
    model.load_state_dict(state, strict=True, assign=True)
    if not encoder_only and not head_in_checkpoint:
        model.tie_head()
    if dtype is not None:
        cast_model(model, dtype)
    return model.eval()
