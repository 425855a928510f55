"""The sparse modes (`local`, `block`) of the flash kernels, run by Triton's CPU interpreter.

Each case checks the output and all four gradients (q, k, v, table) against two references:
the same mode written as dense attention with an [L, L] mask in float64
(`reference.reference_sparse`), and t5core's blocked torch implementation (t5core/sparse.py,
also float64). Tolerances are norm-wise relative errors: fp32 with exact (ieee) fp32 dots lands
near 1e-6, so 1e-5 leaves rounding room and still catches a wrong mask, a key counted twice
or a wrong distance (those give 1e-2 and up); fp16 carries 11 mantissa bits, so 1e-2.
Outputs are NaN-poisoned: an element the kernels fail to write shows.

The interpreter's tiles are small and unequal (forward 32x16, dq 32x16, dk/dv 16x32), so these
lengths give windows and blocks narrower and wider than a tile, blocks that are not tile
multiples, and tiles that straddle the padding.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from t5core.config import AttentionMode, T5Config  # noqa: E402
from t5core.kernels import flash as flash_mod  # noqa: E402
from t5core.kernels import sparse_attention  # noqa: E402
from t5core.layers import RelativeBias  # noqa: E402
from t5core.sparse import attend_sparse, block_attention, local_attention, make_layout  # noqa: E402
from t5core.sparse import sparse_kernel_attention  # noqa: E402

from .interpreter import rel_err, require_interpreter, spy_dtable_flags  # noqa: E402
from .reference import reference_sparse, sparse_visible  # noqa: E402

require_interpreter(flash_mod._fwd_kernel, "test_sparse_gpu.py")

FP32_TOL = 1e-5
FP16_TOL = 1e-2


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flash_mod, "POISON_OUTPUTS", True)


def torch_sparse(q, k, v, table, pattern, lengths, num_buckets, max_distance, params):
    """t5core's blocked torch implementation of the same mode (float64 in, float64 out)."""
    bias = RelativeBias(num_buckets, max_distance, q.shape[1], bidirectional=True).double()
    del bias._parameters["weight"]
    bias.weight = table  # the leaf itself, so gradients reach it
    valid = torch.arange(q.shape[2])[None, :] < torch.tensor(lengths)[:, None]
    if pattern == "local":
        return local_attention(q, k, v, bias, valid, params["local_radius"])
    return block_attention(q, k, v, bias, valid, params["block_size"], params["num_global"])


def run_and_compare(pattern, B, H, L, D, lengths, *, dtype=torch.float32, tol=FP32_TOL, num_buckets=32,
                    max_distance=128, seed=0, heads_last=False, **params):
    """Kernel output and gradients of q, k, v, table vs the dense masked and the torch blocked references.
    heads_last: q, k, v are [B, H, L, D] views of [B, L, H, D] memory, as a model's projections (the
    outputs then come in that memory too, written through their strides)."""
    g = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    table64 = torch.randn(num_buckets, H, generator=g, dtype=torch.float64) * 3
    # The references see the kernel's (rounded) inputs, in float64.
    leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64, table64)]
    if heads_last:
        leaves[:3] = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in leaves[:3]]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    kl = torch.tensor(lengths)
    dense = reference_sparse(*leaves64, pattern, key_lengths=kl, num_buckets=num_buckets, max_distance=max_distance,
                             **params)
    dout = torch.randn(dense.shape, generator=g, dtype=torch.float64)
    dense_grads = torch.autograd.grad(dense, leaves64, dout)
    blocked = torch_sparse(*leaves64, pattern, lengths, num_buckets, max_distance, params)
    blocked_grads = torch.autograd.grad(blocked, leaves64, dout)

    out = sparse_attention(*leaves, pattern=pattern, key_lengths=kl, num_buckets=num_buckets,
                           max_distance=max_distance, **params)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))

    assert out.dtype == dtype and out.shape == dense.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    padded_rows = torch.arange(L)[None, :] >= kl[:, None]
    assert (out.transpose(1, 2)[padded_rows] == 0).all(), "padded query rows must output exactly 0"
    for name, ref, ref_grads in (("dense", dense, dense_grads), ("blocked", blocked, blocked_grads)):
        assert rel_err(out, ref) < tol, f"out vs {name}: {rel_err(out, ref):.2e}"
        for grad_name, grad, ref_grad in zip(["dq", "dk", "dv", "dtable"], grads, ref_grads):
            assert grad.dtype == dtype and torch.isfinite(grad).all(), f"{grad_name}: unwritten or non-finite"
            if ref_grad.norm() == 0:
                assert grad.double().norm() <= tol * max(rg.norm() for rg in ref_grads), f"{grad_name} should be 0"
            else:
                assert rel_err(grad, ref_grad) < tol, f"{grad_name} vs {name}: {rel_err(grad, ref_grad):.2e}"


# ---- local: |k - q| <= radius ------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 17, 100, 130, 257])
def test_local_window_narrower_than_a_tile(L):
    run_and_compare("local", 2, 2, L, 16, [L, max(L // 2, 1)], local_radius=5, seed=L)


@pytest.mark.parametrize("L", [17, 130, 257])
def test_local_window_wider_than_a_tile(L):
    run_and_compare("local", 2, 3, L, 32, [L, max(L - 40, 1)], local_radius=40, seed=L + 1)


def test_local_radius_zero_sees_only_itself():
    run_and_compare("local", 1, 2, 50, 16, [50], local_radius=0)


def test_local_far_tiles_inside_a_window_wider_than_max_distance():
    # max_distance 24 < radius 70: the window's interior holds far tiles (one scalar bias per
    # tile, folded into the exp2 offset) next to near and boundary tiles.
    run_and_compare("local", 2, 2, 257, 16, [257, 190], local_radius=70, num_buckets=16, max_distance=24)


def test_local_without_a_bias_table_equals_a_zero_table():
    # `local` folds its window into its bias row; without a table it builds it from zeros.
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=g, dtype=torch.float64) for _ in range(3))
    kl = torch.tensor([70, 41])
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = sparse_attention(*leaves, None, pattern="local", local_radius=9, key_lengths=kl)
    zeros = torch.zeros(32, 2, dtype=torch.float64)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference_sparse(*leaves64, zeros, "local", key_lengths=kl, local_radius=9)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    assert rel_err(out, ref) < FP32_TOL
    for grad, ref_grad in zip(torch.autograd.grad(out, leaves, dout.float()), torch.autograd.grad(ref, leaves64, dout)):
        assert rel_err(grad, ref_grad) < FP32_TOL


@pytest.mark.parametrize("pattern,params", [("local", dict(local_radius=40)),
                                            ("block", dict(block_size=40, num_global=5))])
def test_frozen_table_skips_the_bucket_sums_and_keeps_the_other_gradients(monkeypatch, pattern, params):
    # No table gradient wanted: the dq kernels (and block's global-row kernel) skip the per-bucket
    # dS sums; dq, dk, dv are unchanged.
    g = torch.Generator().manual_seed(23)
    q64, k64, v64 = (torch.randn(2, 2, 130, 16, generator=g, dtype=torch.float64) for _ in range(3))
    table64 = torch.randn(32, 2, generator=g, dtype=torch.float64) * 3
    kl = torch.tensor([130, 71])
    leaves = [t.float().requires_grad_() for t in (q64, k64, v64)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference_sparse(*leaves64, table64, pattern, key_lengths=kl, **params)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    flags = spy_dtable_flags(monkeypatch, flash_mod)
    table = table64.float()
    out = sparse_attention(*leaves, table, pattern=pattern, key_lengths=kl, **params)
    grads = torch.autograd.grad(out, leaves, dout.float())
    assert flags == [False] and table.grad is None
    for name, grad, ref_grad in zip(["dq", "dk", "dv"], grads, torch.autograd.grad(ref, leaves64, dout)):
        assert rel_err(grad, ref_grad) < FP32_TOL, f"{name}: {rel_err(grad, ref_grad):.2e}"


def test_local_fp16():
    run_and_compare("local", 2, 2, 130, 32, [130, 61], dtype=torch.float16, tol=FP16_TOL, local_radius=20)


# ---- block: own block + the first num_global keys; the first num_global queries see all -------

@pytest.mark.parametrize("L,block_size,num_global", [
    (1, 24, 1),
    (17, 24, 0),  # one block covers the input: dense
    (100, 24, 1),  # block not a multiple of the tile
    (130, 50, 40),  # num_global inside the first block
    (257, 24, 40),  # num_global > block: leading keys span two blocks, still counted once
    (257, 7, 3),  # blocks much smaller than a tile
    (257, 64, 16),  # tile multiples: interior tiles run unmasked
])
def test_block(L, block_size, num_global):
    run_and_compare("block", 2, 2, L, 16, [L, max(L // 3, 1)], block_size=block_size, num_global=num_global,
                    seed=L + block_size)


@pytest.mark.parametrize("block_size,num_global", [(40, 5), (64, 16), (24, 1), (100, 0)])
def test_block_narrow_leading_tile(monkeypatch, block_size, num_global):
    # With 32-key forward tiles, query tiles whose blocks start past the leading tile read the
    # global keys through a 16-key tile (LEAD_N); the tiles of the first blocks keep the whole one.
    monkeypatch.setattr(flash_mod, "_INTERPRET", {**flash_mod._INTERPRET, "fwd": (32, 32)})
    run_and_compare("block", 2, 2, 257, 16, [257, 90], block_size=block_size, num_global=num_global,
                    seed=block_size + num_global)


def test_block_far_leading_tile(monkeypatch):
    # A short reach (8 buckets, max_distance 4): the narrow leading tile of every query tile past
    # row ~20 lies wholly beyond it and runs as a far tile (one scalar bias, no gather).
    monkeypatch.setattr(flash_mod, "_INTERPRET", {**flash_mod._INTERPRET, "fwd": (32, 32), "dq": (32, 32)})
    run_and_compare("block", 2, 2, 257, 16, [257, 90], block_size=40, num_global=16, num_buckets=8, max_distance=4,
                    seed=5)


def test_block_padding_inside_the_leading_tokens():
    run_and_compare("block", 3, 2, 64, 16, [64, 2, 1], block_size=16, num_global=16)


def test_block_far_tiles_inside_a_block_wider_than_max_distance():
    run_and_compare("block", 1, 2, 257, 16, [240], block_size=128, num_global=5, num_buckets=16, max_distance=24)


@pytest.mark.parametrize("block_size,num_global", [(40, 16), (64, 50), (100, 1)])
def test_block_global_rows_and_keys_split_into_many_chunks(monkeypatch, block_size, num_global):
    # The tiles holding the global rows (forward, dq) and global keys (dk, dv) run split over the
    # long axis and are merged; a small chunk makes a short sequence span many chunks.
    monkeypatch.setattr(flash_mod, "GLOBAL_MIN_CHUNK", 16)
    run_and_compare("block", 2, 2, 230, 16, [230, 97], block_size=block_size, num_global=num_global,
                    seed=block_size + num_global)


@pytest.mark.parametrize("pattern,params", [("local", dict(local_radius=9)),
                                            ("block", dict(block_size=40, num_global=20))])
def test_q_k_v_in_a_models_memory(monkeypatch, pattern, params):
    # A model's q, k, v are [B, H, L, D] views of [B, L, H, D] projections, and the outputs (out,
    # dq, dk, dv) take that memory layout; block's global rows are split into several chunks, so
    # their merge writes through those strides.
    monkeypatch.setattr(flash_mod, "GLOBAL_MIN_CHUNK", 16)
    run_and_compare(pattern, 2, 3, 150, 16, [150, 61], heads_last=True, seed=21, **params)


def test_block_global_rows_run_far_and_near_tiles_over_every_key(monkeypatch):
    # The global rows' forward runs the dense loops: with a short reach (8 buckets, max_distance 4)
    # and 70 global rows (tiles of up to 64 of them), their chunks hold far-left, near, far-right
    # and partial key tiles; the second sequence's padding starts inside the global rows. The
    # main kernel computes the rest of the tiles that hold global rows.
    monkeypatch.setattr(flash_mod, "GLOBAL_MIN_CHUNK", 16)
    run_and_compare("block", 2, 2, 201, 16, [201, 50], block_size=30, num_global=70, num_buckets=8, max_distance=4,
                    seed=3)


def test_block_without_a_bias_table_equals_a_zero_table():
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 2, 150, 16, generator=g, dtype=torch.float64) for _ in range(3))
    kl = torch.tensor([150, 77])
    params = dict(block_size=40, num_global=20)
    out = sparse_attention(*(t.float() for t in (q, k, v)), None, pattern="block", key_lengths=kl, **params)
    ref = reference_sparse(q, k, v, torch.zeros(32, 2, dtype=torch.float64), "block", key_lengths=kl, **params)
    assert rel_err(out, ref) < FP32_TOL


def test_block_fp16():
    run_and_compare("block", 2, 2, 130, 32, [130, 77], dtype=torch.float16, tol=FP16_TOL, block_size=48,
                    num_global=16)


def test_key_length_zero_gives_zero_rows_and_no_gradient():
    run_and_compare("local", 2, 2, 40, 16, [0, 23], local_radius=7)
    run_and_compare("block", 2, 2, 40, 16, [23, 0], block_size=16, num_global=4)


# ---- which tiles are visited -------------------------------------------------------------------

@triton.jit
def _ranges_probe(Out, length, n_full, PATTERN: tl.constexpr, RADIUS: tl.constexpr, SBLOCK: tl.constexpr,
                  NUM_GLOBAL: tl.constexpr, T: tl.constexpr, U: tl.constexpr):
    t = tl.program_id(0)
    t0 = t * T
    if PATTERN == 2:  # block: the global positions are the split kernels' (the main kernels' t0)
        t0 = tl.maximum(t0, NUM_GLOBAL)
    lead_end, a0, i0, i1, e1 = flash_mod._sparse_ranges(t0, t * T + T, length, n_full, PATTERN, RADIUS, SBLOCK,
                                                        NUM_GLOBAL, U)
    tl.store(Out + t * 5 + 0, lead_end)
    tl.store(Out + t * 5 + 1, a0)
    tl.store(Out + t * 5 + 2, i0)
    tl.store(Out + t * 5 + 3, i1)
    tl.store(Out + t * 5 + 4, e1)


@pytest.mark.parametrize("pattern,params", [
    # radii and blocks on both sides of tile multiples, where an off-by-one in a bound shows
    *[("local", dict(local_radius=r)) for r in (0, 5, 14, 15, 16, 31, 40, 62, 63)],
    ("block", dict(block_size=24, num_global=1)), ("block", dict(block_size=24, num_global=40)),
    ("block", dict(block_size=7, num_global=0)), ("block", dict(block_size=64, num_global=16)),
    ("block", dict(block_size=32, num_global=32)), ("block", dict(block_size=33, num_global=15)),
])
@pytest.mark.parametrize("T,U", [(32, 16), (16, 32), (64, 64)])
def test_tile_ranges_cover_each_visible_pair_once_and_only_tiles_with_one(pattern, params, T, U):
    """The spec of _sparse_ranges: every visible pair lies in exactly one visited tile; tiles run
    without a mask are wholly visible and below n_full; every visited tile holds a visible pair.
    block: for the tile's positions past the global ones, as the main kernels ask (the global
    rows and keys are the split kernels', tested with the kernels below)."""
    length = 203
    n_full = (length // U) * U
    tiles = triton.cdiv(length, T)
    out = torch.zeros(tiles * 5, dtype=torch.int32)
    _ranges_probe[(tiles,)](out, length, n_full, PATTERN={"local": 1, "block": 2}[pattern],
                            RADIUS=params.get("local_radius", 0), SBLOCK=params.get("block_size", 1),
                            NUM_GLOBAL=params.get("num_global", 0), T=T, U=U)
    visible = sparse_visible(length, pattern, **params)
    first = params.get("num_global", 0) if pattern == "block" else 0
    for t, (lead_end, a0, i0, i1, e1) in enumerate(out.view(tiles, 5).tolist()):
        rows = slice(max(t * T, first), min(t * T + T, length))
        if rows.start >= rows.stop:  # a tile of global positions only: the main kernels skip it
            continue
        assert 0 <= lead_end <= a0 <= i0 <= i1 <= e1 and i1 <= max(n_full, i0)
        covered = torch.zeros(length, dtype=torch.int32)
        for start, end, masked in ((0, lead_end, True), (a0, i0, True), (i0, i1, False), (i1, e1, True)):
            for n in range(start, end, U):
                block = visible[rows, n : n + U]
                assert block.any(), f"tile {n} of rows {rows} holds no visible pair"
                assert masked or (block.all() and n + U <= n_full), f"unmasked tile {n} is not wholly visible"
                covered[n : n + U] += 1
        seen = visible[rows].any(0)
        assert (covered[seen] == 1).all(), "a visible key is missed or visited twice"


# ---- the model's route -------------------------------------------------------------------------

@pytest.mark.parametrize("mode,params", [("local", dict(local_radius=9)), ("block", dict(block_size=20,
                                                                                           num_global=3))])
def test_kernel_route_equals_the_torch_route(mode, params):
    """sparse_kernel_attention (what attend_sparse calls on CUDA: key mask -> lengths, the
    RelativeBias description) gives the torch route's result; on the CPU attend_sparse stays torch."""
    B, H, L, D = 2, 2, 70, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    bias = RelativeBias(16, 24, H, bidirectional=True)
    with torch.no_grad():
        bias.weight.normal_(0, 2.0, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor([70, 33])[:, None]
    layout = make_layout(T5Config(attention=AttentionMode(mode), **params), mask, B, L, None)
    torch_out = attend_sparse(q, k, v, layout=layout, bias=bias, key_mask=mask)
    kernel_out = sparse_kernel_attention(q, k, v, layout=layout, bias=bias, key_mask=mask)
    assert rel_err(kernel_out, torch_out.double()) < FP32_TOL


# ---- transient-global: the local kernel + the side-key kernels ----------------------------------

def _tglobal_case(L, lengths, radius, global_block, num_buckets, max_distance, dtype, seed):
    """(leaves, layout, mask, local bias, side kv) for one precision; the same values each call."""
    B, H, D = len(lengths), 2, 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3))
    bias = RelativeBias(num_buckets, max_distance, H, bidirectional=True).to(dtype)
    global_bias = RelativeBias(num_buckets, max_distance, H, bidirectional=True).to(dtype)
    with torch.no_grad():
        bias.weight.copy_(torch.randn(num_buckets, H, generator=g, dtype=torch.float64) * 2)
        global_bias.weight.copy_(torch.randn(num_buckets, H, generator=g, dtype=torch.float64) * 2)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    config = T5Config(attention=AttentionMode.TRANSIENT_GLOBAL, local_radius=radius, global_block_size=global_block,
                      num_buckets=num_buckets, max_distance=max_distance)
    layout = make_layout(config, mask, B, L, global_bias)
    num_side = layout.num_side
    side_k, side_v = (torch.randn(B, H, num_side, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                      for _ in range(2))
    leaves = [q, k, v, bias.weight, side_k, side_v, global_bias.weight]
    return leaves, layout, mask, bias, (side_k, side_v)


@pytest.mark.parametrize("L,lengths,radius,global_block,num_buckets,max_distance,heads_last", [
    (70, [70, 33], 9, 4, 32, 24, False),    # orphans (33 = 8 blocks of 4 + 1), padding, rel beyond max_distance
    (70, [70, 33], 9, 4, 32, 24, True),     # the same, q, k, v in a model's [B, L, H, D] memory
    (100, [100, 100], 30, 16, 8, 4, False),  # side keys beyond +-max_distance (the clamped LUT)
    (300, [300, 211], 9, 4, 8, 4, False),   # 75 side keys: far side-key tiles on both sides, padding
    (45, [45, 3], 7, 4, 32, 128, False),    # a row with no full global block: no side key at all
    (9, [9, 9], 3, 16, 32, 128, False),     # shorter than a global block: G = 0 side keys
])
def test_transient_global_kernels_equal_the_torch_route(monkeypatch, L, lengths, radius, global_block, num_buckets,
                                                        max_distance, heads_last):
    """tglobal_kernel_attention (what attend_sparse calls on CUDA) against the blocked torch route
    in float64: output and the gradients of q, k, v, both tables and the side keys and values.
    heads_last: q, k, v are [B, H, L, D] views of [B, L, H, D] memory, as a model's projections
    are (so are the output, the merged softmax the side kernel writes in place, and dq)."""
    from t5core.sparse import tglobal_kernel_attention

    monkeypatch.setattr(flash_mod, "GLOBAL_MIN_CHUNK", 16)  # the side dk/dv split over several query chunks
    case = (L, lengths, radius, global_block, num_buckets, max_distance)
    ref_leaves, ref_layout, mask, ref_bias, ref_side = _tglobal_case(*case, torch.float64, seed=L + radius)
    expected = attend_sparse(*ref_leaves[:3], layout=ref_layout, bias=ref_bias, key_mask=mask, side_kv=ref_side)
    leaves, layout, _, bias, side = _tglobal_case(*case, torch.float32, seed=L + radius)
    if heads_last:
        leaves[:3] = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in leaves[:3]]
        assert leaves[0].stride(2) != leaves[0].shape[-1]
    actual = tglobal_kernel_attention(*leaves[:3], layout=layout, bias=bias, key_mask=mask, side_kv=side)
    assert torch.isfinite(actual).all()
    assert rel_err(actual, expected) < FP32_TOL
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(expected, ref_leaves, dout, allow_unused=True)
    grads = torch.autograd.grad(actual, leaves, dout.float(), allow_unused=True)
    names = ["dq", "dk", "dv", "dtable", "dside_k", "dside_v", "dglobal_table"]
    for name, grad, ref in zip(names, grads, ref_grads):
        if ref is None or ref.norm() == 0:
            assert grad is None or grad.norm() == 0, name
            continue
        assert torch.isfinite(grad).all(), name
        assert rel_err(grad, ref) < FP32_TOL, f"{name}: {rel_err(grad, ref):.2e}"


@pytest.mark.parametrize("num_buckets,max_distance,block_n", [(32, 128, 32), (8, 4, 16)])
def test_far_rows_split_each_side_key_tile_exactly(num_buckets, max_distance, block_n):
    """_far_rows (the side dk/dv kernel's far query rows per key tile) against brute force: every
    real row before the first bound is >= reach before the tile's keys, every real row from the
    second is >= reach after them, and no real row on the other side of a bound is."""
    from t5core.sparse import global_block_ids

    reach = flash_mod._bucket_tables(True, num_buckets, max_distance, torch.device("cpu")).reach
    g = torch.Generator().manual_seed(3)
    L, gbs = 3000, 8
    lengths = torch.tensor([L, 2001, int(torch.randint(1, L, (1,), generator=g)), gbs - 1])
    valid = torch.arange(L)[None, :] < lengths[:, None]  # right padding, orphans, no full block
    block_ids, _ = global_block_ids(valid, gbs)
    n_tiles = triton.cdiv(L // gbs, block_n)
    bounds = flash_mod._far_rows(block_ids, n_tiles, block_n, reach)
    assert bounds.shape == (4, n_tiles, 2) and bounds.dtype == torch.int32
    rows = torch.arange(L)
    for b in range(4):
        real = block_ids[b] >= 0
        for t in range(n_tiles):
            first, last = t * block_n, t * block_n + block_n - 1
            before, after = bounds[b, t].tolist()
            assert 0 <= before <= after <= L
            far_right = real & (block_ids[b] <= first - reach)
            far_left = real & (block_ids[b] >= last + reach)
            assert torch.equal(far_right, real & (rows < before)), (b, t)
            assert torch.equal(far_left, real & (rows >= after)), (b, t)


def test_side_forward_merges_into_the_local_softmax():
    """side_forward against the two softmaxes merged in float64: random local (out, lse) with
    some rows holding no local key (lse = +inf), padding rows (block -1) left as they were."""
    from t5core.layers import relative_position_bucket
    from t5core.sparse import global_block_ids

    g = torch.Generator().manual_seed(5)
    B, H, L, D, G, nb, md = 2, 2, 50, 16, 12, 8, 6
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    side_k, side_v = (torch.randn(B, H, G, D, generator=g, dtype=torch.float64) for _ in range(2))
    table = torch.randn(nb, H, generator=g, dtype=torch.float64) * 2
    valid = torch.arange(L)[None, :] < torch.tensor([L, 38])[:, None]  # orphans in both rows, padding in one
    block_ids, _ = global_block_ids(valid, 4)
    side_lengths = (block_ids.max(-1).values + 1).to(torch.int32)
    out_local = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    lse_local = torch.randn(B, H, L, generator=g, dtype=torch.float64) * 3
    lse_local[0, :, 5] = float("inf")  # no local key
    out_local[0, :, 5] = 0.0
    rel = torch.arange(G)[None, None, :] - block_ids.clamp_min(0)[:, :, None]  # [B, L, G]
    bias = table[relative_position_bucket(rel, True, nb, md)].permute(0, 3, 1, 2)  # [B, H, L, G]
    scores = q @ side_k.transpose(-1, -2) + bias
    scores = scores.masked_fill(torch.arange(G)[None, None, None, :] >= side_lengths[:, None, None, None], -torch.inf)
    side_lse = torch.logsumexp(scores, -1)
    side_out = torch.softmax(scores, -1) @ side_v
    local_nat = torch.where(torch.isinf(lse_local), -torch.inf, lse_local * math.log(2))  # +inf: no key
    lse_nat = torch.logaddexp(local_nat, side_lse)
    expected = (out_local * torch.exp(local_nat - lse_nat)[..., None]
                + side_out * torch.exp(side_lse - lse_nat)[..., None])
    expected_lse = lse_nat / math.log(2)
    pad = (block_ids < 0)[:, None, :].expand(B, H, L)
    expected[pad], expected_lse[pad] = out_local[pad], lse_local[pad]

    out, lse = out_local.float().clone(), lse_local.float().clone()
    lut = flash_mod.side_lut(table.float(), nb, md)
    flash_mod.side_forward(q.float(), side_k.float(), side_v.float(), lut, block_ids, side_lengths, out, lse)
    assert rel_err(out, expected) < FP32_TOL
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], expected_lse[finite]) < FP32_TOL
    assert torch.equal(out[pad], out_local.float()[pad])  # padding rows untouched


def test_far_rows_reject_block_ids_with_holes():
    """Padding inside a row (block ids -1 between real ones) would break the sorted search: a
    clear error, not a wrong bias."""
    block_ids = torch.arange(64)[None] // 8
    block_ids[0, 20:30] = -1
    with pytest.raises(RuntimeError, match="must not decrease"):
        flash_mod._far_rows(block_ids, 2, 4, 3)


def test_opcheck_sparse_patterns():
    q, k, v = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    kl = torch.tensor([20])
    for pattern_args in ((1, 5, 1, 0), (2, 0, 8, 3)):
        args = (q, k, v, table, kl, True, 32, 128, False, 0, *pattern_args)
        torch.library.opcheck(torch.ops.t5core.flash_attention_fwd.default, args)


def test_torch_compile_traces_sparse_attention_without_graph_breaks():
    def attend(q, k, v, table):
        return sparse_attention(q, k, v, table, pattern="block", block_size=8, num_global=2).square().sum()

    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    loss = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v, table)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v, table)]
    for t in (q, k, v, table):
        t.grad = None
    attend(q, k, v, table).backward()
    assert torch.allclose(loss, attend(q, k, v, table))
    for got, want in zip(grads, [t.grad for t in (q, k, v, table)]):
        assert torch.allclose(got, want)


def _tglobal_op_inputs():
    """Kernel inputs of a small transient-global case: padding, orphan tokens, side keys."""
    leaves, layout, mask, _, _ = _tglobal_case(30, [30, 21], 5, 4, 32, 24, torch.float32, seed=3)
    q, k, v, table, side_k, side_v, global_table = leaves
    return (q, k, v, table, side_k, side_v, global_table, layout.block_ids,
            mask.sum(-1).to(torch.int32), layout.local_radius)


def test_opcheck_transient_global():
    q, k, v, table, side_k, side_v, global_table, block_ids, key_lengths, radius = _tglobal_op_inputs()
    args = (q, k, v, table, side_k, side_v, global_table, block_ids, key_lengths, radius, 32, 24)
    torch.library.opcheck(torch.ops.t5core.transient_global_fwd.default, args)


@pytest.mark.parametrize("frozen_table", [False, True])
def test_torch_compile_traces_transient_global_without_graph_breaks(frozen_table):
    """fullgraph=True fails on a graph break; the compiled loss and every gradient (the frozen
    local table: none) equal eager's."""
    from t5core.kernels import transient_global_attention

    q, k, v, table, side_k, side_v, global_table, block_ids, key_lengths, radius = _tglobal_op_inputs()
    table.requires_grad_(not frozen_table)
    leaves = [q, k, v, table, side_k, side_v, global_table]

    def attend(q, k, v, table, side_k, side_v, global_table):
        out = transient_global_attention(q, k, v, table, side_k, side_v, global_table, block_ids,
                                         local_radius=radius, key_lengths=key_lengths, num_buckets=32,
                                         max_distance=24)
        return out.square().sum()

    loss = torch.compile(attend, backend="aot_eager", fullgraph=True)(*leaves)
    loss.backward()
    grads = [None if t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    eager = attend(*leaves)
    eager.backward()
    assert torch.allclose(loss, eager)
    assert (grads[3] is None) == frozen_table
    for got, t in zip(grads, leaves):
        if t.requires_grad:
            assert got is not None and got.norm() > 0
            assert torch.allclose(got, t.grad, rtol=1e-5, atol=1e-6)


def test_bad_patterns_are_rejected():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="pattern must be one of"):
        sparse_attention(q, q, q, None, pattern="global")
    with pytest.raises(ValueError, match="encoder self-attention"):
        sparse_attention(q, torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16), None, pattern="local")
