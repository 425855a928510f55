#!/usr/bin/env python
"""Where a kernel's instructions and stalls go, from Nsight Compute's per-instruction export.

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > SASS.csv
    python tools/ncu_summary.py SASS.csv [--kernel _fwd_kernel] [--top 12]

For each kernel in the export (tools/gpu_run.sh's `ncu` step writes one per pattern): the warp
instructions executed, the warp-stall samples, the opcodes by share of instructions and of
samples, the stall reasons, and the code split into runs of equal execution count. A loop body
executes as often as its trip count over all warps, so the runs separate the loops from the code
each program runs once (its prologue, the pipeline fill of each loop, the epilogue): the figures
that say how much of a short-loop kernel (a `local` window of 5 tiles) is per-program overhead.
Then the instructions with the most samples. Reads the CSV only: no GPU, no ncu needed.
"""
from __future__ import annotations

import argparse
import collections
import csv
import re


def kernels(path: str) -> dict[str, list[dict]]:
    """{kernel name (#2, #3 for repeats): its SASS rows as dicts of the export's columns}."""
    out: dict[str, list[dict]] = {}
    name, header = None, None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] == "Kernel Name":
                base, n = row[1], 2
                name = base
                while name in out:
                    name, n = f"{base}#{n}", n + 1
                out[name], header = [], None
            elif row and row[0] == "Address":
                header = row
            elif header and name and len(row) == len(header):
                out[name].append(dict(zip(header, row)))
    return out


def number(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", source.strip())  # drop a predicate guard
    return text.split()[0].split(".")[0] if text else "?"


def summarise(name: str, rows: list[dict], top: int) -> None:
    executed = [number(r["Instructions Executed"]) for r in rows]
    samples = [number(r["Warp Stall Sampling (All Samples)"]) for r in rows]
    total, total_samples = sum(executed) or 1.0, sum(samples) or 1.0
    print(f"== {name}: {sum(executed) / 1e6:.1f} M warp instructions, {sum(samples):.0f} stall samples, "
          f"{len(rows)} SASS lines")
    ops, op_samples = collections.Counter(), collections.Counter()
    for r, e, s in zip(rows, executed, samples):
        ops[opcode(r["Source"])] += e
        op_samples[opcode(r["Source"])] += s
    print("  opcodes (share of instructions / of samples):")
    for op, count in ops.most_common(top):
        print(f"    {op:12s} {100 * count / total:5.1f}%  {100 * op_samples[op] / total_samples:5.1f}%")
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    stall = {k[len("stall_"):]: sum(number(r[k]) for r in rows) for k in reasons}
    print("  stalls: " + ", ".join(f"{k} {100 * v / total_samples:.1f}%"
                                   for k, v in sorted(stall.items(), key=lambda kv: -kv[1])[:10]))
    print("  runs of equal execution count (lines, executions per line, share of samples):")
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or executed[i] != executed[start]:
            share = sum(samples[start:i]) / total_samples
            if share >= 0.005:
                print(f"    {start:5d}-{i - 1:5d} ({i - start:4d} lines) x {executed[start]:>11,.0f}: "
                      f"{100 * share:5.1f}% of samples")
            start = i
    print(f"  the {top} instructions with the most samples:")
    for i in sorted(range(len(rows)), key=lambda j: -samples[j])[:top]:
        print(f"    {i:5d} {100 * samples[i] / total_samples:5.1f}%  x {executed[i]:>11,.0f}  "
              f"{rows[i]['Source'].strip()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    for path in args.csv:
        for name, rows in kernels(path).items():
            if rows and (args.kernel is None or args.kernel in name):
                summarise(f"{path}: {name}", rows, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
