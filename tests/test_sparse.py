"""Sparse modes: the blocked implementations (t5core/sparse.py) against the same functions
written as dense attention with an [L, L] mask, and their selection on plain T5 checkpoints.

The dense references here are the specification of each mode (docs/sparse.md). They run in
float64, so the blocked code must agree to ~1e-12: any difference is a semantic one (a key
seen twice, a wrong distance, a missed mask), not rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import random_batch, relative_error
from torch.utils._python_dispatch import TorchDispatchMode

from t5core.config import AttentionMode, ConfigError, T5Config
from t5core.model import InputError
from t5core import sparse as sparse_module
from t5core.layers import RelativeBias, relative_position_bucket
from t5core.sparse import (
    InitialisedWeightsWarning,
    attend_sparse,
    global_aggregates,
    global_bias_from_local,
    make_layout,
)
from t5core.weights import load_checkpoint, save_checkpoint

TOLERANCE = 1e-12  # float64 on both sides


# ------------------------------------------------------------------ dense masked references
def _bias(table: torch.Tensor, rel: torch.Tensor, num_buckets=32, max_distance=128) -> torch.Tensor:
    """table at bucket(rel), bidirectional (encoder): rel [..., Lq, Lk] -> [..., H, Lq, Lk]."""
    return table[relative_position_bucket(rel, True, num_buckets, max_distance)].movedim(-1, -3)


def _dense(scores, allowed, values, valid):
    """softmax over allowed scores, times values; padded query rows are 0 (the sparse rule)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ values) * valid[:, None, :, None]


def dense_local(q, k, v, table, valid, radius):
    L = q.shape[2]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # k - q
    allowed = (rel.abs() <= radius)[None, None] & valid[:, None, None, :]
    return _dense(q @ k.transpose(-1, -2) + _bias(table, rel), allowed, v, valid)


def dense_block(q, k, v, table, valid, block_size, num_global):
    L = q.shape[2]
    qpos, kpos = torch.arange(L)[:, None], torch.arange(L)[None, :]
    rel = kpos - qpos
    pattern = (qpos // block_size == kpos // block_size) | (kpos < num_global) | (qpos < num_global)
    allowed = pattern[None, None] & valid[:, None, None, :]
    return _dense(q @ k.transpose(-1, -2) + _bias(table, rel), allowed, v, valid)


def dense_transient_global(q, k, v, side_k, side_v, table, global_table, lengths, radius, global_block_size):
    """Local keys plus G = L // global_block_size side keys; right-padded rows of `lengths`."""
    B, _, L, _ = q.shape
    G = L // global_block_size
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    block_id = torch.full((B, L), -1)
    for b, n in enumerate(lengths):  # token i -> block i // size; orphans join the last full block
        full_blocks = n // global_block_size
        for i in range(n):
            block_id[b, i] = min(i // global_block_size, full_blocks - 1)
    side_in_use = torch.arange(G)[None, :] < torch.tensor([n // global_block_size for n in lengths])[:, None]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    local_scores = q @ k.transpose(-1, -2) + _bias(table, rel)
    side_rel = torch.arange(G)[None, None, :] - block_id[:, :, None]  # g - block of the token
    side_scores = q @ side_k.transpose(-1, -2) + _bias(global_table, side_rel)
    allowed = torch.cat([((rel.abs() <= radius)[None] & valid[:, None, :]).expand(B, L, L),
                         side_in_use[:, None, :].expand(B, L, G)], dim=-1)[:, None]
    return _dense(torch.cat([local_scores, side_scores], -1), allowed, torch.cat([v, side_v], 2), valid)


# ------------------------------------------------------------------------ blocked vs dense
def _inputs(B, H, L, D, lengths, seed, grad=False):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=generator, dtype=torch.float64, requires_grad=grad) for _ in range(3))
    bias = RelativeBias(32, 128, H, bidirectional=True).double()
    with torch.no_grad():
        bias.weight.normal_(0, 2.0, generator=generator)
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return q, k, v, bias, valid


def _config(mode, **params):
    return T5Config(attention=AttentionMode(mode), **params)


def _grads(out, tensors, seed=0):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), tensors)


LOCAL_CASES = [  # (L, lengths, radius): radius 4 -> blocks of 5; lengths not multiples; a row of 1
    (37, [37, 21, 1], 4),
    (40, [40, 40], 4),  # a multiple of the block
    (9, [9, 6], 12),  # shorter than the window: one block
    (130, [130, 77], 15),
]


@pytest.mark.parametrize("L,lengths,radius", LOCAL_CASES)
def test_local_matches_dense_masked_reference_with_gradients(L, lengths, radius):
    q, k, v, bias, valid = _inputs(len(lengths), 3, L, 8, lengths, seed=L, grad=True)
    layout = make_layout(_config("local", local_radius=radius), valid, len(lengths), L, None)
    out = attend_sparse(q, k, v, layout=layout, bias=bias, key_mask=valid)
    expected = dense_local(q, k, v, bias.weight, valid, radius)
    assert relative_error(out.detach(), expected.detach()) <= TOLERANCE
    for got, want in zip(_grads(out, (q, k, v, bias.weight)), _grads(expected, (q, k, v, bias.weight))):
        assert relative_error(got, want) <= TOLERANCE


BLOCK_CASES = [  # (L, lengths, block_size, num_global)
    (37, [37, 21, 1], 8, 3),
    (37, [37, 30], 8, 10),  # leading tokens span two blocks: each key still counted once
    (37, [37, 12], 8, 0),  # no leading tokens: pure block-diagonal
    (20, [20, 5], 64, 4),  # one block covers everything: dense
    (64, [64, 2], 16, 16),  # padding inside the leading tokens
]


@pytest.mark.parametrize("L,lengths,block_size,num_global", BLOCK_CASES)
def test_block_matches_dense_masked_reference_with_gradients(L, lengths, block_size, num_global):
    q, k, v, bias, valid = _inputs(len(lengths), 2, L, 8, lengths, seed=L + num_global, grad=True)
    layout = make_layout(_config("block", block_size=block_size, num_global=num_global), valid, len(lengths), L, None)
    out = attend_sparse(q, k, v, layout=layout, bias=bias, key_mask=valid)
    expected = dense_block(q, k, v, bias.weight, valid, block_size, num_global)
    assert relative_error(out.detach(), expected.detach()) <= TOLERANCE
    for got, want in zip(_grads(out, (q, k, v, bias.weight)), _grads(expected, (q, k, v, bias.weight))):
        assert relative_error(got, want) <= TOLERANCE


TGLOBAL_CASES = [  # (L, lengths, radius, global_block_size)
    (37, [37, 22, 3], 4, 4),  # orphans (37 = 9*4 + 1, 22 = 5*4 + 2); a row with no full global block
    (48, [48, 16], 7, 4),  # multiples everywhere
    (23, [23, 23], 30, 5),  # one local block, side tokens still apply
]


@pytest.mark.parametrize("L,lengths,radius,global_block_size", TGLOBAL_CASES)
def test_transient_global_matches_dense_masked_reference_with_gradients(L, lengths, radius, global_block_size):
    B, H, D = len(lengths), 2, 8
    q, k, v, bias, valid = _inputs(B, H, L, D, lengths, seed=L, grad=True)
    G = L // global_block_size
    generator = torch.Generator().manual_seed(99)
    side_k, side_v = (torch.randn(B, H, G, D, generator=generator, dtype=torch.float64, requires_grad=True)
                      for _ in range(2))
    global_bias = RelativeBias(32, 128, H, bidirectional=True).double()
    with torch.no_grad():
        global_bias.weight.normal_(0, 2.0, generator=generator)
    config = _config("transient-global", local_radius=radius, global_block_size=global_block_size)
    layout = make_layout(config, valid, B, L, global_bias)
    out = attend_sparse(q, k, v, layout=layout, bias=bias, key_mask=valid, side_kv=(side_k, side_v))
    expected = dense_transient_global(q, k, v, side_k, side_v, bias.weight, global_bias.weight, lengths, radius,
                                      global_block_size)
    assert relative_error(out.detach(), expected.detach()) <= TOLERANCE
    inputs = (q, k, v, side_k, side_v, bias.weight, global_bias.weight)
    for got, want in zip(_grads(out, inputs), _grads(expected, inputs)):
        assert relative_error(got, want) <= TOLERANCE


def test_side_token_inputs_are_block_sums_with_orphans_in_the_last_full_block():
    hidden = torch.randn(2, 11, 5, dtype=torch.float64)
    valid = torch.arange(11)[None, :] < torch.tensor([11, 6])[:, None]
    layout = make_layout(_config("transient-global", global_block_size=4), valid, 2, 11,
                         RelativeBias(32, 128, 1, True).double())
    sums = global_aggregates(hidden, layout)  # G = 11 // 4 = 2
    assert torch.allclose(sums[0, 0], hidden[0, 0:4].sum(0))
    assert torch.allclose(sums[0, 1], hidden[0, 4:11].sum(0))  # 8, 9, 10 are orphans of block 1
    assert torch.allclose(sums[1, 0], hidden[1, 0:6].sum(0))  # 4, 5 orphans; padding excluded
    assert torch.equal(sums[1, 1], torch.zeros(5, dtype=torch.float64))
    assert layout.side_visible.tolist() == [[True, True], [True, False]]


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode,params,per_query", [
    ("local", dict(local_radius=15), 3 * 16),
    ("block", dict(block_size=32, num_global=8), 32 + 8),
])
def test_memory_is_linear_in_length(mode, params, per_query):
    """No tensor larger than B*H*L*(keys a query can see): never an [L, L] mask or score matrix."""
    B, H, L, D = 1, 2, 4096, 8
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    valid = torch.ones(B, L, dtype=torch.bool)
    layout = make_layout(_config(mode, **params), valid, B, L, None)
    bias = RelativeBias(32, 128, H, True)
    with _LargestTensor() as probe:
        attend_sparse(q, k, v, layout=layout, bias=bias, key_mask=valid)
    assert probe.largest <= B * H * L * per_query < L * L


# ---------------------------------------------------------------- selection on plain T5
def _encode(model, ids, mask):
    with torch.no_grad():
        return model.encode(ids, mask)


@pytest.mark.parametrize("attention,wide,narrow", [
    ("local", dict(local_radius=64), dict(local_radius=3)),
    ("block", dict(block_size=64, num_global=0), dict(block_size=8, num_global=2)),
])
def test_sparse_mode_is_selectable_on_a_plain_t5_checkpoint(checkpoint_dir, attention, wide, narrow):
    """A window/block covering the whole input is dense attention; a small one is not."""
    folder, reference = checkpoint_dir("t5-v1_1")
    ids, mask = random_batch(reference.config.vocab_size, [40, 23, 7], seed=1)
    valid = mask.bool()
    dense = _encode(load_checkpoint(folder), ids, mask)
    model = load_checkpoint(folder, attention=attention, **wide)
    assert model.config.attention is AttentionMode(attention) and model.encoder.mode is AttentionMode(attention)
    assert model.decoder.mode is AttentionMode.FLASH  # linear-memory dense decoder under a sparse encoder
    assert relative_error(_encode(model, ids, mask)[valid], dense[valid]) <= 1e-6
    sparse = _encode(load_checkpoint(folder, attention=attention, **narrow), ids, mask)
    assert relative_error(sparse[valid], dense[valid]) > 1e-3
    assert model.generate(ids, mask, max_new_tokens=3).shape == (3, 4)


PARAMS = dict(local_radius=3, block_size=8, num_global=2)  # narrow: each mode differs from dense


@pytest.mark.parametrize("mode", ["local", "block", "flash", "basic"])
def test_the_encoder_mode_can_be_chosen_per_call(checkpoint_dir, mode):
    """encode / forward / generate(attention=mode) on a model loaded in another mode give what a
    model loaded in `mode` gives (with the model's sparse parameters), and leave its own mode."""
    folder, reference = checkpoint_dir("t5-v1_1")
    ids, mask = random_batch(reference.config.vocab_size, [40, 23, 7], seed=3)
    decoder_ids, _ = random_batch(reference.config.vocab_size, [6, 6, 6], seed=4)
    valid = mask.bool()
    own_mode = "flash" if mode == "basic" else "basic"
    model = load_checkpoint(folder, attention=own_mode, **PARAMS)
    loaded = load_checkpoint(folder, attention=mode, **PARAMS)
    with torch.no_grad():
        per_call = model.encode(ids, mask, attention=mode)
        expected = loaded.encode(ids, mask)
        own = model.encode(ids, mask)
        logits = model(ids, mask, decoder_input_ids=decoder_ids, attention=mode).logits
        expected_logits = loaded(ids, mask, decoder_input_ids=decoder_ids).logits
    assert relative_error(per_call[valid], expected[valid]) <= 1e-6
    if mode in ("local", "block"):  # the call ran the sparse mode, not the model's dense one
        assert relative_error(own[valid], expected[valid]) > 1e-3
    assert relative_error(logits, expected_logits) <= 1e-5  # the decoders' dense modes may differ
    assert (model.generate(ids, mask, max_new_tokens=4, attention=mode).tolist()
            == loaded.generate(ids, mask, max_new_tokens=4).tolist())
    assert model.config.attention is AttentionMode(own_mode) and model.encoder.mode is AttentionMode(own_mode)
    encoder = load_checkpoint(folder, attention=own_mode, encoder_only=True, **PARAMS)
    with torch.no_grad():
        assert relative_error(encoder(ids, mask, attention=mode)[valid], expected[valid]) <= 1e-6


def test_a_per_call_mode_is_checked(checkpoint_dir):
    folder, reference = checkpoint_dir("t5-v1_1")
    ids, mask = random_batch(reference.config.vocab_size, [9, 5], seed=5)
    model = load_checkpoint(folder)  # basic on the CPU: takes any mask
    with pytest.raises(InputError, match="not a mode; choose one of 'basic', 'flash', 'local'"):
        model.encode(ids, mask, attention="sliding")
    with pytest.raises(InputError, match="load it with attention='transient-global'"):
        model.encode(ids, mask, attention="transient-global")
    left_padded = mask.flip(-1)
    model.encode(ids, left_padded)  # its own mode reads any mask
    with pytest.raises(InputError, match="not right-padded.*attention='local'"):
        model.encode(ids, left_padded, attention="local")
    with pytest.warns(InitialisedWeightsWarning):
        tglobal = load_checkpoint(folder, attention="transient-global", local_radius=3, global_block_size=4)
    local = load_checkpoint(folder, attention="local", local_radius=3)
    with torch.no_grad():  # a transient-global model runs `local` without its side tokens
        assert torch.equal(tglobal.encode(ids, mask, attention="local"), local.encode(ids, mask))


def test_transient_global_on_a_plain_t5_checkpoint_warns_once_and_runs(checkpoint_dir, tmp_path):
    folder, reference = checkpoint_dir("t5-v1_1")
    with pytest.warns(InitialisedWeightsWarning) as record:
        model = load_checkpoint(folder, attention="transient-global", local_radius=7, global_block_size=4)
    assert sum(issubclass(w.category, InitialisedWeightsWarning) for w in record) == 1
    for block in model.encoder.blocks:  # each global norm starts as its layer's attention norm
        assert torch.equal(block.global_norm.weight, block.self_attn_norm.weight)
    ids, mask = random_batch(reference.config.vocab_size, [40, 23, 7], seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning when running
        hidden = _encode(model, ids, mask)
        tokens = model.generate(ids, mask, max_new_tokens=3)
    assert torch.isfinite(hidden).all() and tokens.shape == (3, 4)
    with pytest.raises(ValueError, match="only LongT5 checkpoints store them"):
        save_checkpoint(model, tmp_path)


def test_global_bias_starts_as_the_local_table_at_block_distance_times_block_size():
    local = torch.randn(32, 4)
    table = global_bias_from_local(local, 32, 128, 16)
    for d in (0, 1, -1, 2, -3, 7, -7):  # the smallest distance of each of these buckets
        block_bucket = relative_position_bucket(torch.tensor(d), True, 32, 128)
        token_bucket = relative_position_bucket(torch.tensor(d * 16), True, 32, 128)
        assert torch.equal(table[block_bucket], local[token_bucket])


@pytest.mark.parametrize("field,value", [
    ("local_radius", 0), ("global_block_size", 0), ("block_size", -1), ("num_global", -1), ("block_size", 2.5),
])
def test_bad_sparse_parameters_are_rejected_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        T5Config.from_dict({"model_type": "t5"}, attention="local", **{field: value})


def test_transient_global_is_rejected_for_per_layer_bias_tables():
    with pytest.raises(ConfigError, match="umt5"):
        T5Config.from_dict({"model_type": "umt5"}, attention="transient-global")


def test_longt5_config_defaults_to_its_encoder_attention_and_rejects_unknown_types():
    config = T5Config.from_dict({"model_type": "longt5", "encoder_attention_type": "transient-global",
                                 "local_radius": 63, "global_block_size": 8})
    assert config.attention is AttentionMode.TRANSIENT_GLOBAL and config.decoder_attention is AttentionMode.FLASH
    assert (config.local_radius, config.global_block_size) == (63, 8)
    assert T5Config.from_dict({"model_type": "longt5"}).attention is AttentionMode.LOCAL  # the reference's default
    assert T5Config.from_dict({"model_type": "t5"}).attention is AttentionMode.BASIC
    with pytest.raises(ConfigError, match="encoder_attention_type 'global'"):
        T5Config.from_dict({"model_type": "longt5", "encoder_attention_type": "global"})


# ------------------------------------------------------------- chunked (linear-memory) torch path
@pytest.mark.parametrize("L,lengths,radius,global_block_size", TGLOBAL_CASES)
def test_chunked_transient_global_equals_dense_reference_with_gradients(L, lengths, radius, global_block_size,
                                                                        monkeypatch):
    """SCORE_BUDGET so small that every query block is its own chunk (recomputed in the backward)."""
    monkeypatch.setattr(sparse_module, "SCORE_BUDGET", 1)
    test_transient_global_matches_dense_masked_reference_with_gradients(L, lengths, radius, global_block_size)


def test_chunked_local_equals_dense_reference_with_gradients(monkeypatch):
    monkeypatch.setattr(sparse_module, "SCORE_BUDGET", 2000)  # a few blocks per chunk
    B, H, L, D, lengths = 2, 2, 61, 8, [61, 30]
    q, k, v, bias, valid = _inputs(B, H, L, D, lengths, seed=3, grad=True)
    layout = make_layout(_config("local", local_radius=4), valid, B, L, None)
    out = attend_sparse(q, k, v, layout=layout, bias=bias, key_mask=valid)
    expected = dense_local(q, k, v, bias.weight, valid, 4)
    assert relative_error(out.detach(), expected.detach()) <= TOLERANCE
    inputs = (q, k, v, bias.weight)
    for got, want in zip(_grads(out, inputs), _grads(expected, inputs)):
        assert relative_error(got, want) <= TOLERANCE


def test_transient_global_memory_is_bounded_by_the_chunk_budget(monkeypatch):
    """No [L, G] (or [L, L]) tensor: the side scores of one chunk at a time, plus linear tensors."""
    budget = 1 << 16
    monkeypatch.setattr(sparse_module, "SCORE_BUDGET", budget)
    B, H, L, D = 1, 2, 4096, 8
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    side_k, side_v = (torch.randn(B, H, L // 16, D) for _ in range(2))
    valid = torch.ones(B, L, dtype=torch.bool)
    layout = make_layout(_config("transient-global", local_radius=15), valid, B, L, RelativeBias(32, 128, H, True))
    with _LargestTensor() as probe:
        attend_sparse(q, k, v, layout=layout, bias=RelativeBias(32, 128, H, True), key_mask=valid,
                      side_kv=(side_k, side_v))
    linear = B * H * L * 3 * D  # the key/value windows
    assert probe.largest <= max(2 * budget, linear) < B * H * L * (L // 16)
