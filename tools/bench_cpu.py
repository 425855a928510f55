#!/usr/bin/env python
"""CPU speed: t5core `basic` against transformers eager T5, same weights, same inputs, one run.

t5-small shape (d_model 512, d_ff 2048, 6+6 layers, 8 heads, relu, vocab 32128), random
weights, float32, batch 4 x 512 input tokens:
  - forward: encoder + decoder over 32 teacher-forced decoder tokens (logits);
  - generate: 32-token greedy generation (EOS disabled on both sides, so both make 32 tokens).
Times are medians of --repeats runs after a warm-up. Writes JSON to bench/results/ and
prints a table last. transformers is imported here only as the peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from t5core.weights import load_checkpoint

    config = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                                   feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(0)
    reference = transformers.T5ForConditionalGeneration(config).eval()
    reference.set_attn_implementation("eager")
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = load_checkpoint(folder, attention="basic")

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32100, (args.batch, args.length), generator=generator)
    mask = torch.ones_like(ids)
    decoder_ids = torch.randint(3, 32100, (args.batch, args.new_tokens), generator=generator)
    no_eos = dict(eos_token_id=-1)

    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        actual = ours(ids, mask, decoder_input_ids=decoder_ids).logits
        max_rel = float((actual - expected).abs().max() / expected.abs().max())
        results = {
            "forward": {
                "transformers_eager_s": median_seconds(
                    lambda: reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids), args.repeats),
                "t5core_basic_s": median_seconds(lambda: ours(ids, mask, decoder_input_ids=decoder_ids), args.repeats),
            },
            "generate": {
                "transformers_eager_s": median_seconds(
                    lambda: reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                               min_new_tokens=args.new_tokens, do_sample=False), args.repeats),
                "t5core_basic_s": median_seconds(
                    lambda: ours.generate(ids, mask, max_new_tokens=args.new_tokens, **no_eos), args.repeats),
            },
        }
    for row in results.values():
        row["speedup"] = row["transformers_eager_s"] / row["t5core_basic_s"]
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "shape": dict(model="t5-small shape", batch=args.batch, input_tokens=args.length,
                      decoder_tokens=args.new_tokens, dtype="float32"),
        "logits_max_relative_difference": max_rel,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    print(f"{'task':10} {'transformers eager':>20} {'t5core basic':>14} {'speedup':>8}")
    for task, row in results.items():
        print(f"{task:10} {row['transformers_eager_s'] * 1e3:>17.1f} ms {row['t5core_basic_s'] * 1e3:>11.1f} ms "
              f"{row['speedup']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
