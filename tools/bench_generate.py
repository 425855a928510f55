"""Generation benchmark: t5core's fast decode path vs transformers' generate(), one GPU call.

    python tools/bench_generate.py [--sizes 1x512,1x8192,1x32768,32x512] [--new-tokens 128]

flan-t5-base shape (d_model 768, 12+12 layers, 12 heads, d_ff 2048, gated-gelu, vocab 32128)
with random weights in bf16. transformers builds the model (its own random init) and saves
it; t5core loads the same folder. Greedy, `--new-tokens` tokens for every row with EOS off
on both sides (t5core: eos_token_id=-1; transformers: min_new_tokens = max_new_tokens).

Per size (batch x input tokens) and variant it reports:
  * tok/s: batch * new tokens / wall time of the whole generate() call (encoder included);
  * decode tok/s: batch * (new tokens - 1) / (total - time to first token);
  * ttft: wall time of generate() with one new token (encoder + first step);
  * peak GB: torch.cuda.max_memory_allocated during the timed call (weights included).
Variants: t5core (CUDA graphs + flash decoding, the default), t5core-eager (no CUDA graph),
hf-eager and hf-sdpa (transformers' attn_implementation, its default dynamic cache). Each
part runs in its own try/except (an OOM is recorded as such). JSON goes to bench/results/
and to $OUT if set; a table with the speed-ups over the best transformers variant prints last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAN_T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                    num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
TARGETS = {"1x512": 3.0, "1x32768": 10.0, "32x512": 2.0}  # t5core tok/s over transformers' best


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1x512,1x8192,1x32768,32x512", help="comma list of BATCHxINPUT_TOKENS")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--variants", default="t5core,t5core-eager,hf-eager,hf-sdpa")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case; the fastest is kept")
    p.add_argument("--budget-s", type=float, default=320.0, help="skip what is left after this many seconds")
    p.add_argument("--attention", default="flash", help="t5core encoder attention mode")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks this script, measures nothing")
    return p.parse_args(argv)


DEVICE = "cuda"


def sync_time() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def make_inputs(batch: int, length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 32000), (batch, length), generator=g)
    return ids.to(DEVICE), torch.ones_like(ids).to(DEVICE)


def build_models(folder: Path, shape: dict):
    import transformers

    config = transformers.T5Config(**shape)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    del model
    return config


def load_hf(folder: Path, impl: str):
    import transformers

    cls = transformers.T5ForConditionalGeneration
    try:
        model = cls.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation=impl)
    except TypeError:  # older transformers: torch_dtype
        model = cls.from_pretrained(folder, torch_dtype=torch.bfloat16, attn_implementation=impl)
    return model.to(DEVICE).eval()


def load_t5core(folder: Path, attention: str):
    from t5core.weights import load_checkpoint

    return load_checkpoint(folder, dtype=torch.bfloat16, device=DEVICE, attention=attention).eval()


def generate_fn(variant: str, model, fast: bool = True):
    if variant.startswith("hf"):
        def run(ids, mask, n):
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, num_beams=1)
    else:
        graphs = variant == "t5core"

        def run(ids, mask, n):
            return model.generate(ids, mask, max_new_tokens=n, eos_token_id=-1, fast=True if fast else None,
                                  cuda_graphs=graphs if fast else None)
    return run


def measure(run, ids, mask, new_tokens: int, repeats: int) -> dict:
    batch = ids.shape[0]
    run(ids[:, : min(ids.shape[1], 64)], mask[:, : min(ids.shape[1], 64)], 3)  # compile / warm up
    run(ids, mask, 2)  # warm up at this length (kernel autotuning, allocator)
    best, out = float("inf"), None
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = sync_time()
        out = run(ids, mask, new_tokens)
        best = min(best, sync_time() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    generated = out.shape[1] - 1
    start = sync_time()
    run(ids, mask, 1)
    ttft = sync_time() - start
    decode_rate = batch * (generated - 1) / (best - ttft) if best > ttft and generated > 1 else None
    return dict(total_s=best, ttft_s=ttft, tokens_per_s=batch * generated / best,
                decode_tokens_per_s=decode_rate, peak_gb=peak,
                generated=generated, ok=generated == new_tokens)


def free():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    global DEVICE
    args = parse_args(argv)
    shape = FLAN_T5_BASE
    if args.smoke:
        DEVICE = "cpu"
        shape = dict(FLAN_T5_BASE, vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                     num_heads=4)
        args.sizes, args.new_tokens, args.repeats, args.attention = "1x16,3x8", 5, 1, "basic"
    elif not torch.cuda.is_available():
        print("bench_generate needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    import transformers
    import triton

    env = dict(gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__, dtype="bf16",
               new_tokens=args.new_tokens, sizes=args.sizes)
    print(json.dumps(env), flush=True)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    variants = args.variants.split(",")
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_models(folder, shape)
        for variant in variants:
            try:
                model = load_hf(folder, variant[3:]) if variant.startswith("hf") else load_t5core(folder,
                                                                                                  args.attention)
            except Exception as err:  # noqa: BLE001
                results.append(dict(variant=variant, error=f"load: {type(err).__name__}: {err}"))
                traceback.print_exc()
                continue
            run = generate_fn(variant, model, fast=not args.smoke)
            for batch, length in sizes:
                row = dict(variant=variant, size=f"{batch}x{length}", batch=batch, input_tokens=length)
                if time.perf_counter() - t0 > args.budget_s:
                    row["error"] = "skipped: time budget"
                    results.append(row)
                    continue
                try:
                    ids, mask = make_inputs(batch, length, shape["vocab_size"])
                    row.update(measure(run, ids, mask, args.new_tokens, args.repeats))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                except Exception as err:  # noqa: BLE001
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    traceback.print_exc()
                free()
                results.append(row)
                print(json.dumps(row), flush=True)
            del model, run
            free()
    summary = summarize(results)
    report = dict(env=env, results=results, summary=summary, wall_s=time.perf_counter() - t0)
    if not args.smoke:
        write(report, args.out)
    print_table(results, summary)
    return 0


def summarize(results: list[dict]) -> dict:
    """Per size: t5core tok/s over the best transformers variant (OOM counts as t5core winning)."""
    out = {}
    for size in dict.fromkeys(r.get("size") for r in results if "size" in r):
        ours = next((r for r in results if r.get("size") == size and r["variant"] == "t5core"), {})
        theirs = [r for r in results if r.get("size") == size and r["variant"].startswith("hf")]
        hf_ok = [r["tokens_per_s"] for r in theirs if "tokens_per_s" in r]
        entry = dict(t5core_tokens_per_s=ours.get("tokens_per_s"), hf_best_tokens_per_s=max(hf_ok, default=None),
                     hf_errors=[r.get("error") for r in theirs if "error" in r])
        if ours.get("tokens_per_s") and hf_ok:
            entry["speedup"] = ours["tokens_per_s"] / max(hf_ok)
        elif ours.get("tokens_per_s") and theirs and not hf_ok:
            entry["speedup"] = "transformers failed (" + ", ".join(map(str, entry["hf_errors"])) + ")"
        if size in TARGETS:
            entry["target"] = TARGETS[size]
            sp = entry.get("speedup")
            entry["meets_target"] = (sp >= TARGETS[size]) if isinstance(sp, float) else isinstance(sp, str)
        out[size] = entry
    return out


def write(report: dict, out_dir: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in filter(None, [out_dir, os.environ.get("OUT")]):
        try:
            path = Path(folder) / f"bench_generate-{stamp}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
            print(f"wrote {path}")
        except OSError as err:
            print(f"could not write to {folder}: {err}")


def print_table(results: list[dict], summary: dict) -> None:
    print()
    print(f"{'size':>9} {'variant':>13} {'tok/s':>9} {'decode tok/s':>13} {'ttft ms':>9} {'peak GB':>8}  note")
    for r in results:
        if "tokens_per_s" in r:
            print(f"{r['size']:>9} {r['variant']:>13} {r['tokens_per_s']:>9.1f} {r['decode_tokens_per_s'] or float('nan'):>13.1f} "
                  f"{1e3 * r['ttft_s']:>9.1f} {r['peak_gb']:>8.2f}  {'' if r['ok'] else 'WRONG TOKEN COUNT'}")
        else:
            print(f"{r.get('size', '-'):>9} {r['variant']:>13} {'-':>9} {'-':>13} {'-':>9} {'-':>8}  {r['error']}")
    print()
    for size, s in summary.items():
        sp = s.get("speedup")
        sp_text = f"{sp:.2f}x" if isinstance(sp, float) else str(sp)
        target = f" (target >= {s['target']}x: {'met' if s['meets_target'] else 'NOT met'})" if "target" in s else ""
        print(f"{size:>9}: t5core vs best transformers: {sp_text}{target}")


if __name__ == "__main__":
    sys.exit(main())
