"""Whole-model checks on the GPU: `flash` against `basic` at real lengths (run with `pytest -m gpu`)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_batch, relative_error

from t5core.weights import load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"),
]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", ["t5-v1_1", "umt5", "inner-dim"])
def test_flash_model_matches_basic(checkpoint_dir, name, dtype, tolerance):
    folder, reference = checkpoint_dir(name)
    basic = load_checkpoint(folder, dtype=dtype, device="cuda", attention="basic")
    flash = load_checkpoint(folder, dtype=dtype, device="cuda", attention="flash")
    ids, mask = random_batch(reference.config.vocab_size, [3000, 1025, 77], seed=1)
    decoder_ids, _ = random_batch(reference.config.vocab_size, [130] * 3, seed=2)
    ids, mask, decoder_ids = ids.cuda(), mask.cuda(), decoder_ids.cuda()
    with torch.no_grad():
        expected = basic(ids, mask, decoder_input_ids=decoder_ids)
        actual = flash(ids, mask, decoder_input_ids=decoder_ids)
    valid = mask.bool()
    assert relative_error(actual.encoder_hidden[valid].float(), expected.encoder_hidden[valid].float()) < tolerance
    assert relative_error(actual.logits.float(), expected.logits.float()) < tolerance


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_flash_training_gradients_match_basic(checkpoint_dir, dtype, tolerance):
    folder, reference = checkpoint_dir("t5-v1_1")
    ids, mask = random_batch(reference.config.vocab_size, [700, 300], seed=3)
    labels, _ = random_batch(reference.config.vocab_size, [90, 90], seed=4)
    grads = []
    for attention in ("basic", "flash"):
        model = load_checkpoint(folder, dtype=dtype, device="cuda", attention=attention).train()
        loss = model(ids.cuda(), mask.cuda(), labels=labels.cuda()).loss
        loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    for name in ("encoder.relative_bias.weight", "decoder.relative_bias.weight", "encoder.blocks.0.self_attn.q.weight",
                 "decoder.blocks.1.cross_attn.k.weight"):
        assert relative_error(grads[1][name], grads[0][name]) < tolerance, name


def test_flash_generation_matches_basic_in_float32(checkpoint_dir):
    folder, reference = checkpoint_dir("t5-v1_1")
    ids, mask = random_batch(reference.config.vocab_size, [900, 400, 33], seed=5)
    outputs = []
    for attention in ("basic", "flash"):
        model = load_checkpoint(folder, device="cuda", attention=attention)
        outputs.append(model.generate(ids.cuda(), mask.cuda(), max_new_tokens=20).tolist())
        outputs.append(model.generate(ids.cuda(), mask.cuda(), max_new_tokens=12, num_beams=3).tolist())
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]


def test_flash_runs_131072_tokens_flan_t5_base_shape():
    """The issue's long-input target: a flan-t5-base-shaped model over 131,072 tokens, batch 1."""
    from t5core import T5, T5Config
    from t5core.model import cast_model

    config = T5Config.from_dict(dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                                     feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                                attention="flash")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cast_model(T5(config), torch.bfloat16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 32100, (1, 131072), device="cuda")
    with torch.no_grad():
        logits = model(ids, decoder_input_ids=ids[:, :128]).logits
    assert logits.shape == (1, 128, 32128) and torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["local", "block"])
def test_a_sparse_mode_chosen_per_call_runs_its_kernels(checkpoint_dir, mode):
    """A flash model asked for a sparse mode per call gives what a model loaded in it gives
    (bf16: the sparse kernels both times), and its own mode's output otherwise."""
    folder, reference = checkpoint_dir("t5-v1_1")
    params = dict(local_radius=31, block_size=64, num_global=4)
    model = load_checkpoint(folder, dtype=torch.bfloat16, device="cuda", attention="flash", **params)
    loaded = load_checkpoint(folder, dtype=torch.bfloat16, device="cuda", attention=mode, **params)
    ids, mask = random_batch(reference.config.vocab_size, [1500, 700, 33], seed=8)
    ids, mask = ids.cuda(), mask.cuda()
    valid = mask.bool()
    with torch.no_grad():
        per_call = model.encode(ids, mask, attention=mode)
        expected = loaded.encode(ids, mask)
        own = model.encode(ids, mask)
    assert torch.equal(per_call[valid], expected[valid])
    assert relative_error(own[valid].float(), expected[valid].float()) > 1e-2
    assert (model.generate(ids, mask, max_new_tokens=8, attention=mode).tolist()
            == loaded.generate(ids, mask, max_new_tokens=8).tolist())


@pytest.mark.filterwarnings("ignore:the checkpoint has no transient-global weights")
@pytest.mark.parametrize("mode,params", [
    ("flash", {}),
    ("local", dict(local_radius=31)),
    ("block", dict(block_size=64, num_global=4)),
    ("transient-global", dict(local_radius=31, global_block_size=8)),
])
def test_encoder_graph_replays_equal_eager_encodes(checkpoint_dir, mode, params):
    """float32: the first call of a shape runs eagerly (padded), the second captures, the
    third replays with other inputs of the same padded length; each equals the eager,
    unpadded encode. A model whose storage moved recaptures; training never uses a graph."""
    folder, reference = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder, device="cuda", attention=mode, **params)
    graphs = model.encoder_graphs
    vocab = reference.config.vocab_size
    batches = [random_batch(vocab, lengths, seed=20 + i) for i, lengths in
               enumerate([[700, 333, 45], [690, 700, 1], [700, 512, 300], [650, 2, 700]])]
    with torch.no_grad():
        for i, (ids, mask) in enumerate(batches):  # 700 and 690 tokens: one graph of 704
            ids, mask = ids.cuda(), mask.cuda()
            if i == 3:
                model.cpu().cuda()  # new storage: the graph must not replay the old addresses
            actual = model.encode(ids, mask)
            expected = model.encode(ids, mask, cuda_graph=False)
            valid = mask.bool()
            assert relative_error(actual[valid], expected[valid]) <= 1e-5, i
            assert actual.shape == expected.shape
        assert len(graphs.graphs) == 1 and graphs.replays == 3 and graphs.disabled is None
        tokens = model.generate(ids, mask, max_new_tokens=6)
        assert tokens.tolist() == model.generate(ids, mask, max_new_tokens=6, cuda_graphs=False).tolist()
    model.train()
    model(ids, mask, labels=ids[:, :4]).loss.backward()  # training: eager, no new shape seen
    assert graphs.replays == 3 + 1 and len(graphs.seen) == 1  # + the first generate's encode


def test_encoder_graph_replays_from_two_threads_on_two_streams(checkpoint_dir):
    """Two threads, each on its own stream, replay one graph with different inputs: every
    result equals the eager encode of its own input (no replay overwrites another's buffers)."""
    folder, reference = checkpoint_dir("t5-v1_1")
    model = load_checkpoint(folder, device="cuda")  # flash
    inputs = [tuple(t.cuda() for t in random_batch(reference.config.vocab_size, [300, 290 - 7 * i], seed=30 + i))
              for i in range(6)]  # all padded to 320 tokens: one graph
    with torch.no_grad():
        expected = [model.encode(ids, mask, cuda_graph=False) for ids, mask in inputs]
        for _ in range(2):  # first sighting, then the capture
            model.encode(*inputs[0])
    torch.cuda.synchronize()
    results = []

    def work(first: int) -> None:
        stream = torch.cuda.Stream()
        with torch.no_grad(), torch.cuda.stream(stream):
            for r in range(24):
                i = (first + r) % len(inputs)
                results.append((i, model.encode(*inputs[i])))
        stream.synchronize()

    threads = [threading.Thread(target=work, args=(first,)) for first in (0, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 48 and model.encoder_graphs.replays >= 48
    for i, out in results:
        valid = inputs[i][1].bool()
        assert relative_error(out[valid], expected[i][valid]) <= 1e-5, i


@pytest.mark.parametrize("name", ["longt5-local", "longt5-tglobal"])
def test_longt5_on_the_gpu_matches_the_reference(checkpoint_dir, name):
    """LongT5 checkpoints on CUDA run the sparse kernels (local; transient-global's local + side
    kernels) in float32: encoder output and logits against transformers' eager float32 on the
    CPU, and for transient-global the training loss and the gradients of q and both tables."""
    folder, reference = checkpoint_dir(name)
    model = load_checkpoint(folder, device="cuda")  # float32, the checkpoint's own mode
    ids, mask = random_batch(reference.config.vocab_size, [700, 333, 45], seed=5)
    decoder_ids, _ = random_batch(reference.config.vocab_size, [20] * 3, seed=6)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        actual = model(ids.cuda(), mask.cuda(), decoder_input_ids=decoder_ids.cuda())
    valid = mask.bool()
    assert relative_error(actual.encoder_hidden.cpu()[valid], expected.encoder_last_hidden_state[valid]) <= 1e-5
    assert relative_error(actual.logits.cpu(), expected.logits) <= 1e-5
    if name != "longt5-tglobal":
        return
    labels, label_mask = random_batch(reference.config.vocab_size, [7, 5, 3], seed=7)
    labels = labels.masked_fill(~label_mask.bool(), -100)
    model.train()
    reference.train()  # dropout_rate is 0 in the test configs
    try:
        expected_loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        actual_loss = model(ids.cuda(), mask.cuda(), labels=labels.cuda()).loss
        expected_loss.backward()
        actual_loss.backward()
        ref = dict(reference.named_parameters())
        prefix = "encoder.block.0.layer.0.TransientGlobalSelfAttention."
        assert relative_error(actual_loss.detach().cpu(), expected_loss.detach()) <= 1e-5
        pairs = [(model.encoder.blocks[0].self_attn.q.weight, prefix + "q.weight"),
                 (model.encoder.relative_bias.weight, prefix + "relative_attention_bias.weight"),
                 (model.encoder.global_bias.weight, prefix + "global_relative_attention_bias.weight")]
        for ours, theirs in pairs:
            assert relative_error(ours.grad.cpu(), ref[theirs].grad) <= 1e-4, theirs
    finally:
        reference.eval()
        reference.zero_grad()
