"""T5 relative position buckets: the torch function and the Triton helper.

There is one definition of the bucket arithmetic: `t5core.layers.relative_position_bucket`, a
line-for-line match of transformers' `T5Attention._relative_position_bucket` (t5-facts A1: float32 log,
truncation, min with num_buckets - 1). The kernels never redo that arithmetic on the GPU:
`bucket_lut` evaluates the torch function once for every rel in [-max_distance, max_distance]
and the Triton helper `lut_lookup` reads that small table. Beyond +-max_distance the bucket is
constant per direction (log(n / max_exact) / log(max_distance / max_exact) >= 1 saturates at
num_buckets - 1), so clamping rel to the table's ends is exact. This keeps the kernels bit
for bit equal to the reference without depending on how a GPU rounds `log` or a division
(n = 16, 32, 64 land exactly on bucket boundaries, where one ulp flips the bucket).
"""
from __future__ import annotations

import functools
import os

import torch

# The one torch definition of the bucket arithmetic lives with the bias module; the kernels
# read it through the LUT below.
from t5core.layers import relative_position_bucket

try:  # triton is optional for the torch half of this module (CPU-only installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None


def bucket_lut(bidirectional: bool, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """int32 [2 * max_distance + 1]: entry i is the bucket of rel = i - max_distance.

    The kernels clamp rel to +-max_distance, which is exact only when the bucket is constant
    beyond it: max_distance >= the exact-bucket range (num_buckets / 4 bidirectional,
    num_buckets / 2 causal). Below that the reference's log term turns negative and its buckets
    stop being monotone; such a bias is refused here rather than computed differently."""
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance < max_exact:
        raise ValueError(
            f"relative_attention_max_distance={max_distance} is below the exact-bucket range ({max_exact}) of "
            f"{num_buckets} {'bidirectional' if bidirectional else 'causal'} buckets: the buckets are not constant "
            "beyond max_distance, which the kernels need; use attention='basic' for such a config")
    rel = torch.arange(-max_distance, max_distance + 1, dtype=torch.long)
    return relative_position_bucket(rel, bidirectional, num_buckets, max_distance).to(torch.int32).to(device)


@functools.lru_cache(maxsize=None)
def bucket_reach(bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """The smallest r >= 1 with bucket(rel) constant for every rel >= r and for every rel <= -r.

    T5's log buckets saturate before max_distance: with 32 buckets and max_distance 128 (every
    T5 size) at |rel| = 91 bidirectional and 113 causal. The kernels take their bias from LUTs over
    +-reach and treat every tile beyond it as far (one scalar bias): fewer near tiles, same values."""
    lut = bucket_lut(bidirectional, num_buckets, max_distance).tolist()  # entry i: rel = i - max_distance
    reach = max_distance
    while reach > 1 and lut[max_distance - reach + 1] == lut[0] and lut[max_distance + reach - 1] == lut[-1]:
        reach -= 1
    return reach


if triton is not None:

    @triton.jit
    def lut_lookup(rel, lut_ptr, MAX_DISTANCE: tl.constexpr):
        """Value of a [2 * MAX_DISTANCE + 1] per-rel table at rel (any shape), rel clamped to +-MAX_DISTANCE.

        With `lut_ptr` = `bucket_lut(...)` this is the bucket of rel; with a per-head row of the
        bias table gathered through it, it is the bias itself.
        """
        idx = tl.minimum(tl.maximum(rel, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE
        return tl.load(lut_ptr + idx)

    if os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.version.hip is not None:

        @triton.jit
        def _load_lut(ptrs):
            return tl.load(ptrs)  # the interpreter and ROCm run no PTX: same values, converted layout

        @triton.jit
        def _load_lut_pairs(ptrs):
            return tl.load(ptrs), tl.load(ptrs + 1)
    else:

        @triton.jit
        def _load_lut(ptrs):
            # An elementwise op, not a load: Triton computes it in whatever layout its consumer has
            # (the MMA accumulator's), where a tl.load gets a coalesced layout and a convert_layout
            # of the whole tile through shared memory. The table is a few hundred bytes: L1 hits.
            return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs],
                                             dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)

        @triton.jit
        def _load_lut_pairs(ptrs):
            # Two consecutive 32-bit values from an 8-byte aligned address, as `_load_lut`.
            return tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptrs],
                                             dtype=(ptrs.dtype.element_ty, ptrs.dtype.element_ty), is_pure=True,
                                             pack=1)

    @triton.jit
    def lut_gather(rel, center_ptr, CLAMP: tl.constexpr):
        """A per-rel table's value at every rel of a tile of scores, read in the scores' own
        register layout (`_load_lut`). The table holds pairs (value at rel, value at rel + 1);
        center_ptr points at rel 0. CLAMP > 0: rel clamped to
        +-CLAMP (a tile anywhere); 0: read as is (a tile whose every rel the table covers)."""
        if CLAMP > 0:
            rel = tl.minimum(tl.maximum(rel, -CLAMP), CLAMP)
        return _load_lut(center_ptr + 2 * rel)

    @triton.jit
    def lut_gather_pairs(offsets, center_ptr):
        """(value at rel, value at rel + 1) of a table of pairs (entry rel at 2 * rel, 8-byte
        aligned) at offsets 2 * rel of a tile: one load per two scores, no clamp."""
        return _load_lut_pairs(center_ptr + offsets)
