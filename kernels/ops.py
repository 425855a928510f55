"""Custom ops (`torch.library`, namespace t5core) and the public attention functions.

The ops are opaque to torch.compile (it traces callers without graph breaks and calls the
Triton launchers at run time); `register_fake` gives their output shapes and
`register_autograd` wires the backward op, so no separate autograd.Function is needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import flash


def _lse_shape(q: Tensor, varlen: bool):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[1], q.shape[2])


# ---- fixed-length [B, H, L, D] ---------------------------------------------------------------


@torch.library.custom_op("t5core::flash_attention_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], key_lengths: Optional[Tensor],
         bidirectional: bool, num_buckets: int, max_distance: int, causal: bool, q_offset: int
         ) -> tuple[Tensor, Tensor]:
    return flash.forward(q, k, v, table, key_lengths, None, None, 0, 0,
                         bidirectional, num_buckets, max_distance, causal, q_offset)


@_fwd.register_fake
def _(q, k, v, table, key_lengths, bidirectional, num_buckets, max_distance, causal, q_offset):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(_lse_shape(q, False),
                                                                                     dtype=torch.float32)


@torch.library.custom_op("t5core::flash_attention_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Optional[Tensor],
         key_lengths: Optional[Tensor], bidirectional: bool, num_buckets: int, max_distance: int, causal: bool,
         q_offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return flash.backward(do, q, k, v, out, lse, table, key_lengths, None, None, 0, 0,
                          bidirectional, num_buckets, max_distance, causal, q_offset)


@_bwd.register_fake
def _(do, q, k, v, out, lse, table, key_lengths, bidirectional, num_buckets, max_distance, causal, q_offset):
    dtable = torch.empty_like(table) if table is not None else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dtable)


def _fwd_setup(ctx, inputs, output):
    q, k, v, table, key_lengths, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, key_lengths)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, table, key_lengths = ctx.saved_tensors
    dq, dk, dv, dtable = _bwd(dout, q, k, v, out, lse, table, key_lengths, *ctx.params)
    return dq, dk, dv, (dtable if table is not None else None), None, None, None, None, None, None


_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ---- packed varlen [T, H, D] -------------------------------------------------------------------


@torch.library.custom_op("t5core::flash_attention_varlen_fwd", mutates_args=())
def _varlen_fwd(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], cu_seqlens_q: Tensor,
                cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, bidirectional: bool,
                num_buckets: int, max_distance: int, causal: bool) -> tuple[Tensor, Tensor]:
    return flash.forward(q, k, v, table, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         bidirectional, num_buckets, max_distance, causal, 0)


@_varlen_fwd.register_fake
def _(q, k, v, table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bidirectional, num_buckets,
      max_distance, causal):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(_lse_shape(q, True),
                                                                                     dtype=torch.float32)


@torch.library.custom_op("t5core::flash_attention_varlen_bwd", mutates_args=())
def _varlen_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Optional[Tensor],
                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                bidirectional: bool, num_buckets: int, max_distance: int, causal: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return flash.backward(do, q, k, v, out, lse, table, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, bidirectional, num_buckets, max_distance, causal, 0)


@_varlen_bwd.register_fake
def _(do, q, k, v, out, lse, table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bidirectional,
      num_buckets, max_distance, causal):
    dtable = torch.empty_like(table) if table is not None else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dtable)


def _varlen_setup(ctx, inputs, output):
    q, k, v, table, cu_q, cu_k, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, cu_q, cu_k)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, table, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv, dtable = _varlen_bwd(dout, q, k, v, out, lse, table, cu_q, cu_k, *ctx.params)
    return dq, dk, dv, (dtable if table is not None else None), None, None, None, None, None, None, None, None


_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ---- public API ------------------------------------------------------------------------------


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], *,
    bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128,
    causal: bool = False, q_offset: int = 0, key_lengths: Optional[Tensor] = None,
    deterministic: bool = True,
) -> Tensor:
    """T5 attention softmax(q kᵀ + table[bucket(k - q), h]) v, no 1/sqrt(d) scaling (t5-facts A1).

    q: [B, H, Lq, D], k, v: [B, H, Lk, D] (last dim contiguous), table: [num_buckets, H] or None
    (no bias, e.g. cross-attention). Query row i sits at position i + q_offset; with `causal`,
    keys after that position are masked. key_lengths: [B] ints on the device; keys at index
    >= key_lengths[b] are masked. Rows that see no key output 0. Returns [B, H, Lq, D].
    The backward is always deterministic (no atomics); `deterministic` is accepted for API
    stability.
    """
    del deterministic
    out, _ = _fwd(q, k, v, table, key_lengths, bidirectional, num_buckets, max_distance, causal, q_offset)
    return out


def flash_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, *, bidirectional: bool = True, num_buckets: int = 32,
    max_distance: int = 128, causal: bool = False, deterministic: bool = True,
) -> Tensor:
    """Packed documents: q [Tq, H, D], k, v [Tk, H, D]; document b holds rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] (int32 on the device). Positions restart at 0 in every
    document (causal masks k > q within a document). Returns [Tq, H, D]."""
    del deterministic
    out, _ = _varlen_fwd(q, k, v, table, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                         bidirectional, num_buckets, max_distance, causal)
    return out
