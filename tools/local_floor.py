"""How fast could a `local` forward be with this kernel design? Floors of its tile schedule, on a GPU.

The `local` forward (radius r = 127, 64 x 64 tiles) visits, for each 64-row query tile, the five
64-key tiles of its window. This tool times that schedule with less and less work per tile:
  * loads:  q, then K and V of each window tile (summed elementwise so nothing is optimised away),
            the output tile stored: the memory traffic alone;
  * dots:   the same loads plus QK^T and PV on the tensor cores (p = the scores cast to bf16): the
            traffic and the MMAs, no softmax and no bias;
  * local:  t5core's `local` forward (bias table, softmax, exact);
and dense `flash` at the same length for the "per visible score" ratio of the issue (visible
scores per second against dense's). The floors bound that ratio for the schedule: no softmax or
bias work makes a tile cheaper than `dots`.

    python tools/local_floor.py [--length 131072] [--radii 127,511,2047] [--out floor.json]

--radii also times the `local` forward and the `dots` floor at wider windows: a window of r has
about (2r + 64) / 64 + 1 key tiles per query tile, so the cost per tile against the window's
length separates what a tile costs from what a query tile's program costs once (its q load,
pipeline fill and drain, output store). Printed as SM-cycles per 64 x 64 tile (time x SMs x
clock / tiles), with dense `flash`'s (2048 tiles per query tile at 128k) for scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@triton.jit
def _window_kernel(Q, K, V, Out, seqlen, RADIUS: tl.constexpr, DOTS: tl.constexpr, BLOCK: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
    """The `local` forward's tile schedule for one 64-row query tile; [B*H, L, D] contiguous."""
    m0 = tl.program_id(0) * BLOCK
    base = tl.program_id(1).to(tl.int64) * seqlen * HEAD_DIM
    rows = m0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    lo = tl.maximum(m0 - RADIUS, 0) // BLOCK * BLOCK
    hi = tl.minimum(m0 + BLOCK + RADIUS, seqlen)
    for n0 in range(lo, hi, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        k = tl.load(K + base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        v = tl.load(V + base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        if DOTS:
            s = tl.dot(q, tl.trans(k))
            acc = tl.dot(s.to(v.dtype), v, acc)
        else:
            acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(Out + base + rows[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty))


def window_floor(q, k, v, dots: bool, stages: int, radius: int = 127) -> float:
    """Median ms of `_window_kernel` over [B*H, L, D] tensors."""
    bh, length, dim = q.shape
    out = torch.empty_like(q)
    grid = (length // 64, bh)

    def launch():
        _window_kernel[grid](q, k, v, out, length, RADIUS=radius, DOTS=dots, BLOCK=64, HEAD_DIM=dim, num_warps=4,
                             num_stages=stages)
    return triton.testing.do_bench(launch, warmup=25, rep=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--radii", default="", help="comma-separated windows to time beside 127")
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the cycle figures (H200: 1.98)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("local_floor.py needs a CUDA GPU")
    from t5core.kernels import flash_attention, sparse_attention

    length, heads, dim, radius = args.length, args.heads, 64, 127
    q, k, v = (torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    table = torch.randn(32, heads, device="cuda")
    flat = [t.view(heads, length, dim) for t in (q, k, v)]
    if length % 64:
        sys.exit("--length must be a multiple of 64 (the floors' tiles have no masks)")
    visible = heads * sum(min(i + radius, length - 1) - max(i - radius, 0) + 1 for i in range(length))
    times = {
        "loads (2 stages)": window_floor(*flat, dots=False, stages=2),
        "loads (3 stages)": window_floor(*flat, dots=False, stages=3),
        "dots (2 stages)": window_floor(*flat, dots=True, stages=2),
        "dots (3 stages)": window_floor(*flat, dots=True, stages=3),
        "local": triton.testing.do_bench(lambda: sparse_attention(q, k, v, table, pattern="local",
                                                                  local_radius=radius), warmup=25, rep=200),
    }
    dense_ms = triton.testing.do_bench(lambda: flash_attention(q, k, v, table), warmup=5, rep=50)
    dense_rate = heads * length * length / dense_ms  # visible scores per ms
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, L = {length}, H = {heads}, D = {dim}, bf16, radius {radius}: {visible / 1e9:.3f} G visible scores")
    print(f"dense flash: {dense_ms:.2f} ms, {dense_rate / 1e9:.1f} G visible scores per ms")
    rows = {}
    for name, ms in times.items():
        ratio = visible / ms / dense_rate
        rows[name] = {"ms": ms, "per_visible_score_vs_dense": ratio}
        print(f"{name:18s} {ms:7.3f} ms   per visible score vs dense {ratio:5.2f}")
    moved = heads * (2 * length * dim * 2 + length // 64 * 5 * 2 * 64 * dim * 2)  # q, out once; K, V per tile
    print(f"bytes through L2 (q, out, 5 K and V tiles per query tile): {moved / 1e9:.2f} GB; "
          f"loads floor at {moved / times['loads (2 stages)'] / 1e9:.2f} TB/s")
    props = torch.cuda.get_device_properties(0)
    clock_ghz = args.clock_ghz

    def cycles_per_tile(ms: float, tiles: int) -> float:
        return ms * 1e6 * props.multi_processor_count * clock_ghz / tiles

    dense_tiles = heads * (length // 64) ** 2
    print(f"SM-cycles per 64 x 64 tile at {clock_ghz} GHz ({props.multi_processor_count} SMs): "
          f"dense flash {cycles_per_tile(dense_ms, dense_tiles):.0f}")
    per_radius = {}
    for r in (int(x) for x in args.radii.split(",") if x):
        tiles = heads * sum(len(range(max(m0 - r, 0) // 64 * 64, min(m0 + 64 + r, length), 64))
                            for m0 in range(0, length, 64))
        local_ms = triton.testing.do_bench(lambda: sparse_attention(q, k, v, table, pattern="local",
                                                                    local_radius=r), warmup=25, rep=200)
        dots_ms = window_floor(*flat, dots=True, stages=2, radius=r)
        per_radius[r] = {"tiles": tiles, "local_ms": local_ms, "dots_ms": dots_ms,
                         "local_cycles_per_tile": cycles_per_tile(local_ms, tiles),
                         "dots_cycles_per_tile": cycles_per_tile(dots_ms, tiles)}
        print(f"radius {r:5d}: {tiles / heads / (length // 64):5.1f} key tiles per query tile; local "
              f"{local_ms:7.3f} ms, {per_radius[r]['local_cycles_per_tile']:5.0f} cycles per tile; dots floor "
              f"{dots_ms:7.3f} ms, {per_radius[r]['dots_cycles_per_tile']:5.0f}")
    if args.out:
        args.out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                                        "length": length, "heads": heads, "visible": visible, "dense_ms": dense_ms,
                                        "rows": rows, "clock_ghz": clock_ghz,
                                        "dense_cycles_per_tile": cycles_per_tile(dense_ms, dense_tiles),
                                        "per_radius": per_radius}, indent=1))


if __name__ == "__main__":
    main()
