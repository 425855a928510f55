"""Tile sweep for the t5core flash kernels, in one process (one device call).

    python tools/sweep_tiles.py [--lengths 4096,16384] [--json OUT.json] [--defaults]

Each variant sets T5CORE_* environment knobs (read by kernels/flash.py at every call):
T5CORE_TILE_{FWD,DQ,DKDV}=BMxBN[xWARPSxSTAGES[xMAXNREG]]. Prints forward and
forward+backward TFLOP/s (fwd 4BHL^2D, fwd+bwd 2.5x) for bf16, H=12, D=64, B*L=16k.
--defaults times the default tiles with a float32 and a bfloat16 bias table, and no bias (an
A/B of versions of the kernels: run it once per tree).
--pattern local|block sweeps the sparse patterns instead (radius 127; blocks of 512 with 16
global tokens), batch 1, reporting TFLOP/s of the visible scores only (4·H·visible·D per
forward), so the figures compare with dense ones as throughput per visible score; with
--only dq, forward+backward over the dq tiles alone (dk/dv at the sparse default).
--pattern transient-global sweeps the side-key kernels' configs (T5CORE_TILE_SIDE_{FWD,DQ,DKDV}),
one kernel at a time, on the local window plus L // 16 side keys.
"""
import argparse
import json
import os

import torch
import triton
from bench_attention import SPARSE_PARAMS, tglobal_inputs, visible_scores  # tools/ is on the path when run as a script

FWD_VARIANTS = [  # the default first (kernels/flash.py: _TILES)
    dict(T5CORE_TILE_FWD="128x64x8x3x128"),  # 2 blocks per SM: 119-126 registers, 80 KB (1 uncapped)
    dict(T5CORE_TILE_FWD="128x64x8x4x128"),
    dict(T5CORE_TILE_FWD="128x64x8x2x128"),
    dict(T5CORE_TILE_FWD="128x32x4x3x128"),
    dict(T5CORE_TILE_FWD="128x32x4x3"),
    dict(T5CORE_TILE_FWD="64x64x4x3"),  # the default until the fifth session
    dict(T5CORE_TILE_FWD="64x64x4x2x128"),  # 4 blocks per SM
    dict(T5CORE_TILE_FWD="64x64x4x2"),
    dict(T5CORE_TILE_FWD="128x64x8x3", buckets="none"),  # no bias at all: the base kernel's speed
    dict(T5CORE_TILE_FWD="128x64x8x3x128", buckets="none"),
]
BWD_VARIANTS = [  # one kernel's tile varied at a time, the other at its default (the first row)
    dict(T5CORE_TILE_DQ="64x32x4x3x128", T5CORE_TILE_DKDV="32x128x4x3"),
    dict(T5CORE_TILE_DQ="64x32x4x3", T5CORE_TILE_DKDV="32x128x4x3"),  # 3 blocks per SM, no cap
    dict(T5CORE_TILE_DQ="64x32x4x2x128", T5CORE_TILE_DKDV="32x128x4x3"),
    dict(T5CORE_TILE_DQ="64x64x4x3x128", T5CORE_TILE_DKDV="32x128x4x3"),
    dict(T5CORE_TILE_DQ="64x64x4x3", T5CORE_TILE_DKDV="32x128x4x3"),
    dict(T5CORE_TILE_DQ="128x64x8x3x128", T5CORE_TILE_DKDV="32x128x4x3"),
    dict(T5CORE_TILE_DQ="64x32x4x3x128", T5CORE_TILE_DKDV="32x128x4x2"),
    dict(T5CORE_TILE_DQ="64x32x4x3x128", T5CORE_TILE_DKDV="32x64x4x3"),
    dict(T5CORE_TILE_DQ="64x32x4x3x128", T5CORE_TILE_DKDV="32x64x4x3x128"),
    dict(T5CORE_TILE_DQ="64x32x4x3x128", T5CORE_TILE_DKDV="64x64x4x3x128"),
    dict(T5CORE_TILE_DQ="64x32x4x3x128", T5CORE_TILE_DKDV="64x128x8x3x128"),
]


SPARSE_FWD_VARIANTS = FWD_VARIANTS + [  # a 64-row local tile computes 320 key columns for 255 visible
    dict(T5CORE_TILE_FWD="32x64x4x3"),
    dict(T5CORE_TILE_FWD="32x64x2x3"),
    dict(T5CORE_TILE_FWD="64x32x4x3"),
    dict(T5CORE_TILE_FWD="64x32x4x3x128"),  # block's forward: 139 registers, 3 blocks per SM; capped 4
]
SPARSE_DQ_VARIANTS = [  # the dq tile alone, dk/dv at the sparse default (kernels/flash.py: _SPARSE_TILES)
    dict(T5CORE_TILE_DQ=dq, T5CORE_TILE_DKDV="32x64x4x3x128")
    for dq in ("64x32x4x3x128", "64x32x4x3", "64x32x4x2x128", "64x64x4x3x128", "64x64x4x3", "64x64x4x2",
               "128x32x8x3x128", "128x64x8x3x128", "32x32x4x3")
]
# transient-global's side-key kernels, one at a time, the defaults first (kernels/flash.py: _TILES "side_*")
SIDE_FWD_VARIANTS = [dict(), *(dict(T5CORE_TILE_SIDE_FWD=t) for t in (
    "128x64x8x3x128", "128x64x8x2x128", "64x64x4x3", "64x64x4x2x128"))]
SIDE_BWD_VARIANTS = [dict(), *(dict(T5CORE_TILE_SIDE_DQ=t) for t in (
    "64x32x4x3x128", "64x64x4x3x128", "128x64x8x3x128")), *(dict(T5CORE_TILE_SIDE_DKDV=t) for t in (
    "32x128x4x3", "32x128x4x2", "64x64x4x3x128", "64x128x8x3x128", "64x128x8x2", "128x64x8x3x128"))]
DEFAULT_VARIANTS = [dict(), dict(table="bfloat16"), dict(buckets="none")]


def run(variant, L, mode, H=12, D=64, tokens=16384, pattern="dense"):
    from t5core.kernels import flash_attention, sparse_attention, transient_global_attention

    knobs = {k: v for k, v in variant.items() if k.startswith("T5CORE")}
    for kind in ("FWD", "DQ", "DKDV", "SIDE_FWD", "GLOBAL_FWD", "SIDE_DQ", "SIDE_DKDV"):
        os.environ.pop(f"T5CORE_TILE_{kind}", None)
    os.environ.update(knobs)
    B = max(1, tokens // L) if pattern == "dense" else 1
    nb, md = (32, 128)
    buckets = variant.get("buckets")
    if buckets and buckets != "none":
        nb, md = (int(x) for x in buckets.split("/"))
    grad = mode == "fwd_bwd"
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
    table_dtype = getattr(torch, variant.get("table", "float32"))
    table = None if buckets == "none" else torch.randn(nb, H, device="cuda", dtype=table_dtype, requires_grad=grad)
    side_leaves = []
    if pattern == "dense":
        fn = lambda: flash_attention(q, k, v, table, num_buckets=nb, max_distance=md)  # noqa: E731
    elif pattern == "transient-global":  # the local window plus L // 16 side keys
        side_k, side_v, global_table, block_ids = tglobal_inputs(L, H, D, torch.bfloat16, 16, grad, grad)
        side_leaves = [side_k, side_v, global_table]
        fn = lambda: transient_global_attention(  # noqa: E731
            q, k, v, table, side_k, side_v, global_table, block_ids,
            local_radius=SPARSE_PARAMS["local"]["local_radius"])
    else:
        fn = lambda: sparse_attention(q, k, v, table, pattern=pattern, num_buckets=nb,  # noqa: E731
                                      max_distance=md, **SPARSE_PARAMS[pattern])
    if grad:
        dout = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
        step = lambda: fn().backward(dout)  # noqa: E731
    else:
        step = fn
    step()
    ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median",  # .grad not accumulated
                                 grad_to_none=[q, k, v, *side_leaves] + ([table] if table is not None else [])
                                 if grad else None)
    scores = L * L
    if pattern != "dense":
        scores = visible_scores(pattern, L, SPARSE_PARAMS["local"]["local_radius"],
                                SPARSE_PARAMS["block"]["block_size"], SPARSE_PARAMS["block"]["num_global"], 16)
    flops = 4 * B * H * scores * D * (2.5 if grad else 1.0)
    return flops / ms / 1e9


def _score(row) -> float:
    try:
        return sum(float(x) for x in row["tflops"])
    except ValueError:  # a variant that failed
        return -1.0


def pick(rows) -> str:
    """Shell exports of the fastest forward variant and of the fastest dq and dk/dv tiles
    (each chosen among the rows that vary it), with the bias on."""
    biased = [r for r in rows if "buckets" not in r["variant"] and "table" not in r["variant"]]
    fwd = max((r for r in biased if r["mode"] == "fwd"), key=_score)
    bwd = [r for r in biased if r["mode"] == "fwd_bwd"]
    default_dq, default_dkdv = bwd[0]["variant"]["T5CORE_TILE_DQ"], bwd[0]["variant"]["T5CORE_TILE_DKDV"]
    dq = max((r for r in bwd if r["variant"]["T5CORE_TILE_DKDV"] == default_dkdv), key=_score)
    dkdv = max((r for r in bwd if r["variant"]["T5CORE_TILE_DQ"] == default_dq), key=_score)
    return (f"export T5CORE_TILE_FWD={fwd['variant']['T5CORE_TILE_FWD']}\n"
            f"export T5CORE_TILE_DQ={dq['variant']['T5CORE_TILE_DQ']}\n"
            f"export T5CORE_TILE_DKDV={dkdv['variant']['T5CORE_TILE_DKDV']}\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384")
    p.add_argument("--json", default=None)
    p.add_argument("--defaults", action="store_true", help="default tiles only, float32 and bfloat16 tables")
    p.add_argument("--pattern", default="dense", choices=["dense", "local", "block", "transient-global"])
    p.add_argument("--only", default=None, choices=["fwd", "fwd_bwd", "dq"],
                   help="sweep one of the two lists only; dq: forward+backward over dq tiles only (sparse patterns)")
    p.add_argument("--fwd-tiles", default=None, help="comma-separated forward configs (BMxBNxWARPSxSTAGES[xMAXNREG]) "
                   "in place of the built-in list, e.g. 64x32x4x3,128x64x8x4x128")
    p.add_argument("--pick", default=None, help="write the best forward tile and the best dq and dk/dv tiles "
                   "(by the sum of TFLOP/s over the lengths) to this file as shell exports")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    if args.defaults:
        plan = (("fwd", DEFAULT_VARIANTS), ("fwd_bwd", DEFAULT_VARIANTS))
    elif args.pattern == "transient-global":  # the side kernels' configs; the forward ones time the forward
        plan = (("fwd", SIDE_FWD_VARIANTS), ("fwd_bwd", SIDE_BWD_VARIANTS))
    elif args.only == "dq":
        plan = (("fwd_bwd", SPARSE_DQ_VARIANTS),)
    else:
        plan = (("fwd", FWD_VARIANTS if args.pattern == "dense" else SPARSE_FWD_VARIANTS), ("fwd_bwd", BWD_VARIANTS))
    if args.fwd_tiles:
        plan = (("fwd", [dict(T5CORE_TILE_FWD=t) for t in args.fwd_tiles.split(",")]),)
    for mode, variants in plan:
        if args.only in ("fwd", "fwd_bwd") and mode != args.only:
            continue
        for variant in variants:
            cells = []
            for L in lengths:
                try:
                    cells.append(f"{run(variant, L, mode, pattern=args.pattern):7.1f}")
                except Exception as err:  # a tile that does not compile must not stop the sweep
                    cells.append(f"ERR {type(err).__name__}")
            rows.append(dict(mode=mode, variant=variant, tflops=cells))
            print(mode, " ".join(cells), variant, flush=True)
    if args.pick:
        with open(args.pick, "w") as f:
            f.write(pick(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(lengths=lengths, pattern=args.pattern, rows=rows, gpu=torch.cuda.get_device_name()), f,
                      indent=1)


if __name__ == "__main__":
    main()
