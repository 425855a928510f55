"""Flash decoding: split-K attention for a few query rows against many keys.

Decoding feeds one token per step, so a normal flash kernel would run one program per
(batch, head) and leave most SMs idle while it walks 32k encoder keys. Here the key axis is
cut into `num_splits` chunks, each program does an online softmax over its chunk and writes
fp32 partials (max m, sum l, weighted values acc); a second kernel merges the chunks:

    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,   M = max_s m_s   (base-2 exps)

Scores are `q . k + table[bucket(k - q), h]` with no 1/sqrt(d) scaling (t5-facts A1). The
bias is read from a per-head row of `bias_lut` ([H, 2*max_distance + 1], log2(e) * table at
the bucket of every clamped rel), built from `bucket.bucket_lut`: the bucket arithmetic
lives in one place (kernels/bucket.py).

Two uses in the T5 decoder:
  * self-attention over the static KV cache: `causal=True` with the bias; the queries are
    the last Lq keys, i.e. query i of row b sits at position key_lengths[b] - Lq + i (the
    true position = cache length, so bucket(k - q) uses true positions);
  * cross-attention over the encoder output: no bias, not causal, key_lengths from the
    (right-padded) encoder mask.
Every length is read on the device (no host sync, CUDA-graph safe); tiles past a row's
length are skipped by the loop bound. `q_per_kv` lets `q_per_kv` consecutive query rows share
one K/V row (beam search: the K beams of an input read the same encoder K/V, stored once).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .bucket import bucket_lut, lut_lookup
from .launch import interpreting as _interpreting
from .launch import cdiv, launch

LOG2E = 1.4426950408889634
MAX_SPLITS = 128  # bounds the partial buffers and the combine loop
SPLIT_CHUNK = 16  # splits merged per iteration of the combine kernel


@triton.jit
def _split_kernel(
    Q, K, V, BiasLUT, KeyLens, PartM, PartL, PartAcc,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    num_heads, seqlen_q, keys_per_split, q_per_kv, num_splits,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, MAX_DISTANCE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    qi = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    b_kv = b // q_per_kv
    kv_len = tl.load(KeyLens + b_kv).to(tl.int32)
    q_pos = kv_len - seqlen_q + qi  # true position of this query (the cache length when decoding)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, kv_len)
    if CAUSAL:
        end = tl.minimum(end, q_pos + 1)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    bkv64 = b_kv.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + qi * stride_qm + offs_d).to(tl.float32)
    k_base = K + bkv64 * stride_kb + h64 * stride_kh
    v_base = V + bkv64 * stride_vb + h64 * stride_vh
    bias_row = BiasLUT + h * (2 * MAX_DISTANCE + 1)

    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        kmask = cols < end
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kmask[:, None],
                    other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kmask[:, None],
                    other=0.0)
        s = tl.sum(q[None, :] * k.to(tl.float32), 1) * 1.4426950408889634  # [BLOCK_N], base 2
        if HAS_BIAS:
            s += lut_lookup(cols - q_pos, bias_row, MAX_DISTANCE)
        s = tl.where(kmask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: every tile holds at least one visible key
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new

    part = (pid_bh * seqlen_q + qi) * num_splits + split
    tl.store(PartM + part, m_i)  # -inf and l = 0 for a chunk with no visible key
    tl.store(PartL + part, l_i)
    tl.store(PartAcc + part.to(tl.int64) * HEAD_DIM + offs_d, acc)


@triton.jit
def _combine_kernel(
    PartM, PartL, PartAcc, Out,
    stride_ob, stride_oh, stride_om,
    num_heads, seqlen_q, num_splits,
    HEAD_DIM: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    qi = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    row = (pid_bh * seqlen_q + qi) * num_splits
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        smask = s0 + offs_s < num_splits
        m = tl.load(PartM + row + s0 + offs_s, mask=smask, other=float("-inf"))
        l = tl.load(PartL + row + s0 + offs_s, mask=smask, other=0.0)
        a = tl.load(PartAcc + (row + s0 + offs_s).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=smask[:, None], other=0.0)
        m_new = tl.maximum(m_i, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no NaN
        w = tl.math.exp2(m - m_safe)  # 0 for empty chunks (m = -inf)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(w * l, 0)
        acc = acc * alpha + tl.sum(w[:, None] * a, 0)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)  # rows with no visible key output 0
    o_ptr = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + qi * stride_om + offs_d
    tl.store(o_ptr, out.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_n(head_dim: int) -> int:
    return 16 if _interpreting() else 64


def choose_num_splits(batch: int, heads: int, seqlen_q: int, max_keys: int, device: torch.device) -> int:
    """Splits of the key axis: about 8 programs per SM, at least one key tile per split.

    Depends only on static shapes (CUDA graphs replay the same launch). Batch 1 with 32k keys
    gets 88 splits on an H200 (132 SMs): measured there 51.5 us against 57.8 us with 44 and
    57.2 us with 128 (tools/profile_model.py --splits); batch 32 with 512 keys gets 3.
    """
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    tiles = cdiv(max(max_keys, 1), _block_n(0))
    want = cdiv(8 * sms, batch * heads * seqlen_q)
    return max(1, min(want, tiles, MAX_SPLITS))


@functools.lru_cache(maxsize=32)
def _bucket_lut_on(bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    return bucket_lut(bidirectional, num_buckets, max_distance, device=device).long()


def decode_bias_lut(table: torch.Tensor, *, bidirectional: bool = False, num_buckets: int = 32,
                    max_distance: int = 128) -> torch.Tensor:
    """[H, 2*max_distance + 1] fp32: log2(e) * table[bucket(rel), h] for rel in [-max_distance, max_distance].

    Build it once per table (e.g. when a generation's cache is allocated), outside any CUDA graph.
    """
    lut = _bucket_lut_on(bidirectional, num_buckets, max_distance, table.device)
    return (table.detach().float() * LOG2E)[lut].t().contiguous()


def _check(q, k, v, key_lengths, bias_lut, max_distance, q_per_kv):
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {d}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[1] != q.shape[1] or k.shape[-1] != d:
        raise ValueError(f"k, v must be [B/q_per_kv, H, Lk, D] like q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] * q_per_kv:
        raise ValueError(f"q has {q.shape[0]} rows, k has {k.shape[0]} with q_per_kv={q_per_kv}")
    if key_lengths.shape != (k.shape[0],):
        raise ValueError(f"key_lengths must be [{k.shape[0]}] (one per K/V row), got {tuple(key_lengths.shape)}")
    if bias_lut is not None and bias_lut.shape != (q.shape[1], 2 * max_distance + 1):
        raise ValueError(f"bias_lut must be [H, 2*max_distance+1] = [{q.shape[1]}, {2 * max_distance + 1}], "
                         f"got {tuple(bias_lut.shape)} (build it with decode_bias_lut)")


# Tests set this: partials and outputs start as NaN, so anything the kernels fail to write shows.
POISON_OUTPUTS = False


def _new(shape, dtype, device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf.fill_(float("nan")) if POISON_OUTPUTS else buf


def decode_attention(
    q: torch.Tensor,  # [B, H, Lq, D], Lq small (1 when decoding)
    k: torch.Tensor,  # [B / q_per_kv, H, Lk, D]: the whole preallocated buffer
    v: torch.Tensor,
    key_lengths: torch.Tensor,  # [B / q_per_kv] ints on the device: valid keys per K/V row
    bias_lut: torch.Tensor | None = None,  # from decode_bias_lut; None = no bias (cross-attention)
    *,
    causal: bool = False,
    max_distance: int = 128,
    q_per_kv: int = 1,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, H, Lq, D]
    """softmax(q kᵀ + bias) v over keys [0, key_lengths[b]) of each row, split over the key axis.

    Query i of row b sits at position key_lengths[b // q_per_kv] - Lq + i (used by the bias
    and, with `causal`, to hide later keys). Rows with no visible key output 0.
    """
    _check(q, k, v, key_lengths, bias_lut, max_distance, q_per_kv)
    if q.stride(-1) != 1:
        q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    batch, heads, seqlen_q, head_dim = q.shape
    max_keys = k.shape[2]
    block_n = _block_n(head_dim)
    if num_splits is None:
        num_splits = choose_num_splits(batch, heads, seqlen_q, max_keys, q.device)
    keys_per_split = cdiv(cdiv(max(max_keys, 1), num_splits), block_n) * block_n
    num_splits = cdiv(max(max_keys, 1), keys_per_split)  # no split that starts past the buffer
    part_m = _new((batch, heads, seqlen_q, num_splits), torch.float32, q.device)
    part_l = _new(part_m.shape, torch.float32, q.device)
    part_acc = _new((batch, heads, seqlen_q, num_splits, head_dim), torch.float32, q.device)
    if out is None:
        out = _new(q.shape, q.dtype, q.device)
    has_bias = bias_lut is not None
    warps = 4 if head_dim <= 64 else 8
    launch(
        _split_kernel, (num_splits, batch * heads, seqlen_q),
        q, k, v, bias_lut if has_bias else part_m, key_lengths, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        heads, seqlen_q, keys_per_split, q_per_kv, num_splits,
        HAS_BIAS=has_bias, CAUSAL=causal, MAX_DISTANCE=max_distance if has_bias else 1,
        HEAD_DIM=head_dim, BLOCK_N=block_n, num_warps=warps,
    )
    launch(
        _combine_kernel, (batch * heads, seqlen_q),
        part_m, part_l, part_acc, out, out.stride(0), out.stride(1), out.stride(2),
        heads, seqlen_q, num_splits, HEAD_DIM=head_dim, SPLIT_CHUNK=SPLIT_CHUNK, num_warps=warps,
    )
    return out


__all__ = ["decode_attention", "decode_bias_lut", "choose_num_splits", "MAX_SPLITS"]
