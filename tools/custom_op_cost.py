#!/usr/bin/env python
"""Where the host's time of one attention call goes: the launch, the custom op, autograd.

    python tools/custom_op_cost.py [--length 1024]

Dense and `block` (bf16, 12 heads, d 64, batch 1, the T5 bias), host time per call (the GPU
idle before each batch of calls): one Triton launch alone (the bias-row kernel) against one
torch launch; `t5core.kernels.flash.forward/backward` called directly and through the custom
ops (`torch.ops.t5core.flash_attention_fwd/bwd`, what flash_attention and sparse_attention
use); and the forward and `torch.autograd.backward` under autograd, once through the custom
ops' registered autograd and once through a plain `torch.autograd.Function` around the same
two functions (as transient-global's). Then where `torch.autograd.backward`'s time goes beyond
the backward function: the time spent inside that function (timed from within the autograd
engine's thread), the same call with the engine's device threads off
(`torch.autograd.set_multithreading_enabled(False)`: it runs on the calling thread), and a
Function whose backward launches nothing. Last, one Triton launch through the JIT's `run` against
the compiled kernel's launcher called directly (what a launch costs beyond binding its
arguments). A diagnosis tool (tools/host_overhead.py: per mode).
"""
from __future__ import annotations

import argparse
import time

import torch
from profile_attention import host_ms  # tools/ is on the path when run as a script


def host_us(fn) -> float:
    """Median host µs per call (profile_attention.host_ms: 8 calls a round, 5 rounds)."""
    return host_ms(fn, calls=8, rounds=5) * 1e3


def plain_function(pattern, inside: list | None = None):
    """A torch.autograd.Function around flash.forward/backward for `pattern`: autograd without the
    custom ops. With `inside`, its backward appends the µs it spends (from within the engine's thread)."""
    from t5core.kernels import flash

    class Plain(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, table):
            out, lse = flash.forward(q, k, v, table, None, None, None, 0, 0, True, 32, 128, False, 0, pattern)
            ctx.save_for_backward(q, k, v, table, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            start = time.perf_counter()
            q, k, v, table, out, lse = ctx.saved_tensors
            grads = flash.backward(dout, q, k, v, out, lse, table, None, None, None, 0, 0, True, 32, 128, False, 0,
                                   pattern, True)
            if inside is not None:
                inside.append((time.perf_counter() - start) * 1e6)
            return grads

    return Plain.apply


class _Nothing(torch.autograd.Function):
    """Backward returns ready gradients: the engine's own cost for one node and four leaves."""

    @staticmethod
    def forward(ctx, q, k, v, table):
        ctx.grads = tuple(torch.zeros_like(x) for x in (q, k, v, table))
        return q.clone()

    @staticmethod
    def backward(ctx, dout):
        return ctx.grads


def backward_us(forward, dout, leaves) -> float:
    """Median host time of torch.autograd.backward alone over 8 calls (each after a synced forward)."""
    times = []
    for _ in range(8):
        out = forward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.autograd.backward(out, dout)
        times.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        for leaf in leaves:
            leaf.grad = None
    return sorted(times)[4]


def main() -> int:
    from t5core.kernels import flash
    from t5core.kernels import ops  # noqa: F401 - registers torch.ops.t5core

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, 12, args.length, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    table = torch.randn(32, 12, device="cuda")
    x = torch.zeros(1, device="cuda")
    tables = flash._bucket_tables(True, 32, 128, q.device)
    report = lambda name, label, us: print(f"{name:6s} {label:24s} {us:8.1f} us host per call")  # noqa: E731
    report("", "one torch launch (add_)", host_us(lambda: x.add_(1)))
    report("", "one Triton launch (bias row)", host_us(lambda: flash._bias_row(table, tables.lut, tables.reach, 256)))
    for name, pattern in (("dense", (0, 0, 1, 0)), ("block", (2, 0, 512, 16))):
        pat = flash.Pattern(*pattern)
        out, lse = flash.forward(q, k, v, table, None, None, None, 0, 0, True, 32, 128, False, 0, pat)
        calls = {
            "fwd direct": lambda: flash.forward(q, k, v, table, None, None, None, 0, 0, True, 32, 128, False, 0, pat),
            "fwd custom op": lambda: torch.ops.t5core.flash_attention_fwd(q, k, v, table, None, True, 32, 128, False,
                                                                          0, *pattern),
            "bwd direct": lambda: flash.backward(do, q, k, v, out, lse, table, None, None, None, 0, 0, True, 32, 128,
                                                 False, 0, pat, True),
            "bwd custom op": lambda: torch.ops.t5core.flash_attention_bwd(do, q, k, v, out, lse, table, None, True,
                                                                          32, 128, False, 0, *pattern, True),
        }
        for label, fn in calls.items():
            for _ in range(3):
                fn()
            report(name, label, host_us(fn))
        leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
        plain = plain_function(pat)
        forwards = {
            "custom op": lambda: torch.ops.t5core.flash_attention_fwd(*leaves, None, True, 32, 128, False, 0,
                                                                      *pattern)[0],
            "autograd.Function": lambda: plain(*leaves),
        }
        for label, forward in forwards.items():
            for _ in range(3):
                torch.autograd.backward(forward(), do)
            report(name, f"fwd, {label}", host_us(forward))
            report(name, f"backward(), {label}", backward_us(forward, do, leaves))
        inside: list = []
        timed = plain_function(pat, inside)
        for _ in range(3):
            torch.autograd.backward(timed(*leaves), do)
        inside.clear()
        report(name, "backward(), timed Function", backward_us(lambda: timed(*leaves), do, leaves))
        report(name, "  of which inside backward", sorted(inside)[len(inside) // 2])
        with torch.autograd.set_multithreading_enabled(False):
            inside.clear()
            report(name, "backward(), one thread", backward_us(lambda: timed(*leaves), do, leaves))
            report(name, "  of which inside backward", sorted(inside)[len(inside) // 2])
        for label, fn in (("custom op", forwards["custom op"]), ("nothing", lambda: _Nothing.apply(*leaves))):
            with torch.autograd.set_multithreading_enabled(False):
                report(name, f"backward(), one thread, {label}", backward_us(fn, do, leaves))
        report(name, "backward(), nothing", backward_us(lambda: _Nothing.apply(*leaves), do, leaves))
    launch_direct(table, tables, report)
    return 0


def launch_direct(table, tables, report) -> None:
    """The bias-row kernel launched through the JIT against through its compiled kernel's launcher."""
    from t5core.kernels import flash

    heads, lut_w = table.shape[1], 256
    out = torch.empty((heads, 2 * lut_w + 1, 2), dtype=torch.float32, device=table.device)
    args = (table, table.stride(0), table.stride(1), tables.lut, out, lut_w)
    consts = dict(REACH=tables.reach, WINDOW=-1, CHUNK=1024)
    jit = lambda: flash._bias_lut_kernel[(heads,)](*args, **consts)  # noqa: E731
    compiled = jit()
    stream = torch.cuda.current_stream().cuda_stream
    every = (*args, *consts.values())
    direct = lambda: compiled.run(heads, 1, 1, stream, compiled.function, compiled.packed_metadata, None,  # noqa: E731
                                  None, None, *every)
    report("", "Triton launch, JIT run", host_us(jit))
    report("", "Triton launch, launcher", host_us(direct))
    expected = out.clone()
    out.zero_()
    direct()
    torch.cuda.synchronize()
    print("direct launch writes the JIT's result:", torch.equal(out, expected))


if __name__ == "__main__":
    raise SystemExit(main())
