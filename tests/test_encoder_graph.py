"""The encoder's CUDA-graph path on the CPU: its padding is exact in every mode, its shapes are
bounded, and it is never taken off CUDA or with gradients (replays: test_model_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, relative_error

from t5core.encoder_graph import MAX_GRAPHS, EncoderGraphs, _Graph, padded_length
from t5core.weights import load_checkpoint


def test_padded_length_is_a_bounded_round_up():
    previous = 0
    for length in range(1, 70000, 7):
        padded = padded_length(length)
        assert padded >= length and padded % 64 == 0 and padded >= previous
        assert padded - length < max(64, length / 8)  # at most 1/8 padding beyond 512 tokens
        previous = padded
    assert [padded_length(n) for n in (1, 64, 65, 512, 513, 4096, 4097, 5000)] == [64, 64, 128, 512, 576, 4096,
                                                                                  4608, 5120]
    assert len({padded_length(n) for n in range(4097, 8193)}) == 8  # 8 graph lengths per octave


@pytest.mark.filterwarnings("ignore:the checkpoint has no transient-global weights")
@pytest.mark.parametrize("mode,params", [
    ("basic", {}),
    ("flash", {}),
    ("local", dict(local_radius=5)),
    ("block", dict(block_size=8, num_global=2)),
    ("transient-global", dict(local_radius=5, global_block_size=4)),
])
def test_padding_to_the_graph_length_changes_no_real_token(checkpoint_dir, mode, params):
    """The graph path's first call runs the encoder on inputs right-padded to padded_length
    (40 -> 64 tokens): at the real tokens that is the unpadded forward, in every mode
    (transient-global: 16 side tokens instead of 10, the extra ones summarising padding)."""
    folder, reference = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder, attention=mode, **params)
    ids, mask = random_batch(reference.config.vocab_size, [40, 23, 7], seed=11)
    valid = mask.bool()
    graphs = EncoderGraphs()

    def run(ids, mask):
        return model.encoder(model.embed(ids), mask)

    with torch.no_grad():
        expected = model.encode(ids, mask)
        padded = graphs.encode(run, ids, mask.bool(), ("any",), ())
        unmasked = graphs.encode(run, ids, None, ("other",), ())  # no mask: every token real
        expected_unmasked = model.encode(ids)
    assert padded.shape == expected.shape and unmasked.shape == expected.shape
    assert relative_error(padded[valid], expected[valid]) <= 1e-6
    assert relative_error(unmasked, expected_unmasked) <= 1e-6
    assert not graphs.graphs and len(graphs.seen) == 2  # first sightings: eager, nothing captured


def test_graphs_are_not_used_off_cuda_or_with_gradients(checkpoint_dir):
    folder, reference = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder)
    ids, mask = random_batch(reference.config.vocab_size, [9, 5], seed=12)
    with torch.no_grad():
        assert not model.encoder_graphs.usable(ids, model.eval(), None)
        assert not model.encoder_graphs.usable(ids, model, True)  # CPU tensors: never
        model.encode(ids, mask, cuda_graph=True)
    assert not model.encoder_graphs.seen  # the CPU call ran eagerly, unpadded


def test_graphs_are_dropped_least_recently_used_once_their_last_replay_is_done():
    """The LRU bound, and each dropped graph's last replay waited for (its pool is reused at once)."""

    class Done:  # stands for the CUDA event recorded after a replay's output copy
        waited = False

        def synchronize(self) -> None:
            self.waited = True

    graphs = EncoderGraphs()
    events = [Done() for _ in range(MAX_GRAPHS + 2)]
    for i, event in enumerate(events):
        graphs.graphs[i] = _Graph(None, None, None, None, (), [event])
        graphs._drop_graphs(keep=MAX_GRAPHS)
    assert list(graphs.graphs) == list(range(2, MAX_GRAPHS + 2))
    assert [event.waited for event in events] == [True, True] + [False] * MAX_GRAPHS
    graphs.graphs[MAX_GRAPHS + 2] = _Graph(None, None, None, None, (), [None])  # never replayed
    graphs.clear()
    assert not graphs.graphs and not graphs.seen and all(event.waited for event in events)
