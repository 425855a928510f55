"""A static KV cache for incremental decoding.

Self-attention keys/values are preallocated per layer for the batch and a maximum decoder
length and written in place (no concatenation per step); cross-attention keys/values of
the encoder output are projected once per request. Beam search reorders rows in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import attend_block
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
        """Keep rows `rows` (beam search): every cached tensor is gathered along the batch, in place."""
        for tensors in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            for t in tensors:
                t.copy_(t.index_select(0, rows))
        if self.encoder_mask is not None:  # tiny, and may be the caller's tensor: not in place
            self.encoder_mask = self.encoder_mask.index_select(0, rows)


class StaticKVCache:
    """The decode step's cache: every shape fixed, every length on the device (CUDA graphs).

    - Self-attention K/V: per layer [B, H, max_length, D], zero-filled; step t writes its K/V at
      `position` (a device index, `index_copy_`) and attends over the whole buffer, masked to
      `position + 1` keys: the tensors a step touches never change address or shape.
    - Cross-attention K/V: per layer [B / rows_per_input, H, Lenc, D], projected once. Beam
      search's K beams of one input share one row (`rows_per_input = K`): reordering beams
      never moves them, and the encoder output is not repeated K times.
    - `kernel`: "triton" (flash decoding, kernels/decode.py) or "torch" (the same masked
      attention in torch; CPU, or a reference). Both read the bias through one table per
      layer indexed by the clamped rel (kernels/bucket.py: `bucket_lut`).
    """

    def __init__(
        self,
        config: T5Config,
        cross: list[tuple[Tensor, Tensor]],  # per layer, [B / rows_per_input, H, Lenc, D]
        encoder_mask: Tensor | None,  # [B / rows_per_input, Lenc] bool, right-padded
        bias_tables: list[Tensor],  # per decoder layer, the [num_buckets, H] table it uses
        max_length: int,
        rows_per_input: int = 1,
        kernel: str = "torch",
    ) -> None:
        from t5core.kernels.bucket import bucket_lut  # torch-only part of the kernels package

        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if kernel not in ("triton", "torch"):
            raise ValueError(f"kernel must be 'triton' or 'torch', got {kernel!r}")
        inputs, _, enc_len, _ = cross[0][0].shape
        device, dtype = cross[0][0].device, cross[0][0].dtype
        self.batch = inputs * rows_per_input
        self.self_qkv: list[Tensor] = []  # per layer [3 * inner, d_model]: set by T5.new_static_cache
        self.rows_per_input = rows_per_input
        self.max_length = max_length
        self.kernel = kernel
        self.max_distance = config.max_distance
        shape = (self.batch, config.num_heads, max_length, config.d_kv)
        # Zeros, not empty: the torch path multiplies masked (p = 0) rows, and 0 * NaN garbage is NaN.
        self.self_k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_decoder_layers)]
        self.self_v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_decoder_layers)]
        self.cross_k = [k for k, _ in cross]
        self.cross_v = [v for _, v in cross]
        if encoder_mask is None:
            encoder_mask = torch.ones(inputs, enc_len, dtype=torch.bool, device=device)
        self.encoder_mask = encoder_mask.bool()
        self.encoder_lengths = self.encoder_mask.sum(-1, dtype=torch.int32)  # right padding: checked by the caller
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # tokens cached = next token's position
        self.lengths = torch.zeros(self.batch, dtype=torch.int32, device=device)  # the same, per row (kernel)
        # One bias lookup table per distinct table (T5 shares one; UMT5 has one per layer), indexed by
        # rel + max_distance with rel clamped to +-max_distance: exact, buckets are constant beyond.
        lut = bucket_lut(False, config.num_buckets, config.max_distance, device=device).long()
        made: dict[int, Tensor] = {}
        self.bias_luts = []
        for table in bias_tables:
            if id(table) not in made:
                if kernel == "triton":
                    from t5core.kernels.decode import decode_bias_lut

                    made[id(table)] = decode_bias_lut(table, bidirectional=False, num_buckets=config.num_buckets,
                                                      max_distance=config.max_distance)
                else:
                    made[id(table)] = table.detach()[lut].t().contiguous()  # [H, 2*max_distance + 1]
            self.bias_luts.append(made[id(table)])

    def begin_step(self) -> Tensor:
        """Keys visible to this step's (single) query, per row: [B] int32 = cached + 1."""
        return self.lengths + 1

    def write_self(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Write one token's K/V [B, H, 1, D] at `position` (device index: no host sync)."""
        self.self_k[layer].index_copy_(2, self.position, keys)
        self.self_v[layer].index_copy_(2, self.position, values)

    def end_step(self) -> None:
        self.position.add_(1)
        self.lengths.add_(1)

    def attend_self(self, layer: int, q: Tensor, key_lengths: Tensor) -> Tensor:
        """Causal self-attention of q [B, H, 1, D] (at position key_lengths - 1) over the cache."""
        keys, values, lut = self.self_k[layer], self.self_v[layer], self.bias_luts[layer]
        if self.kernel == "triton":
            from t5core.kernels.decode import decode_attention

            return decode_attention(q, keys, values, key_lengths, lut, causal=True, max_distance=self.max_distance)
        positions = torch.arange(self.max_length, device=q.device)
        rel = positions[None, :] - (key_lengths[:, None] - 1)  # [B, max_length]: k - q, true positions
        bias = lut[:, rel.clamp(-self.max_distance, self.max_distance) + self.max_distance]  # [H, B, max_length]
        visible = positions[None, :] < key_lengths[:, None]  # causal and written: the same set here
        return attend_block(q, keys, values, bias.transpose(0, 1)[:, :, None, :], visible)

    def attend_cross(self, layer: int, q: Tensor) -> Tensor:
        """Cross-attention of q [B, H, 1, D] over the encoder K/V (no bias; masked to each input's length)."""
        keys, values = self.cross_k[layer], self.cross_v[layer]
        if self.kernel == "triton":
            from t5core.kernels.decode import decode_attention

            return decode_attention(q, keys, values, self.encoder_lengths, None, q_per_kv=self.rows_per_input)
        group = self.rows_per_input  # [B, H, 1, D] -> [B / group, H, group, D]: beams share their input's keys
        inputs, heads, _, dim = keys.shape
        q_grouped = q.view(inputs, group, heads, dim).transpose(1, 2)
        out = attend_block(q_grouped, keys, values, None, self.encoder_mask)
        return out.transpose(1, 2).reshape(inputs * group, heads, 1, dim)

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (beam search) in place. rows stay within each input's beams, so the
        shared cross-attention K/V and the lengths (equal in every row) need no change."""
        for tensors in (self.self_k, self.self_v):
            for t in tensors:
                t.copy_(t.index_select(0, rows))
