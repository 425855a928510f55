"""The `t5core` command: generate, encode, info, convert and demo.

    t5core generate flan-t5-base "translate English to German: How old are you?"
    t5core encode flan-t5-base "a sentence to embed" --save hidden.safetensors
    t5core info flan-t5-base
    t5core demo            # flan-t5-base when the hub is reachable, else a local random model (says so)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


class ProgressBar:
    """A one-line progress indication on stderr for long work (generation steps)."""

    def __init__(self, label: str) -> None:
        self.label, self.start = label, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a name (flan-t5-base, t5-small, ...), a hub repo id, or a checkpoint folder")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="parameter dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", choices=["basic", "flash", "local", "block", "transient-global"], default=None,
                        help="basic: torch reference; flash: relative-bias kernel (CUDA) / chunked (CPU); "
                             "local, block, transient-global: sparse encoder (docs/sparse.md). "
                             "Default: the checkpoint's own (LongT5: its encoder_attention_type; else basic)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5core", description="T5-family models in plain PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from one or more prompts",
                                   description="Generate text with greedy search, beam search or sampling.")
    _model_arguments(generate)
    generate.add_argument("text", nargs="+", help="input text(s); several are run as one padded batch")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--num-beams", type=int, default=1)
    generate.add_argument("--length-penalty", type=float, default=1.0)
    generate.add_argument("--early-stopping", action="store_true")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)

    encode = commands.add_parser("encode", help="run the encoder and print (or save) the hidden states",
                                 description="Encode text; prints the shape and the mean-pooled vector.")
    _model_arguments(encode)
    encode.add_argument("text", nargs="+")
    encode.add_argument("--save", type=Path, help="write hidden states and masks to this .safetensors file")

    info = commands.add_parser("info", help="describe a checkpoint without loading its weights",
                               description="Print the config, parameter count and files of a checkpoint.")
    info.add_argument("model", help="a name, hub repo id, or checkpoint folder")

    convert = commands.add_parser("convert", help="load a checkpoint and write it back (e.g. .bin -> safetensors, dtype)",
                                  description="Load with t5core's converter and save config.json + safetensors.")
    _model_arguments(convert)
    convert.add_argument("output", type=Path)
    convert.add_argument("--max-shard-mb", type=int, default=None)

    commands.add_parser("demo", help="the README's main command: generate with flan-t5-base (offline: a local model)",
                        description="Generate with flan-t5-base. Without hub access, builds a small random-weight "
                                    "model locally and runs the same pipeline (its output is meaningless).")
    return parser


def _load(args):
    from .hub import load

    return load(args.model, dtype=DTYPES[args.dtype], device=args.device, attention=args.attention)


def cmd_generate(args) -> int:
    model, tokenizer = _load(args)
    batch = tokenizer(args.text)
    progress = ProgressBar("generating")
    ids = model.generate(
        batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device),
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, length_penalty=args.length_penalty,
        early_stopping=args.early_stopping, do_sample=args.sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, progress=progress,
    )
    progress.close()
    for text in tokenizer.batch_decode(ids.tolist()):
        print(text)
    return 0


def cmd_encode(args) -> int:
    from .hub import load

    model, tokenizer = load(args.model, dtype=DTYPES[args.dtype], device=args.device, attention=args.attention,
                            encoder_only=True)
    batch = {k: v.to(args.device) for k, v in tokenizer(args.text).items()}
    with torch.inference_mode():
        hidden = model(batch["input_ids"], batch["attention_mask"])  # [B, L, d_model]
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens: [B, d_model]
    print(f"hidden states: {list(hidden.shape)} ({hidden.dtype})")
    for text, vector in zip(args.text, pooled.float().tolist()):
        print(f"{text[:40]!r}: mean-pooled [{', '.join(f'{x:.4f}' for x in vector[:6])}, ...]")
    if args.save:
        from safetensors.torch import save_file

        save_file({"hidden": hidden.float().cpu().contiguous(), "attention_mask": batch["attention_mask"].cpu()},
                  str(args.save))
        print(f"saved to {args.save}")
    return 0


def cmd_info(args) -> int:
    from t5core.weights.load import CheckpointReader, checkpoint_files

    from .config import T5Config
    from .hub import resolve

    folder = resolve(args.model)
    config = T5Config.from_file(folder)
    reader = CheckpointReader(checkpoint_files(folder))
    params = sum(int(torch.Size(shape).numel()) for shape in reader.shapes.values())
    summary = {
        "folder": str(folder),
        "model_type": config.model_type,
        "parameters (stored)": f"{params / 1e6:.1f}M",
        "layers (encoder/decoder)": f"{config.num_layers}/{config.num_decoder_layers}",
        "d_model / d_ff / heads x d_kv": f"{config.d_model} / {config.d_ff} / {config.num_heads} x {config.d_kv}",
        "feed_forward_proj": config.feed_forward_proj,
        "vocab_size": config.vocab_size,
        "relative buckets / max distance": f"{config.num_buckets} / {config.max_distance}",
        "bias tables": "per layer" if config.per_layer_bias else "shared per stack",
        "scaled tied head": config.scale_decoder_outputs,
        "weight files": [f.name for f in reader.files],
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_convert(args) -> int:
    from t5core.weights import save_checkpoint

    model, _ = _load(args)
    shard = None if args.max_shard_mb is None else args.max_shard_mb * 2**20
    save_checkpoint(model, args.output, max_shard_bytes=shard)
    folder = Path(args.model)
    if folder.is_dir():  # carry the tokenizer files along
        import shutil

        for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (folder / name).is_file():
                shutil.copy(folder / name, args.output / name)
    print(f"wrote {args.output}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .hub import HubError
    from .model import InputError
    from .tokenizer import TokenizerError
    from t5core.weights import CheckpointError

    handlers = {"generate": cmd_generate, "encode": cmd_encode, "info": cmd_info, "convert": cmd_convert,
                "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except (HubError, ConfigError, CheckpointError, InputError, TokenizerError) as error:
        print(f"t5core: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
