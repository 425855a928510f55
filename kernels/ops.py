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


# The trailing (pattern, radius, block_size, num_global) describe a sparse pattern
# (flash.Pattern; 0 = dense): the sparse modes are the same op over fewer key tiles.
@torch.library.custom_op("t5core::flash_attention_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], key_lengths: Optional[Tensor],
         bidirectional: bool, num_buckets: int, max_distance: int, causal: bool, q_offset: int,
         pattern: int = 0, radius: int = 0, block_size: int = 1, num_global: int = 0) -> tuple[Tensor, Tensor]:
    return flash.forward(q, k, v, table, key_lengths, None, None, 0, 0, bidirectional, num_buckets, max_distance,
                         causal, q_offset, flash.Pattern(pattern, radius, block_size, num_global))


@_fwd.register_fake
def _(q, k, v, table, key_lengths, bidirectional, num_buckets, max_distance, causal, q_offset, pattern=0, radius=0,
      block_size=1, num_global=0):
    return flash.empty_like_input(q), q.new_empty(_lse_shape(q, False), dtype=torch.float32)


@torch.library.custom_op("t5core::flash_attention_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Optional[Tensor],
         key_lengths: Optional[Tensor], bidirectional: bool, num_buckets: int, max_distance: int, causal: bool,
         q_offset: int, pattern: int = 0, radius: int = 0, block_size: int = 1, num_global: int = 0,
         table_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return flash.backward(do, q, k, v, out, lse, table, key_lengths, None, None, 0, 0, bidirectional, num_buckets,
                          max_distance, causal, q_offset, flash.Pattern(pattern, radius, block_size, num_global),
                          table_grad)


@_bwd.register_fake
def _(do, q, k, v, out, lse, table, key_lengths, bidirectional, num_buckets, max_distance, causal, q_offset,
      pattern=0, radius=0, block_size=1, num_global=0, table_grad=True):
    dtable = torch.empty_like(table) if table is not None and table_grad else q.new_empty(0)
    return flash.empty_like_input(q), flash.empty_like_input(k), flash.empty_like_input(v), dtable


def _fwd_setup(ctx, inputs, output):
    q, k, v, table, key_lengths, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, key_lengths)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, table, key_lengths = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[3]  # a frozen table: no per-bucket dS sums
    dq, dk, dv, dtable = _bwd(dout, q, k, v, out, lse, table, key_lengths, *ctx.params, table_grad=table_grad)
    return (dq, dk, dv, (dtable if table_grad else None)) + (None,) * (len(ctx.params) + 1)


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
    return flash.empty_like_input(q), q.new_empty(_lse_shape(q, True), dtype=torch.float32)


@torch.library.custom_op("t5core::flash_attention_varlen_bwd", mutates_args=())
def _varlen_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Optional[Tensor],
                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                bidirectional: bool, num_buckets: int, max_distance: int, causal: bool, table_grad: bool = True
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return flash.backward(do, q, k, v, out, lse, table, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, bidirectional, num_buckets, max_distance, causal, 0, table_grad=table_grad)


@_varlen_bwd.register_fake
def _(do, q, k, v, out, lse, table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bidirectional,
      num_buckets, max_distance, causal, table_grad=True):
    dtable = torch.empty_like(table) if table is not None and table_grad else q.new_empty(0)
    return flash.empty_like_input(q), flash.empty_like_input(k), flash.empty_like_input(v), dtable


def _varlen_setup(ctx, inputs, output):
    q, k, v, table, cu_q, cu_k, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, cu_q, cu_k)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, table, cu_q, cu_k = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dtable = _varlen_bwd(dout, q, k, v, out, lse, table, cu_q, cu_k, *ctx.params, table_grad=table_grad)
    return dq, dk, dv, (dtable if table_grad else None), None, None, None, None, None, None, None, None


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
    stability. A table that does not require grad (frozen) gets none, and the backward skips
    its per-bucket sums.
    """
    del deterministic
    out, _ = _fwd(q, k, v, table, key_lengths, bidirectional, num_buckets, max_distance, causal, q_offset)
    return out


SPARSE_PATTERNS = {"local": 1, "block": 2}


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], *, pattern: str,
    local_radius: int = 127, block_size: int = 512, num_global: int = 16,
    key_lengths: Optional[Tensor] = None, bidirectional: bool = True, num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """Sparse encoder self-attention (docs/sparse.md) by the flash kernels over only the visible tiles.

    pattern "local": query i sees keys with |i - k| <= local_radius; "block": keys in its own
    block of block_size and the first num_global keys, and the first num_global queries see
    every key. q, k, v: [B, H, L, D]; key_lengths: [B] ints (right padding): keys and queries
    at index >= key_lengths[b] are padding, and padded query rows output 0. Bias: the table at
    bucket(k - q) with true positions. Gradients flow to q, k, v and the table.
    """
    if pattern not in SPARSE_PATTERNS:
        raise ValueError(f"pattern must be one of {sorted(SPARSE_PATTERNS)}, got {pattern!r}")
    length = q.shape[-2]
    # A block or a leading part longer than the input changes nothing; clamping keeps the
    # kernels' compile-time constants few.
    block_size, num_global = min(block_size, max(length, 1)), min(num_global, length)
    out, _ = _fwd(q, k, v, table, key_lengths, bidirectional, num_buckets, max_distance, False, 0,
                  SPARSE_PATTERNS[pattern], local_radius if pattern == "local" else 0,
                  block_size if pattern == "block" else 1, num_global if pattern == "block" else 0)
    return out


# ---- transient-global: the local window and the side keys in one softmax ---------------------


@torch.library.custom_op("t5core::transient_global_fwd", mutates_args=())
def _tglobal_fwd(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], side_k: Tensor, side_v: Tensor,
                 global_table: Tensor, block_ids: Tensor, key_lengths: Optional[Tensor], local_radius: int,
                 num_buckets: int, max_distance: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, side_lengths): the last two for the backward."""
    out, lse = flash.forward(q, k, v, table, key_lengths, None, None, 0, 0, True, num_buckets, max_distance, False,
                             0, flash.Pattern(1, local_radius, 1, 0))
    side_lengths = (block_ids.max(-1).values + 1).clamp_min(0).to(torch.int32)  # [B]: side keys row b sees
    if side_k.shape[2] > 0:  # the side keys' softmax merged into the window's, in place
        lut = flash.side_lut(global_table, num_buckets, max_distance)
        out, lse = flash.side_forward(q, side_k, side_v, lut, block_ids, side_lengths, out, lse)
    return out, lse, side_lengths


@_tglobal_fwd.register_fake
def _(q, k, v, table, side_k, side_v, global_table, block_ids, key_lengths, local_radius, num_buckets, max_distance):
    return (flash.empty_like_input(q), q.new_empty(_lse_shape(q, False), dtype=torch.float32),
            block_ids.new_empty(block_ids.shape[0], dtype=torch.int32))


@torch.library.custom_op("t5core::transient_global_bwd", mutates_args=())
def _tglobal_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], side_k: Tensor,
                 side_v: Tensor, global_table: Tensor, block_ids: Tensor, side_lengths: Tensor,
                 key_lengths: Optional[Tensor], out: Tensor, lse: Tensor, local_radius: int, num_buckets: int,
                 max_distance: int, table_grad: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Each part's gradient from the merged softmax: P = 2^(S - lse) with the merged lse, and
    # delta from the merged output, as for any attention over a union of key sets.
    has_side = side_k.shape[2] > 0
    delta = flash.row_delta(out, dout)
    dq, dk, dv, dtable = flash.backward(dout, q, k, v, out, lse, table, key_lengths, None, None, 0, 0, True,
                                        num_buckets, max_distance, False, 0, flash.Pattern(1, local_radius, 1, 0),
                                        table_grad, delta=delta, dq_dtype=torch.float32 if has_side else None)
    if has_side:  # the side dq kernel adds its part to the local fp32 dq and rounds the sum once
        dq, d_side_k, d_side_v, d_global = flash.side_backward(
            dout, q, side_k, side_v, lse, delta, dq, global_table, block_ids, side_lengths, num_buckets, max_distance)
    else:
        d_side_k, d_side_v = torch.zeros_like(side_k), torch.zeros_like(side_v)
        d_global = torch.zeros_like(global_table)
    return dq, dk, dv, dtable, d_side_k, d_side_v, d_global  # dtable: empty for no table or a frozen one


@_tglobal_bwd.register_fake
def _(dout, q, k, v, table, side_k, side_v, global_table, block_ids, side_lengths, key_lengths, out, lse,
      local_radius, num_buckets, max_distance, table_grad=True):
    dtable = torch.empty_like(table) if table is not None and table_grad else q.new_empty(0)
    return (flash.empty_like_input(q), flash.empty_like_input(k), flash.empty_like_input(v), dtable,
            torch.empty_like(side_k), torch.empty_like(side_v), torch.empty_like(global_table))


def _tglobal_setup(ctx, inputs, output):
    q, k, v, table, side_k, side_v, global_table, block_ids, key_lengths, *params = inputs
    out, lse, side_lengths = output
    ctx.save_for_backward(q, k, v, table, side_k, side_v, global_table, block_ids, side_lengths, key_lengths, out,
                          lse)
    ctx.params = params
    ctx.mark_non_differentiable(lse, side_lengths)


def _tglobal_backward(ctx, dout, _dlse, _dside_lengths):
    q, k, v, table, side_k, side_v, global_table, block_ids, side_lengths, key_lengths, out, lse = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[3]  # a frozen local table: no per-bucket dS sums
    dq, dk, dv, dtable, d_side_k, d_side_v, d_global = _tglobal_bwd(
        dout, q, k, v, table, side_k, side_v, global_table, block_ids, side_lengths, key_lengths, out, lse,
        *ctx.params, table_grad=table_grad)
    return (dq, dk, dv, dtable if table_grad else None, d_side_k, d_side_v, d_global, None, None, None, None, None)


_tglobal_fwd.register_autograd(_tglobal_backward, setup_context=_tglobal_setup)


def transient_global_attention(
    q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], side_k: Tensor, side_v: Tensor,
    global_table: Tensor, block_ids: Tensor, *, local_radius: int, key_lengths: Optional[Tensor] = None,
    num_buckets: int = 32, max_distance: int = 128,
) -> Tensor:
    """LongT5 transient-global encoder attention by the kernels, forward and backward.

    One softmax over the `local` window (|k - q| <= local_radius, `table` at bucket(k - q)) and
    the side keys: side_k, side_v [B, H, G, D]; `global_table` [num_buckets, H] at the
    bidirectional bucket of g - block_ids[b, i]; block_ids [B, L] (-1: sees no side key), row b
    having max(block_ids[b]) + 1 side keys (t5core.sparse.make_layout gives both; the backward
    needs them nondecreasing along a row, then -1 on the right padding, and checks). q, k, v
    [B, H, L, D]; key_lengths [B] (right padding): padded query rows output 0. Gradients reach
    q, k, v, both tables and the side keys and values. Like the other attention functions it is a
    pair of torch.library ops, which torch.compile traces without a graph break.
    """
    out, _, _ = _tglobal_fwd(q, k, v, table, side_k, side_v, global_table, block_ids, key_lengths, local_radius,
                             num_buckets, max_distance)
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
