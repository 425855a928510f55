"""Generation options beyond reference parity: sampling, filtering, option errors, the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch

from t5core.generation import GenerationError, filter_logits
from t5core.weights import load_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    folder, _ = checkpoint_dir("t5-v1_1")
    return load_checkpoint(folder)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    ids, mask = random_batch(160, [12, 7], seed=1)
    a = model.generate(ids, mask, do_sample=True, seed=123, max_new_tokens=12)
    b = model.generate(ids, mask, do_sample=True, seed=123, max_new_tokens=12)
    c = model.generate(ids, mask, do_sample=True, seed=124, max_new_tokens=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_sampling_is_greedy(model):
    ids, mask = random_batch(160, [12, 7], seed=2)
    greedy = model.generate(ids, mask, max_new_tokens=10)
    sampled = model.generate(ids, mask, do_sample=True, top_k=1, temperature=0.7, seed=5, max_new_tokens=10)
    assert torch.equal(greedy, sampled)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.1)) == [True, False, False, False]


def test_cached_decoding_equals_full_decoding(model):
    """Incremental decoding through the static cache gives the same logits as one full pass."""
    ids, mask = random_batch(160, [20, 9], seed=3)
    decoder_ids, _ = random_batch(160, [8, 8], seed=4)
    with torch.no_grad():
        hidden = model.encode(ids, mask)
        full = model.decode(decoder_ids, hidden, mask)
        cache = model.new_cache(hidden, mask, max_length=8)
        steps = [model.decode(decoder_ids[:, :3], cache=cache)]  # a prefix of 3, then one at a time
        steps += [model.decode(decoder_ids[:, i : i + 1], cache=cache) for i in range(3, 8)]
    assert torch.allclose(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model.decode(decoder_ids[:, :1], cache=cache)


@pytest.mark.parametrize("options,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=2, do_sample=True), "beam sampling"),
])
def test_invalid_options_are_rejected(model, options, match):
    ids, mask = random_batch(160, [5], seed=5)
    with pytest.raises(GenerationError, match=match):
        model.generate(ids, mask, **options)


def test_progress_is_reported(model):
    ids, mask = random_batch(160, [5], seed=6)
    seen = []
    model.generate(ids, mask, max_new_tokens=4, eos_token_id=-1, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
