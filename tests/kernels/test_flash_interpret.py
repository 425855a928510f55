"""The Triton T5 flash-attention kernels, run by Triton's CPU interpreter, against a float64 reference.

Tolerances (norm-wise relative error ‖x - ref‖ / ‖ref‖): fp32 inputs with exact (ieee) fp32
dots land near 1e-6, so 1e-5 leaves rounding room and still catches any wrong bias, mask or
bucket (those give errors of 1e-2 and up); bf16 inputs carry 8 mantissa bits, so 2e-2.
"""
import pytest
import torch

import math

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from t5core.kernels import flash_attention, flash_attention_varlen, relative_position_bucket  # noqa: E402
from t5core.kernels import bucket as bucket_mod  # noqa: E402
from t5core.kernels import flash as flash_mod  # noqa: E402

from .interpreter import rel_err, require_interpreter, spy_dtable_flags  # noqa: E402
from .reference import reference_attention, reference_varlen  # noqa: E402

require_interpreter(flash_mod._fwd_kernel, "test_flash_gpu.py")

FP32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flash_mod, "POISON_OUTPUTS", True)


def run_and_compare(B, H, Lq, Lk, D, *, dtype=torch.float32, tol=FP32_TOL, with_table=True, key_lengths=None,
                    strided=False, seed=0, **bias_kwargs):
    """Forward and all four gradients of the kernel vs the float64 reference on random inputs."""
    g = torch.Generator().manual_seed(seed)
    nb = bias_kwargs.get("num_buckets", 32)
    if strided:  # q, k, v as views of a [B, L, H, D] projection output, as the model produces them
        q64, k64, v64 = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
                         for L in (Lq, Lk, Lk))
    else:
        q64, k64, v64 = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    table64 = torch.randn(nb, H, generator=g, dtype=torch.float64) * 3 if with_table else None
    kl = torch.tensor(key_lengths) if key_lengths is not None else None
    leaves64 = [t.requires_grad_() for t in (q64, k64, v64, table64) if t is not None]
    ref = reference_attention(q64, k64, v64, table64, key_lengths=kl, **bias_kwargs)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves64, dout)

    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    q, k, v = leaves[:3]
    table = leaves[3] if with_table else None
    out = flash_attention(q, k, v, table, key_lengths=kl, **bias_kwargs)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))

    assert out.dtype == dtype and out.shape == ref.shape
    if strided:  # outputs and gradients in the inputs' layout: the heads merge back without a copy
        for name, x in zip(["out", "dq", "dk", "dv"], (out, *grads[:3])):
            assert x.transpose(1, 2).is_contiguous(), f"{name} is not in the [B, L, H, D] layout"
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    assert rel_err(out, ref) < tol, f"out: {rel_err(out, ref):.2e}"
    for name, grad, ref_grad in zip(["dq", "dk", "dv", "dtable"], grads, ref_grads):
        assert grad.dtype == dtype
        assert torch.isfinite(grad).all(), f"{name}: unwritten or non-finite"
        if ref_grad.norm() == 0:  # e.g. dq with one key: only rounding noise may remain
            scale = max(rg.norm() for rg in ref_grads)
            assert grad.double().norm() <= tol * scale, f"{name} should be zero"
        else:
            assert rel_err(grad, ref_grad) < tol, f"{name}: {rel_err(grad, ref_grad):.2e}"


# ---- the bucket function ----------------------------------------------------------------------

BUCKET_CONFIGS = [(32, 128), (32, 256), (64, 128)]


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_CONFIGS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_equals_transformers(num_buckets, max_distance, bidirectional):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5", reason="transformers (test oracle) missing")
    rel = torch.arange(-5000, 5001)
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    theirs = t5.T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_CONFIGS + [(16, 24)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_is_constant_beyond_max_distance(num_buckets, max_distance, bidirectional):
    # The far-tile specialisation and the clamped lookup table rely on this.
    rel = torch.arange(-4 * max_distance, 4 * max_distance + 1)
    buckets = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    left, right = relative_position_bucket(torch.tensor([-max_distance, max_distance]), bidirectional, num_buckets,
                                           max_distance).tolist()
    assert (buckets[rel <= -max_distance] == left).all() and (buckets[rel >= max_distance] == right).all()
    lut = bucket_mod.bucket_lut(bidirectional, num_buckets, max_distance)
    clamped = rel.clamp(-max_distance, max_distance) + max_distance
    assert torch.equal(lut.long()[clamped], buckets)


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_CONFIGS + [(16, 24), (8, 8)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_reach_is_where_the_buckets_stop_changing(num_buckets, max_distance, bidirectional):
    # The kernels treat every tile beyond +-reach as far (one scalar bias): exact only if no bucket
    # changes beyond it; and the reach is the least such distance (else near tiles are wasted).
    reach = bucket_mod.bucket_reach(bidirectional, num_buckets, max_distance)
    rel = torch.arange(-4 * max_distance, 4 * max_distance + 1)
    buckets = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    left, right = relative_position_bucket(torch.tensor([-max_distance, max_distance]), bidirectional, num_buckets,
                                           max_distance).tolist()
    assert 1 <= reach <= max_distance
    assert (buckets[rel <= -reach] == left).all() and (buckets[rel >= reach] == right).all()
    if reach > 1:
        inside = buckets[(rel == 1 - reach) | (rel == reach - 1)]
        assert inside[0] != left or inside[1] != right
    if (num_buckets, max_distance) == (32, 128):  # every T5 size: the log buckets saturate early
        assert reach == (91 if bidirectional else 113)


# ---- fixed-length attention -------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 17, 100, 130, 257])
def test_encoder_bidirectional(L):
    run_and_compare(2, 3, L, L, 32, bidirectional=True, seed=L)


def test_encoder_head_dim_64_with_padding():
    run_and_compare(3, 2, 130, 130, 64, key_lengths=[130, 57, 1], bidirectional=True)


def test_encoder_key_lengths_not_tile_multiples():
    run_and_compare(2, 2, 257, 257, 32, key_lengths=[200, 33], bidirectional=True)


def test_encoder_strided_inputs():
    run_and_compare(2, 2, 100, 100, 32, strided=True, bidirectional=True)


def test_decoder_causal():
    run_and_compare(2, 2, 257, 257, 32, bidirectional=False, causal=True)


@pytest.mark.parametrize("Lq,Lk,q_offset", [(1, 130, 129), (17, 130, 113), (100, 257, 157), (17, 257, 40)])
def test_decoder_causal_with_q_offset(Lq, Lk, q_offset):
    # Decoding with a cache: query i sits at position q_offset + i; keys past it are masked.
    run_and_compare(2, 2, Lq, Lk, 32, bidirectional=False, causal=True, q_offset=q_offset)


def test_small_max_distance_many_far_tiles():
    run_and_compare(2, 2, 130, 257, 32, num_buckets=16, max_distance=24, bidirectional=True)
    run_and_compare(1, 2, 130, 130, 32, num_buckets=16, max_distance=24, bidirectional=False, causal=True)


@pytest.mark.parametrize("Lq,Lk", [(17, 100), (130, 257), (1, 17)])
def test_cross_attention_without_table(Lq, Lk):
    run_and_compare(2, 2, Lq, Lk, 32, with_table=False, key_lengths=[Lk, max(Lk // 3, 1)])


def test_key_length_zero_gives_zero_rows():
    # A row with no visible key outputs 0 (never NaN), and passes no gradient anywhere.
    run_and_compare(2, 2, 17, 40, 32, key_lengths=[0, 23], bidirectional=True)
    run_and_compare(2, 2, 17, 40, 32, with_table=False, key_lengths=[23, 0])


@triton.jit
def _bf16_dot_probe(A, C):
    offs = tl.arange(0, 16)
    a = tl.load(A + offs[:, None] * 16 + offs[None, :])
    tl.store(C + offs[:, None] * 16 + offs[None, :], tl.dot(a, a))


def interpreter_bf16_dot_works() -> bool:
    a = torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    _bf16_dot_probe[(1,)](a, c)
    return torch.allclose(c, a.float() @ a.float(), rtol=1e-2, atol=1e-2)


def test_bf16():
    if not interpreter_bf16_dot_works():
        pytest.skip("this Triton's interpreter computes bf16 tl.dot wrongly (seen on 3.9: errors ~1e10 "
                    "on a plain 16x16 dot); bf16 is covered by test_flash_gpu.py")
    run_and_compare(2, 2, 130, 130, 64, dtype=torch.bfloat16, tol=BF16_TOL, key_lengths=[130, 77])


def test_fp16_causal():
    run_and_compare(1, 2, 100, 100, 32, dtype=torch.float16, tol=BF16_TOL, bidirectional=False, causal=True)


def test_table_grad_keeps_table_dtype():
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    table = torch.randn(32, 2, dtype=torch.bfloat16, requires_grad=True)
    flash_attention(q, k, v, table).sum().backward()
    assert table.grad.dtype == torch.bfloat16 and torch.isfinite(table.grad).all()


@pytest.mark.parametrize("causal", [False, True])
def test_frozen_table_skips_the_bucket_sums_and_keeps_the_other_gradients(monkeypatch, causal):
    # A frozen bias table (LoRA-style fine-tuning): no table gradient, so the dq kernel runs
    # without the per-bucket dS sums; dq, dk, dv must not change.
    g = torch.Generator().manual_seed(21)
    B, H, Lq, Lk = 2, 3, 45 if causal else 130, 130
    q64, k64, v64 = (torch.randn(B, H, L, 32, generator=g, dtype=torch.float64).requires_grad_()
                     for L in (Lq, Lk, Lk))
    table64 = torch.randn(32, H, generator=g, dtype=torch.float64) * 3  # no requires_grad: frozen
    kw = dict(bidirectional=not causal, causal=causal, q_offset=Lk - Lq if causal else 0,
              key_lengths=torch.tensor([Lk, 77]))
    ref = reference_attention(q64, k64, v64, table64, **kw)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [q64, k64, v64], dout)
    flags = spy_dtable_flags(monkeypatch, flash_mod)
    leaves = [t.detach().float().requires_grad_() for t in (q64, k64, v64)]
    table = table64.float()
    out = flash_attention(*leaves, table, **kw)
    out.backward(dout.float())
    assert flags == [False] and table.grad is None
    for name, leaf, ref_grad in zip(["dq", "dk", "dv"], leaves, ref_grads):
        assert rel_err(leaf.grad, ref_grad) < FP32_TOL, f"{name}: {rel_err(leaf.grad, ref_grad):.2e}"


# ---- varlen ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packing(causal):
    g = torch.Generator().manual_seed(7)
    lens = [17, 100, 1, 130]
    H, D = 2, 32
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    q64, k64, v64 = (torch.randn(total, H, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    table64 = (torch.randn(32, H, generator=g, dtype=torch.float64) * 3).requires_grad_()
    kw = dict(bidirectional=not causal, causal=causal)
    ref = reference_varlen(q64, k64, v64, table64, cu, cu, **kw)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [q64, k64, v64, table64], dout)
    leaves = [t.detach().float().requires_grad_() for t in (q64, k64, v64, table64)]
    out = flash_attention_varlen(*leaves, cu, cu, max(lens), max(lens), **kw)
    grads = torch.autograd.grad(out, leaves, dout.float())
    assert rel_err(out, ref) < FP32_TOL
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.isfinite(grad).all() and rel_err(grad, ref_grad) < FP32_TOL


# ---- torch.library / torch.compile -------------------------------------------------------------


@pytest.mark.parametrize("strided", [False, True])
def test_opcheck_fixed_length(strided):
    # strided: views of [B, L, H, D], whose outputs keep that layout (the fake implementation too)
    shape = (1, 33, 2, 16) if strided else (1, 2, 33, 16)
    q, k, v = (torch.randn(shape).transpose(1, 2).requires_grad_() if strided else torch.randn(shape, requires_grad=True)
               for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    kl = torch.tensor([20])
    args = (q, k, v, table, kl, True, 32, 128, False, 0)
    torch.library.opcheck(torch.ops.t5core.flash_attention_fwd.default, args)


def test_opcheck_varlen():
    cu = torch.tensor([0, 9, 33], dtype=torch.int32)
    q, k, v = (torch.randn(33, 2, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    args = (q, k, v, table, cu, cu, 24, 24, False, 32, 128, True)
    torch.library.opcheck(torch.ops.t5core.flash_attention_varlen_fwd.default, args)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_traces_without_graph_breaks(backend):
    def attend(q, k, v, table):
        return flash_attention(q, k, v, table, bidirectional=False, causal=True, q_offset=3).square().sum()

    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    compiled = torch.compile(attend, backend=backend, fullgraph=True)
    loss = compiled(q, k, v, table)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v, table)]
    for t in (q, k, v, table):
        t.grad = None
    attend(q, k, v, table).backward()
    assert math.isclose(loss.item(), attend(q, k, v, table).item(), rel_tol=1e-6)
    for got, want in zip(grads, [t.grad for t in (q, k, v, table)]):
        assert torch.allclose(got, want)


@pytest.mark.parametrize("bidirectional,window", [(True, -1), (False, -1), (True, 40), (True, 300)])
def test_bias_row_holds_the_bias_of_every_rel_a_tile_can_hold(bidirectional, window):
    """_bias_row entry i is the pair (bias at rel, at rel + 1), rel = i - lut_w, the bias being
    table[bucket(rel), h] (beyond the reach the bucket is constant, so its clamp is exact), -inf
    beyond a `local` window; lut_width covers the extreme rels of a near tile (first key reach - 1
    + BLOCK_M - 1 after the last query, or before) and of a window tile."""
    g = torch.Generator().manual_seed(12)
    table = torch.randn(32, 3, generator=g)
    tables = flash_mod._bucket_tables(bidirectional, 32, 128, torch.device("cpu"))
    tiles = [(32, 16), (16, 32)]
    lut_w = flash_mod.lut_width(tables.reach, window, tiles)
    for rows, cols in tiles:
        extreme = max(tables.reach, window) - 1 + rows - 1 + cols - 1
        assert extreme <= lut_w
    row = flash_mod._bias_row(table, tables.lut, tables.reach, lut_w, window)
    for second in (0, 1):
        rel = torch.arange(-lut_w, lut_w + 1) + second
        want = table[relative_position_bucket(rel, bidirectional, 32, 128)].t()
        if window >= 0:
            want = torch.where(rel.abs() <= window, want, float("-inf"))
        assert torch.equal(row[:, :, second], want)


def test_bf16_table_matches_the_float64_reference_of_that_table():
    """A bf16 table (a bf16 model's): its values are exact in the fp32 bias row, so fp32 inputs
    match the float64 reference of the same table to fp32 precision."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 3, 130, 32, generator=g, dtype=torch.float64) for _ in range(3))
    table = (torch.randn(32, 3, generator=g, dtype=torch.float64) * 3).to(torch.bfloat16)
    kl = torch.tensor([130, 77])
    ref = reference_attention(q, k, v, table.double(), key_lengths=kl)
    out = flash_attention(q.float(), k.float(), v.float(), table, key_lengths=kl)
    assert rel_err(out, ref) < FP32_TOL


def test_autotuned_launchers_are_built_once_with_the_listed_configs(monkeypatch):
    # T5CORE_AUTOTUNE=1 (GPU only): one autotuner per kernel, family and default config, else
    # every call re-tunes; the default config first, then _AUTOTUNE_MORE's.
    monkeypatch.setitem(flash_mod._AUTOTUNE_MORE["sm90"], "fwd", [(4, 3), (4, 2, 128)])
    flash_mod._tuned.cache_clear()
    try:
        tuner = flash_mod._tuned("fwd", "sm90", (8, 3, 128))
        assert flash_mod._tuned("fwd", "sm90", (8, 3, 128)) is tuner
        got = [(c.num_warps, c.num_stages, c.maxnreg) for c in tuner.configs]
        assert got == [(8, 3, 128), (4, 3, None), (4, 2, 128)]
    finally:
        flash_mod._tuned.cache_clear()


def test_launch_configs_per_pattern_and_the_tile_override(monkeypatch):
    # A sparse pattern takes its own tile *and* warps (the dense forward's 8 warps would be wrong for
    # its 64-row tiles); a tile-only override keeps the default launch options; a full one replaces them.
    monkeypatch.setattr(flash_mod, "_interpreting", lambda: False)
    monkeypatch.setattr(flash_mod, "_family", lambda fp32: "fp32" if fp32 else "sm90")
    monkeypatch.delenv("T5CORE_TILE_FWD", raising=False)
    dense = flash_mod.launch_config("fwd", False)
    local, block = (flash_mod.launch_config("fwd", False, pattern) for pattern in (1, 2))
    assert dense == flash_mod._TILES["sm90"]["fwd"]
    assert local == flash_mod._SPARSE_TILES["sm90"][1]["fwd"] and block == flash_mod._SPARSE_TILES["sm90"][2]["fwd"]
    assert dense[2:] != local[2:] and dense[2:] != block[2:]
    for kind in ("side_fwd", "global_fwd", "side_dq", "side_dkdv"):  # no sparse entry; each a full config
        assert flash_mod.launch_config(kind, False, 1) == flash_mod._TILES["sm90"][kind]
        assert len(flash_mod._TILES["sm90"][kind]) >= 4
    assert flash_mod.launch_config("fwd", True, 1) == flash_mod._TILES["fp32"]["fwd"]  # no fp32 sparse tiles
    monkeypatch.setenv("T5CORE_TILE_FWD", "64x32")
    assert flash_mod.launch_config("fwd", False, 1) == (64, 32, *local[2:])
    assert flash_mod.launch_config("fwd", False) == (64, 32, *dense[2:])
    monkeypatch.setenv("T5CORE_TILE_FWD", "64x64x4x2x128")
    assert flash_mod.launch_config("fwd", False) == (64, 64, 4, 2, 128)
    for bad in ("128x64x8", "64", "64xsixty-four"):  # warps without stages: no launch options to read it by
        monkeypatch.setenv("T5CORE_TILE_FWD", bad)
        with pytest.raises(ValueError, match="T5CORE_TILE_FWD"):
            flash_mod.launch_config("fwd", False)
