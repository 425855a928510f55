"""Benchmark T5 relative-bias attention: t5core's Triton kernel against its peers.

Runs on a CUDA GPU. For each length (batch x length = --tokens until batch 1), times the
forward and forward+backward with triton.testing.do_bench (median), and records peak extra
memory. FLOPs: forward 4*B*H*Lq*Lk*D, fwd+bwd 2.5x that (as the brief specifies; the
FlashAttention papers count 3.5x, i.e. multiply our fwd+bwd TFLOP/s by 1.4 to compare),
halved when causal. Writes JSON to bench/results/attention-<date>.json (and $OUT if set)
and prints a short table last.

    python tools/bench_attention.py                    # the full run
    python tools/bench_attention.py --lengths 4096 --peers t5core,sdpa
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ALL_PEERS = ["t5core", "t5core_nobias", "sdpa", "sdpa_bias", "flex_bucket", "flex_bias", "hf_eager"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384,32768,131072", help="comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=16384, help="batch * length, until batch 1")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--causal", action="store_true", help="decoder self-attention (causal, unidirectional buckets)")
    p.add_argument("--peers", default=",".join(ALL_PEERS), help=f"subset of {ALL_PEERS}")
    p.add_argument("--flex-max-len", type=int, default=16384, help="skip flex above this length (compile time)")
    p.add_argument("--eager-max-len", type=int, default=32768, help="skip HF eager math above this length")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--num-buckets", type=int, default=32, help="t5core only (diagnostics: 4 with --max-distance 2 "
                   "leaves almost no near-diagonal tiles)")
    p.add_argument("--max-distance", type=int, default=128, help="t5core only")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/attention-<date>.json)")
    return p.parse_args()


def make_peer(name, q, k, v, table, causal, L, num_buckets=32, max_distance=128):
    """A function running one attention of `name`; raises to report a skip/failure."""
    from t5core.kernels import flash_attention, relative_position_bucket
    import torch.nn.functional as F

    H = q.shape[1]
    bidirectional = not causal

    def bias_bhll():
        rel = torch.arange(L, device=q.device)[None, :] - torch.arange(L, device=q.device)[:, None]
        return table[relative_position_bucket(rel, bidirectional, 32, 128)].permute(2, 0, 1)[None]

    if name == "t5core":
        if num_buckets != table.shape[0]:
            table = torch.randn(num_buckets, H, device=q.device, requires_grad=q.requires_grad)
        return lambda: flash_attention(q, k, v, table, bidirectional=bidirectional, causal=causal,
                                       num_buckets=num_buckets, max_distance=max_distance)
    if name == "t5core_nobias":  # the same kernel with no bias at all: its far-tile-only speed
        return lambda: flash_attention(q, k, v, None, causal=causal)
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    if name == "sdpa_bias":
        need = H * L * L * q.element_size() * (3 if q.requires_grad else 1)
        if need > 0.6 * torch.cuda.get_device_properties(0).total_memory:
            raise MemoryError("OOM (materialised bias would need %.0f GB)" % (need / 1e9))
        with torch.no_grad():
            bias = bias_bhll().to(q.dtype)
            if causal:
                bias = bias.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        bias.requires_grad_(q.requires_grad)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    if name in ("flex_bucket", "flex_bias"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch._dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device=q.device)
        if name == "flex_bucket":
            nb, me = (16, 8) if bidirectional else (32, 16)
            log_ratio = math.log(128 / me)

            def score_mod(score, b, h, q_idx, kv_idx):
                rel = kv_idx - q_idx
                if bidirectional:
                    base = torch.where(rel > 0, nb, 0)
                    n = torch.abs(rel)
                else:
                    base = 0
                    n = -torch.clamp(rel, max=0)
                large = me + (torch.log(torch.clamp(n, min=1).float() / me) / log_ratio * (nb - me)).to(torch.int32)
                large = torch.clamp(large, max=nb - 1)
                return score + table[base + torch.where(n < me, n, large), h].to(score.dtype)
        else:
            if H * L * L * 2 > 0.4 * torch.cuda.get_device_properties(0).total_memory:
                raise MemoryError("OOM (precomputed [H,L,L] bias)")
            with torch.no_grad():
                bias = bias_bhll()[0].to(q.dtype)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx]
        return lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
    if name == "hf_eager":
        from transformers.models.t5.modeling_t5 import T5Attention  # test oracle / peer only

        need = q.shape[0] * H * L * L * 6 * (2 if q.requires_grad else 1)
        if need > 0.8 * torch.cuda.get_device_properties(0).total_memory:
            raise MemoryError("OOM (scores need %.0f GB)" % (need / 1e9))

        def hf():
            rel = torch.arange(L, device=q.device)[None, :] - torch.arange(L, device=q.device)[:, None]
            buckets = T5Attention._relative_position_bucket(rel, bidirectional, 32, 128)
            bias = table[buckets].permute(2, 0, 1)[None].to(q.dtype)
            if causal:
                bias = bias.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1),
                                        torch.finfo(q.dtype).min)
            scores = q @ k.transpose(-1, -2) + bias
            probs = torch.softmax(scores.float(), dim=-1).type_as(scores)  # v4 eager path
            return probs @ v
        return hf
    raise ValueError(name)


def measure(fn, mode, q):
    import triton

    grad = None
    if mode == "fwd_bwd":
        out = fn()
        grad = torch.randn_like(out)
        del out

        def run():
            fn().backward(grad)
    else:
        def run():
            with torch.no_grad():
                fn()
    run()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return ms, peak


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    peers = args.peers.split(",")
    modes = args.modes.split(",")
    H, D = args.heads, args.head_dim
    import triton
    import transformers

    from t5core.kernels import flash

    results = []
    for L in (int(x) for x in args.lengths.split(",")):
        B = max(1, args.tokens // L)
        flops_fwd = 4 * B * H * L * L * D / (2 if args.causal else 1)
        for mode in modes:
            flops = flops_fwd * (2.5 if mode == "fwd_bwd" else 1.0)
            for name in peers:
                row = dict(peer=name, mode=mode, L=L, B=B, H=H, D=D)
                q = k = v = table = fn = None
                if name.startswith("flex") and L > args.flex_max_len:
                    row["status"] = f"skipped (L > --flex-max-len {args.flex_max_len})"
                elif name == "flex_bias" and H * L * L >= 2**31:
                    # Seen on torch 2.11 at L=16k: flex indexing a [H, L, L] captured bias past 2**31
                    # elements makes an illegal memory access, which kills the CUDA context for the run.
                    row["status"] = "skipped (flex int32 indexing overflows a [H, L, L] bias >= 2**31 elements)"
                elif name == "hf_eager" and L > args.eager_max_len:
                    row["status"] = f"skipped (L > --eager-max-len {args.eager_max_len})"
                else:
                    try:
                        torch.manual_seed(0)
                        need_grad = mode == "fwd_bwd"
                        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=need_grad)
                                   for _ in range(3))
                        table = (torch.randn(32, H, device="cuda") * 3).requires_grad_(need_grad)
                        fn = make_peer(name, q, k, v, table, args.causal, L, args.num_buckets, args.max_distance)
                        ms, peak = measure(fn, mode, q)
                        row.update(status="ok", ms=ms, tflops=flops / ms / 1e9, peak_extra_mb=peak / 2**20)
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "OOM"
                    except MemoryError as err:
                        row["status"] = str(err)
                    except Exception as err:  # one failing peer must not stop the run
                        row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
                        traceback.print_exc(limit=3)
                    finally:
                        q = k = v = table = fn = None
                        torch.cuda.empty_cache()
                results.append(row)
                print(json.dumps(row), flush=True)

    def tflops(peer, mode, L):
        for r in results:
            if r["peer"] == peer and r["mode"] == mode and r["L"] == L and r.get("status") == "ok":
                return r["tflops"]
        return None

    ratios = []
    for L in sorted({r["L"] for r in results}):
        for mode in modes:
            ours = tflops("t5core", mode, L)
            entry = dict(L=L, mode=mode)
            for peer in ("sdpa", "flex_bucket"):
                theirs = tflops(peer, mode, L)
                entry[f"t5core/{peer}"] = ours / theirs if ours and theirs else None
            ratios.append(entry)

    props = torch.cuda.get_device_properties(0)
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), gpu=props.name,
        capability=f"{props.major}.{props.minor}", torch=torch.__version__, triton=triton.__version__,
        transformers=transformers.__version__, dtype=args.dtype, causal=args.causal, heads=H, head_dim=D,
        tokens=args.tokens, tiles={k: flash.tile(k, dtype == torch.float32) for k in ("fwd", "dq", "dkdv")},
        autotuned=flash.best_configs(), flops_note="fwd 4BHL^2D, fwd+bwd 2.5x fwd, causal halves",
        results=results, ratios=ratios,
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-causal" if args.causal else ""
    paths = [Path(args.out) if args.out else ROOT / "bench" / "results" / f"attention-{stamp}{suffix}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"attention-{stamp}{suffix}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))

    # Short table last: TFLOP/s (peak extra MB) per peer.
    print(f"\n{props.name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, H={H}, D={D}, "
          f"{'causal' if args.causal else 'bidirectional'}; TFLOP/s (peak extra MiB)")
    print(f"{'mode':8s} {'L':>7s} {'B':>3s} " + " ".join(f"{p:>17s}" for p in peers))
    for L in sorted({r["L"] for r in results}):
        for mode in modes:
            cells = []
            for peer in peers:
                r = next(r for r in results if r["peer"] == peer and r["mode"] == mode and r["L"] == L)
                if r.get("status") == "ok":
                    cells.append(f"{r['tflops']:7.1f} ({r['peak_extra_mb']:6.0f})")
                else:
                    cells.append(r["status"][:17])
            B = max(1, args.tokens // L)
            print(f"{mode:8s} {L:7d} {B:3d} " + " ".join(f"{c:>17s}" for c in cells))
    for e in ratios:
        print(f"ratio {e['mode']:8s} L={e['L']:7d}: " + ", ".join(
            f"{k}={v:.2f}" if v else f"{k}=n/a" for k, v in e.items() if "/" in k))


if __name__ == "__main__":
    main()
