#!/usr/bin/env python
"""What the host spends on one attention call, and whether it waits for the GPU.

    python tools/host_overhead.py [--length 4096] [--rows 25]

For dense flash and each sparse mode (bf16, 12 heads, d 64, batch 1, the benchmarks'
parameters), forward and forward+backward with the T5 bias: the host's time to enqueue one
call (GPU idle before it), the wall time per call back to back, and the calls that synchronise
with the GPU (torch.cuda.set_sync_debug_mode("warn") during one call). Then, per mode, one
forward+backward's Python functions by own time in µs (cProfile; pstats prints milliseconds to
three places, too coarse here) and its torch ops by self CPU time (torch.profiler, warmed up
first: its first active step inflates every op). cProfile's own time for the custom ops'
`backend_impl` (1.5-3 ms in the twelfth session) is not found by direct timing
(tools/custom_op_cost.py): read it as time the thread spent waiting, not computing. When the
host time is near the wall time, the call is bound by launches at that length: attention alone
is not CUDA-graphed. A diagnosis tool; the benchmark is bench_attention.py.
"""
from __future__ import annotations

import argparse
import warnings

import torch
from bench_attention import SPARSE_PARAMS, tglobal_inputs  # tools/ is on the path when run as a script
from profile_attention import host_and_wall
from profile_model import cprofile_call


def make_call(mode: str, length: int, backward: bool):
    from t5core.kernels import flash_attention, sparse_attention, transient_global_attention

    torch.manual_seed(0)
    heads, dim = 12, 64
    q, k, v = (torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
               for _ in range(3))
    table = torch.randn(32, heads, device="cuda", requires_grad=backward)
    dout = torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16)
    side = tglobal_inputs(length, heads, dim, torch.bfloat16, 16, backward, backward) if mode == "transient-global" else ()

    def call():
        for leaf in (q, k, v, table, *side[:3]):
            leaf.grad = None
        if mode == "dense":
            out = flash_attention(q, k, v, table)
        elif mode == "transient-global":
            out = transient_global_attention(q, k, v, table, *side, **SPARSE_PARAMS["local"])
        else:
            out = sparse_attention(q, k, v, table, pattern=mode, **SPARSE_PARAMS[mode])
        if backward:
            out.backward(dout)

    return call


def syncs(call) -> list[str]:
    """The distinct synchronising-operation warnings of one call."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    messages = {str(w.message).splitlines()[0][:160] for w in caught}
    notice = "Synchronization debug mode is a prototype"  # printed once per process, not a sync
    return sorted(m for m in messages if not m.startswith(notice))


def own_time_table(call, rows: int) -> None:
    stats = cprofile_call(call).stats  # {(file, line, name): (calls, primitive, own, cumulative, callers)}
    total = sum(entry[2] for entry in stats.values())
    print(f"   cProfile: {total * 1e3:.3f} ms in {sum(entry[0] for entry in stats.values())} calls; by own time:")
    for (file, line, name), (ncalls, _, own, cumulative, _) in sorted(stats.items(), key=lambda x: -x[1][2])[:rows]:
        where = f"{file.split('site-packages/')[-1].split('/work/')[-1]}:{line}({name})"
        print(f"   {own * 1e6:9.1f} us own {cumulative * 1e6:9.1f} us cum {ncalls:5d}x  {where[-110:]}")


def op_table(call, rows: int) -> None:
    """torch.profiler's CPU ops of forward+backward by self time, the profiler warmed up first
    (its first active step inflates every op)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=2, active=4)) as prof:
        for _ in range(7):
            call()
            prof.step()
    torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--modes", default="dense,local,block,transient-global")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    for mode in args.modes.split(","):
        for backward in (False, True):
            call = make_call(mode, args.length, backward)
            for _ in range(3):  # compile and warm up
                call()
            kind = "fwd+bwd" if backward else "fwd"
            host, wall = host_and_wall(call, steps=10)
            print(f"== {mode} {kind} L={args.length}: host {host:.3f} ms per call, back to back {wall:.3f} ms per call")
            for message in syncs(call):
                print(f"   sync: {message}")
            if backward:
                own_time_table(call, args.rows)
                op_table(call, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
