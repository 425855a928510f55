"""The flash-decoding kernels (kernels/decode.py), run by Triton's CPU interpreter, against float64.

Tolerances (norm-wise relative error): fp32 inputs are multiplied and summed in fp32, so
errors land near 1e-7; 1e-5 leaves room and still catches a wrong bias, mask, bucket or
split merge (those give 1e-2 and up). bf16 inputs carry 8 mantissa bits: 1e-2.
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from t5core.kernels import decode as decode_mod  # noqa: E402
from t5core.kernels.decode import decode_attention, decode_bias_lut  # noqa: E402

from .interpreter import rel_err, require_interpreter  # noqa: E402
from .reference import reference_attention  # noqa: E402

require_interpreter(decode_mod._split_kernel, "test_decode_gpu.py")

FP32_TOL = 1e-5
BF16_TOL = 1e-2


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(decode_mod, "POISON_OUTPUTS", True)


def decode_reference(q, k, v, table, key_lengths, *, causal, q_per_kv=1, **bias):
    """Float64, row by row: query i of row b at position key_lengths[b // q_per_kv] - Lq + i."""
    rows = []
    for b in range(q.shape[0]):
        n = int(key_lengths[b // q_per_kv])
        kb, vb = k[b // q_per_kv : b // q_per_kv + 1, :, :n], v[b // q_per_kv : b // q_per_kv + 1, :, :n]
        rows.append(reference_attention(q[b : b + 1], kb, vb, table, causal=causal, q_offset=n - q.shape[2],
                                        **bias))
    return torch.cat(rows)


def run_and_compare(H, Lq, key_lengths, D, *, causal, with_bias, dtype=torch.float32, tol=FP32_TOL,
                    buffer_len=None, q_per_kv=1, num_splits=None, seed=0, max_distance=128, num_buckets=32):
    g = torch.Generator().manual_seed(seed)
    kv_rows = len(key_lengths)
    Lk = buffer_len or max(key_lengths)
    q64 = torch.randn(kv_rows * q_per_kv, H, Lq, D, generator=g, dtype=torch.float64)
    k64, v64 = (torch.randn(kv_rows, H, Lk, D, generator=g, dtype=torch.float64) for _ in range(2))
    table = torch.randn(num_buckets, H, generator=g, dtype=torch.float64) * 3 if with_bias else None
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    lengths = torch.tensor(key_lengths, dtype=torch.int32)
    bias = dict(bidirectional=False, num_buckets=num_buckets, max_distance=max_distance)
    ref = decode_reference(q.double(), k.double(), v.double(), table, lengths, causal=causal,
                           q_per_kv=q_per_kv, **bias)
    lut = decode_bias_lut(table.float(), **bias) if with_bias else None
    out = decode_attention(q, k, v, lengths, lut, causal=causal, max_distance=max_distance, q_per_kv=q_per_kv,
                           num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("Lq", [1, 2])
@pytest.mark.parametrize("key_lengths", [[1, 17], [100, 17], [130, 1], [257, 100]])
def test_self_attention_causal_with_bias_at_true_positions(Lq, key_lengths):
    # The growing self cache: queries are the last Lq keys; bias bucket(k - q) with q = cache length.
    run_and_compare(3, Lq, key_lengths, 32, causal=True, with_bias=True, buffer_len=260, seed=sum(key_lengths))


@pytest.mark.parametrize("Lq", [1, 2])
@pytest.mark.parametrize("key_lengths", [[257, 130, 17], [1, 100, 257]])
def test_cross_attention_no_bias_per_row_key_lengths(Lq, key_lengths):
    run_and_compare(4, Lq, key_lengths, 64, causal=False, with_bias=False, seed=Lq)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40])
def test_split_count_does_not_change_the_result(num_splits):
    # 40 splits of 16 keys over 257 keys with rows of 100 and 17: most splits see no key at all.
    run_and_compare(2, 1, [257, 100, 17], 32, causal=True, with_bias=True, num_splits=num_splits)


def test_small_max_distance_log_buckets():
    # max_distance 24, 16 buckets (the t5-v1_1 test config): saturation well inside the keys.
    run_and_compare(2, 1, [130, 57], 32, causal=True, with_bias=True, max_distance=24, num_buckets=16)


def test_beams_share_their_input_keys():
    # q_per_kv = 3: query rows 3b..3b+2 read K/V row b (beam search over one encoder output).
    run_and_compare(2, 1, [100, 17], 64, causal=False, with_bias=False, q_per_kv=3)


@pytest.mark.parametrize("causal,with_bias", [(True, True), (False, False)])
def test_bf16(causal, with_bias):
    run_and_compare(2, 1, [257, 100], 64, causal=causal, with_bias=with_bias, dtype=torch.bfloat16, tol=BF16_TOL)


def test_fp16_head_dim_128():
    run_and_compare(2, 2, [130, 17], 128, causal=True, with_bias=True, dtype=torch.float16, tol=BF16_TOL)


def test_strided_queries_and_keys():
    # The model hands q, k, v as [B, L, H, D] projections viewed as [B, H, L, D].
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 3, 32, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 100, 3, 32, generator=g).transpose(1, 2) for _ in range(2))
    lengths = torch.tensor([100, 40], dtype=torch.int32)
    ref = decode_reference(q.double(), k.double(), v.double(), None, lengths, causal=False)
    out = decode_attention(q, k, v, lengths)
    assert rel_err(out, ref) < FP32_TOL


def test_split_count_uses_the_key_length_and_the_machine():
    device = torch.device("cpu")
    assert decode_mod.choose_num_splits(1, 12, 1, 32768, device) > decode_mod.choose_num_splits(32, 12, 1, 512, device)
    assert decode_mod.choose_num_splits(1, 12, 1, 1, device) == 1
    assert decode_mod.choose_num_splits(1, 1, 1, 10**7, device) <= decode_mod.MAX_SPLITS


def test_bad_inputs_are_rejected():
    q = torch.randn(2, 2, 1, 32)
    k = torch.randn(2, 2, 10, 32)
    with pytest.raises(ValueError, match="key_lengths"):
        decode_attention(q, k, k, torch.tensor([10], dtype=torch.int32))
    with pytest.raises(ValueError, match="head dim"):
        decode_attention(q[..., :24], k[..., :24], k[..., :24], torch.tensor([10, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="bias_lut"):
        decode_attention(q, k, k, torch.tensor([10, 10], dtype=torch.int32), torch.zeros(2, 5), causal=True)
