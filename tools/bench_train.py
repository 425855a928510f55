#!/usr/bin/env python
"""Training-step GPU benchmark: flan-t5-base shape, t5core's attention modes against transformers.

    python tools/bench_train.py [--sizes 512x32,1024x16,4096x4,16384x1] [--modes flash,local,block]

One step = teacher-forced forward with labels (encoder over L tokens, decoder over 128), the
cross-entropy loss, and its backward into every weight (no optimizer: its cost is the same for
every implementation). Random weights, the same in all (transformers saves the checkpoint that
t5core loads), bf16, dropout 0, batch x L as given. Per size: the median step time
(`triton.testing.do_bench`), the GPU's busy time in one step (the sum of its kernels' times,
torch.profiler) and peak memory, for t5core in each --modes and transformers eager and sdpa
(up to --peer-max-length). A step whose time is well above its GPU time is bound by the host
(launches and Python), not by the GPU. The sparse modes apply to the encoder only.
--backward-on-caller runs every backward (t5core's and transformers') with the autograd engine's
device threads off (`torch.autograd.set_multithreading_enabled(False)`): the graph then runs on
the calling thread, not handed to the engine's CUDA worker thread.
Writes JSON under bench/results/ (and $OUT) and prints a table last.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from bench_model import FLAN_T5_BASE, measure, write_record  # tools/ is on the path when run as a script
from profile_model import cuda_events

ROOT = Path(__file__).resolve().parents[1]


def gpu_busy_ms(step) -> float:
    """Sum of the CUDA kernel times of one step (ms): what the step costs the GPU."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in cuda_events(prof)) / 1e3


def main() -> int:
    import transformers

    from t5core.sparse import InitialisedWeightsWarning
    from t5core.weights import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512x32,1024x16,4096x4,16384x1", help="LENGTHxBATCH,...")
    parser.add_argument("--modes", default="flash,local,block,transient-global")
    parser.add_argument("--sparse-min-length", type=int, default=4096,
                        help="sparse modes only from this length (shorter inputs fit in one block or window)")
    parser.add_argument("--decoder-tokens", type=int, default=128)
    parser.add_argument("--peer-max-length", type=int, default=4096, help="skip transformers beyond this length")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--backward-on-caller", action="store_true",
                        help="backward on the calling thread (set_multithreading_enabled(False))")
    args = parser.parse_args()

    device = "cuda"
    torch.manual_seed(0)
    reference = transformers.T5ForConditionalGeneration(transformers.T5Config(**FLAN_T5_BASE))
    models = {}
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        for mode in args.modes.split(","):
            with warnings.catch_warnings():  # a plain T5 checkpoint in transient-global: initialised weights
                warnings.simplefilter("ignore", InitialisedWeightsWarning)
                models[mode] = load_checkpoint(folder, dtype=torch.bfloat16, device=device, attention=mode).train()
    reference = reference.to(device=device, dtype=torch.bfloat16).train()

    def backward(loss):
        with (torch.autograd.set_multithreading_enabled(False) if args.backward_on_caller
              else contextlib.nullcontext()):
            loss.backward()

    rows = []
    for size in args.sizes.split(","):
        length, batch = (int(x) for x in size.lower().split("x"))
        generator = torch.Generator(device=device).manual_seed(length)
        ids = torch.randint(3, 32100, (batch, length), device=device, generator=generator)
        mask = torch.ones_like(ids)
        labels = torch.randint(3, 32100, (batch, args.decoder_tokens), device=device, generator=generator)
        row = {"length": length, "batch": batch}

        def timed(name, model, step):
            result = measure(step)
            if "ms" in result:
                result["gpu_busy_ms"] = gpu_busy_ms(step)
            model.zero_grad(set_to_none=True)
            row[name] = result

        for mode, model in models.items():
            if mode != "flash" and length < args.sparse_min_length:
                continue

            def step(model=model):
                model.zero_grad(set_to_none=True)
                backward(model(ids, mask, labels=labels).loss)

            timed(f"t5core_{mode}", model, step)
        for impl in ("eager", "sdpa"):
            if length > args.peer_max_length:
                continue
            reference.set_attn_implementation(impl)

            def peer_step():
                reference.zero_grad(set_to_none=True)
                backward(reference(input_ids=ids, attention_mask=mask, labels=labels).loss)

            timed(f"transformers_{impl}", reference, peer_step)
        rows.append(row)
        print(row, flush=True)

    record = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__,
                     "transformers": transformers.__version__},
        "model": "flan-t5-base shape, random weights, bf16, train mode, dropout 0",
        "step": "forward with labels, loss, backward (no optimizer)", "decoder_tokens": args.decoder_tokens,
        "backward_on_caller": args.backward_on_caller,
        "rows": rows,
    }
    write_record(record, args.out, f"train-{record['date']}.json")
    columns = [c for c in (*(f"t5core_{m}" for m in models), "transformers_eager", "transformers_sdpa")
               if any(c in row for row in rows)]

    def cell(result: dict | None) -> str:
        if result is None:
            return "-"
        if "ms" not in result:
            return result["error"][:24]
        return f"{result['ms']:.1f} ({result['gpu_busy_ms']:.1f} GPU) {result['peak_gb']:.1f} GB"

    print("\ntraining step, ms (GPU busy ms) peak GB\n" + f"{'L x B':>10} | " + " | ".join(f"{c:>26}" for c in columns))
    for row in rows:
        print(f"{row['length']:>6} x {row['batch']:<2} | " + " | ".join(f"{cell(row.get(c)):>26}" for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
