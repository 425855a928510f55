"""A static KV cache for incremental decoding.

Self-attention keys/values are preallocated per layer for the batch and a maximum decoder
length and written in place (no concatenation per step); cross-attention keys/values of
the encoder output are projected once per request. Beam search reorders rows in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import T5Config


@dataclass
class KVCache:
    self_k: list[Tensor]  # per layer [B, H, max_length, D]
    self_v: list[Tensor]
    cross_k: list[Tensor]  # per layer [B, H, Lenc, D]
    cross_v: list[Tensor]
    encoder_mask: Tensor | None  # [B, Lenc] bool
    max_length: int
    length: int = 0  # decoder tokens already in the cache = true position of the next token

    @classmethod
    def allocate(
        cls,
        config: T5Config,
        encoder_hidden: Tensor,
        cross: list[tuple[Tensor, Tensor]],
        encoder_mask: Tensor | None,
        max_length: int,
    ) -> "KVCache":
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        batch = encoder_hidden.shape[0]
        dtype = cross[0][0].dtype if cross else encoder_hidden.dtype
        shape = (batch, config.num_heads, max_length, config.d_kv)
        layers = config.num_decoder_layers
        return cls(
            self_k=[torch.empty(shape, dtype=dtype, device=encoder_hidden.device) for _ in range(layers)],
            self_v=[torch.empty(shape, dtype=dtype, device=encoder_hidden.device) for _ in range(layers)],
            cross_k=[k for k, _ in cross],
            cross_v=[v for _, v in cross],
            encoder_mask=encoder_mask,
            max_length=max_length,
        )

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise ValueError(
                f"KV cache full: {self.length} + {new_tokens} tokens exceed max_length {self.max_length}; "
                "allocate the cache with a larger max_length"
            )

    def append_self(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens' K/V at positions [length, length + n); return all K/V so far."""
        end = self.length + keys.shape[2]
        self.self_k[layer][:, :, self.length : end] = keys
        self.self_v[layer][:, :, self.length : end] = values
        return self.self_k[layer][:, :, :end], self.self_v[layer][:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (beam search): every cached tensor is gathered along the batch."""
        for tensors in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            for i, t in enumerate(tensors):
                tensors[i] = t.index_select(0, rows)
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.index_select(0, rows)
