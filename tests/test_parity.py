"""t5core against transformers' eager float32 T5 on locally built checkpoints.

Tolerance: norm-wise relative error <= 1e-5 (float32; both sides do the same math in a
possibly different order). Generations must match token for token.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, build_reference, random_batch, relative_error

from t5core.weights import load_checkpoint

LENGTHS = [40, 23, 7]  # batch > 1 with right padding; the longest exceeds small max_distances


def run_both(folder, reference, attention="basic"):
    model = load_checkpoint(folder, attention=attention)
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=1)
    decoder_ids, _ = random_batch(reference.config.vocab_size, [11] * len(LENGTHS), seed=2)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        actual = model(ids, mask, decoder_input_ids=decoder_ids)
    return model, ids, mask, expected, actual


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attention", ["basic", "flash"])
def test_encoder_output_and_logits_match_reference(checkpoint_dir, name, attention):
    folder, reference = checkpoint_dir(name)
    _, _, mask, expected, actual = run_both(folder, reference, attention)
    valid = mask.bool()  # padded positions are not defined by either implementation
    assert relative_error(actual.encoder_hidden[valid], expected.encoder_last_hidden_state[valid]) <= 1e-5
    assert relative_error(actual.logits, expected.logits) <= 1e-5


def _through_eos(row: list[int], eos: int = 1) -> list[int]:
    """A generated row up to and including its first EOS (the reference's beam search fills
    finished rows with EOS where greedy fills with pad; t5core pads with pad in both)."""
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_reference(checkpoint_dir, name):
    folder, reference = checkpoint_dir(name)
    model = load_checkpoint(folder)
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=3)
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    actual = model.generate(ids, mask, max_new_tokens=12)
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "umt5", "byt5"])
@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.6, True), (2.0, "never")])
def test_beam_search_matches_reference(checkpoint_dir, name, length_penalty, early_stopping):
    folder, reference = checkpoint_dir(name)
    model = load_checkpoint(folder)
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=4)
    options = dict(max_new_tokens=10, num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    expected = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, **options)
    actual = model.generate(ids, mask, **options)
    assert [_through_eos(r) for r in actual.tolist()] == [_through_eos(r) for r in expected.tolist()]


def test_generation_with_eos_stops_each_row(tmp_path):
    """A model biased towards EOS: rows finish at different steps and are padded afterwards."""
    reference = build_reference("t5-v1_1", seed=11)
    with torch.no_grad():  # make EOS likely but not certain
        reference.lm_head.weight[1] *= 4.0
    reference.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    ids, mask = random_batch(reference.config.vocab_size, [30, 12, 5, 19], seed=5)
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    actual = model.generate(ids, mask, max_new_tokens=15)
    assert actual.tolist() == expected.tolist()
    finished_at = [row.index(1) for row in actual.tolist() if 1 in row]
    assert len(set(finished_at)) > 1, "the test needs rows that stop at different steps"


def test_sharded_checkpoint_loads_and_matches(tmp_path, checkpoint_dir):
    _, reference = checkpoint_dir("t5-v1_1")
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, _, _, expected, actual = run_both(tmp_path, reference)
    assert relative_error(actual.logits, expected.logits) <= 1e-5


def test_checkpoint_without_shared_weight_uses_encoder_embedding(tmp_path, checkpoint_dir):
    """Like google/madlad400-3b-mt: encoder/decoder.embed_tokens + lm_head, no `shared.weight`."""
    from safetensors.torch import load_file, save_file

    folder, reference = checkpoint_dir("t5-v1_1")
    state = load_file(str(folder / "model.safetensors"))
    embedding = state.pop("shared.weight")
    state["encoder.embed_tokens.weight"] = embedding.clone()
    state["decoder.embed_tokens.weight"] = embedding.clone()
    assert "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], embedding)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, _, _, expected, actual = run_both(tmp_path, reference)
    assert relative_error(actual.logits, expected.logits) <= 1e-5


def test_pytorch_bin_is_used_only_without_safetensors(tmp_path, checkpoint_dir):
    from safetensors.torch import load_file

    folder, reference = checkpoint_dir("t5-v1_0")
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, _, _, expected, actual = run_both(tmp_path, reference)
    assert relative_error(actual.logits, expected.logits) <= 1e-5


@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "umt5"])
def test_saved_checkpoint_round_trips_and_reference_loads_it(tmp_path, checkpoint_dir, name):
    import transformers

    from t5core.weights import save_checkpoint

    folder, reference = checkpoint_dir(name)
    model = load_checkpoint(folder)
    save_checkpoint(model, tmp_path / "saved")
    again = load_checkpoint(tmp_path / "saved")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert again.head_is_tied == model.head_is_tied
    reloaded = getattr(transformers, type(reference).__name__).from_pretrained(tmp_path / "saved",
                                                                               attn_implementation="eager")
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=6)
    decoder_ids, _ = random_batch(reference.config.vocab_size, [5] * 3, seed=7)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        actual = reloaded.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert relative_error(actual, expected) <= 1e-6


def test_encoder_only_model_matches_reference_encoder(checkpoint_dir):
    import transformers

    folder, reference = checkpoint_dir("t5-v1_1")
    encoder = load_checkpoint(folder, encoder_only=True)
    hf_encoder = transformers.T5EncoderModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=8)
    with torch.no_grad():
        expected = hf_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = encoder(ids, mask)
    assert relative_error(actual[mask.bool()], expected[mask.bool()]) <= 1e-5


def test_training_loss_and_gradients_match_reference(checkpoint_dir):
    """Teacher-forced loss with -100 labels, and the gradient of every parameter."""
    folder, reference = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder).train()
    reference.train()  # dropout_rate is 0 in the test configs: train mode is deterministic
    ids, mask = random_batch(reference.config.vocab_size, LENGTHS, seed=9)
    labels, label_mask = random_batch(reference.config.vocab_size, [9, 6, 4], seed=10)
    labels = labels.masked_fill(~label_mask.bool(), -100)
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    actual = model(ids, mask, labels=labels).loss
    expected.backward()
    actual.backward()
    reference.eval()
    assert relative_error(actual.detach(), expected.detach()) <= 1e-5
    ref_grads = dict(reference.named_parameters())
    assert relative_error(model.encoder.blocks[0].self_attn.q.weight.grad,
                          ref_grads["encoder.block.0.layer.0.SelfAttention.q.weight"].grad) <= 1e-4
    assert relative_error(model.decoder.relative_bias.weight.grad,
                          ref_grads["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].grad) <= 1e-4
    reference.zero_grad()
