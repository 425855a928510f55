"""Half precision: bf16 and fp16 stay close to fp32; fp16 never overflows to inf/NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, relative_error

from t5core.weights import load_checkpoint


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_close_to_float32(checkpoint_dir, dtype):
    folder, _ = checkpoint_dir("t5-v1_1")
    full = load_checkpoint(folder)
    half = load_checkpoint(folder, dtype=dtype)
    ids, mask = random_batch(160, [30, 11], seed=1)
    decoder_ids, _ = random_batch(160, [6, 6], seed=2)
    with torch.no_grad():
        expected = full(ids, mask, decoder_input_ids=decoder_ids).logits
        actual = half(ids, mask, decoder_input_ids=decoder_ids).logits
    assert relative_error(actual.float(), expected) < 3e-2  # bf16 has 8 mantissa bits; fp16 10


def test_fp16_keeps_wo_in_fp32_like_the_reference(checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder, dtype=torch.float16)
    assert model.encoder.blocks[0].ffn.wo.weight.dtype == torch.float32
    assert model.encoder.blocks[0].ffn.wi_0.weight.dtype == torch.float16


def test_fp16_residual_stream_is_clamped_not_infinite(checkpoint_dir):
    """An attention output beyond fp16's range (inf before the residual turns fp32 at the fp32 `wo`):
    the reference's clamp keeps the stream finite; without it the final norm gives NaN."""
    folder, _ = checkpoint_dir("t5-v1_0")
    model = load_checkpoint(folder, dtype=torch.float16)
    with torch.no_grad():
        model.encoder.blocks[0].self_attn.o.weight.mul_(1e5)
    ids, mask = random_batch(160, [20, 9], seed=3)
    with torch.no_grad():
        hidden = model.encode(ids, mask)
    assert torch.isfinite(hidden).all()
