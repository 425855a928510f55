"""The fast decode path (shape-static cache, flash decoding, CUDA graphs) against the basic path.

Both paths compute the same function in float32, so generations must match token for token
(greedy, beam search, sampling with a seed), on padded batches and with rows that finish
early. On this CPU the fast path runs its torch attention, and the Triton flash-decoding
kernel through Triton's interpreter (TRITON_INTERPRET=1, set by tests/kernels when run in
the same session, or by the caller); the CUDA-graph fallback is exercised here too.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from conftest import build_reference, random_batch, relative_error

from t5core import generation
from t5core.weights import load_checkpoint

LENGTHS = [40, 23, 7, 1]  # right-padded batch, including a one-token input


@pytest.fixture(scope="module", params=["t5-v1_1", "umt5"])
def model(request, checkpoint_dir):
    folder, _ = checkpoint_dir(request.param)
    return load_checkpoint(folder)


def both(model, ids, mask, **options):
    basic = model.generate(ids, mask, fast=False, **options)
    fast = model.generate(ids, mask, fast=True, **options)
    return basic, fast


def test_static_step_logits_equal_basic_step_logits(model):
    """One step at a time: decode_step over the static cache vs decode over the growing cache."""
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=1)
    decoder_ids, _ = random_batch(model.config.vocab_size, [9] * len(LENGTHS), seed=2)
    with torch.no_grad():
        hidden = model.encode(ids, mask)
        cache = model.new_cache(hidden, mask.bool(), max_length=9)
        static = model.new_static_cache(hidden, mask.bool(), max_length=9)
        for i in range(9):
            expected = model.decode(decoder_ids[:, i : i + 1], cache=cache)[:, -1]
            actual = model.decode_step(decoder_ids[:, i : i + 1], static)
            assert relative_error(actual, expected) <= 1e-6, f"step {i}"
    assert int(static.position) == 9 and static.lengths.tolist() == [9] * len(LENGTHS)


def test_greedy_fast_equals_basic(model):
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=3)
    basic, fast = both(model, ids, mask, max_new_tokens=14)
    assert fast.tolist() == basic.tolist()


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.6, True), (2.0, "never")])
def test_beam_search_fast_equals_basic(model, length_penalty, early_stopping):
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=4)
    basic, fast = both(model, ids, mask, max_new_tokens=10, num_beams=3, length_penalty=length_penalty,
                       early_stopping=early_stopping)
    assert fast.tolist() == basic.tolist()


def test_sampling_fast_equals_basic(model):
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=5)
    basic, fast = both(model, ids, mask, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, seed=7)
    assert fast.tolist() == basic.tolist()


def test_rows_finishing_early_fast_equals_basic(tmp_path):
    reference = build_reference("t5-v1_1", seed=11)
    with torch.no_grad():  # make EOS likely but not certain: rows stop at different steps
        reference.lm_head.weight[1] *= 4.0
    reference.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    ids, mask = random_batch(reference.config.vocab_size, [30, 12, 5, 19], seed=5)
    basic, fast = both(model, ids, mask, max_new_tokens=15)
    assert fast.tolist() == basic.tolist()
    finished_at = [row.index(1) for row in fast.tolist() if 1 in row]
    assert len(set(finished_at)) > 1, "the test needs rows that stop at different steps"


def test_checking_for_finished_rows_less_often_gives_the_same_output(model, monkeypatch):
    """On CUDA the fast loop checks 'all finished' every 8 tokens and trims afterwards."""
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=3)
    expected = model.generate(ids, mask, fast=False, max_new_tokens=14, eos_token_id=5)
    original = generation.FastStep.__init__

    def sparse_checks(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.sync_every = 8

    monkeypatch.setattr(generation.FastStep, "__init__", sparse_checks)
    assert model.generate(ids, mask, fast=True, max_new_tokens=14, eos_token_id=5).tolist() == expected.tolist()


def test_left_padded_mask_still_matches_on_the_fast_path(model):
    """The Triton kernel takes key lengths (right padding); other masks use the torch attention."""
    ids, mask = random_batch(model.config.vocab_size, [12, 7], seed=8)
    left = torch.flip(mask, dims=[1])
    ids = torch.flip(ids, dims=[1])
    basic, fast = both(model, ids, left, max_new_tokens=8)
    assert fast.tolist() == basic.tolist()


def test_cuda_graph_request_falls_back_to_eager_with_a_warning(model):
    """cuda_graphs=True where capture is impossible (here: no CUDA) warns and decodes eagerly."""
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=9)
    expected = model.generate(ids, mask, fast=False, max_new_tokens=6)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        actual = model.generate(ids, mask, fast=True, cuda_graphs=True, max_new_tokens=6)
    assert actual.tolist() == expected.tolist()


def test_capture_error_falls_back_to_eager(model, monkeypatch):
    """Any exception during capture leaves the cache untouched and the step eager."""
    def failing_capture(step, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generation, "_capture_graph", failing_capture)
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=10)
    expected = model.generate(ids, mask, fast=False, max_new_tokens=6, num_beams=2)
    with pytest.warns(UserWarning, match="stream is capturing"):
        actual = model.generate(ids, mask, fast=True, cuda_graphs=True, max_new_tokens=6, num_beams=2)
    assert actual.tolist() == expected.tolist()


def test_no_cuda_graph_attempt_by_default_on_cpu(model):
    ids, mask = random_batch(model.config.vocab_size, [5], seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, mask, fast=True, max_new_tokens=3)


def _interpreted_kernels() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    pytest.importorskip("triton", reason="triton is not installed")
    from t5core.kernels import decode

    return type(decode._split_kernel).__name__.startswith("Interpreted")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernel runs on CPU only under TRITON_INTERPRET=1 (set before triton loads)")
@pytest.mark.parametrize("num_beams", [1, 3])
def test_flash_decoding_kernel_generation_equals_basic(model, num_beams):
    """The Triton flash-decoding kernel (interpreted) inside generation: same tokens as basic."""
    if not _interpreted_kernels():
        pytest.skip("triton kernels were compiled before TRITON_INTERPRET=1 was set")
    ids, mask = random_batch(model.config.vocab_size, LENGTHS, seed=12)
    basic = model.generate(ids, mask, fast=False, max_new_tokens=6, num_beams=num_beams)
    fast = model.generate(ids, mask, fast=True, decode_kernel="triton", max_new_tokens=6, num_beams=num_beams)
    assert fast.tolist() == basic.tolist()
