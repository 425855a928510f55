"""The attention entry point: every mode against a float64 reference written out in full."""

from __future__ import annotations

import math

import pytest
import torch

from t5core import attention as attention_module
from t5core.attention import attend
from t5core.config import AttentionMode
from t5core.layers import RelativeBias


def reference_attention(q, k, v, table, bidirectional, num_buckets, max_distance, key_lengths, causal, q_offset):
    """Float64, one score at a time in vectorised form, with the bucket formula spelled out."""
    q, k, v = q.double(), k.double(), v.double()
    Lq, Lk = q.shape[2], k.shape[2]
    qpos = torch.arange(Lq)[:, None] + q_offset
    kpos = torch.arange(Lk)[None, :]
    scores = q @ k.transpose(-1, -2)
    if table is not None:
        rel = kpos - qpos
        nb = num_buckets // 2 if bidirectional else num_buckets
        if bidirectional:
            bucket = (rel > 0).long() * nb
            n = rel.abs()
        else:
            bucket = torch.zeros_like(rel)
            n = (-rel).clamp_min(0)
        exact = nb // 2
        large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (nb - exact)).long()
        bucket = bucket + torch.where(n < exact, n, large.clamp_max(nb - 1))
        scores = scores + table.double()[bucket].permute(2, 0, 1)[None]
    hidden = torch.zeros(q.shape[0], 1, Lq, Lk, dtype=torch.bool)
    if key_lengths is not None:
        hidden |= (kpos >= key_lengths[:, None, None, None])
    if causal:
        hidden |= (kpos > qpos)[None, None]
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, -1) @ v


CASES = [
    # (Lq, Lk, causal, q_offset, bidirectional, with_bias)
    (300, 300, False, 0, True, True),  # encoder, more than one CPU query block
    (257, 257, True, 0, False, True),  # decoder training
    (3, 40, True, 37, False, True),  # incremental decoding: query positions start at the cache length
    (17, 530, False, 0, True, False),  # cross-attention: Lq != Lk, no bias
]


@pytest.mark.parametrize("mode", [m for m in AttentionMode if not m.is_sparse])  # sparse: tests/test_sparse.py
@pytest.mark.parametrize("Lq,Lk,causal,q_offset,bidirectional,with_bias", CASES)
def test_attend_matches_float64_reference(mode, Lq, Lk, causal, q_offset, bidirectional, with_bias, monkeypatch):
    monkeypatch.setattr(attention_module, "CPU_QUERY_BLOCK", 128)  # several blocks even for short inputs
    torch.manual_seed(0)
    B, H, D = 2, 3, 16
    q, k, v = (torch.randn(B, H, L, D) for L in (Lq, Lk, Lk))
    bias = RelativeBias(32, 128, H, bidirectional) if with_bias else None
    if bias is not None:
        torch.nn.init.normal_(bias.weight, std=2.0)
    key_lengths = None if causal else torch.tensor([Lk, max(1, Lk // 3)])
    key_mask = None if key_lengths is None else torch.arange(Lk)[None, :] < key_lengths[:, None]
    out = attend(q, k, v, mode=mode, bias=bias, key_mask=key_mask, causal=causal, q_offset=q_offset)
    expected = reference_attention(q, k, v, None if bias is None else bias.weight.detach(), bidirectional, 32, 128,
                                   key_lengths, causal, q_offset)
    error = (out.double() - expected).norm() / expected.norm()
    assert error < 1e-6


def test_chunked_path_gradients_match_basic(monkeypatch):
    """The CPU flash path recomputes blocks in the backward; gradients must equal the basic path's."""
    monkeypatch.setattr(attention_module, "CPU_QUERY_BLOCK", 32)
    torch.manual_seed(1)
    B, H, L, D = 2, 2, 100, 8
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = RelativeBias(32, 128, H, bidirectional=False).double()
    torch.nn.init.normal_(bias.weight)
    grads = []
    for mode in (AttentionMode.BASIC, AttentionMode.FLASH):
        out = attend(q, k, v, mode=mode, bias=bias, causal=True)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v, bias.weight)))
    for basic, flash in zip(*grads):
        assert torch.allclose(basic, flash, rtol=1e-10, atol=1e-12)


def test_relative_bucket_matches_reference_implementation():
    transformers = pytest.importorskip("transformers", reason="transformers (oracle) not installed")
    from t5core.layers import relative_position_bucket

    rel = torch.arange(-5000, 5001)
    for num_buckets, max_distance in [(32, 128), (32, 256), (64, 128), (16, 24)]:
        for bidirectional in (True, False):
            expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
            )
            assert torch.equal(relative_position_bucket(rel, bidirectional, num_buckets, max_distance), expected)


def test_key_lengths_are_computed_once_per_mask_and_again_after_a_change():
    from t5core.attention import key_lengths_from_mask

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    first = key_lengths_from_mask(mask)
    assert key_lengths_from_mask(mask) is first  # every layer of a forward gets the same lengths
    mask[0, 2] = True  # an in-place change bumps the version: recomputed
    changed = key_lengths_from_mask(mask)
    assert changed is not first and changed.tolist() == [3, 3]
    assert key_lengths_from_mask(mask.clone()).tolist() == [3, 3]
    with torch.inference_mode():  # lengths made in inference mode are kept apart
        assert key_lengths_from_mask(mask) is not changed
    assert key_lengths_from_mask(mask.clone()) is not changed
