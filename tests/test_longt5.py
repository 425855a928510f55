"""LongT5 checkpoints: t5core against transformers' LongT5ForConditionalGeneration (eager, float32).

Checkpoints are built locally from random weights (norms and bias tables randomised too; see
conftest.LONGT5_CONFIGS): radius 7 (blocks of 8) and global blocks of 4, so the test lengths
span several blocks, end in partial blocks (orphan tokens), and one row (3 tokens) is shorter
than a global block (no side token at all).

Tolerance: norm-wise relative error <= 1e-5 (float32; the same math in a different order).
Generations must match token for token.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LONGT5_CONFIGS, random_batch, relative_error

from t5core.config import AttentionMode
from t5core.sparse import InitialisedWeightsWarning
from t5core.weights import CheckpointError, load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers (the test oracle) is not installed")

LENGTHS = [45, 29, 3]  # 45, 29: not multiples of 8 or 4; 3 < global_block_size


def _forward_both(model, reference, lengths=LENGTHS, with_mask=True):
    ids, mask = random_batch(reference.config.vocab_size, lengths, seed=1)
    decoder_ids, _ = random_batch(reference.config.vocab_size, [9] * len(lengths), seed=2)
    mask_arg = mask if with_mask else None
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask_arg, decoder_input_ids=decoder_ids)
        actual = model(ids, mask_arg, decoder_input_ids=decoder_ids)
    return mask.bool(), expected, actual


@pytest.mark.parametrize("name", list(LONGT5_CONFIGS))
def test_encoder_output_and_logits_match_reference(checkpoint_dir, name):
    folder, reference = checkpoint_dir(name)
    model = load_checkpoint(folder)
    assert model.config.attention.value == LONGT5_CONFIGS[name]["encoder_attention_type"]  # the checkpoint's own mode
    valid, expected, actual = _forward_both(model, reference)
    # Padded positions are not defined (LongT5 averages uniformly there, t5core outputs 0).
    assert relative_error(actual.encoder_hidden[valid], expected.encoder_last_hidden_state[valid]) <= 1e-5
    assert relative_error(actual.logits, expected.logits) <= 1e-5


@pytest.mark.parametrize("name", ["longt5-local", "longt5-tglobal"])
def test_unpadded_batch_without_mask_matches_reference(checkpoint_dir, name):
    folder, reference = checkpoint_dir(name)
    _, expected, actual = _forward_both(load_checkpoint(folder), reference, lengths=[37, 37], with_mask=False)
    assert relative_error(actual.encoder_hidden, expected.encoder_last_hidden_state) <= 1e-5
    assert relative_error(actual.logits, expected.logits) <= 1e-5


def test_input_shorter_than_a_global_block_matches_reference(checkpoint_dir):
    # A padded length of 3 < global_block_size 4: no side token at all (G = 0).
    folder, reference = checkpoint_dir("longt5-tglobal")
    valid, expected, actual = _forward_both(load_checkpoint(folder), reference, lengths=[3, 2])
    assert relative_error(actual.encoder_hidden[valid], expected.encoder_last_hidden_state[valid]) <= 1e-5
    assert relative_error(actual.logits, expected.logits) <= 1e-5


@pytest.mark.parametrize("name", list(LONGT5_CONFIGS))
def test_greedy_generation_matches_reference(checkpoint_dir, name):
    folder, reference = checkpoint_dir(name)
    model = load_checkpoint(folder)
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=3)
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    actual = model.generate(ids, mask, max_new_tokens=12)
    assert actual.tolist() == expected.tolist()


def test_encoder_only_model_matches_reference_encoder(checkpoint_dir):
    folder, reference = checkpoint_dir("longt5-tglobal")
    encoder = load_checkpoint(folder, encoder_only=True)
    hf_encoder = transformers.LongT5EncoderModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=8)
    with torch.no_grad():
        expected = hf_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = encoder(ids, mask)
    assert relative_error(actual[mask.bool()], expected[mask.bool()]) <= 1e-5


def test_training_gradients_match_reference(checkpoint_dir):
    """Loss, and the gradients of q and of both tables, through the blocked local + side attention."""
    folder, reference = checkpoint_dir("longt5-tglobal")
    model = load_checkpoint(folder).train()
    reference.train()  # dropout_rate is 0 in the test configs
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=9)
    labels, label_mask = random_batch(reference.config.vocab_size, [7, 5, 3], seed=10)
    labels = labels.masked_fill(~label_mask.bool(), -100)
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    actual = model(ids, mask, labels=labels).loss
    expected.backward()
    actual.backward()
    reference.eval()
    ref = dict(reference.named_parameters())
    prefix = "encoder.block.0.layer.0.TransientGlobalSelfAttention."
    try:
        assert relative_error(actual.detach(), expected.detach()) <= 1e-5
        # 1e-4: gradients sum many float32 products in a different order.
        assert relative_error(model.encoder.blocks[0].self_attn.q.weight.grad, ref[prefix + "q.weight"].grad) <= 1e-4
        assert relative_error(model.encoder.relative_bias.weight.grad,
                              ref[prefix + "relative_attention_bias.weight"].grad) <= 1e-4
        assert relative_error(model.encoder.global_bias.weight.grad,
                              ref[prefix + "global_relative_attention_bias.weight"].grad) <= 1e-4
        assert relative_error(model.encoder.blocks[1].global_norm.weight.grad,
                              ref["encoder.block.1.layer.0.TransientGlobalSelfAttention.global_input_layer_norm.weight"]
                              .grad) <= 1e-4
    finally:
        reference.zero_grad()


@pytest.mark.parametrize("name", ["longt5-local", "longt5-tglobal", "longt5-tglobal-tied"])
def test_saved_checkpoint_round_trips_and_reference_loads_it(tmp_path, checkpoint_dir, name):
    folder, reference = checkpoint_dir(name)
    model = load_checkpoint(folder)
    save_checkpoint(model, tmp_path / "saved")
    again = load_checkpoint(tmp_path / "saved")
    assert again.config.attention is model.config.attention
    assert (again.config.local_radius, again.config.global_block_size) == (
        model.config.local_radius, model.config.global_block_size)
    assert list(again.state_dict()) == list(model.state_dict())
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p1, p2), n1
    assert again.head_is_tied == model.head_is_tied
    reloaded = transformers.LongT5ForConditionalGeneration.from_pretrained(tmp_path / "saved",
                                                                           attn_implementation="eager").eval()
    _, expected, actual = _forward_both(model, reloaded)
    assert relative_error(actual.logits, expected.logits) <= 1e-5
    _, original, _ = _forward_both(model, reference)
    assert relative_error(expected.logits, original.logits) <= 1e-6


def test_local_checkpoint_runs_transient_global_with_initialised_weights(checkpoint_dir, tmp_path):
    """LongT5-local has no global weights: they are initialised (one warning) and the model
    saves as a LongT5-TGlobal checkpoint the reference can load."""
    folder, reference = checkpoint_dir("longt5-local")
    with pytest.warns(InitialisedWeightsWarning) as record:
        model = load_checkpoint(folder, attention="transient-global", global_block_size=4)
    assert len([w for w in record if issubclass(w.category, InitialisedWeightsWarning)]) == 1
    save_checkpoint(model, tmp_path)
    reloaded = transformers.LongT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.encoder_attention_type == "transient-global"
    valid, expected, actual = _forward_both(model, reloaded)
    assert relative_error(actual.logits, expected.logits) <= 1e-5


def test_dense_or_block_encoder_on_a_longt5_checkpoint_keeps_a_dense_decoder(checkpoint_dir):
    folder, reference = checkpoint_dir("longt5-local")
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=4)
    for attention in ("basic", "block"):
        model = load_checkpoint(folder, attention=attention, block_size=16, num_global=2)
        assert model.config.attention is AttentionMode(attention)
        assert model.decoder.mode is (AttentionMode.FLASH if attention == "block" else AttentionMode.BASIC)
        assert model.generate(ids, mask, max_new_tokens=4).shape[0] == 3


def test_transient_global_checkpoint_with_another_mode_names_the_fix(checkpoint_dir):
    folder, _ = checkpoint_dir("longt5-tglobal")
    with pytest.raises(CheckpointError, match="attention='transient-global'"):
        load_checkpoint(folder, attention="local")
