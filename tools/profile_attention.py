#!/usr/bin/env python
"""Where an attention call's time goes: CUDA kernel times of t5core flash, with and without bias.

    python tools/profile_attention.py [--lengths 4096] [--steps 20] [--table-dtype bfloat16]
    python tools/profile_attention.py --pattern local --lengths 131072

bf16, 12 heads, head dim 64, batch x length = 16k tokens (as bench_attention.py). For each
length, forward and forward+backward with the T5 bias and without: the kernels by total CUDA
time per call (torch.profiler), so the cost of the bias shows kernel by kernel (near tiles in
the main kernels, the bias-row and table-gradient kernels around them), then the host's time to
enqueue one call and the wall time per call back to back: a call whose host time is near its
GPU time is bound by launches, and its timings move with the host's speed
(tools/host_overhead.py says where the host's time goes). --pattern local,
block or transient-global profiles the sparse modes (radius 127; blocks of 512 with 16 global
tokens; one side key per 16 tokens, its global table always on), batch 1.
A diagnosis tool: the benchmark is bench_attention.py.
"""
from __future__ import annotations

import argparse
import time

import torch
from bench_attention import SPARSE_PARAMS, tglobal_inputs  # tools/ is on the path when run as a script
from profile_model import table as kernel_table
from torch.profiler import ProfilerActivity, profile


def main() -> int:
    from t5core.kernels import flash_attention, sparse_attention, transient_global_attention

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--table-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the bias table's dtype (a bf16 model's is bf16)")
    p.add_argument("--pattern", default="dense", choices=["dense", "local", "block", "transient-global"])
    args = p.parse_args()
    H, D = 12, 64
    for L in (int(x) for x in args.lengths.split(",")):
        B = max(1, args.tokens // L) if args.pattern == "dense" else 1
        for with_bias in (True, False):
            for backward in (False, True):
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                           for _ in range(3))
                table = (torch.randn(32, H, device="cuda", dtype=getattr(torch, args.table_dtype),
                                     requires_grad=backward) if with_bias else None)
                dout = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
                side = (tglobal_inputs(L, H, D, torch.bfloat16, 16, backward, backward)
                        if args.pattern == "transient-global" else ())

                def call():
                    for leaf in (q, k, v, table, *side[:3]):  # no accumulation into .grad (as inside a model)
                        if leaf is not None:
                            leaf.grad = None
                    if args.pattern == "dense":
                        out = flash_attention(q, k, v, table)
                    elif args.pattern == "transient-global":
                        out = transient_global_attention(q, k, v, table, *side, **SPARSE_PARAMS["local"])
                    else:
                        out = sparse_attention(q, k, v, table, pattern=args.pattern, **SPARSE_PARAMS[args.pattern])
                    if backward:
                        out.backward(dout)

                for _ in range(3):  # compile and warm up
                    call()
                host, wall = host_and_wall(call, args.steps)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.steps):
                        call()
                    torch.cuda.synchronize()
                kernel_table(prof, 40, f"{args.pattern} L={L} B={B} "
                             f"{args.table_dtype + ' bias' if with_bias else 'no bias'} "
                             f"{'fwd+bwd' if backward else 'fwd'}", steps=args.steps)
                print(f"host {host:.3f} ms per call to enqueue, wall {wall:.3f} ms per call back to back")
    return 0


def host_ms(call, calls: int = 4, rounds: int = 3) -> float:
    """Host ms to enqueue one call, the GPU idle before each round: the median over `rounds` of
    `calls` calls each. Few calls per round: more would fill the launch queue (~1000 launches),
    and the host would then wait for the GPU."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def host_and_wall(call, steps: int) -> tuple[float, float]:
    """(host ms to enqueue one call, wall ms per call back to back). Measured before the profiler
    runs (its hooks slow the host)."""
    host = host_ms(call)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        call()
    torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / steps * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
