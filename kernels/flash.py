"""FlashAttention-2 with the T5 relative position bias computed inside the kernel.

Scores are `q . k + table[bucket(k - q), h]` with no 1/sqrt(d) scaling (t5-facts A1). The
bias is never materialised: the kernels read a per-head row of `bias_lut`, the bias of every
rel a near tile can hold (see `bucket.py` and `_bias_lut_kernel`). `reach` is where the
buckets stop changing (`bucket_reach`: 91 for T5's 32 bidirectional buckets and max_distance
128, 113 causal), at or before max_distance; the kernels call it REACH.

Tiles are sorted into three kinds per (query block, key block) pair:
  * far-left:  every rel <= -reach, so the bias is one scalar per head (the table at
    the "far before" bucket); it is folded into the exp2 offset, no per-score work.
  * far-right: every rel >= +reach, likewise with the "far after" bucket.
  * near:      anything else. A near tile gathers its bias from the row at c + (j - i),
    c = n0 - m0 - q_offset, in the scores' own register layout, and starts its score
    accumulator there (tl.dot(q, kT, acc=bias)). The causal mask is applied here only.
Loops run over far-left tiles, then near tiles, then far-right tiles, then at most one
partial (masked) key tile whose bias is gathered with a clamp, so the common case pays for
no mask and no bias.

Backward (deterministic, no atomics):
  * `_bwd_dq_kernel`: one program per query block stores its rows' delta = rowsum(dO * O)
    (ROW_DELTA; for `block` and transient-global a kernel of its own computes it first), then
    walks the key blocks (dq) and reduces dS
    for the table gradient. A bucket is a run of consecutive rel values, so with
    E_k = sum of dS over rel < (end of run k), run k gets E_k - E_(k-1). Near tiles add every
    row's E_k (one row cumsum and one gather) to a per-row accumulator, far tiles their row
    sums; each program reduces its rows once, differences E into run sums and writes them
    [runs] (fp32); torch sums the programs in a fixed order and maps runs to buckets.
  * `_bwd_dkdv_kernel` (after it: it reads delta): one program per key block walks the query
    blocks (dk, dv).
Masked entries (causal, padding, rows and columns past a sequence end) have p = 0, hence
dS = 0, so they contribute nothing to any gradient.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bucket import bucket_lut, bucket_reach, lut_gather, lut_gather_pairs, lut_lookup
from .launch import interpreting as _interpreting
from .launch import cdiv, launch, next_power_of_2

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    # fp32 inputs use exact fp32 products (no tf32) so results match a float64 reference.
    if FP32_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b: near tiles start the score accumulator at their bias block, so the bias
    costs no extra register tile and no extra add (keeps the far loops' occupancy)."""
    if FP32_DOT:
        return tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def _seq_bounds(b, seqlen_q, seqlen_k, KeyLens, CuQ, CuK, HAS_KEYLENS: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, kv_len) of sequence b: rows [q_start, q_start + q_len) etc."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int32)
        q_len = tl.load(CuQ + b + 1).to(tl.int32) - q_start
        k_start = tl.load(CuK + b).to(tl.int32)
        kv_len = tl.load(CuK + b + 1).to(tl.int32) - k_start
    else:
        q_start = b * 0
        q_len = b * 0 + seqlen_q
        k_start = b * 0
        kv_len = b * 0 + seqlen_k
        if HAS_KEYLENS:
            kv_len = tl.minimum(tl.maximum(tl.load(KeyLens + b).to(tl.int32), 0), seqlen_k)
    return q_start, q_len, k_start, kv_len


@triton.jit
def _key_regions(m0, q_offset, kv_len, DIST: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Key-tile boundaries for query rows [m0, m0 + BLOCK_M) at positions + q_offset.

    Returns (left_end, right_start, n_full, hi): far-left tiles [0, left_end), near tiles
    [left_end, right_start), far-right tiles [right_start, n_full), and one masked tile at
    n_full if n_full < hi. All boundaries are multiples of BLOCK_N.
    """
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + q_offset)  # keys past the last row's position are masked
    hi = tl.maximum(hi, 0)
    n_full = (hi // BLOCK_N) * BLOCK_N
    left_end, right_start = _far_bounds(m0 + q_offset, m0 + BLOCK_M - 1 + q_offset, n_full, DIST, BLOCK_N)
    return left_end, right_start, n_full, hi


@triton.jit
def _far_bounds(lo_pos, hi_pos, n_full, DIST: tl.constexpr, BLOCK_N: tl.constexpr):
    """(left_end, right_start) for query positions in [lo_pos, hi_pos] and key tiles below n_full:
    key tiles [0, left_end) are far-left (every rel <= -DIST), [right_start, n_full) far-right
    (every rel >= DIST); both multiples of BLOCK_N, left_end <= right_start <= n_full."""
    x = lo_pos - DIST - BLOCK_N + 1  # far-left: n0 + BLOCK_N - 1 - lo_pos <= -DIST
    left_end = tl.minimum(tl.where(x >= 0, (x // BLOCK_N + 1) * BLOCK_N, 0), n_full)
    right_start = tl.cdiv(hi_pos + DIST, BLOCK_N) * BLOCK_N  # far-right: n0 - hi_pos >= DIST
    return left_end, tl.maximum(tl.minimum(right_start, n_full), left_end)


# ----------------------------------------------------------------------------------------------
# Sparse patterns (docs/sparse.md): one kernel, the same loops, fewer key tiles
# ----------------------------------------------------------------------------------------------
# A sparse pattern is a visibility predicate on (query, key) positions. Both patterns here are
# symmetric (visible(q, k) == visible(k, q)), so one helper gives the other-axis tiles of a
# query tile (forward, dq) and of a key tile (dk/dv). Tiles where every pair is visible run
# the dense loops unchanged (far-left / near / far-right: the far-tile trick still applies
# when the window is wider than the reach); the few boundary tiles gather their bias per
# score and apply the predicate.

DENSE: tl.constexpr = tl.constexpr(0)
LOCAL: tl.constexpr = tl.constexpr(1)  # |k - q| <= RADIUS
BLOCK: tl.constexpr = tl.constexpr(2)  # same block of SBLOCK, or k < NUM_GLOBAL, or q < NUM_GLOBAL


@triton.jit
def _visible(q_pos, k_pos, PATTERN: tl.constexpr, RADIUS: tl.constexpr, SBLOCK: tl.constexpr,
             NUM_GLOBAL: tl.constexpr):
    """Whether query q_pos sees key k_pos (broadcast shapes) under a sparse pattern."""
    if PATTERN == LOCAL:
        return tl.abs(k_pos - q_pos) <= RADIUS
    else:
        return ((q_pos // SBLOCK) == (k_pos // SBLOCK)) | (k_pos < NUM_GLOBAL) | (q_pos < NUM_GLOBAL)


@triton.jit
def _sparse_ranges(t0, t1, length, n_full, PATTERN: tl.constexpr, RADIUS: tl.constexpr, SBLOCK: tl.constexpr,
                   NUM_GLOBAL: tl.constexpr, U: tl.constexpr):
    """Tiles of the other axis (starts are multiples of U, positions < length) that the own
    positions [t0, t1) can see. Returns (lead_end, a0, i0, i1, e1): masked tiles [0, lead_end)
    and [a0, i0), tiles with every pair visible [i0, i1) (whole tiles, ending at or before
    n_full), masked tiles [i1, e1). The ranges are disjoint, so a key visible twice over
    (a leading key inside the query's own block) is still counted once.
    block: t0 >= NUM_GLOBAL. The global rows and keys see everything; the split kernels do
    them, and a tile holding some passes t0 = NUM_GLOBAL (its block positions only)."""
    end = tl.cdiv(length, U) * U
    if PATTERN == LOCAL:
        lead_end = t0 * 0
        a0 = (tl.maximum(t0 - RADIUS, 0) // U) * U
        e1 = tl.cdiv(tl.minimum(t1 + RADIUS, length), U) * U
        # every pair visible: n >= t1 - 1 - R and n + U - 1 <= t0 + R
        i0 = tl.cdiv(tl.maximum(t1 - 1 - RADIUS, 0), U) * U
        i1 = ((t0 + RADIUS + 1) // U) * U
    else:
        lead_end = tl.minimum(tl.cdiv(NUM_GLOBAL, U) * U, end)
        b_first = t0 // SBLOCK
        b_last = (tl.minimum(t1, length) - 1) // SBLOCK
        a0 = tl.maximum((b_first * SBLOCK // U) * U, lead_end)
        e1 = tl.cdiv(tl.minimum((b_last + 1) * SBLOCK, length), U) * U
        i0 = tl.cdiv(b_first * SBLOCK, U) * U
        i1 = tl.where(b_first != b_last, i0, ((b_first + 1) * SBLOCK // U) * U)
    e1 = tl.maximum(tl.minimum(e1, end), a0)
    i0 = tl.minimum(tl.maximum(i0, a0), e1)
    i1 = tl.minimum(tl.maximum(tl.minimum(i1, n_full), i0), e1)
    live = t0 < length  # an own tile wholly past the length (padding) sees nothing
    return (tl.where(live, lead_end, 0), tl.where(live, a0, 0), tl.where(live, i0, 0), tl.where(live, i1, 0),
            tl.where(live, e1, 0))


@triton.jit
def _query_tile_ranges(t0, t1, kv_len, left_end, right_start, n_full, PATTERN: tl.constexpr, RADIUS: tl.constexpr,
                       SBLOCK: tl.constexpr, NUM_GLOBAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile ranges of query rows [t0, t1) for the forward and dq kernels: masked [0, lead_end) and
    [a0, i0), fully visible far-left [i0, f0), near [f0, f1), far-right [f1, i1), masked [i1, e1).
    Dense: everything below n_full is visible (the one partial tile is the callers' business)."""
    if PATTERN == DENSE:
        zero = t0 * 0
        return zero, zero, zero, left_end, right_start, n_full, n_full  # _key_regions keeps these in [0, n_full]
    else:
        lead_end, a0, i0, i1, e1 = _sparse_ranges(t0, t1, kv_len, n_full, PATTERN, RADIUS, SBLOCK, NUM_GLOBAL,
                                                  BLOCK_N)
        f0 = tl.minimum(tl.maximum(left_end, i0), i1)
        f1 = tl.minimum(tl.maximum(right_start, f0), i1)
        return lead_end, a0, i0, f0, f1, i1, e1


# ----------------------------------------------------------------------------------------------
# The per-call bias table
# ----------------------------------------------------------------------------------------------
# A near tile's bias is a gather from one small fp32 row per head, read in the scores' MMA
# register layout (bucket.lut_gather_pairs: an elementwise op, so Triton neither converts a
# coalesced tile through shared memory nor spends a register tile on it). Entry rel of the row,
# bias_lut[h, rel + lut_w], is the pair (bias at rel, bias at rel + 1), so two neighbouring
# scores of a row take one 8-byte load; tl.join + reshape put the pair's halves in the
# neighbouring columns (exact whatever the layout; with the MMA layout's column pairs they cost
# nothing). Inside a tile the rels are c + j - i with c = n0 - m0 - q_offset: one scalar per tile
# plus a constant tile, so each thread reads from one base address at immediate offsets (16
# loads for its 32 scores of a 64x64 tile, sm90). The row spans every rel a near tile can hold, +-lut_w with
# lut_w = max(reach, window) + BLOCK_M + BLOCK_N, so near tiles read it without a clamp;
# tiles that can lie anywhere (partial, sparse-boundary, side-key tiles) clamp rel to +-reach.

FAR: tl.constexpr = tl.constexpr(0)  # constant bias (or none): folded into the exp2 offset
NEAR: tl.constexpr = tl.constexpr(1)  # rels within the bias row: c + (j - i), no clamp
ANY: tl.constexpr = tl.constexpr(2)  # any tile, any query positions: rel clamped to +-reach
NEAR_AHEAD: tl.constexpr = tl.constexpr(3)  # NEAR, each tile's bias gathered during the tile before


@triton.jit
def _bias_lut_kernel(Table, stride_tb, stride_th, BucketLUT, BiasLUT, lut_w, REACH: tl.constexpr,
                     WINDOW: tl.constexpr, CHUNK: tl.constexpr):
    """BiasLUT[h, i] = table[bucket(rel), h] for rel = i - lut_w in [-lut_w, lut_w], straight from the
    table through the bucket LUT (one launch, no torch ops per call). WINDOW >= 0 (the `local`
    pattern): -inf where |rel| > WINDOW, the window's mask folded in."""
    h = tl.program_id(0)
    width = 2 * lut_w + 1
    for start in range(0, width, CHUNK):
        i = start + tl.arange(0, CHUNK)
        for second in tl.static_range(2):  # entry i holds (bias at rel, bias at rel + 1)
            rel = i + second - lut_w
            bucket = lut_lookup(rel, BucketLUT, REACH)
            value = tl.load(Table + bucket * stride_tb + h * stride_th).to(tl.float32)
            if WINDOW >= 0:
                value = tl.where((rel <= WINDOW) & (rel >= -WINDOW), value, float("-inf"))
            tl.store(BiasLUT + h * 2 * width + 2 * i + second, value, mask=i < width)


@triton.jit
def _bias_center(BiasLUT, h, lut_w):
    """Rel 0 of head h's bias row: entry rel (at 2 * rel) is the pair (bias at rel, bias at rel + 1)."""
    return BiasLUT + h * (4 * lut_w + 2) + 2 * lut_w


@triton.jit
def _tile_bias(c, q_pos, cols, bias_row, MODE: tl.constexpr, REACH: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The bias of one tile of scores, [BLOCK_Q queries, BLOCK_K keys] (or [keys, queries] when
    TRANSPOSED). NEAR: at c + (j - i), c = the tile's first key minus its first query position
    (the rels are within the bias row). ANY: at key - query position, clamped to +-REACH."""
    if MODE == NEAR:
        # Two neighbouring scores at once: one 8-byte load of a row entry (bias at x, at x + 1).
        # The pair of rel x is at 2 * x floats from rel 0: the offsets below are 2 * x.
        if TRANSPOSED:  # [keys, queries]: queries 2p and 2p + 1 are rels x and x - 1
            pair_off = 2 * tl.arange(0, BLOCK_K)[:, None] - 4 * tl.arange(0, BLOCK_Q // 2)[None, :] - 2
            before, at = lut_gather_pairs(pair_off, bias_row + 2 * c)
            return tl.join(at, before).reshape(BLOCK_K, BLOCK_Q)
        else:  # [queries, keys]: keys 2p and 2p + 1 are rels x and x + 1
            pair_off = 4 * tl.arange(0, BLOCK_K // 2)[None, :] - 2 * tl.arange(0, BLOCK_Q)[:, None]
            at, after = lut_gather_pairs(pair_off, bias_row + 2 * c)
            return tl.join(at, after).reshape(BLOCK_Q, BLOCK_K)
    elif TRANSPOSED:
        return lut_gather(cols[:, None] - q_pos[None, :], bias_row, REACH)
    else:
        return lut_gather(cols[None, :] - q_pos[:, None], bias_row, REACH)


@triton.jit
def _head_bias(BiasLUT, h, lut_w, HAS_BIAS: tl.constexpr, REACH: tl.constexpr, PATTERN: tl.constexpr):
    """(rel 0 of head h's bias row, far-left bias, far-right bias), the far ones in the exp2
    domain; 0 without a bias or for `local` (no far tiles: its row is -inf beyond the window)."""
    bias_row = _bias_center(BiasLUT, h, lut_w)
    if HAS_BIAS and PATTERN != LOCAL:
        c_left = tl.load(bias_row - 2 * REACH) * LOG2E
        c_right = tl.load(bias_row + 2 * REACH) * LOG2E
    else:
        c_left = 0.0
        c_right = 0.0
    return bias_row, c_left, c_right


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, far_bias, kv_len, start,
               end, m0, q_offset, offs_n, offs_d,
               MODE: tl.constexpr, MASK_K: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
               REACH: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PATTERN: tl.constexpr, RADIUS: tl.constexpr, SBLOCK: tl.constexpr,
               NUM_GLOBAL: tl.constexpr):
    # PATTERN != DENSE: a sparse boundary tile; scores the pattern hides are masked (non-far modes only).
    # NEAR_AHEAD (interior near tiles, bias on: dense's, `block`'s and `local`'s window tiles): the
    # next tile's bias is gathered while this tile's PV dot runs, so the gathers' latency is off the
    # QK^T dot's path.
    if MODE == NEAR_AHEAD:
        ahead = _tile_bias(start - m0 - q_offset, q_pos, offs_n, bias_row, NEAR, REACH, BLOCK_M, BLOCK_N, False)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASK_K:
            kmask = cols < kv_len
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        if MODE == FAR:
            # Far tile: the bias is the scalar far_bias for every score; fold it into the offset.
            qk = _dot(q, tl.trans(k), FP32_DOT)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * LOG2E + far_bias)
            m_safe = m_new
            p = tl.math.exp2(qk * LOG2E - (m_new - far_bias)[:, None])
        else:
            # Scores stay in natural units (the bias added by the dot itself); the base-2 scaling
            # goes into the max and one FMA per score.
            if MODE == NEAR_AHEAD:
                qk = _dot_acc(q, tl.trans(k), ahead, FP32_DOT)
                ahead = _tile_bias(start_n + BLOCK_N - m0 - q_offset, q_pos, cols, bias_row, NEAR, REACH, BLOCK_M,
                                   BLOCK_N, False)  # past the last tile: still inside the row (lut_width)
            elif HAS_BIAS:
                bias = _tile_bias(start_n - m0 - q_offset, q_pos, cols, bias_row, MODE, REACH, BLOCK_M, BLOCK_N,
                                  False)
                qk = _dot_acc(q, tl.trans(k), bias, FP32_DOT)
            else:
                qk = _dot(q, tl.trans(k), FP32_DOT)
            if CAUSAL:
                qk = tl.where(cols[None, :] <= q_pos[:, None], qk, float("-inf"))
            if MASK_K:
                qk = tl.where(kmask[None, :], qk, float("-inf"))
            if PATTERN != DENSE:
                qk = tl.where(_visible(q_pos[:, None], cols[None, :], PATTERN, RADIUS, SBLOCK, NUM_GLOBAL), qk,
                              float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * LOG2E)
            # A row with no visible key so far keeps m = -inf; subtract 0 instead (no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * LOG2E - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, BiasLUT, KeyLens, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    num_heads, seqlen_q, seqlen_k, q_offset, lut_w, tune_len,
    HAS_BIAS: tl.constexpr, REACH: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KEYLENS: tl.constexpr, IS_VARLEN: tl.constexpr, FP32_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr = 0, RADIUS: tl.constexpr = 0, SBLOCK: tl.constexpr = 1, NUM_GLOBAL: tl.constexpr = 0,
    LEAD_N: tl.constexpr = 0,
):
    # LEAD_N (block, 0 < LEAD_N < BLOCK_N): the width of the leading tile for query tiles whose blocks
    # start past it, where it holds the NUM_GLOBAL global keys and nothing else visible.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, q_len, k_start, kv_len = _seq_bounds(b, seqlen_q, seqlen_k, KeyLens, CuQ, CuK, HAS_KEYLENS, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    t0 = m0  # the first row the tile's key ranges are for
    if PATTERN == BLOCK:
        if m0 + BLOCK_M <= NUM_GLOBAL:  # global rows only: _global_rows_fwd_kernel
            return
        # Rows [m0, t0) are global: this tile computes them as block rows, and
        # _global_rows_forward overwrites them afterwards.
        t0 = tl.maximum(m0, NUM_GLOBAL)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + b64 * stride_kb + h64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k_start.to(tl.int64) * stride_vn
    rmask = offs_m < q_len
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=rmask[:, None], other=0.0)
    q_pos = offs_m + q_offset

    if HAS_BIAS:
        DIST: tl.constexpr = REACH
    else:
        DIST: tl.constexpr = 1  # no bias: "far" just means fully visible
    left_end, right_start, n_full, hi = _key_regions(m0, q_offset, kv_len, DIST, CAUSAL, BLOCK_M, BLOCK_N)
    bias_row, c_left, c_right = _head_bias(BiasLUT, h, lut_w, HAS_BIAS, REACH, PATTERN)

    lead_end, a0, i0, f0, f1, i1, e1 = _query_tile_ranges(t0, m0 + BLOCK_M, kv_len, left_end, right_start, n_full,
                                                          PATTERN, RADIUS, SBLOCK, NUM_GLOBAL, BLOCK_N)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if PATTERN == LOCAL:
        # Every tile of the window reads its bias row, whose -inf beyond the radius is the window's
        # mask (_bias_lut_kernel): no predicate; keys past the length masked.
        split = tl.minimum(tl.maximum(n_full, a0), e1)
        # Each tile's bias gathered during the tile before, the first before the loop, so only where
        # the loop runs (sixteenth session: 128k forward 0.478 -> 0.446 ms, 1M even; H200).
        if a0 < split:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, 0.0,
                                       kv_len, a0, split, m0, q_offset, offs_n, offs_d, NEAR_AHEAD, False, HAS_BIAS,
                                       CAUSAL, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        # The masked loop runs for the last windows only; the `if` skips its pipeline prologue (its
        # first loads, issued before the trip count is known) everywhere else.
        if split < e1:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, 0.0,
                                       kv_len, split, e1, m0, q_offset, offs_n, offs_d, NEAR, True, HAS_BIAS, CAUSAL,
                                       REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    else:
        if PATTERN != DENSE:  # sparse boundary tiles before the visible run (leading keys, window start)
            narrow_lead = False
            if LEAD_N > 0 and LEAD_N < BLOCK_N:  # the tile's blocks start past the leading tile (a tile
                # wholly in the padding sees nothing: the wide call's range is empty for it)
                narrow_lead = ((t0 // SBLOCK) * SBLOCK >= lead_end) & (t0 < kv_len)
            far_lead = False
            if NUM_GLOBAL % LEAD_N == 0:  # the narrow tiles hold global keys only: every one visible
                far_lead = narrow_lead & (m0 + q_offset >= NUM_GLOBAL - 1 + DIST)  # all beyond the reach
            if far_lead:  # one scalar bias (far-left), no gather, no predicate
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row,
                                           c_left, kv_len, 0, NUM_GLOBAL, m0, q_offset, tl.arange(0, LEAD_N), offs_d,
                                           FAR, False, HAS_BIAS, CAUSAL, REACH, FP32_DOT, BLOCK_M, LEAD_N, DENSE, 0,
                                           1, 0)
            elif narrow_lead:  # the global keys alone, not a whole BLOCK_N tile of mostly hidden scores
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row,
                                           0.0, kv_len, 0, tl.cdiv(NUM_GLOBAL, LEAD_N) * LEAD_N, m0, q_offset,
                                           tl.arange(0, LEAD_N), offs_d, ANY, True, HAS_BIAS, CAUSAL, REACH, FP32_DOT,
                                           BLOCK_M, LEAD_N, PATTERN, RADIUS, SBLOCK, NUM_GLOBAL)
            else:
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row,
                                           0.0, kv_len, 0, lead_end, m0, q_offset, offs_n, offs_d, ANY, True, HAS_BIAS,
                                           CAUSAL, REACH, FP32_DOT, BLOCK_M, BLOCK_N, PATTERN, RADIUS, SBLOCK,
                                           NUM_GLOBAL)
            if a0 < i0:  # empty where the window or block starts on a tile edge: no pipeline prologue
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row,
                                           0.0, kv_len, a0, i0, m0, q_offset, offs_n, offs_d, ANY, True, HAS_BIAS,
                                           CAUSAL, REACH, FP32_DOT, BLOCK_M, BLOCK_N, PATTERN, RADIUS, SBLOCK,
                                           NUM_GLOBAL)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, c_left,
                                   kv_len, i0, f0, m0, q_offset, offs_n, offs_d, FAR, False, HAS_BIAS, CAUSAL, REACH,
                                   FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        if HAS_BIAS and PATTERN == DENSE and not CAUSAL:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, 0.0,
                                       kv_len, f0, f1, m0, q_offset, offs_n, offs_d, NEAR_AHEAD, False, HAS_BIAS,
                                       CAUSAL, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        elif HAS_BIAS and PATTERN == BLOCK:
            # The first tile's bias is gathered before the loop: only where the band is not empty
            # (a tile in the padding has f0 anywhere, its rels beyond the bias row).
            if f0 < f1:
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row,
                                           0.0, kv_len, f0, f1, m0, q_offset, offs_n, offs_d, NEAR_AHEAD, False,
                                           HAS_BIAS, CAUSAL, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        else:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, 0.0,
                                       kv_len, f0, f1, m0, q_offset, offs_n, offs_d, NEAR, False, HAS_BIAS, CAUSAL,
                                       REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, c_right,
                                   kv_len, f1, i1, m0, q_offset, offs_n, offs_d, FAR, False, HAS_BIAS, CAUSAL, REACH,
                                   FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        # Masked tiles after the run, their bias gathered with a clamp (they may be far): the one
        # partial key tile (dense; a plain `if`, so the dense kernel compiles as before its sparse
        # patterns), the window end / block end (sparse).
        if PATTERN == DENSE:
            if n_full < hi:
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row,
                                           0.0, kv_len, n_full, n_full + BLOCK_N, m0, q_offset, offs_n, offs_d, ANY,
                                           True, HAS_BIAS, CAUSAL, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        elif i1 < e1:  # as a0 < i0 above
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, 0.0,
                                       kv_len, i1, e1, m0, q_offset, offs_n, offs_d, ANY, True, HAS_BIAS, CAUSAL,
                                       REACH, FP32_DOT, BLOCK_M, BLOCK_N, PATTERN, RADIUS, SBLOCK, NUM_GLOBAL)

    # Rows with no visible key (key length 0, fully masked) output 0 and lse = +inf; so do
    # padded query rows of a sparse pattern (encoder self-attention: query i is real iff key i is).
    empty = l_i == 0.0
    if PATTERN != DENSE:
        empty = empty | (offs_m >= kv_len)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]  # one division per row, not per element (each a ~10-instruction div.full)
    if PATTERN != DENSE:
        out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # base-2 logsumexp
    o_base = Out + b64 * stride_ob + h64 * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=rmask[:, None])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse, mask=rmask)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(Out, DO, Delta, CuQ,
                      stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                      stride_lb, stride_lh, num_heads, seqlen_q,
                      IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 (the softmax backward's row term)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, q_len, k_start, kv_len = _seq_bounds(b, seqlen_q, seqlen_q, CuQ, CuQ, CuQ, False, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < q_len
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = q_start.to(tl.int64) + offs_m
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + rows, delta, mask=rmask)


@triton.jit
def _dq_inner(dq, acc_rows, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, q_pos,
              bias_row, RunEnd, far_bias, kv_len, start, end, m0,
              q_offset, offs_n, offs_d, nb_idx,
              MODE: tl.constexpr, MASK_K: tl.constexpr, HAS_BIAS: tl.constexpr, DTABLE: tl.constexpr,
              CAUSAL: tl.constexpr, REACH: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, PATTERN: tl.constexpr, RADIUS: tl.constexpr, SBLOCK: tl.constexpr,
              NUM_GLOBAL: tl.constexpr):
    if DTABLE and MODE != FAR:
        run_end = tl.load(RunEnd + nb_idx)  # [NB_POW2]: the first rel after each run (padding: 2^20)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASK_K:
            kmask = cols < kv_len
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        if MODE == FAR:
            qk = _dot(q, tl.trans(k), FP32_DOT)
            p = tl.math.exp2(qk * LOG2E - (lse - far_bias)[:, None])
        else:
            if HAS_BIAS:
                bias = _tile_bias(start_n - m0 - q_offset, q_pos, cols, bias_row, MODE, REACH, BLOCK_M, BLOCK_N,
                                  False)
                qk = _dot_acc(q, tl.trans(k), bias, FP32_DOT)
            else:
                qk = _dot(q, tl.trans(k), FP32_DOT)
            p = tl.math.exp2(qk * LOG2E - lse[:, None])
            if CAUSAL:
                p = tl.where(cols[None, :] <= q_pos[:, None], p, 0.0)
            if MASK_K:
                p = tl.where(kmask[None, :], p, 0.0)
            if PATTERN != DENSE:
                p = tl.where(_visible(q_pos[:, None], cols[None, :], PATTERN, RADIUS, SBLOCK, NUM_GLOBAL), p, 0.0)
        dp = _dot(do, tl.trans(v), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32_DOT)
        if DTABLE:  # the table's gradient: sums of dS per run of equal buckets (see _bwd_dq_kernel)
            if MODE == FAR:
                acc_rows += tl.sum(ds, 1)
            else:
                # E_k = the sum of dS at rel < run_end[k], for every run end at once: in row m,
                # rel < t <=> key < t + q_pos[m], a prefix of the row, so one row cumsum and one
                # gather at column t + q_pos[m] - start_n (clamped: nothing before the tile, the
                # row's total after it). Accumulated per row; reduced over rows once per program.
                col = run_end[None, :] + (q_pos - start_n)[:, None]  # [BM, NB_POW2]
                f = tl.gather(tl.cumsum(ds, 1), tl.minimum(tl.maximum(col - 1, 0), BLOCK_N - 1), 1)
                acc_runs += tl.where(col > 0, f, 0.0)
    return dq, acc_rows, acc_runs


@triton.jit
def _run_sums(acc_runs, acc_left, acc_right, nb_idx, N_RUNS: tl.constexpr):
    """A program's dS sum per run of equal buckets, k < N_RUNS. acc_runs [BM, NB_POW2] holds each
    row's E_k = sum of dS at rel < end of run k over the near tiles: summed over rows, run k gets
    E_k - E_(k-1) (differenced here, per program, so the sums over programs add no cancellation);
    the far tiles' row sums go to the first run (far-left) and the last (far-right). The host maps
    runs to buckets (_run_sums_to_table)."""
    e = tl.sum(acc_runs, 0)
    before = tl.where(nb_idx == 0, 0.0, tl.gather(e, tl.maximum(nb_idx - 1, 0), 0))
    runs = e - before + tl.where(nb_idx == 0, tl.sum(acc_left, 0), 0.0)
    return runs + tl.where(nb_idx == N_RUNS - 1, tl.sum(acc_right, 0), 0.0)


@triton.jit
def _load_query_rows(Q, DO, LSE, Delta, b64, h64, rows, rmask, stride_qb, stride_qh, stride_qm, stride_dob,
                     stride_doh, stride_dom, stride_lb, stride_lh, offs_d):
    """What a dq program reads of its query rows: q, dO, lse (+inf past the end: p = 0) and delta."""
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + rows, mask=rmask, other=float("inf"))
    delta = tl.load(Delta + b64 * stride_lb + h64 * stride_lh + rows, mask=rmask, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, Delta, Out, BiasLUT, RunEnd, DTablePart, KeyLens, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pm,
    stride_ob, stride_oh, stride_om,
    num_heads, seqlen_q, seqlen_k, q_offset, lut_w, tune_len,
    HAS_BIAS: tl.constexpr, DTABLE: tl.constexpr, N_RUNS: tl.constexpr, NB_POW2: tl.constexpr,
    REACH: tl.constexpr, CAUSAL: tl.constexpr, ROW_DELTA: tl.constexpr,
    HAS_KEYLENS: tl.constexpr, IS_VARLEN: tl.constexpr, FP32_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr = 0, RADIUS: tl.constexpr = 0, SBLOCK: tl.constexpr = 1, NUM_GLOBAL: tl.constexpr = 0,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, q_len, k_start, kv_len = _seq_bounds(b, seqlen_q, seqlen_k, KeyLens, CuQ, CuK, HAS_KEYLENS, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    nb_idx = tl.arange(0, NB_POW2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = q_start.to(tl.int64) + offs_m
    rmask = offs_m < q_len
    q, do, lse, delta = _load_query_rows(Q, DO, LSE, Delta, b64, h64, rows, rmask, stride_qb, stride_qh, stride_qm,
                                         stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, offs_d)
    if ROW_DELTA:  # delta = rowsum(dO * O) of these rows here, stored for the dk/dv kernels (which run
        # after this one): no pass of its own over O and dO (backward(): delta None; the load of
        # delta above is then dead code)
        o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                    mask=rmask[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + b64 * stride_lb + h64 * stride_lh + rows, delta, mask=rmask)
    t0 = m0  # the first row the tile's key ranges are for
    if PATTERN == BLOCK:  # after any ROW_DELTA store: the global rows need their delta too
        if m0 + BLOCK_M <= NUM_GLOBAL:  # global rows only: _global_rows_dq_kernel
            return
        t0 = tl.maximum(m0, NUM_GLOBAL)  # rows [m0, t0) are global: lse = +inf, p = dS = 0
        lse = tl.where(offs_m < NUM_GLOBAL, float("inf"), lse)  # their dq and dS sums: _global_rows_dq_kernel's
    k_base = K + b64 * stride_kb + h64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k_start.to(tl.int64) * stride_vn
    q_pos = offs_m + q_offset

    if HAS_BIAS:
        DIST: tl.constexpr = REACH
    else:
        DIST: tl.constexpr = 1
    left_end, right_start, n_full, hi = _key_regions(m0, q_offset, kv_len, DIST, CAUSAL, BLOCK_M, BLOCK_N)
    bias_row, c_left, c_right = _head_bias(BiasLUT, h, lut_w, HAS_BIAS, REACH, PATTERN)

    lead_end, a0, i0, f0, f1, i1, e1 = _query_tile_ranges(t0, m0 + BLOCK_M, kv_len, left_end, right_start, n_full,
                                                          PATTERN, RADIUS, SBLOCK, NUM_GLOBAL, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_left = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_right = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_runs = tl.zeros([BLOCK_M, NB_POW2], dtype=tl.float32)
    if PATTERN == LOCAL:  # every tile reads the window's bias row (see the forward)
        split = tl.minimum(tl.maximum(n_full, a0), e1)
        dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                           stride_vn, q_pos, bias_row, RunEnd, 0.0, kv_len, a0, split, m0, q_offset,
                                           offs_n, offs_d, nb_idx, NEAR, False, HAS_BIAS, DTABLE, CAUSAL, REACH,
                                           FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                           stride_vn, q_pos, bias_row, RunEnd, 0.0, kv_len, split, e1, m0, q_offset,
                                           offs_n, offs_d, nb_idx, NEAR, True, HAS_BIAS, DTABLE, CAUSAL, REACH,
                                           FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    else:
        if PATTERN != DENSE:
            dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                               stride_vn, q_pos, bias_row, RunEnd, 0.0, kv_len, 0, lead_end, m0,
                                               q_offset, offs_n, offs_d, nb_idx, ANY, True, HAS_BIAS, DTABLE, CAUSAL,
                                               REACH, FP32_DOT, BLOCK_M, BLOCK_N, PATTERN, RADIUS, SBLOCK, NUM_GLOBAL)
            dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                               stride_vn, q_pos, bias_row, RunEnd, 0.0, kv_len, a0, i0, m0, q_offset,
                                               offs_n, offs_d, nb_idx, ANY, True, HAS_BIAS, DTABLE, CAUSAL, REACH,
                                               FP32_DOT, BLOCK_M, BLOCK_N, PATTERN, RADIUS, SBLOCK, NUM_GLOBAL)
        dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                           stride_vn, q_pos, bias_row, RunEnd, c_left, kv_len, i0, f0, m0, q_offset,
                                           offs_n, offs_d, nb_idx, FAR, False, HAS_BIAS, DTABLE, CAUSAL, REACH,
                                           FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                           stride_vn, q_pos, bias_row, RunEnd, 0.0, kv_len, f0, f1, m0, q_offset,
                                           offs_n, offs_d, nb_idx, NEAR, False, HAS_BIAS, DTABLE, CAUSAL, REACH,
                                           FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        dq, acc_right, acc_runs = _dq_inner(dq, acc_right, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                            stride_vn, q_pos, bias_row, RunEnd, c_right, kv_len, f1, i1, m0, q_offset,
                                            offs_n, offs_d, nb_idx, FAR, False, HAS_BIAS, DTABLE, CAUSAL, REACH,
                                            FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
        if PATTERN == DENSE:
            if n_full < hi:
                dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                                   stride_vn, q_pos, bias_row, RunEnd, 0.0, kv_len, n_full,
                                                   n_full + BLOCK_N, m0, q_offset, offs_n, offs_d, nb_idx, ANY, True,
                                                   HAS_BIAS, DTABLE, CAUSAL, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE,
                                                   0, 1, 0)
        else:
            dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                               stride_vn, q_pos, bias_row, RunEnd, 0.0, kv_len, i1, e1, m0, q_offset,
                                               offs_n, offs_d, nb_idx, ANY, True, HAS_BIAS, DTABLE, CAUSAL, REACH,
                                               FP32_DOT, BLOCK_M, BLOCK_N, PATTERN, RADIUS, SBLOCK, NUM_GLOBAL)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask[:, None])
    if DTABLE:
        e = _run_sums(acc_runs, acc_left, acc_right, nb_idx, N_RUNS)
        tl.store(DTablePart + b64 * stride_pb + h64 * stride_ph + pid_m * stride_pm + nb_idx, e, mask=nb_idx < N_RUNS)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, n0,
                far_bias, q_len, q_offset, start, end, offs_m, offs_d, bias_row, q_pos_base,
                MODE: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REACH: tl.constexpr,
                PATTERN: tl.constexpr, RADIUS: tl.constexpr, SBLOCK: tl.constexpr, NUM_GLOBAL: tl.constexpr,
                Q_POS_TENSOR: tl.constexpr):
    # Transposed orientation: scores^T [BLOCK_N keys, BLOCK_M queries], so dk and dv need no transposes.
    # Q_POS_TENSOR (transient-global side keys): query positions are read from q_pos_base (ANY only).
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        rmask = rows < q_len
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=rmask, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
        if MODE == FAR:
            qk_t = _dot(k, tl.trans(q), FP32_DOT)
            p_t = tl.math.exp2(qk_t * LOG2E - (lse - far_bias)[None, :])
        else:
            if HAS_BIAS:
                if Q_POS_TENSOR:
                    q_pos = tl.maximum(tl.load(q_pos_base + rows, mask=rmask, other=0), 0)
                else:
                    q_pos = rows + q_offset
                bias = _tile_bias(n0 - start_m - q_offset, q_pos, cols, bias_row, MODE, REACH, BLOCK_M, BLOCK_N,
                                  True)
                qk_t = _dot_acc(k, tl.trans(q), bias, FP32_DOT)
            else:
                qk_t = _dot(k, tl.trans(q), FP32_DOT)
            p_t = tl.math.exp2(qk_t * LOG2E - lse[None, :])
            if CAUSAL:
                p_t = tl.where(cols[:, None] <= (rows + q_offset)[None, :], p_t, 0.0)
            if PATTERN != DENSE:
                p_t = tl.where(_visible(rows[None, :], cols[:, None], PATTERN, RADIUS, SBLOCK, NUM_GLOBAL), p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, FP32_DOT)
        dp_t = _dot(v, tl.trans(do), FP32_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, FP32_DOT)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, Delta, BiasLUT, KeyLens, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    num_heads, seqlen_q, seqlen_k, q_offset, lut_w, tune_len,
    HAS_BIAS: tl.constexpr, REACH: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KEYLENS: tl.constexpr, IS_VARLEN: tl.constexpr, FP32_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr = 0, RADIUS: tl.constexpr = 0, SBLOCK: tl.constexpr = 1, NUM_GLOBAL: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, q_len, k_start, kv_len = _seq_bounds(b, seqlen_q, seqlen_k, KeyLens, CuQ, CuK, HAS_KEYLENS, IS_VARLEN)
    if IS_VARLEN:
        store_len = kv_len  # rows past this document belong to the next one
    else:
        store_len = b * 0 + seqlen_k  # padded keys get a zero gradient
    n0 = pid_n * BLOCK_N
    if n0 >= store_len:
        return
    t0 = n0  # the first key the tile's query ranges are for
    if PATTERN == BLOCK:
        if n0 + BLOCK_N <= NUM_GLOBAL:  # global keys only: _split_dkdv_kernel
            return
        t0 = tl.maximum(n0, NUM_GLOBAL)  # keys [n0, t0) are global: computed as block keys, then overwritten
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = n0 + offs_n
    kmask = cols < kv_len
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    k_rows = k_start.to(tl.int64) + cols
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + k_rows[:, None] * stride_kn + offs_d[None, :],
                mask=kmask[:, None], other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + k_rows[:, None] * stride_vn + offs_d[None, :],
                mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if HAS_BIAS:
        DIST: tl.constexpr = REACH
    else:
        DIST: tl.constexpr = 1
    bias_row, c_left, c_right = _head_bias(BiasLUT, h, lut_w, HAS_BIAS, REACH, PATTERN)
    if n0 < kv_len:
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start.to(tl.int64) * stride_dom
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh + q_start
        delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q_start
        lo = b * 0
        if CAUSAL:
            lo = (tl.maximum(n0 - q_offset, 0) // BLOCK_M) * BLOCK_M  # earlier rows see none of these keys
        # far-right (keys far after the queries): m0 + BLOCK_M - 1 + q_offset <= n0 - DIST
        x = n0 - DIST - q_offset - BLOCK_M + 1
        right_end = tl.where(x >= 0, (x // BLOCK_M + 1) * BLOCK_M, 0)
        if CAUSAL:
            right_end = lo  # those tiles are wholly masked
        # far-left (keys far before the queries): m0 + q_offset >= n0 + BLOCK_N - 1 + DIST
        left_start = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + DIST - q_offset, 0), BLOCK_M) * BLOCK_M
        if PATTERN == DENSE:
            lead_end = lo * 0
            a0 = lo
            i0 = lo
            i1 = q_len
            e1 = q_len
        else:  # the query tiles that see this key tile (both patterns are symmetric); padded rows have lse = +inf
            lead_end, a0, i0, i1, e1 = _sparse_ranges(t0, n0 + BLOCK_N, kv_len, tl.cdiv(kv_len, BLOCK_M) * BLOCK_M,
                                                      PATTERN, RADIUS, SBLOCK, NUM_GLOBAL, BLOCK_M)
        right_end = tl.minimum(tl.maximum(right_end, i0), i1)
        left_start = tl.minimum(tl.maximum(left_start, right_end), i1)
        if PATTERN == LOCAL:  # every query tile reads the window's bias row (see the forward)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols,
                                 n0, 0.0, q_len, q_offset, a0, e1, offs_m, offs_d,
                                 bias_row, bias_row, NEAR, HAS_BIAS, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N, REACH,
                                 DENSE, 0, 1, 0, False)
        else:
            if PATTERN != DENSE:
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols,
                                     n0, 0.0, q_len, q_offset, 0, lead_end, offs_m, offs_d,
                                     bias_row, bias_row, ANY, HAS_BIAS, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N, REACH,
                                     PATTERN, RADIUS, SBLOCK, NUM_GLOBAL, False)
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols,
                                     n0, 0.0, q_len, q_offset, a0, i0, offs_m, offs_d,
                                     bias_row, bias_row, ANY, HAS_BIAS, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N, REACH,
                                     PATTERN, RADIUS, SBLOCK, NUM_GLOBAL, False)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, n0,
                                 c_right, q_len, q_offset, i0, right_end, offs_m, offs_d,
                                 bias_row, bias_row, FAR, HAS_BIAS, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N, REACH, DENSE, 0, 1, 0, False)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, n0,
                                 0.0, q_len, q_offset, right_end, left_start, offs_m,
                                 offs_d, bias_row, bias_row, NEAR, HAS_BIAS, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N, REACH,
                                 DENSE, 0, 1, 0, False)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, n0,
                                 c_left, q_len, q_offset, left_start, i1, offs_m, offs_d,
                                 bias_row, bias_row, FAR, HAS_BIAS, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N, REACH, DENSE, 0, 1, 0, False)
            if PATTERN != DENSE:
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols,
                                     n0, 0.0, q_len, q_offset, i1, e1, offs_m, offs_d,
                                     bias_row, bias_row, ANY, HAS_BIAS, CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N, REACH,
                                     PATTERN, RADIUS, SBLOCK, NUM_GLOBAL, False)
    # Keys past the key length get exactly zero (their p was not masked above).
    dk = tl.where(kmask[:, None], dk, 0.0)
    dv = tl.where(kmask[:, None], dv, 0.0)
    smask = (cols < store_len)[:, None]
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + k_rows[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + k_rows[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=smask)


# ----------------------------------------------------------------------------------------------
# `block` pattern: the global rows and columns, split over the long axis
# ----------------------------------------------------------------------------------------------
# The first NUM_GLOBAL queries see every key, and every query sees the first NUM_GLOBAL keys. In
# the kernels above, the query tile (forward, dq) or key tile (dk/dv) holding them would walk the
# whole sequence alone: at 1M tokens that one program per head is most of the run. They are done
# here instead, split over the other axis into chunks of tiles, one program per (chunk, batch x
# head, tile), then merged in a fixed order (the forward's softmax partials by
# _merge_global_rows_kernel, the backward's by plain torch sums). The split kernels take the
# global rows (forward, dq) or keys (dk/dv) alone, in tiles of next_power_of_2(num_global), and
# run the dense loops over each chunk, since every key or query is visible to them; the main
# kernels compute the other rows or keys of the tiles that hold them.


@triton.jit
def _split_program(num_heads, seqlen, KeyLens, HAS_KEYLENS: tl.constexpr):
    """(chunk, batch x head, batch, head, key length) of a split kernel's program; b, h as int64."""
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    _, _, _, kv_len = _seq_bounds(b, seqlen, seqlen, KeyLens, KeyLens, KeyLens, HAS_KEYLENS, False)
    return c, pid_bh, b.to(tl.int64), (pid_bh % num_heads).to(tl.int64), kv_len


@triton.jit
def _global_chunk_regions(m0, c, chunk, kv_len, HAS_BIAS: tl.constexpr, REACH: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """(start, f0, f1, f2, end): chunk c of the keys that global rows [m0, m0 + BLOCK_M) see (all of
    them), cut at the dense key regions: far-left tiles [start, f0), near [f0, f1), far-right
    [f1, f2), the partial last tile [f2, end). Without a bias every tile is far."""
    if HAS_BIAS:
        DIST: tl.constexpr = REACH
    else:
        DIST: tl.constexpr = 1
    left_end, right_start, n_full, hi = _key_regions(m0, 0, kv_len, DIST, False, BLOCK_M, BLOCK_N)
    start = c * chunk  # a multiple of BLOCK_N, as every region boundary
    end = tl.minimum(start + chunk, tl.cdiv(hi, BLOCK_N) * BLOCK_N)
    f0 = tl.minimum(tl.maximum(left_end, start), end)
    f1 = tl.minimum(tl.maximum(right_start, f0), end)
    f2 = tl.minimum(tl.maximum(n_full, f1), end)
    return start, f0, f1, f2, end


@triton.jit
def _global_rows_fwd_kernel(
    Q, K, V, PartM, PartL, PartAcc, BiasLUT, KeyLens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    num_heads, seqlen, chunk, rows_total, lut_w,
    HAS_BIAS: tl.constexpr, HAS_KEYLENS: tl.constexpr, REACH: tl.constexpr, FP32_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial softmax state (m, l, acc; base 2) of global-row tile t over keys [c * chunk, (c + 1) * chunk).

    Global rows see every key: the chunk runs the dense loops (far-left, near, far-right tiles,
    then the one partial key tile masked). Rows of the tile past the global ones are computed
    the same way and never read (the merge keeps rows < num_global)."""
    c, pid_bh, b64, h64, kv_len = _split_program(num_heads, seqlen, KeyLens, HAS_KEYLENS)
    m0 = tl.program_id(2) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m < seqlen)[:, None], other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    bias_row, c_left, c_right = _head_bias(BiasLUT, h64, lut_w, HAS_BIAS, REACH, BLOCK)
    start, f0, f1, f2, end = _global_chunk_regions(m0, c, chunk, kv_len, HAS_BIAS, REACH, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, bias_row, c_left,
                               kv_len, start, f0, m0, 0, offs_n, offs_d, FAR, False, HAS_BIAS, False, REACH,
                               FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, bias_row, 0.0,
                               kv_len, f0, f1, m0, 0, offs_n, offs_d, NEAR, False, HAS_BIAS, False, REACH,
                               FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, bias_row, c_right,
                               kv_len, f1, f2, m0, 0, offs_n, offs_d, FAR, False, HAS_BIAS, False, REACH,
                               FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, bias_row, 0.0,
                               kv_len, f2, end, m0, 0, offs_n, offs_d, ANY, True, HAS_BIAS, False, REACH,
                               FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    row = (c.to(tl.int64) * tl.num_programs(1) + pid_bh) * rows_total + offs_m  # [chunk, B*H, rows]
    tl.store(PartM + row, m_i)
    tl.store(PartL + row, l_i)
    tl.store(PartAcc + row[:, None] * HEAD_DIM + offs_d[None, :], acc)


@triton.jit
def _merge_global_rows_kernel(
    PartM, PartL, PartAcc, Out, LSE, KeyLens,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    num_heads, seqlen, n_chunks, rows_total,
    HAS_KEYLENS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNKS: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
):
    """Out and lse of global row r (program (batch x head, r)): its chunks' partial softmax states
    (m, l, acc; base 2) of _global_rows_fwd_kernel ([chunk, B*H, rows]) merged in one fixed order.
    One launch instead of a dozen torch ops. A row with no visible key (every chunk's m = -inf) or
    past its sequence's length outputs 0 with lse = +inf, as the main kernel's padded rows."""
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    _, _, _, kv_len = _seq_bounds(b, seqlen, seqlen, KeyLens, KeyLens, KeyLens, HAS_KEYLENS, False)
    offs_c = tl.arange(0, CHUNKS)
    slot = (offs_c.to(tl.int64) * tl.num_programs(0) + pid_bh) * rows_total + r  # [CHUNKS]
    m_c = tl.load(PartM + slot, mask=offs_c < n_chunks, other=float("-inf"))
    m = tl.max(m_c, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no visible key anywhere: every weight is 0
    total = tl.sum(tl.exp2(m_c - m_safe) * tl.load(PartL + slot, mask=offs_c < n_chunks, other=0.0), 0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for c0 in range(0, n_chunks, CHUNK_BLOCK):
        cs = c0 + tl.arange(0, CHUNK_BLOCK)
        cslot = (cs.to(tl.int64) * tl.num_programs(0) + pid_bh) * rows_total + r  # [CHUNK_BLOCK]
        weight = tl.exp2(tl.load(PartM + cslot, mask=cs < n_chunks, other=float("-inf")) - m_safe)
        part = tl.load(PartAcc + cslot[:, None] * HEAD_DIM + offs_d[None, :], mask=(cs < n_chunks)[:, None],
                       other=0.0)  # [CHUNK_BLOCK, HEAD_DIM]
        acc += tl.sum(weight[:, None] * part, 0)
    keep = (total > 0) & (r < kv_len)
    safe_total = tl.where(keep, total, 1.0)
    out = tl.where(keep, acc / safe_total, 0.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + r * stride_om + offs_d,
             out.to(Out.dtype.element_ty))
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + r,
             tl.where(keep, m + tl.log2(safe_total), float("inf")))


@triton.jit
def _global_rows_dq_kernel(
    Q, K, V, DO, LSE, Delta, PartDQ, PartTable, BiasLUT, RunEnd, KeyLens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
    num_heads, seqlen, chunk, rows_total, lut_w,
    HAS_BIAS: tl.constexpr, DTABLE: tl.constexpr, N_RUNS: tl.constexpr, NB_POW2: tl.constexpr,
    HAS_KEYLENS: tl.constexpr, REACH: tl.constexpr, FP32_DOT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_GLOBAL: tl.constexpr,
):
    """Partial dq of global-row tile t over keys [c * chunk, (c + 1) * chunk), and its dS sums per
    run of equal buckets: the dense loops, as the global rows' forward. Rows of the tile past the
    global ones get lse = +inf (p = dS = 0): they add nothing to the sums and their dq is never read."""
    c, pid_bh, b64, h64, kv_len = _split_program(num_heads, seqlen, KeyLens, HAS_KEYLENS)
    t = tl.program_id(2)
    m0 = t * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    nb_idx = tl.arange(0, NB_POW2)
    rmask = offs_m < seqlen
    q, do, lse, delta = _load_query_rows(Q, DO, LSE, Delta, b64, h64, offs_m, rmask, stride_qb, stride_qh, stride_qm,
                                         stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, offs_d)
    lse = tl.where(offs_m < NUM_GLOBAL, lse, float("inf"))
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    bias_row, c_left, c_right = _head_bias(BiasLUT, h64, lut_w, HAS_BIAS, REACH, BLOCK)
    start, f0, f1, f2, end = _global_chunk_regions(m0, c, chunk, kv_len, HAS_BIAS, REACH, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_left = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_right = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_runs = tl.zeros([BLOCK_M, NB_POW2], dtype=tl.float32)
    dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                                       offs_m, bias_row, RunEnd, c_left, kv_len, start, f0, m0, 0, offs_n, offs_d,
                                       nb_idx, FAR, False, HAS_BIAS, DTABLE, False, REACH, FP32_DOT, BLOCK_M, BLOCK_N,
                                       DENSE, 0, 1, 0)
    dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                                       offs_m, bias_row, RunEnd, 0.0, kv_len, f0, f1, m0, 0, offs_n, offs_d, nb_idx,
                                       NEAR, False, HAS_BIAS, DTABLE, False, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE,
                                       0, 1, 0)
    dq, acc_right, acc_runs = _dq_inner(dq, acc_right, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                        stride_vn, offs_m, bias_row, RunEnd, c_right, kv_len, f1, f2, m0, 0, offs_n,
                                        offs_d, nb_idx, FAR, False, HAS_BIAS, DTABLE, False, REACH, FP32_DOT, BLOCK_M,
                                        BLOCK_N, DENSE, 0, 1, 0)
    dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                                       offs_m, bias_row, RunEnd, 0.0, kv_len, f2, end, m0, 0, offs_n, offs_d, nb_idx,
                                       ANY, True, HAS_BIAS, DTABLE, False, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE,
                                       0, 1, 0)
    row = (c.to(tl.int64) * tl.num_programs(1) + pid_bh) * rows_total + offs_m  # [chunk, B*H, rows]
    tl.store(PartDQ + row[:, None] * HEAD_DIM + offs_d[None, :], dq)
    if DTABLE:  # [chunk, B*H, tile, run]
        slot = (c.to(tl.int64) * tl.num_programs(1) + pid_bh) * tl.num_programs(2) + t
        e = _run_sums(acc_runs, acc_left, acc_right, nb_idx, N_RUNS)
        tl.store(PartTable + slot * N_RUNS + nb_idx, e, mask=nb_idx < N_RUNS)


@triton.jit
def _split_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, PartDK, PartDV, BiasLUT, KeyLens, QPos, FarRows,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_pb,
    num_heads, seqlen, num_keys, chunk, cols_total, lut_w,
    HAS_BIAS: tl.constexpr, HAS_KEYLENS: tl.constexpr, REACH: tl.constexpr, FP32_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PATTERN: tl.constexpr,
    SBLOCK: tl.constexpr, NUM_GLOBAL: tl.constexpr, Q_POS_TENSOR: tl.constexpr,
):
    """Partial dk, dv of key tile t over queries [c * chunk, (c + 1) * chunk), for keys that
    queries all along the sequence see: `block`'s global keys (PATTERN, keys = the queries'
    sequence) or transient-global's side keys (Q_POS_TENSOR: query positions read from QPos).
    The caller sums the chunks. Side keys: FarRows [B, tiles, 2] holds, per key tile, the rows
    below which every position is at least REACH before the tile's keys and from which every
    one is at least REACH after them; the query tiles wholly in either part are far tiles (one
    scalar bias), the others gather theirs per score."""
    c, pid_bh, b64, h64, kv_len = _split_program(num_heads, num_keys, KeyLens, HAS_KEYLENS)
    n0 = tl.program_id(2) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = n0 + offs_n
    kmask = cols < kv_len
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=kmask[:, None], other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    start = c * chunk
    if Q_POS_TENSOR:
        q_end = seqlen
    else:
        q_end = tl.cdiv(kv_len, BLOCK_M) * BLOCK_M  # queries are the keys' sequence: padded rows see nothing
    end = tl.minimum(start + chunk, q_end)
    bias_row = _bias_center(BiasLUT, h64, lut_w)  # rel 0 of this head's bias row
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_dob + h64 * stride_doh
    lse_base = LSE + b64 * stride_lb + h64 * stride_lh
    delta_base = Delta + b64 * stride_lb + h64 * stride_lh
    q_pos_base = QPos + b64 * stride_pb
    if Q_POS_TENSOR:
        far_rows = FarRows + (b64 * tl.num_programs(2) + tl.program_id(2)) * 2
        near_start = tl.minimum(tl.maximum((tl.load(far_rows) // BLOCK_M) * BLOCK_M, start), end)
        near_end = tl.minimum(tl.maximum(tl.cdiv(tl.load(far_rows + 1), BLOCK_M) * BLOCK_M, near_start), end)
        c_right = tl.load(bias_row + 2 * REACH) * LOG2E  # rel >= REACH: queries before the keys
    else:  # `block`'s global keys, seen by every query: rows far before and after them by position
        if HAS_BIAS:
            DIST: tl.constexpr = REACH
        else:
            DIST: tl.constexpr = 1
        _, c_after, c_right = _head_bias(BiasLUT, h64, lut_w, HAS_BIAS, REACH, PATTERN)
        near_start = tl.minimum(tl.maximum((tl.maximum(n0 - DIST + 1, 0) // BLOCK_M) * BLOCK_M, start), end)
        near_end = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1 + DIST, BLOCK_M) * BLOCK_M, near_start), end)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, n0,
                         c_right, seqlen, 0, start, near_start, offs_m, offs_d, bias_row, q_pos_base, FAR,
                         HAS_BIAS, False, FP32_DOT, BLOCK_M, BLOCK_N, REACH, PATTERN, 0, SBLOCK, NUM_GLOBAL,
                         Q_POS_TENSOR)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, n0, 0.0,
                         seqlen, 0, near_start, near_end, offs_m, offs_d, bias_row, q_pos_base, ANY, HAS_BIAS, False,
                         FP32_DOT, BLOCK_M, BLOCK_N, REACH, PATTERN, 0, SBLOCK, NUM_GLOBAL, Q_POS_TENSOR)
    if Q_POS_TENSOR:
        c_left = tl.load(bias_row - 2 * REACH) * LOG2E  # rel <= -REACH: queries after the keys
    else:
        c_left = c_after
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, cols, n0,
                         c_left, seqlen, 0, near_end, end, offs_m, offs_d, bias_row, q_pos_base, FAR, HAS_BIAS,
                         False, FP32_DOT, BLOCK_M, BLOCK_N, REACH, PATTERN, 0, SBLOCK, NUM_GLOBAL, Q_POS_TENSOR)
    dk = tl.where(kmask[:, None], dk, 0.0)
    dv = tl.where(kmask[:, None], dv, 0.0)
    col = (c.to(tl.int64) * tl.num_programs(1) + pid_bh) * cols_total + cols  # [chunk, B*H, cols]
    tl.store(PartDK + col[:, None] * HEAD_DIM + offs_d[None, :], dk)
    tl.store(PartDV + col[:, None] * HEAD_DIM + offs_d[None, :], dv)


# ----------------------------------------------------------------------------------------------
# `transient-global` side keys (forward; inference)
# ----------------------------------------------------------------------------------------------
# LongT5's side attention is T5 attention with a bidirectional bias where query i sits at
# position block_ids[b, i] (its global block; orphans already folded in) and side key g at g:
# the bias is the global table at bucket(g - block_ids[i]), clamped beyond +-reach like
# every T5 bias, and row b has max(block_ids[b]) + 1 side keys. A query tile's positions lie in
# [min, max] of its block ids: side-key tiles beyond +-reach of both are far tiles (one
# scalar bias, as in the dense kernel), the others gather their bias per score (the positions
# are not contiguous). Rows with block id -1 (padding, or no full block at all) see no side key.


@triton.jit
def _side_fwd_kernel(
    Q, SK, SV, Out, LSE, BlockIds, SideLens, BiasLUT,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_ib,
    num_heads, seqlen,
    HAS_BIAS: tl.constexpr, REACH: tl.constexpr, FP32_DOT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile's attention over the side keys, merged in place into the local window's
    softmax that Out and LSE (base 2) hold: they leave as the softmax over both key sets."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // num_heads).to(tl.int64)
    h64 = (pid_bh % num_heads).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < seqlen
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    block_id = tl.load(BlockIds + b64 * stride_ib + offs_m, mask=rmask, other=-1).to(tl.int32)
    q_pos = tl.maximum(block_id, 0)
    n_side = tl.load(SideLens + b64).to(tl.int32)
    bias_row = _bias_center(BiasLUT, h64, REACH)  # rel 0 of this head's row
    k_base = SK + b64 * stride_kb + h64 * stride_kh
    v_base = SV + b64 * stride_vb + h64 * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Side keys beyond +-REACH of every row's block get one scalar bias (far tiles, as in the
    # dense kernel); the rows' positions span [min, max] of their block ids. Near and partial tiles
    # gather theirs per score.
    n_full = (n_side // BLOCK_N) * BLOCK_N
    left_end, right_start = _far_bounds(tl.min(q_pos, 0), tl.max(q_pos, 0), n_full, REACH, BLOCK_N)
    c_left = tl.load(bias_row - 2 * REACH) * LOG2E
    c_right = tl.load(bias_row + 2 * REACH) * LOG2E
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, c_left,
                               n_side, 0, left_end, m0, 0, offs_n, offs_d, FAR, False, HAS_BIAS, False, REACH,
                               FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, 0.0, n_side,
                               left_end, right_start, m0, 0, offs_n, offs_d, ANY, False, HAS_BIAS, False, REACH,
                               FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, c_right,
                               n_side, right_start, n_full, m0, 0, offs_n, offs_d, FAR, False, HAS_BIAS, False, REACH,
                               FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, bias_row, 0.0, n_side,
                               n_full, tl.cdiv(n_side, BLOCK_N) * BLOCK_N, m0, 0, offs_n, offs_d, ANY, True, HAS_BIAS,
                               False, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    # Merge with the local window's softmax, (out, base-2 lse) in Out and LSE, in place: the
    # local part is out with weight 1 at m = lse. Rows with no block (padding, or no full block)
    # see no side key and keep the local result; every other row sees side key 0 at least, so
    # the side part's l > 0.
    merged = rmask & (block_id >= 0)
    o_ptrs = Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    l_ptrs = LSE + b64 * stride_lb + h64 * stride_lh + offs_m
    lse_local = tl.load(l_ptrs, mask=merged, other=float("inf"))
    lse_local = tl.where(lse_local == float("inf"), float("-inf"), lse_local)  # no local key: weight 0
    out_local = tl.load(o_ptrs, mask=merged[:, None], other=0.0).to(tl.float32)
    m = tl.where(merged, tl.maximum(m_i, lse_local), 0.0)  # finite on merged rows (m_i is)
    w_local = tl.math.exp2(lse_local - m)
    w_side = tl.math.exp2(m_i - m)
    total = tl.where(merged, w_local + w_side * l_i, 1.0)
    out = (out_local * w_local[:, None] + acc * w_side[:, None]) * (1.0 / total)[:, None]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=merged[:, None])
    tl.store(l_ptrs, m + tl.math.log2(total), mask=merged)


@triton.jit
def _side_dq_kernel(
    Q, SK, SV, DO, LSE, Delta, DQLocal, DQ, DTablePart, BlockIds, SideLens, BiasLUT, RunEnd,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_ib,
    stride_pb, stride_ph, stride_pm, stride_ab, stride_ah, stride_am, stride_dqb, stride_dqh, stride_dqm,
    num_heads, seqlen,
    N_RUNS: tl.constexpr, NB_POW2: tl.constexpr, REACH: tl.constexpr, FP32_DOT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq = DQLocal (the local window's dq, fp32) + the side keys' dq, in DQ's dtype, and the global
    table's per-bucket dS sums per query tile. LSE is +inf on rows that see no side key, so they
    add nothing."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // num_heads).to(tl.int64)
    h64 = (pid_bh % num_heads).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    nb_idx = tl.arange(0, NB_POW2)
    rmask = offs_m < seqlen
    q, do, lse, delta = _load_query_rows(Q, DO, LSE, Delta, b64, h64, offs_m, rmask, stride_qb, stride_qh, stride_qm,
                                         stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, offs_d)
    q_pos = tl.maximum(tl.load(BlockIds + b64 * stride_ib + offs_m, mask=rmask, other=0).to(tl.int32), 0)
    # The first row's position: block ids never decrease along a row, so the tile's rels lie in
    # [n0 - first - (BLOCK_M - 1), n0 - first + BLOCK_N - 1], the range the segment sums visit.
    first = tl.maximum(tl.load(BlockIds + b64 * stride_ib + m0).to(tl.int32), 0)
    n_side = tl.load(SideLens + b64).to(tl.int32)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_left = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_right = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_runs = tl.zeros([BLOCK_M, NB_POW2], dtype=tl.float32)
    bias_row = _bias_center(BiasLUT, h64, REACH)  # rel 0 of this head's row
    k_base = SK + b64 * stride_kb + h64 * stride_kh
    v_base = SV + b64 * stride_vb + h64 * stride_vh
    # Far side keys as in the forward: one scalar bias, their dS row sums go to the far buckets.
    n_full = (n_side // BLOCK_N) * BLOCK_N
    left_end, right_start = _far_bounds(tl.min(q_pos, 0), tl.max(q_pos, 0), n_full, REACH, BLOCK_N)
    c_left = tl.load(bias_row - 2 * REACH) * LOG2E
    c_right = tl.load(bias_row + 2 * REACH) * LOG2E
    dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                                       q_pos, bias_row, RunEnd, c_left, n_side, 0, left_end, first, 0, offs_n, offs_d,
                                       nb_idx, FAR, False, True, True, False, REACH, FP32_DOT, BLOCK_M, BLOCK_N, DENSE,
                                       0, 1, 0)
    dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                                       q_pos, bias_row, RunEnd, 0.0, n_side, left_end, right_start, first, 0, offs_n,
                                       offs_d, nb_idx, ANY, False, True, True, False, REACH, FP32_DOT, BLOCK_M, BLOCK_N,
                                       DENSE, 0, 1, 0)
    dq, acc_right, acc_runs = _dq_inner(dq, acc_right, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn,
                                        stride_vn, q_pos, bias_row, RunEnd, c_right, n_side, right_start, n_full, first,
                                        0, offs_n, offs_d, nb_idx, FAR, False, True, True, False, REACH, FP32_DOT,
                                        BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    dq, acc_left, acc_runs = _dq_inner(dq, acc_left, acc_runs, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                                       q_pos, bias_row, RunEnd, 0.0, n_side, n_full, tl.cdiv(n_side, BLOCK_N) * BLOCK_N,
                                       first, 0, offs_n, offs_d, nb_idx, ANY, True, True, True, False, REACH, FP32_DOT,
                                       BLOCK_M, BLOCK_N, DENSE, 0, 1, 0)
    e = _run_sums(acc_runs, acc_left, acc_right, nb_idx, N_RUNS)
    dq += tl.load(DQLocal + b64 * stride_ab + h64 * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :],
                  mask=rmask[:, None], other=0.0)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask[:, None])
    tl.store(DTablePart + b64 * stride_pb + h64 * stride_ph + pid_m * stride_pm + nb_idx, e, mask=nb_idx < N_RUNS)


# ----------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------
# Each kernel has one launch configuration per (GPU family, precision): its tile, warps,
# pipeline stages and, where it pays, a register cap
# per thread (ptxas' maxnreg) that buys a block per SM (docs/kernels.md, "Where the bias
# costs"). T5CORE_AUTOTUNE=1 adds a small autotune over further (warps, stages) pairs, keyed on
# head dim, dtype, mask flags and a power-of-two length bucket. The interpreter uses one small
# tile (fast CPU tests that still have far, near and partial tiles).

_INTERPRET = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32),  # unequal, like the GPU's
              "side_fwd": (32, 16), "global_fwd": (32, 16), "side_dq": (32, 16), "side_dkdv": (16, 32)}
# (BLOCK_M, BLOCK_N, warps, stages[, maxnreg]). The kernels beside the three main ones: "side_fwd"
# transient-global's side-key forward, "global_fwd" the block pattern's global-row forward,
# "side_dq" the dq of both (side keys, global rows), "side_dkdv" dk/dv split over query chunks
# (side keys, global keys). sm90 side_*: the H200 sweep of the eighth session at 128k
# (bench/results/sweep-2026-11-29-s8-side.json; transient-global visible-score TFLOP/s, forward
# 331.5 -> 352.1, forward+backward 150.7 -> 156.8 (dq) and 155.2 (dk/dv), each against 4 warps and
# 2 stages, the configs until then); global_fwd keeps those, its rows capped at the global rows'
# next power of two (_global_tile: 16 rows for 16 global rows).
_TILES = {
    # The H200 sweep (bench/results/sweep-2026-11-29-s5-occupancy.txt): a 128x64 forward capped at
    # 128 registers holds 2 blocks per SM (1 uncapped) and beat 64x64 by 1-6%; dq capped at 128
    # holds 4 blocks instead of 3 (+2% forward+backward at 4k).
    "sm90": {"fwd": (128, 64, 8, 3, 128), "dq": (64, 32, 4, 3, 128), "dkdv": (32, 128, 4, 3),
             "side_fwd": (128, 64, 8, 3, 128), "global_fwd": (64, 64, 4, 2), "side_dq": (64, 32, 4, 3, 128),
             "side_dkdv": (32, 128, 4, 3)},
    "sm80": {"fwd": (64, 64, 4, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 128, 4, 3),  # unmeasured
             "side_fwd": (64, 64, 4, 2), "global_fwd": (64, 64, 4, 2), "side_dq": (64, 32, 4, 2),
             "side_dkdv": (32, 128, 4, 2)},
    "fp32": {"fwd": (64, 32, 4, 2), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2),  # exact fp32 dots
             "side_fwd": (64, 32, 4, 2), "global_fwd": (64, 32, 4, 2), "side_dq": (64, 32, 4, 2),
             "side_dkdv": (32, 64, 4, 2)},
}
# The sparse patterns (1 local, 2 block) visit the tiles along a window or a block's edges,
# where tiles narrower across the window compute fewer hidden scores. H200 sweep at 128k, sixth
# session (bench/results/sweep-2026-11-29-s6-{local,block}.json, visible-score TFLOP/s): local's
# forward 64x64 at 4 blocks per SM (201.8 against 184.0 for 64x32), block's 64x32 (207.4; 64x64
# 185.5); both backwards dq capped at 128 registers (local +7%) and dk/dv 32x64 capped. Sixteenth
# session: block's forward 64x64 (4, 2, capped: 4 blocks per SM) with its near tiles' bias gathered a
# tile ahead (NEAR_AHEAD), 128k / 1M 0.853-0.873 -> 0.812 ms / 7.15 -> 6.69 ms (block-tiles-ab).
_SPARSE_TILES = {"sm90": {
    1: {"fwd": (64, 64, 4, 2, 128), "dq": (64, 32, 4, 3, 128), "dkdv": (32, 64, 4, 3, 128)},
    2: {"fwd": (64, 64, 4, 2, 128), "dq": (64, 32, 4, 3, 128), "dkdv": (32, 64, 4, 3, 128)},
}}
_AUTOTUNE_MORE = {  # (warps, stages[, maxnreg]) pairs T5CORE_AUTOTUNE=1 tries after the default's
    "sm90": {"fwd": [(4, 3), (8, 3), (4, 2, 128)], "dq": [(4, 3), (8, 2), (4, 2)], "dkdv": [(8, 2), (4, 2), (8, 3)]},
    "sm80": {"fwd": [(8, 3), (4, 2)], "dq": [(8, 2), (4, 2)], "dkdv": [(8, 2), (4, 2)]},
    "fp32": {"fwd": [(8, 2)], "dq": [(8, 2)], "dkdv": [(8, 2)]},
}


def _family(fp32: bool) -> str:
    if fp32:
        return "fp32"
    return "sm90" if _capability_major(torch.cuda.current_device() if torch.cuda.is_available() else -1) >= 9 else "sm80"


@functools.lru_cache(maxsize=None)
def _capability_major(device: int) -> int:
    return torch.cuda.get_device_capability(device)[0] if device >= 0 else 8


def launch_config(kind: str, fp32: bool, pattern: int = 0) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, warps, stages[, maxnreg]) of a kernel for a Pattern kind (0 dense, 1 local,
    2 block). Under the interpreter, only the tile."""
    if _interpreting():
        return _INTERPRET[kind]
    override = _tile_override(kind)
    if override:
        return override if len(override) >= 4 else (*override, *_default_config(kind, fp32, pattern)[2:])
    return _default_config(kind, fp32, pattern)


def _default_config(kind: str, fp32: bool, pattern: int) -> tuple[int, ...]:
    family = _family(fp32)
    return _SPARSE_TILES.get(family, {}).get(pattern, {}).get(kind, _TILES[family][kind])


def tile(kind: str, fp32: bool, pattern: int = 0) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a kernel: queries x keys per tile, for a Pattern kind."""
    block_m, block_n = launch_config(kind, fp32, pattern)[:2]
    return block_m, block_n


def _tile_override(kind: str):
    """Tuning runs: T5CORE_TILE_FWD=128x64 (tile), 128x64x8x3 (tile, warps, stages) or
    64x64x4x2x128 (and a register cap per thread, ptxas' maxnreg: occupancy, docs/kernels.md)."""
    name = f"T5CORE_TILE_{kind.upper()}"
    value = os.environ.get(name)
    if not value:
        return None
    try:
        config = tuple(int(x) for x in value.lower().split("x"))
    except ValueError:
        config = ()
    if len(config) not in (2, 4, 5):
        raise ValueError(f"{name}={value!r}: expected BMxBN, BMxBNxWARPSxSTAGES or BMxBNxWARPSxSTAGESxMAXNREG "
                         "(integers, e.g. 128x64x8x3x128); unset it for the default tile")
    return config


def _autotune_enabled() -> bool:
    # Off by default: the default configs are the measured best on the H200;
    # T5CORE_AUTOTUNE=1 tunes among them and _AUTOTUNE_MORE per length bucket.
    return os.environ.get("T5CORE_AUTOTUNE", "0") == "1"


_KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}
_TUNE_KEY = ["tune_len", "HEAD_DIM", "HAS_BIAS", "CAUSAL", "HAS_KEYLENS", "IS_VARLEN", "FP32_DOT", "BLOCK_M",
             "BLOCK_N", "PATTERN"]


def _launch_options(config: tuple) -> dict:
    """(warps, stages) or (warps, stages, maxnreg: a register cap per thread, for occupancy)."""
    return dict(zip(("num_warps", "num_stages", "maxnreg"), config))


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, family: str, default: tuple):
    configs = [triton.Config({}, **_launch_options(config)) for config in [default, *_AUTOTUNE_MORE[family][kind]]]
    return triton.autotune(configs, key=_TUNE_KEY)(_KERNELS[kind])


def _launch(kind: str, grid: tuple, fp32: bool, *args, pattern: int = 0, **kwargs):
    """Launch one kernel with its launch_config (fixed small launch under the interpreter); with
    T5CORE_AUTOTUNE=1, autotuned among that config's and _AUTOTUNE_MORE's warps/stages."""
    kernel = _KERNELS[kind]
    if _interpreting():
        kernel[grid](*args, **kwargs)
        return
    options = launch_config(kind, fp32, pattern)[2:]
    if not _autotune_enabled() or _tile_override(kind):  # the default first: no second env parse per launch
        launch(kernel, grid, *args, **_launch_options(options), **kwargs)
        return
    family = _family(fp32)
    _TUNED_USED.add((kind, family, options))
    _tuned(kind, family, options)[grid](*args, **kwargs)


def best_configs() -> dict:
    """The autotuner's choices so far, for benchmark reports: {kernel/family/default: {key: config}}."""
    if not _autotune_enabled():
        return {}
    return {f"{kind}/{family}/{'x'.join(map(str, options))}":
            {str(key): str(cfg) for key, cfg in _tuned(kind, family, options).cache.items()}
            for kind, family, options in sorted(_TUNED_USED)}


_TUNED_USED: set = set()


def _tune_len(n: int) -> int:
    return min(next_power_of_2(max(n, 1)), 1 << 17)


# ----------------------------------------------------------------------------------------------
# Host side: layouts, bias tables, launches
# ----------------------------------------------------------------------------------------------


class _BucketTables(NamedTuple):
    reach: int  # bucket_reach: the buckets are constant beyond +-reach, and the tables below span it
    lut: torch.Tensor  # int32 [2 * reach + 1]: bucket of rel = i - reach
    n_runs: int  # runs of equal buckets along rel (the first from -infinity, the last to +infinity)
    run_end: torch.Tensor  # int32 [next_power_of_2(num_buckets)]: first rel after each run (2^20: none)
    run_bucket: torch.Tensor  # one-hot fp32 [n_runs, num_buckets]: the bucket of each run


RUN_END_NONE = 1 << 20  # beyond every tile: the last run, and the padding up to a power of two


@functools.lru_cache(maxsize=64)
def _bucket_tables(bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device) -> _BucketTables:
    reach = bucket_reach(bidirectional, num_buckets, max_distance)
    lut = bucket_lut(bidirectional, num_buckets, max_distance)[max_distance - reach:max_distance + reach + 1]
    starts = [0] + [i for i in range(1, lut.numel()) if lut[i] != lut[i - 1]]  # indices where a run begins
    n_runs = len(starts)
    width = next_power_of_2(num_buckets)
    if n_runs > width:  # a bucket function whose buckets are not contiguous runs of rel
        raise ValueError(f"{n_runs} runs of equal buckets for {num_buckets} buckets: not supported by the kernels")
    run_end = torch.full((width,), RUN_END_NONE, dtype=torch.int32)
    run_end[:n_runs - 1] = torch.tensor([i - reach for i in starts[1:]], dtype=torch.int32)
    run_bucket = torch.nn.functional.one_hot(lut[starts].long(), num_buckets).to(torch.float32)
    return _BucketTables(reach, lut.to(device), n_runs, run_end.to(device), run_bucket.to(device))


def _run_sums_to_table(runs: torch.Tensor, tables: _BucketTables) -> torch.Tensor:
    """[..., num_buckets] from the kernels' dS sums per run of equal buckets [..., n_runs] (each run
    is one bucket). Fixed-order sums: deterministic."""
    return (runs[..., :, None] * tables.run_bucket).sum(-2)


def _bias_row(table: torch.Tensor, bucket_lut_: torch.Tensor, reach: int, lut_w: int, window: int = -1):
    """bias_lut [H, 2 * lut_w + 1] fp32: entry i is table[bucket(i - lut_w), h], -inf beyond a `local`
    window (window >= 0). One launch, straight from the [num_buckets, H] table."""
    heads = table.shape[1]
    bias_lut = torch.empty((heads, 2 * lut_w + 1, 2), dtype=torch.float32, device=table.device)
    launch(_bias_lut_kernel, (heads,), table, table.stride(0), table.stride(1), bucket_lut_, bias_lut, lut_w,
           REACH=reach, WINDOW=window, CHUNK=256 if _interpreting() else 1024)
    return bias_lut


def lut_width(reach: int, window: int, tiles: list[tuple[int, int]]) -> int:
    """Half-width of the bias row: every rel a near tile (or a `local` window tile) of these
    (BLOCK_M, BLOCK_N) tiles can hold, |rel| < max(reach, window) + BLOCK_M + BLOCK_N."""
    return max(reach, window) + max(rows + cols for rows, cols in tiles)


class _Layout:
    """Strides and sizes of either the batched [B, H, L, D] or the packed varlen [T, H, D] layout."""

    def __init__(self, q, k, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            self.heads = q.shape[1]
            self.seqlen_q, self.seqlen_k = max_seqlen_q, max_seqlen_k
            self.lse_shape = (self.heads, q.shape[0])
        else:
            self.batch, self.heads, self.seqlen_q = q.shape[0], q.shape[1], q.shape[2]
            self.seqlen_k = k.shape[2]
            self.lse_shape = (self.batch, self.heads, self.seqlen_q)
        self.head_dim = q.shape[-1]

    def strides(self, x):  # (batch, head, row)
        if self.varlen:
            return 0, x.stride(1), x.stride(0)
        return x.stride(0), x.stride(1), x.stride(2)

    def lse_strides(self, lse):
        if self.varlen:
            return 0, lse.stride(0)
        return lse.stride(0), lse.stride(1)


def _check(q, k, v, table, num_buckets, max_distance):
    d = q.shape[-1]
    if d < 16 or d > 128 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 128], got {d}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    heads = q.shape[-2] if q.dim() == 3 else q.shape[1]
    if table is not None and (table.dim() != 2 or tuple(table.shape) != (num_buckets, heads)):
        raise ValueError(f"table must be [num_buckets={num_buckets}, heads={heads}], got {tuple(table.shape)}")
    if max_distance < 1 or num_buckets < 2:
        raise ValueError(f"need max_distance >= 1 and num_buckets >= 2, got {max_distance}, {num_buckets}")


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


# Tests set this: every output buffer starts as NaN, so an element the kernels fail to write shows.
POISON_OUTPUTS = False


def _new(shape, dtype, device):
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf.fill_(float("nan")) if POISON_OUTPUTS else buf


def empty_like_input(x: torch.Tensor) -> torch.Tensor:
    """An output for input x (out for q, dq for q, ...) in x's memory layout when its last dim is
    contiguous. A model's q, k, v are [B, L, H, D] projections viewed as [B, H, L, D]; an output in
    that layout turns back into [B, L, H * D] without a copy (the heads merge, the gradients'
    way to the projections). The custom ops' fake implementations use it too (same strides)."""
    return torch.empty_like(x) if x.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _new_like(x: torch.Tensor) -> torch.Tensor:
    buf = empty_like_input(x)
    return buf.fill_(float("nan")) if POISON_OUTPUTS else buf


def _dummy(device, dtype=torch.int32):
    return torch.empty(1, dtype=dtype, device=device)


class Pattern(NamedTuple):
    """A sparse pattern for the kernels (docs/sparse.md); `Pattern()` is dense attention.

    kind: 0 dense, 1 local (|k - q| <= radius), 2 block (same block of block_size, or a key or
    query among the first num_global). Sparse patterns are encoder self-attention: query row i
    is real iff key i is (key_lengths), and padded query rows output 0.
    """
    kind: int = 0
    radius: int = 0
    block_size: int = 1
    num_global: int = 0

    def constexprs(self) -> dict:
        return dict(PATTERN=self.kind, RADIUS=self.radius, SBLOCK=self.block_size, NUM_GLOBAL=self.num_global)


DENSE_PATTERN = Pattern()


def _check_pattern(pattern: Pattern, q, k, causal, q_offset, varlen):
    if pattern.kind == 0:
        return
    if pattern.kind not in (1, 2):
        raise ValueError(f"unknown sparse pattern kind {pattern.kind} (1 local, 2 block)")
    if causal or q_offset or varlen or q.shape[-2] != k.shape[-2]:
        raise ValueError("sparse patterns are encoder self-attention: same query and key length, not causal, "
                         "no q_offset, not varlen")
    if pattern.radius < 0 or pattern.block_size < 1 or pattern.num_global < 0:
        raise ValueError(f"bad sparse pattern {pattern}: need radius >= 0, block_size >= 1, num_global >= 0")


def _with_window(table, pattern: Pattern, num_buckets: int, heads: int, device):
    """(table, window) for the bias row. `local` reads every tile's bias from a row with its
    window's mask folded in (window = radius), so it needs a table: zeros when there is none."""
    if pattern.kind != 1:
        return table, -1
    if table is None:
        table = torch.zeros((num_buckets, heads), dtype=torch.float32, device=device)
    return table, pattern.radius


def forward(q, k, v, table, key_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            bidirectional, num_buckets, max_distance, causal, q_offset, pattern: Pattern = DENSE_PATTERN):
    """Returns (out, lse). lse is the base-2 logsumexp per row (+inf for rows with no key)."""
    _check(q, k, v, table, num_buckets, max_distance)
    tables = _bucket_tables(bidirectional, num_buckets, max_distance, q.device)
    reach = tables.reach  # the kernels' near band: the buckets are constant beyond +-reach
    _check_pattern(pattern, q, k, causal, q_offset, cu_seqlens_q is not None)
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    lay = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = _new_like(q)
    lse = _new(lay.lse_shape, torch.float32, q.device)
    dummy = _dummy(q.device)
    fp32 = q.dtype == torch.float32
    block_m, block_n = tile("fwd", fp32, pattern=pattern.kind)
    table, window = _with_window(table, pattern, num_buckets, lay.heads, q.device)
    if table is not None:
        tiles = [(block_m, 2 * block_n)]  # NEAR_AHEAD reads one tile past the band
        if pattern.kind == 2:
            tiles.append(_global_tile("global_fwd", pattern.num_global, fp32))
        lut_w = lut_width(reach, window, tiles)
        bias_lut = _bias_row(table, tables.lut, reach, lut_w, window)
    else:
        bias_lut, lut_w = _dummy(q.device, torch.float32), 0
    _launch(
        "fwd", (cdiv(lay.seqlen_q, block_m), lay.batch * lay.heads), fp32,
        q, k, v, out, lse, bias_lut,
        key_lengths if key_lengths is not None else dummy,
        cu_seqlens_q if lay.varlen else dummy, cu_seqlens_k if lay.varlen else dummy,
        *lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.strides(out), *lay.lse_strides(lse),
        lay.heads, lay.seqlen_q, lay.seqlen_k, q_offset, lut_w,
        _tune_len(max(lay.seqlen_q, lay.seqlen_k)),
        HAS_BIAS=table is not None, REACH=reach, CAUSAL=causal,
        HAS_KEYLENS=key_lengths is not None, IS_VARLEN=lay.varlen, FP32_DOT=fp32, HEAD_DIM=lay.head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, **pattern.constexprs(),
        LEAD_N=min(block_n, max(16, next_power_of_2(pattern.num_global))) if pattern.kind == 2 else 0,
        pattern=pattern.kind,
    )
    if pattern.kind == 2 and pattern.num_global > 0:
        _global_rows_forward(q, k, v, out, lse, bias_lut, lut_w, key_lengths, table is not None, reach, pattern,
                             fp32)
    return out, lse


def backward(do, q, k, v, out, lse, table, key_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             bidirectional, num_buckets, max_distance, causal, q_offset, pattern: Pattern = DENSE_PATTERN,
             table_grad: bool = True, delta=None, dq_dtype=None):
    """Returns (dq, dk, dv, dtable); dtable is an empty tensor when table is None or not table_grad (a
    frozen table: the dq kernel then skips the per-bucket dS sums, most of a near tile's cost).
    delta: `row_delta(out, do)` when the caller has it already; dq_dtype: dq's dtype when it is not
    q's (transient-global: fp32, which the side dq kernel finishes)."""
    tables = _bucket_tables(bidirectional, num_buckets, max_distance, q.device)
    reach = tables.reach
    q, k, v, out = (_last_dim_contiguous(x) for x in (q, k, v, out))
    do = _last_dim_contiguous(do)  # the kernels read it through its strides (stride 0 too)
    lay = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dummy = _dummy(q.device)
    keylens = key_lengths if key_lengths is not None else dummy
    cu_q = cu_seqlens_q if lay.varlen else dummy
    cu_k = cu_seqlens_k if lay.varlen else dummy
    fp32 = q.dtype == torch.float32
    tune_len = _tune_len(max(lay.seqlen_q, lay.seqlen_k))
    bh = lay.batch * lay.heads

    # The dq kernel computes delta (ROW_DELTA) before dk/dv read it, one pass over O and dO fewer
    # (fifteenth session, 128k / 1M forward+backward: `local` -2% / -4%, dense even), except for
    # `block`, whose dq kernel then spills (4 -> 88 bytes, sm90) and ran 3% slower at both lengths.
    row_delta_in_dq = delta is None and pattern.kind != 2
    if row_delta_in_dq:
        delta = _new(lay.lse_shape, torch.float32, q.device)
    elif delta is None:
        delta = _row_delta(out, do, lay, cu_q)

    wants_dtable = table is not None and table_grad
    table, window = _with_window(table, pattern, num_buckets, lay.heads, q.device)
    has_bias = table is not None
    dq_m, dq_n = tile("dq", fp32, pattern=pattern.kind)
    kv_m, kv_n = tile("dkdv", fp32, pattern=pattern.kind)
    if has_bias:
        tiles = [(dq_m, dq_n), (kv_m, kv_n)]
        if pattern.kind == 2:
            tiles.append(_global_tile("side_dq", pattern.num_global, fp32))
        lut_w = lut_width(reach, window, tiles)
        bias_lut = _bias_row(table, tables.lut, reach, lut_w, window)
    else:
        bias_lut, lut_w = _dummy(q.device, torch.float32), 0
    if wants_dtable:  # per query block: the dS sum per run of equal buckets (_run_sums)
        parts = torch.zeros((lay.batch, lay.heads, cdiv(lay.seqlen_q, dq_m), tables.n_runs),
                            dtype=torch.float32, device=q.device)
    else:
        parts = _dummy(q.device, torch.float32).view(1, 1, 1)

    dq = _new_like(q) if dq_dtype in (None, q.dtype) else torch.empty_like(q, dtype=dq_dtype)
    dk = _new_like(k)
    dv = _new_like(v)
    _launch(
        "dq", (cdiv(lay.seqlen_q, dq_m), bh), fp32,
        q, k, v, do, dq, lse, delta, out, bias_lut, tables.run_end, parts, keylens, cu_q, cu_k,
        *lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.strides(do), *lay.strides(dq),
        *lay.lse_strides(lse), parts.stride(0), parts.stride(1), parts.stride(2), *lay.strides(out),
        lay.heads, lay.seqlen_q, lay.seqlen_k, q_offset, lut_w, tune_len,
        HAS_BIAS=has_bias, DTABLE=wants_dtable, N_RUNS=tables.n_runs, NB_POW2=tables.run_end.numel(),
        REACH=reach, CAUSAL=causal, ROW_DELTA=row_delta_in_dq,
        HAS_KEYLENS=key_lengths is not None, IS_VARLEN=lay.varlen, FP32_DOT=fp32, HEAD_DIM=lay.head_dim,
        BLOCK_M=dq_m, BLOCK_N=dq_n, **pattern.constexprs(),
        pattern=pattern.kind,
    )
    _launch(
        "dkdv", (cdiv(lay.seqlen_k, kv_n), bh), fp32,
        q, k, v, do, dk, dv, lse, delta, bias_lut, keylens, cu_q, cu_k,
        *lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.strides(do), *lay.strides(dk),
        *lay.strides(dv), *lay.lse_strides(lse),
        lay.heads, lay.seqlen_q, lay.seqlen_k, q_offset, lut_w, tune_len,
        HAS_BIAS=has_bias, REACH=reach, CAUSAL=causal,
        HAS_KEYLENS=key_lengths is not None, IS_VARLEN=lay.varlen, FP32_DOT=fp32, HEAD_DIM=lay.head_dim,
        BLOCK_M=kv_m, BLOCK_N=kv_n, **pattern.constexprs(),
        pattern=pattern.kind,
    )
    global_runs = 0.0
    if pattern.kind == 2 and pattern.num_global > 0:
        global_runs = _global_backward(q, k, v, do, lse, delta, dq, dk, dv, bias_lut, lut_w, tables, key_lengths,
                                         has_bias, wants_dtable, pattern, fp32)
    if wants_dtable:
        # Deterministic: fixed-order torch sums over (batch, query block) partials.
        runs = parts.sum(dim=(0, 2)) + global_runs  # [H, runs]
        dtable = _run_sums_to_table(runs, tables).t().to(table.dtype).contiguous()
    else:
        dtable = torch.empty(0, dtype=q.dtype, device=q.device)
    return dq, dk, dv, dtable


def _row_delta(out, do, lay: _Layout, cu_q) -> torch.Tensor:
    """delta = rowsum(dO * O) fp32, in lse's shape: the softmax backward's row term."""
    delta = _new(lay.lse_shape, torch.float32, out.device)
    block = 64 if lay.head_dim <= 64 else 32
    launch(
        _bwd_delta_kernel, (cdiv(lay.seqlen_q, block), lay.batch * lay.heads),
        out, do, delta, cu_q, *lay.strides(out), *lay.strides(do), *lay.lse_strides(delta),
        lay.heads, lay.seqlen_q, IS_VARLEN=lay.varlen, HEAD_DIM=lay.head_dim, BLOCK_M=block,
    )
    return delta


def row_delta(out, do) -> torch.Tensor:
    """delta [B, H, L] fp32 = rowsum(dO * O) of a batched [B, H, L, D] output and its gradient."""
    out, do = _last_dim_contiguous(out), _last_dim_contiguous(do)
    return _row_delta(out, do, _Layout(out, out), _dummy(out.device))


# ---- `block` pattern: global rows and columns (the split kernels above) ----------------------


GLOBAL_MIN_CHUNK = 1024  # tests lower it to split short sequences into many chunks
SPLIT_PROGRAMS = 2048  # programs a split launch aims for: enough waves for every SM of an H200


def _global_chunk(length: int, tile_len: int, tiles: int) -> int:
    """Chunk of the long axis per program of the split kernels, whose grid is chunks x `tiles`
    (short-axis tiles times batch and heads): as few chunks as give SPLIT_PROGRAMS programs (each
    chunk costs an fp32 partial of every tile, summed in torch), at most 128, at least
    GLOBAL_MIN_CHUNK positions (rounded up to whole tiles)."""
    chunks = min(max(cdiv(SPLIT_PROGRAMS, tiles), 1), 128)
    return tile_len * cdiv(max(cdiv(length, chunks), GLOBAL_MIN_CHUNK), tile_len)


def _launch_side(kernel, kind: str, fp32: bool, grid: tuple, *args, **kwargs):
    """Launch a side_* kernel (no autotune) with its launch_config's warps, stages and register cap."""
    options = {} if _interpreting() else _launch_options(launch_config(kind, fp32)[2:])
    launch(kernel, grid, *args, **options, **kwargs)


def _global_tile(kind: str, num_global: int, fp32: bool) -> tuple[int, int]:
    """The global rows' tile ("global_fwd" forward, "side_dq" dq): its config's, with no more rows
    than the global ones need (at least 16, a dot's smallest): 16 global rows take one 16-row
    tile, not a 64-row one."""
    block_m, block_n = tile(kind, fp32)
    return min(block_m, max(16, next_power_of_2(num_global))), block_n


def _global_rows_forward(q, k, v, out, lse, bias_lut, lut_w, key_lengths, has_bias, reach, pattern, fp32):
    """Out and lse of the global rows, in place: split over keys, then merged by one kernel."""
    batch, heads, length, dim = q.shape
    block_m, block_n = _global_tile("global_fwd", pattern.num_global, fp32)
    n_tiles = cdiv(min(pattern.num_global, length), block_m)
    rows = n_tiles * block_m
    chunk = _global_chunk(length, block_n, n_tiles * batch * heads)
    n_chunks = cdiv(length, chunk)
    part_m = torch.empty((n_chunks, batch * heads, rows), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((n_chunks, batch * heads, rows, dim), dtype=torch.float32, device=q.device)
    _launch_side(
        _global_rows_fwd_kernel, "global_fwd", fp32, (n_chunks, batch * heads, n_tiles),
        q, k, v, part_m, part_l, part_acc, bias_lut, key_lengths if key_lengths is not None else _dummy(q.device),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), heads, length, chunk, rows, lut_w,
        HAS_BIAS=has_bias, HAS_KEYLENS=key_lengths is not None, REACH=reach, FP32_DOT=fp32,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    real = min(pattern.num_global, length)  # the main kernel wrote the rest of its tiles
    launch(
        _merge_global_rows_kernel, (batch * heads, real),
        part_m, part_l, part_acc, out, lse, key_lengths if key_lengths is not None else _dummy(q.device),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), heads, length, n_chunks, rows,
        HAS_KEYLENS=key_lengths is not None, HEAD_DIM=dim, CHUNKS=next_power_of_2(n_chunks),
        CHUNK_BLOCK=min(32, next_power_of_2(n_chunks)),
    )


def _far_rows(q_pos: torch.Tensor, n_tiles: int, block_n: int, reach: int) -> torch.Tensor:
    """[B, n_tiles, 2] int32: for key tile t (keys t * block_n ...), the rows before which every
    query position is <= its first key - reach, and from which every one is >= its last key +
    reach. q_pos [B, L]: block ids as make_layout gives them for a right-padded mask, nondecreasing
    and then -1 on the padding (which sees no side key: lse = +inf, so any bias serves it); other
    block ids are rejected (checked on the device)."""
    pos = torch.where(q_pos < 0, torch.iinfo(torch.int32).max, q_pos).to(torch.int32).contiguous()
    torch._assert_async((pos[:, 1:] >= pos[:, :-1]).all(),
                        "transient-global block ids must not decrease along a row, with -1 only on the "
                        "right padding (t5core.sparse.make_layout of a right-padded mask gives such)")
    first = torch.arange(n_tiles, device=q_pos.device, dtype=torch.int32) * block_n
    before = torch.searchsorted(pos, (first - reach).expand(pos.shape[0], -1).contiguous(), right=True)
    after = torch.searchsorted(pos, (first + block_n - 1 + reach).expand(pos.shape[0], -1).contiguous())
    return torch.stack([before, after], dim=-1).to(torch.int32).contiguous()


def _split_dkdv(q, k, v, do, lse, delta, bias_lut, lut_w, key_lengths, q_pos, first_keys, has_bias, reach,
                pattern: Pattern):
    """dk, dv (fp32) of the key tiles holding the first `first_keys` keys, over every query, the
    query axis split into chunks (_split_dkdv_kernel) and summed: [B, H, min(tiles' keys, Lk), D].
    q_pos [B, L] (transient-global's block ids) gives the query positions, else the row index."""
    batch, heads, length, dim = q.shape
    fp32 = q.dtype == torch.float32
    block_m, block_n = tile("side_dkdv", fp32)
    if q_pos is None:  # `block`'s global keys alone (the main dk/dv kernel does the rest of their tile)
        block_n = min(block_n, max(16, next_power_of_2(first_keys)))
    n_tiles = cdiv(first_keys, block_n)
    cols, chunk = n_tiles * block_n, _global_chunk(length, block_m, n_tiles * batch * heads)
    n_chunks = cdiv(length, chunk)
    part_dk = torch.empty((n_chunks, batch * heads, cols, dim), dtype=torch.float32, device=q.device)
    part_dv = torch.empty_like(part_dk)
    q_pos_arg = q_pos if q_pos is not None else _dummy(q.device)
    far_rows = _far_rows(q_pos, n_tiles, block_n, reach) if q_pos is not None else _dummy(q.device)
    _launch_side(
        _split_dkdv_kernel, "side_dkdv", fp32, (n_chunks, batch * heads, n_tiles),
        q, k, v, do, lse, delta, part_dk, part_dv, bias_lut,
        key_lengths if key_lengths is not None else _dummy(q.device), q_pos_arg, far_rows,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1),
        q_pos_arg.stride(0) if q_pos is not None else 0, heads, length, k.shape[2], chunk, cols, lut_w,
        HAS_BIAS=has_bias, HAS_KEYLENS=key_lengths is not None, REACH=reach, FP32_DOT=fp32,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, PATTERN=pattern.kind, SBLOCK=pattern.block_size,
        NUM_GLOBAL=pattern.num_global, Q_POS_TENSOR=q_pos is not None,
    )
    keys = min(first_keys, k.shape[2])
    return (part_dk.sum(0).view(batch, heads, cols, dim)[:, :, :keys],
            part_dv.sum(0).view(batch, heads, cols, dim)[:, :, :keys])


def _global_backward(q, k, v, do, lse, delta, dq, dk, dv, bias_lut, lut_w, tables, key_lengths, has_bias,
                     wants_dtable, pattern, fp32):
    """dq of the global rows' tiles and dk, dv of the global keys' tiles, split and summed; returns
    their dS sums per run of equal buckets [H, runs] (zeros unless wants_dtable)."""
    reach = tables.reach
    batch, heads, length, dim = q.shape
    bh = batch * heads
    keylens = key_lengths if key_lengths is not None else _dummy(q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
               v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1))
    n_global = min(pattern.num_global, length)

    block_m, block_n = _global_tile("side_dq", pattern.num_global, fp32)
    n_tiles = cdiv(n_global, block_m)
    rows, chunk = n_tiles * block_m, _global_chunk(length, block_n, n_tiles * bh)
    n_chunks = cdiv(length, chunk)
    part_dq = torch.empty((n_chunks, bh, rows, dim), dtype=torch.float32, device=q.device)
    part_table = torch.zeros((n_chunks, bh, n_tiles, tables.n_runs), dtype=torch.float32, device=q.device)
    _launch_side(
        _global_rows_dq_kernel, "side_dq", fp32, (n_chunks, bh, n_tiles),
        q, k, v, do, lse, delta, part_dq, part_table, bias_lut, tables.run_end, keylens, *strides, heads, length,
        chunk, rows, lut_w,
        DTABLE=wants_dtable, N_RUNS=tables.n_runs, NB_POW2=tables.run_end.numel(), BLOCK_M=block_m,
        BLOCK_N=block_n, HAS_BIAS=has_bias, HAS_KEYLENS=key_lengths is not None, REACH=reach, FP32_DOT=fp32,
        HEAD_DIM=dim, NUM_GLOBAL=pattern.num_global,
    )
    # The main dq kernel wrote the other rows of its tiles (and 0 for the global ones).
    dq[:, :, :n_global] = part_dq.sum(0).view(batch, heads, rows, dim)[:, :, :n_global].to(dq.dtype)

    part_dk, part_dv = _split_dkdv(q, k, v, do, lse, delta, bias_lut, lut_w, key_lengths, None, n_global, has_bias,
                                   reach, pattern)
    real = part_dk.shape[2]
    dk[:, :, :real] = part_dk.to(dk.dtype)
    dv[:, :, :real] = part_dv.to(dv.dtype)
    return part_table.sum(dim=(0, 2)).view(batch, heads, tables.n_runs).sum(0)  # [H, runs]


# ---- `transient-global` (forward; inference) ----------------------------------------------------


def side_forward(q, side_k, side_v, side_lut, block_ids, side_lengths, out, lse):
    """Side attention of transient-global, merged into the local window's softmax in place: out
    [B, H, L, D] and its base-2 lse [B, H, L] (+inf: no key) come from the local forward and leave
    as the one softmax over the window and the side keys (rows with no block keep theirs).

    side_k, side_v [B, H, G, D]; side_lut [H, 2 * reach + 1, 2] fp32 (`side_lut`): the global table at
    bucket(rel) for rel in +-reach (constant beyond); block_ids [B, L] ints (-1: none);
    side_lengths [B] ints: side keys of each row."""
    reach = (side_lut.shape[1] - 1) // 2
    _check(q, side_k, side_v, None, 32, reach)
    q, side_k, side_v = (_last_dim_contiguous(x) for x in (q, side_k, side_v))
    batch, heads, length, dim = q.shape
    fp32 = q.dtype == torch.float32
    block_m, block_n = tile("side_fwd", fp32)
    block_ids = block_ids.contiguous()
    _launch_side(
        _side_fwd_kernel, "side_fwd", fp32, (cdiv(length, block_m), batch * heads),
        q, side_k, side_v, out, lse, block_ids, side_lengths.contiguous(), side_lut.float().contiguous(),
        q.stride(0), q.stride(1), q.stride(2), side_k.stride(0), side_k.stride(1), side_k.stride(2),
        side_v.stride(0), side_v.stride(1), side_v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), block_ids.stride(0), heads, length,
        HAS_BIAS=True, REACH=reach, FP32_DOT=fp32, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out, lse


def side_lut(table: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """The (global) table's bias row (`_bias_row`) at the bidirectional bucket of every rel in +-reach
    (bucket_reach: constant beyond)."""
    tables = _bucket_tables(True, num_buckets, max_distance, table.device)
    return _bias_row(table, tables.lut, tables.reach, tables.reach)


def side_backward(do, q, side_k, side_v, lse, delta, dq_local, table, block_ids, side_lengths, num_buckets,
                  max_distance):
    """Gradients of the side part of transient-global, given the merged softmax's lse and delta
    (`row_delta` of the merged output) and the local window's dq (fp32, `backward(..., dq_dtype=
    torch.float32)`): (dq [B, H, L, D] in q's dtype, the sum of both parts, d side_k, d side_v,
    d table [num_buckets, H])."""
    q, side_k, side_v, do = (_last_dim_contiguous(x) for x in (q, side_k, side_v, do))
    batch, heads, length, dim = q.shape
    fp32 = q.dtype == torch.float32
    block_ids = block_ids.contiguous()
    # Rows that see no side key (block id -1) get lse = +inf here, hence p = 0 against side keys.
    lse = torch.where(block_ids[:, None, :] < 0, float("inf"), lse).contiguous()
    delta = delta.contiguous()  # lse's strides serve both
    lut = side_lut(table, num_buckets, max_distance)
    tables = _bucket_tables(True, num_buckets, max_distance, q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), side_k.stride(0), side_k.stride(1), side_k.stride(2),
               side_v.stride(0), side_v.stride(1), side_v.stride(2), do.stride(0), do.stride(1), do.stride(2),
               lse.stride(0), lse.stride(1), block_ids.stride(0))

    block_m, block_n = tile("side_dq", fp32)
    n_tiles = cdiv(length, block_m)
    dq = _new_like(q)
    parts = torch.zeros((batch, heads, n_tiles, tables.n_runs), dtype=torch.float32, device=q.device)
    _launch_side(
        _side_dq_kernel, "side_dq", fp32, (n_tiles, batch * heads),
        q, side_k, side_v, do, lse, delta, dq_local, dq, parts, block_ids, side_lengths, lut, tables.run_end,
        *strides, parts.stride(0), parts.stride(1), parts.stride(2), dq_local.stride(0), dq_local.stride(1),
        dq_local.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), heads, length,
        N_RUNS=tables.n_runs, NB_POW2=tables.run_end.numel(), REACH=tables.reach, FP32_DOT=fp32, HEAD_DIM=dim,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )

    d_side_k, d_side_v = _split_dkdv(q, side_k, side_v, do, lse, delta, lut, tables.reach, side_lengths, block_ids,
                                     side_k.shape[2], True, tables.reach, DENSE_PATTERN)
    d_side_k, d_side_v = d_side_k.to(side_k.dtype), d_side_v.to(side_v.dtype)
    d_table = _run_sums_to_table(parts.sum(dim=(0, 2)), tables).t().to(table.dtype).contiguous()
    return dq, d_side_k, d_side_v, d_table
