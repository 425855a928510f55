"""Flash decoding and the fast generation path on a CUDA device, at real sizes.

Kernel tolerances (norm-wise relative, vs float64 on the same rounded inputs): fp32 1e-5
(fp32 products and sums), bf16/fp16 1e-2. Generation: fast and basic paths in float32 must
give the same tokens (greedy and beam search, padded batch), with the step replayed as a
CUDA graph.
"""
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference(q, k, v, table, key_lengths, causal, q_per_kv=1):
    from .reference import reference_attention

    rows = []
    for b in range(q.shape[0]):
        n = int(key_lengths[b // q_per_kv])
        kb, vb = k[b // q_per_kv : b // q_per_kv + 1, :, :n], v[b // q_per_kv : b // q_per_kv + 1, :, :n]
        rows.append(reference_attention(q[b : b + 1].cpu(), kb.cpu(), vb.cpu(),
                                        None if table is None else table.cpu(), bidirectional=False,
                                        causal=causal, q_offset=n - q.shape[2]))
    return torch.cat(rows).cuda()


def compare(H, Lq, key_lengths, D, dtype, *, causal, with_bias, q_per_kv=1, seed=0):
    from t5core.kernels.decode import decode_attention, decode_bias_lut

    g = torch.Generator(device="cuda").manual_seed(seed)
    Lk = max(key_lengths)
    q = torch.randn(len(key_lengths) * q_per_kv, H, Lq, D, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(len(key_lengths), H, Lk, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    table = torch.randn(32, H, generator=g, device="cuda") * 3 if with_bias else None
    lengths = torch.tensor(key_lengths, dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, lengths, decode_bias_lut(table) if with_bias else None, causal=causal,
                           q_per_kv=q_per_kv)
    ref = reference(q.double(), k.double(), v.double(), None if table is None else table.double(), lengths,
                    causal, q_per_kv)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key_lengths", [[512], [8192, 3000], [32768], [32768, 1, 20000]])
def test_cross_attention_long_keys(dtype, key_lengths):
    compare(12, 1, key_lengths, 64, dtype, causal=False, with_bias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_lengths", [[1], [129, 57], [1024, 600, 3]])
def test_self_attention_causal_bias(dtype, key_lengths):
    compare(12, 1, key_lengths, 64, dtype, causal=True, with_bias=True)


@pytest.mark.parametrize("D", [32, 128])
def test_head_dims(D):
    compare(8, 2, [4000, 77], D, torch.bfloat16, causal=True, with_bias=True)


def test_batch_32_with_shared_beam_keys():
    compare(12, 1, [512, 300, 17, 512, 1, 64, 400, 256], 64, torch.bfloat16, causal=False, with_bias=False,
            q_per_kv=4)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    from t5core.weights import load_checkpoint

    folder, _ = checkpoint_dir("t5-v1_1")
    return load_checkpoint(folder, device="cuda")


def test_generation_fast_equals_basic_greedy(model):
    from conftest import random_batch

    ids, mask = (t.cuda() for t in random_batch(model.config.vocab_size, [300, 40, 7, 1], seed=1))
    basic = model.generate(ids, mask, fast=False, max_new_tokens=24)
    fast = model.generate(ids, mask, max_new_tokens=24)  # the CUDA default: fast, graphs, triton
    assert fast.tolist() == basic.tolist()


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.6, True)])
def test_generation_fast_equals_basic_beam(model, length_penalty, early_stopping):
    from conftest import random_batch

    ids, mask = (t.cuda() for t in random_batch(model.config.vocab_size, [300, 40, 7], seed=2))
    options = dict(max_new_tokens=16, num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
    basic = model.generate(ids, mask, fast=False, **options)
    fast = model.generate(ids, mask, **options)
    assert fast.tolist() == basic.tolist()


def test_step_is_replayed_as_a_cuda_graph(model):
    from conftest import random_batch

    from t5core.generation import FastStep

    ids, mask = (t.cuda() for t in random_batch(model.config.vocab_size, [50, 9], seed=3))
    tokens = torch.tensor([[0], [0]], device="cuda")
    logits = {}
    with torch.inference_mode():
        hidden = model.encode(ids, mask)
        for use_graph in (False, True):
            cache = model.new_static_cache(hidden, mask.bool(), 8, kernel="triton")
            step = FastStep(model, cache, use_graph=use_graph, warn_on_fallback=True)
            logits[use_graph] = [step(tokens + i).clone() for i in range(5)]
            assert (step.graph is not None) == use_graph, step.fallback_reason
    for eager, replayed in zip(logits[False], logits[True]):
        assert rel_err(replayed, eager.double()) < 1e-6
