"""`t5core demo`: the README's main command.

With hub access: downloads flan-t5-base (only the needed files) and generates answers to a
few prompts. Without hub access (an offline machine, CI): says so, builds a small
randomly initialised flan-t5-shaped checkpoint on disk in the original format (with the
real T5 vocabulary when `../shared/data` has it, else the ByT5 byte vocabulary), and runs
the very same path on it: load by folder -> tokenize -> encode -> generate. The text it
prints is then meaningless; what it shows is that the whole pipeline runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "translate English to German: How old are you?",
    "Answer the question: what is the capital of France?",
    "summarize: t5core runs the T5 family of encoder-decoder models in plain PyTorch, with its own checkpoint "
    "converter, tokenizer and generation, and Triton kernels for relative-bias attention.",
]

# flan-t5-small's shape (8 layers, 6 heads of 64, inner_dim 384 != d_model 512), fewer layers to stay quick.
OFFLINE_CONFIG = dict(
    model_type="t5", d_model=512, d_kv=64, d_ff=1024, num_layers=2, num_decoder_layers=2, num_heads=6,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)


def _shared_vocabulary() -> Path | None:
    candidates = [os.environ.get("T5CORE_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                  Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "t5-spiece.model").is_file():
            return Path(candidate) / "t5-spiece.model"
    return None


def build_offline_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint in the original format (config.json + safetensors + tokenizer)."""
    from .config import T5Config
    from .model import T5
    from t5core.weights import save_checkpoint
    import json

    spiece = _shared_vocabulary()
    vocab_size = 32128 if spiece else 384
    config = T5Config.from_dict(dict(OFFLINE_CONFIG, vocab_size=vocab_size))
    torch.manual_seed(seed)
    model = T5(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5)
    save_checkpoint(model, folder)
    if spiece:
        shutil.copy(spiece, folder / "spiece.model")
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    return folder


def run_demo() -> int:
    from .hub import HubError, load

    start = time.perf_counter()
    try:
        model, tokenizer = load("flan-t5-base")
        source = "flan-t5-base (google/flan-t5-base)"
    except HubError as error:
        print(f"[t5core demo] the hub is not reachable ({str(error).splitlines()[0][:120]}...)", file=sys.stderr)
        folder = Path(os.environ.get("T5CORE_DEMO_DIR", Path.home() / ".cache" / "t5core" / "offline-demo"))
        if folder.exists():
            shutil.rmtree(folder)
        build_offline_checkpoint(folder)
        model, tokenizer = load(folder)
        vocab = "the real T5 vocabulary" if (folder / "spiece.model").is_file() else "the ByT5 byte vocabulary"
        source = f"a RANDOMLY INITIALISED flan-t5-shaped model built at {folder} with {vocab} (its output is noise)"
    print(f"[t5core demo] model: {source}; loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    batch = tokenizer(PROMPTS)
    start = time.perf_counter()
    ids = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=24)
    elapsed = time.perf_counter() - start
    for prompt, answer in zip(PROMPTS, tokenizer.batch_decode(ids.tolist())):
        print(f"> {prompt}\n{answer}\n")
    print(f"[t5core demo] generated {ids.shape[0]} x {ids.shape[1] - 1} tokens in {elapsed:.2f}s", file=sys.stderr)
    return 0
