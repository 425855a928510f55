"""Write a t5core model back in the original format: `config.json` + safetensors.

The reference (and t5core) can load what this writes. The embedding is written once as
`shared.weight` (the reference ties `encoder/decoder.embed_tokens` to it); a separate
`lm_head.weight` is written only when the head is not tied to the embedding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from t5core.config import AttentionMode

from .keymap import to_checkpoint
from .load import SAFETENSORS, SAFETENSORS_INDEX


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under checkpoint names (contiguous, detached)."""
    config = model.config
    model_type = config.model_type
    if config.attention is AttentionMode.TRANSIENT_GLOBAL and model_type != "longt5":
        raise ValueError(
            f"a {model_type} checkpoint has no place for transient-global weights; only LongT5 "
            "checkpoints store them. Save the model in its own mode (load it with attention='basic')"
        )
    out: dict[str, torch.Tensor] = {}
    tied = getattr(model, "head_is_tied", False)
    for name, param in model.named_parameters():  # duplicates (a tied head) are listed once
        if tied and name == "lm_head.weight":
            continue
        key = to_checkpoint(name, model_type, config.encoder_attention_type)
        if key is None:
            raise KeyError(f"no checkpoint name for parameter {name}; add a row to weights/keymap.py")
        out[key] = param.detach().contiguous()
    return out


def save_checkpoint(model: nn.Module, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write config.json and the weights (sharded with an index when over `max_shard_bytes`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.to("cpu") for k, v in checkpoint_state_dict(model).items()}
    shards = _split(state, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFETENSORS), metadata=metadata)
        return folder
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _split(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_bytes is None:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards
