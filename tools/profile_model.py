#!/usr/bin/env python
"""Where the time goes: CUDA kernel times of a flan-t5-base-shaped t5core forward and decode step.

    python tools/profile_model.py [--length 8192] [--batch 2] [--out DIR]

--attention picks the mode and --encoder-only profiles `model.encode` alone (the sparse
modes are encoder modes). Random weights (normal, std 0.05; no transformers needed), bf16, inference mode. Prints the
top kernels by total CUDA time (torch.profiler) for (1) one teacher-forced forward (encoder
over batch x length tokens + 128 decoder tokens) and (2) ten greedy decode steps replayed as
a CUDA graph at batch 1 over a --decode-length-token input, with kernels per step and GPU
vs wall time per step. A diagnosis tool: the benchmarks are bench_model.py and bench_generate.py.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

FLAN_T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                    num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build(attention: str):
    from t5core.config import T5Config
    from t5core.model import T5

    model = T5(T5Config.from_dict(FLAN_T5_BASE, attention=attention))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(device="cuda", dtype=torch.bfloat16).eval()


def cuda_events(prof) -> list:
    """The profiler's CUDA kernels (and memsets, copies), by total time, longest first."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(events, key=lambda e: -e.self_device_time_total)


def table(prof, rows: int, title: str, steps: int = 1) -> None:
    events = cuda_events(prof)
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"\n== {title}: {total / 1e3 / steps:.2f} ms GPU per step, {count / steps:.0f} kernels per step")
    for e in events[:rows]:
        print(f"{e.self_device_time_total / 1e3 / steps:9.3f} ms {e.count / steps:7.1f}x  {e.key[:110]}")


def cprofile_call(fn) -> pstats.Stats:
    """cProfile's statistics of one call of fn, the GPU idle before and after it."""
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    torch.cuda.synchronize()
    return pstats.Stats(profiler)


def host_profile(fn, rows: int) -> None:
    """Python-side time of one call: the launches the GPU waits for when a run is host-bound."""
    stats = cprofile_call(fn)
    for key in ("tottime", "cumulative"):
        print(f"\n== host profile by {key}")
        stats.sort_stats(key).print_stats(rows)


def splits_sweep(keys: int) -> None:
    """Cross-attention decode (batch 1, 12 heads, d 64, `keys` encoder tokens) per split count."""
    import triton

    from t5core.kernels.decode import choose_num_splits, decode_attention

    q = torch.randn(1, 12, 1, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 12, keys, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((1,), keys, device="cuda", dtype=torch.int32)
    default = choose_num_splits(1, 12, 1, keys, q.device)
    print(f"\n== decode over {keys} keys (K+V {2 * k.numel() * 2 / 1e6:.0f} MB): default splits {default}")
    for splits in sorted({default, 22, 44, 66, 88, 110, 128}):
        ms = triton.testing.do_bench(lambda: decode_attention(q, k, v, lengths, num_splits=splits), rep=100)
        print(f"splits {splits:4d}: {1e3 * ms:7.1f} us  {2 * k.numel() * 2 / ms / 1e9:6.2f} TB/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--decode-length", type=int, default=32768)
    p.add_argument("--rows", type=int, default=22)
    p.add_argument("--splits", action="store_true", help="time the decode kernel per split count first")
    p.add_argument("--host", action="store_true", help="also profile the host side (cProfile) of one forward")
    p.add_argument("--attention", default="flash", choices=["flash", "local", "block", "transient-global"])
    p.add_argument("--encoder-only", action="store_true",
                   help="profile model.encode alone (the sparse modes are encoder modes) and skip generation")
    args = p.parse_args()
    if args.splits:
        splits_sweep(args.decode_length)
    model = build(args.attention)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, 32000, (args.batch, args.length), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    dec = torch.randint(3, 32000, (args.batch, 128), device="cuda", generator=g)
    def forward():
        return model.encode(ids, mask) if args.encoder_only else model(ids, mask, decoder_input_ids=dec)

    what = f"{'encoder' if args.encoder_only else 'forward'} {args.batch}x{args.length} ({args.attention})"
    with torch.inference_mode():
        for _ in range(2):
            forward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        print(f"{what}: wall {1e3 * (time.perf_counter() - t):.1f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
        table(prof, args.rows, what)
        if args.host:
            host_profile(forward, args.rows)
        if args.encoder_only:
            return

        ids = torch.randint(3, 32000, (1, args.decode_length), device="cuda", generator=g)
        model.generate(ids, max_new_tokens=40, eos_token_id=-1)  # compiles, captures
        torch.cuda.synchronize()
        for n in (1, 40):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, eos_token_id=-1)
            torch.cuda.synchronize()
            print(f"generate 1x{args.decode_length}, {n} new tokens: wall {1e3 * (time.perf_counter() - t):.1f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.generate(ids, max_new_tokens=40, eos_token_id=-1)
            torch.cuda.synchronize()
        table(prof, args.rows, f"generate 1x{args.decode_length}, 40 tokens (per token)", steps=40)


if __name__ == "__main__":
    main()
