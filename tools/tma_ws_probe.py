#!/usr/bin/env python
"""Does Triton's Hopper warp specialisation or TMA help t5core's attention? A probe on the GPU.

    OUT=bench/results python tools/tma_ws_probe.py      # writes $OUT/tma-ws.json

A minimal flash forward (no bias, no masks: the loop every t5core attention kernel is built on)
in three forms: pointer loads (as t5core's kernels), tensor-descriptor (TMA) loads, and TMA loads
with `tl.range(..., warp_specialize=True)`, Triton's automatic warp specialisation (on sm90 it
only partitions loops of descriptor loads: on t5core's pointer loops the attribute is ignored).
Each runs dense (16k keys per row) and block-like (each 64- or 128-row tile over its own
512- or 4096-key block, as `block` attention without its bias and global rows), 12 heads, d 64,
bf16; timed with `triton.testing.do_bench` (median) and checked against the first
configuration's output (`err`: max abs difference; NaN means a miscompiled kernel).
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_fwd(Q, K, V, O, L, S, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr,
               DESC: tl.constexpr):
    # q, k, v, o: [heads * L, D] contiguous; program (query tile, head) attends to its S-key block.
    pid = tl.program_id(0)
    row0 = tl.program_id(1) * L
    m0 = pid * BM
    lo = (m0 // S) * S
    hi = tl.minimum(lo + S, L)
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BN)
    if DESC:
        rows = L * tl.num_programs(1)
        q_desc = tl.make_tensor_descriptor(Q, shape=[rows, D], strides=[D, 1], block_shape=[BM, D])
        k_desc = tl.make_tensor_descriptor(K, shape=[rows, D], strides=[D, 1], block_shape=[BN, D])
        v_desc = tl.make_tensor_descriptor(V, shape=[rows, D], strides=[D, 1], block_shape=[BN, D])
        q = q_desc.load([row0 + m0, 0])
    else:
        q = tl.load(Q + (row0 + offs_m)[:, None] * D + offs_d[None, :])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for n in tl.range(lo, hi, BN, warp_specialize=WS):
        if DESC:
            k = k_desc.load([row0 + n, 0])
            v = v_desc.load([row0 + n, 0])
        else:
            k = tl.load(K + (row0 + n + offs_n)[:, None] * D + offs_d[None, :])
            v = tl.load(V + (row0 + n + offs_n)[:, None] * D + offs_d[None, :])
        s = tl.dot(q, k.T) * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(O + (row0 + offs_m)[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


# (BM, BN, warps, stages, warp_specialize, descriptors); the first is the reference output.
CONFIGS = [(128, 64, 8, 3, False, False), (64, 32, 4, 3, False, False), (64, 64, 4, 3, False, False),
           (128, 64, 8, 3, False, True), (64, 64, 4, 3, False, True),
           (128, 64, 4, 3, True, True), (128, 128, 4, 2, True, True), (64, 64, 4, 3, True, True),
           (128, 64, 4, 2, True, True), (64, 32, 4, 3, True, True)]
SHAPES = [(16384, 16384), (131072, 512), (131072, 4096)]  # (keys per head, block)


def main() -> None:
    # Device-side descriptors need a scratch allocation per launch.
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    heads, dim = 12, 64
    rows = []
    for L, S in SHAPES:
        q, k, v = (torch.randn(heads * L, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = None
        for bm, bn, warps, stages, ws, desc in CONFIGS:
            o = torch.empty_like(q)

            def run():
                _probe_fwd[(L // bm, heads)](q, k, v, o, L, S, BM=bm, BN=bn, D=dim, WS=ws, DESC=desc,
                                             num_warps=warps, num_stages=stages)
            run()
            torch.cuda.synchronize()
            ref = o.clone() if ref is None else ref
            ms = triton.testing.do_bench(run, warmup=50, rep=300)
            scores = heads * L * min(S, L)
            row = dict(L=L, S=S, BM=bm, BN=bn, warps=warps, stages=stages, ws=ws, desc=desc, ms=ms,
                       err=(o.float() - ref.float()).abs().max().item(), tflops=4 * dim * scores / ms / 1e9)
            rows.append(row)
            print(row, flush=True)
    path = os.path.join(os.environ.get("OUT", "."), "tma-ws.json")
    json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   rows=rows), open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
