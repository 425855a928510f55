#!/usr/bin/env python
"""One attention call per pattern, for Nsight Compute (hardware counters inside one kernel).

    ncu --clock-control none --set full -k regex:_fwd_kernel --launch-skip 1 --launch-count 1 \
        python tools/ncu_attention.py --pattern local --length 131072

bf16, 12 heads, head dim 64, batch 1, the T5 bias (fp32 table), the sparse parameters of
bench_attention.py. The call runs `--calls` times (2: the first compiles, ncu's --launch-skip 1
takes the second), forward only or forward+backward. tools/gpu_run.sh's `ncu` step runs it under
ncu for each pattern and prints the counters that say why a kernel is slower per score than
dense: tensor-pipe and issue utilisation, warp stall reasons, L2/L1 traffic, occupancy.
A diagnosis tool: the benchmark is bench_attention.py.
"""
from __future__ import annotations

import argparse

import torch
from bench_attention import SPARSE_PARAMS  # tools/ is on the path when run as a script


def main() -> int:
    from t5core.kernels import flash_attention, sparse_attention

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", default="dense", choices=["dense", "local", "block"])
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--backward", action="store_true")
    args = p.parse_args()
    H, D, L = 12, 64, args.length
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
               for _ in range(3))
    table = torch.randn(32, H, device="cuda", dtype=torch.float32, requires_grad=args.backward)
    dout = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.calls):
        if args.pattern == "dense":
            out = flash_attention(q, k, v, table)
        else:
            out = sparse_attention(q, k, v, table, pattern=args.pattern, **SPARSE_PARAMS[args.pattern])
        if args.backward:
            out.backward(dout)
    torch.cuda.synchronize()
    print(f"{args.pattern} L={L} {'fwd+bwd' if args.backward else 'fwd'}: {args.calls} calls done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
