"""Shared builders: T5-family checkpoints in the original format, made locally with transformers.

No hub access here, so every test checkpoint is built from random weights with a fixed
seed and written with transformers' `save_pretrained`; t5core must load it and match
transformers' eager float32 output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels can only run in the interpreter, which is chosen when a kernel is
# decorated: set it here, before any test module imports triton (tests/kernels/interpreter.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(os.environ.get("T5CORE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Small configs covering every family feature the parity tests need.
CONFIGS: dict[str, dict] = {
    # T5 v1.0: relu FFN, tie_word_embeddings absent -> tied head with d_model**-0.5 scaling.
    "t5-v1_0": dict(model_type="t5", vocab_size=160, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    feed_forward_proj="relu"),
    # T5 v1.1 / Flan: gated-gelu, untied head, no scaling; small max_distance so log buckets are exercised.
    "t5-v1_1": dict(model_type="t5", vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    relative_attention_num_buckets=16, relative_attention_max_distance=24),
    "mt5": dict(model_type="mt5", vocab_size=300, d_model=48, d_kv=16, d_ff=80, num_layers=2, num_heads=3,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # UMT5: a bias table in every self-attention layer.
    "umt5": dict(model_type="umt5", vocab_size=200, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 relative_attention_num_buckets=16, relative_attention_max_distance=32),
    # ByT5-like: byte vocabulary, encoder deeper than the decoder.
    "byt5": dict(model_type="t5", vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=3,
                 num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # inner_dim (heads * d_kv = 48) != d_model (64), like flan-t5-small; gated-silu.
    "inner-dim": dict(model_type="t5", vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=3,
                      feed_forward_proj="gated-silu", tie_word_embeddings=False),
}

# LongT5 (local and transient-global encoders), kept apart from CONFIGS: those run in every dense
# mode in test_parity. Radius 7 (blocks of 8) and global blocks of 4 so short inputs span several
# blocks; 16 buckets / max distance 24 so local and side distances reach the log buckets.
LONGT5_CONFIGS: dict[str, dict] = {
    "longt5-local": dict(model_type="longt5", vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_layers=3,
                         num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         encoder_attention_type="local", local_radius=7,
                         relative_attention_num_buckets=16, relative_attention_max_distance=24),
    "longt5-tglobal": dict(model_type="longt5", vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_layers=3,
                           num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                           encoder_attention_type="transient-global", local_radius=7, global_block_size=4,
                           relative_attention_num_buckets=16, relative_attention_max_distance=24),
    # Tied head with output scaling (tie_word_embeddings absent), relu FFN.
    "longt5-tglobal-tied": dict(model_type="longt5", vocab_size=160, d_model=48, d_kv=16, d_ff=64, num_layers=2,
                                num_heads=3, feed_forward_proj="relu", encoder_attention_type="transient-global",
                                local_radius=5, global_block_size=3),
}

HF_CLASSES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
              "umt5": "UMT5ForConditionalGeneration", "longt5": "LongT5ForConditionalGeneration"}


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="transformers (the test oracle) is not installed")


def build_reference(name: str, seed: int = 0):
    """A transformers model of config `name` with random weights (norms and biases too), float32, eval."""
    transformers = transformers_or_skip()
    spec = dict({**CONFIGS, **LONGT5_CONFIGS}[name])
    model_type = spec.pop("model_type")
    config_class = {"t5": transformers.T5Config, "mt5": transformers.MT5Config, "umt5": transformers.UMT5Config,
                    "longt5": transformers.LongT5Config}[model_type]
    config = config_class(**spec, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[model_type])(config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for pname, param in model.named_parameters():
            if "layer_norm" in pname:  # ones would hide a missing or misplaced norm (global_input_layer_norm too)
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif "relative_attention_bias" in pname:  # and LongT5's global_relative_attention_bias
                param.copy_(torch.randn(param.shape, generator=generator))
        if spec.get("tie_word_embeddings") is False:  # v5 ties at construction; give the head its own weights
            model.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn(model.lm_head.weight.shape, generator=generator))
    model.set_attn_implementation("eager")  # v5 defaults to sdpa; the oracle is the eager path
    return model.float().eval()


def save_reference(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """Factory: name -> (folder with a saved checkpoint, the transformers model)."""
    made: dict[str, tuple[Path, object]] = {}

    def make(name: str):
        if name not in made:
            model = build_reference(name)
            folder = tmp_path_factory.mktemp(name)
            save_reference(model, folder)
            made[name] = (folder, model)
        return made[name]

    return make


def random_batch(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids [B, max(lengths)] (no pad/eos inside) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab_size, (len(lengths), width), generator=generator)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask.long()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
