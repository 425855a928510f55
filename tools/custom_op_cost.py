#!/usr/bin/env python
"""Host cost of the torch.library custom-op wrapper around t5core's flash forward and backward.

    python tools/custom_op_cost.py [--length 1024]

Times (host, GPU idle before each batch of calls) the same forward and backward called through
the custom ops (`torch.ops.t5core.flash_attention_fwd/bwd`, what flash_attention and
sparse_attention use) and through `t5core.kernels.flash.forward/backward` directly, dense and
`block` (bf16, 12 heads, d 64, batch 1, the T5 bias). The difference is the wrapper's cost.
A diagnosis tool.
"""
from __future__ import annotations

import argparse
import time

import torch


def host_us(fn, calls: int = 8, rounds: int = 5) -> float:
    """Median over rounds of the host time per call for `calls` calls (the queue stays short)."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main() -> int:
    from t5core.kernels import flash
    from t5core.kernels import ops  # noqa: F401 - registers torch.ops.t5core

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, 12, args.length, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    table = torch.randn(32, 12, device="cuda")
    for name, pattern in (("dense", (0, 0, 1, 0)), ("block", (2, 0, 512, 16))):
        pat = flash.Pattern(*pattern)
        out, lse = flash.forward(q, k, v, table, None, None, None, 0, 0, True, 32, 128, False, 0, pat)
        direct_fwd = lambda: flash.forward(q, k, v, table, None, None, None, 0, 0, True, 32, 128, False, 0, pat)  # noqa: E731
        op_fwd = lambda: torch.ops.t5core.flash_attention_fwd(q, k, v, table, None, True, 32, 128, False, 0, *pattern)  # noqa: E731
        direct_bwd = lambda: flash.backward(do, q, k, v, out, lse, table, None, None, None, 0, 0, True, 32, 128,  # noqa: E731
                                            False, 0, pat, True)
        op_bwd = lambda: torch.ops.t5core.flash_attention_bwd(do, q, k, v, out, lse, table, None, True, 32, 128,  # noqa: E731
                                                              False, 0, *pattern, True)
        for label, fn in (("fwd direct", direct_fwd), ("fwd custom op", op_fwd), ("bwd direct", direct_bwd),
                          ("bwd custom op", op_bwd)):
            for _ in range(3):
                fn()
            print(f"{name:6s} {label:14s} {host_us(fn):8.1f} us host per call")
        # The same under autograd: the forward op with inputs that need grad, then backward alone.
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        tg = table.clone().requires_grad_()
        autograd_fwd = lambda: torch.ops.t5core.flash_attention_fwd(qg, kg, vg, tg, None, True, 32, 128, False, 0,  # noqa: E731
                                                                    *pattern)
        for _ in range(3):
            autograd_fwd()
        print(f"{name:6s} {'fwd autograd':14s} {host_us(autograd_fwd):8.1f} us host per call")
        times = []
        for _ in range(8):
            o, _ = autograd_fwd()
            torch.cuda.synchronize()
            start = time.perf_counter()
            torch.autograd.backward(o, do)
            times.append((time.perf_counter() - start) * 1e6)
            torch.cuda.synchronize()
            for leaf in (qg, kg, vg, tg):
                leaf.grad = None
        print(f"{name:6s} {'backward()':14s} {sorted(times)[4]:8.1f} us host per call (median of 8)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            o, _ = autograd_fwd()
            torch.autograd.backward(o, do)
        torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        x = torch.zeros(1, device="cuda")
        print(f"{'':6s} {'torch add_':14s} {host_us(lambda: x.add_(1)):8.1f} us host per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
