"""Benchmark T5 relative-bias attention: t5core's Triton kernel against its peers.

Runs on a CUDA GPU. For each length (batch x length = --tokens until batch 1), times the
forward and forward+backward with triton.testing.do_bench (median), and records peak extra
memory. FLOPs: forward 4*B*H*Lq*Lk*D, fwd+bwd 2.5x that (as the brief specifies; the
FlashAttention papers count 3.5x, i.e. multiply our fwd+bwd TFLOP/s by 1.4 to compare),
halved when causal. Writes JSON to --out, else bench/results/attention-<date>.json (and $OUT if set)
and prints a short table last.

    python tools/bench_attention.py                    # the full run
    python tools/bench_attention.py --lengths 4096 --peers t5core,sdpa
    python tools/bench_attention.py --sparse           # sparse modes vs dense flash, 4k..1M tokens

--sparse times t5core's sparse encoder modes (local r=127, block S=512 n=16) and dense flash
(batch 1, 12 heads, head dim 64, bf16 by default) at 4k, 32k, 128k and 1M tokens: time, peak
extra memory, and throughput per *visible* score (scores a query may attend to, counted
exactly per mode: dense L^2, local sum over q of the window clipped to [0, L), block own
block + leading keys outside it, leading rows L), plus t(1M)/t(128k) per mode and each
sparse mode's throughput relative to dense flash at the same length.
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
ALL_PEERS = ["t5core", "t5core_bf16_table", "t5core_nobias", "sdpa", "sdpa_bias", "flex_bucket", "flex_bias", "hf_eager"]


# The sparse patterns' parameters of every sparse benchmark and profile (sweep_tiles.py and
# profile_attention.py import them): LongT5's local radius, blocks of 512 with 16 global tokens.
SPARSE_PARAMS = {"local": dict(local_radius=127), "block": dict(block_size=512, num_global=16)}


def tglobal_inputs(L: int, H: int, D: int, dtype, global_block_size: int, need_grad: bool, table_grad: bool):
    """transient-global's side keys and values [1, H, L // global_block_size, D], global table
    [32, H] fp32 and block ids [1, L] for one unpadded row (random: the kernels' times do not
    depend on the values)."""
    side = L // global_block_size
    side_k, side_v = (torch.randn(1, H, side, D, device="cuda", dtype=dtype, requires_grad=need_grad)
                      for _ in range(2))
    global_table = (torch.randn(32, H, device="cuda") * 3).requires_grad_(table_grad)
    block_ids = (torch.arange(L, device="cuda") // global_block_size)[None]
    return side_k, side_v, global_table, block_ids


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
    p.add_argument("--modes", default="fwd,fwd_bwd", help="fwd, fwd_bwd; with --sparse also fwd_bwd_frozen "
                   "(forward+backward with the bias tables frozen: no table gradient)")
    p.add_argument("--num-buckets", type=int, default=32, help="t5core only (diagnostics: 4 with --max-distance 2 "
                   "leaves almost no near-diagonal tiles)")
    p.add_argument("--max-distance", type=int, default=128, help="t5core only")
    p.add_argument("--table-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the bias table's dtype (a bf16 model's is bf16: bf16 near-tile blocks)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/attention-<date>.json)")
    p.add_argument("--sparse", action="store_true", help="time the sparse modes against dense flash instead")
    p.add_argument("--sparse-lengths", default="4096,32768,131072,1048576")
    p.add_argument("--sparse-modes", default="dense,local,block,transient-global")
    p.add_argument("--dense-max-len", type=int, default=131072,
                   help="--sparse: skip dense above this length (dense at 1M takes minutes); per-score ratios "
                   "beyond it use dense at this length, whose throughput is flat by then")
    p.add_argument("--global-block-size", type=int, default=16, help="transient-global: tokens per side key")
    p.add_argument("--local-radius", type=int, default=SPARSE_PARAMS["local"]["local_radius"])
    p.add_argument("--block-size", type=int, default=SPARSE_PARAMS["block"]["block_size"])
    p.add_argument("--num-global", type=int, default=SPARSE_PARAMS["block"]["num_global"])
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
    if name == "t5core_bf16_table":  # the table a bf16 model holds: 16-bit near-tile bias blocks
        table16 = table.detach().to(torch.bfloat16).requires_grad_(table.requires_grad)

        def fn():
            return flash_attention(q, k, v, table16, bidirectional=bidirectional, causal=causal)
        fn.leaves = [q, k, v, table16]  # the leaves whose .grad the timing resets
        return fn
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


def measure(fn, mode, leaves):
    """(median ms, peak extra bytes) of fn (forward) or fn().backward (fwd_bwd)."""
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
    return time_and_peak(run, long_run=False, leaves=leaves if mode == "fwd_bwd" else None)


def visible_scores(mode, L, radius, block_size, num_global, global_block_size=16):
    """Exact number of (query, key) pairs a mode lets attend, for one head of one length-L row."""
    if mode == "dense":
        return L * L
    q = torch.arange(L, dtype=torch.int64)
    if mode == "local":
        return int(((q + radius).clamp(max=L - 1) - (q - radius).clamp(min=0) + 1).sum())
    if mode == "block":
        block_start = (q // block_size) * block_size
        block_len = (block_start + block_size).clamp(max=L) - block_start
        lead = min(num_global, L)
        # leading keys outside the query's own block (inside it they are counted once, in the block)
        lead_outside = lead - ((block_start + block_size).clamp(max=lead) - block_start.clamp(max=lead))
        per_query = torch.where(q < num_global, torch.full_like(q, L), block_len + lead_outside)
        return int(per_query.sum())
    if mode == "transient-global":  # the local window plus L // global_block_size side keys
        return visible_scores("local", L, radius, block_size, num_global) + L * (L // global_block_size)
    raise ValueError(mode)


def time_and_peak(run, long_run, leaves=None):
    """(median ms, peak extra bytes). Short runs: do_bench after one untimed call, then one call
    for the peak. Runs of seconds (dense at 1M tokens): one call timed with CUDA events, which
    also gives the peak; the caller has run the kernels once before (compiled). The leaves'
    .grad is reset before every call, so a backward is not charged for accumulating into .grad
    (attention inside a model does not)."""
    import triton

    if not long_run:
        run()  # compile / first call outside the timing
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median", grad_to_none=leaves)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for leaf in leaves or ():
        leaf.grad = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    if long_run:
        ms = start.elapsed_time(end)
    return ms, torch.cuda.max_memory_allocated() - base


def sparse_main(args):
    """Sparse modes vs dense flash: time, memory, throughput per visible score, t(1M)/t(128k)."""
    from t5core.kernels import flash_attention, sparse_attention, transient_global_attention

    dtype = getattr(torch, args.dtype)
    H, D = args.heads, args.head_dim
    modes, kinds = args.sparse_modes.split(","), args.modes.split(",")
    params = dict(local=dict(local_radius=args.local_radius),
                  block=dict(block_size=args.block_size, num_global=args.num_global))
    results = []
    compiled = set()  # (mode, kind) pairs already run once in this process
    for L in (int(x) for x in args.sparse_lengths.split(",")):
        for mode in modes:
            if mode == "dense" and L > args.dense_max_len:
                continue
            scores = visible_scores(mode, L, args.local_radius, args.block_size, args.num_global,
                                    args.global_block_size)
            for kind in kinds:
                row = dict(mode=mode, kind=kind, L=L, B=1, H=H, D=D, visible_scores_per_head=scores,
                           density=scores / (L * L))
                try:
                    torch.manual_seed(0)
                    need_grad = kind in ("fwd_bwd", "fwd_bwd_frozen")  # frozen: the tables get no gradient
                    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=dtype, requires_grad=need_grad)
                               for _ in range(3))
                    table = (torch.randn(32, H, device="cuda") * 3).to(getattr(torch, args.table_dtype))
                    table.requires_grad_(kind == "fwd_bwd")
                    if mode == "dense":
                        fn = lambda: flash_attention(q, k, v, table)  # noqa: E731
                    elif mode == "transient-global":
                        side_k, side_v, global_table, block_ids = tglobal_inputs(
                            L, H, D, dtype, args.global_block_size, need_grad, kind == "fwd_bwd")
                        fn = lambda: transient_global_attention(  # noqa: E731
                            q, k, v, table, side_k, side_v, global_table, block_ids, local_radius=args.local_radius)
                    else:
                        fn = lambda: sparse_attention(q, k, v, table, pattern=mode, **params[mode])  # noqa: E731
                    grad = torch.randn(1, H, L, D, device="cuda", dtype=dtype) if need_grad else None

                    def run():
                        if need_grad:
                            fn().backward(grad)
                        else:
                            with torch.no_grad():
                                fn()
                    leaves = [q, k, v, table] + ([side_k, side_v, global_table] if mode == "transient-global" else [])
                    long_run = scores * H > 2e11  # dense beyond 128k
                    if long_run and (mode, kind) not in compiled:
                        run()  # no shorter length compiled these kernels: one untimed call first
                    compiled.add((mode, kind))
                    ms, peak = time_and_peak(run, long_run, leaves=leaves if need_grad else None)
                    row.update(status="ok", ms=ms, peak_extra_mb=peak / 2**20,
                               gscores_per_s=scores * H / ms / 1e6)  # visible scores (all heads) per second / 1e9
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as err:  # one failing mode must not stop the run
                    row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
                    traceback.print_exc()
                finally:
                    q = k = v = table = fn = grad = side_k = side_v = global_table = None
                    torch.cuda.empty_cache()
                results.append(row)
                print(json.dumps(row), flush=True)

    def find(mode, kind, L):
        return next((r for r in results if r["mode"] == mode and r["kind"] == kind and r["L"] == L
                     and r.get("status") == "ok"), None)

    lengths = sorted({r["L"] for r in results})
    summary = []
    for mode in modes:
        for kind in kinds:
            entry = dict(mode=mode, kind=kind)
            a, b = find(mode, kind, 131072), find(mode, kind, 1048576)
            entry["t(1M)/t(128k)"] = b["ms"] / a["ms"] if a and b else None
            for L in lengths:
                ours, dense = find(mode, kind, L), find("dense", kind, min(L, args.dense_max_len))
                entry[f"throughput_vs_dense@{L}"] = (ours["gscores_per_s"] / dense["gscores_per_s"]
                                                     if ours and dense else None)
            summary.append(entry)

    import triton
    props = torch.cuda.get_device_properties(0)
    report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), gpu=props.name,
                  torch=torch.__version__, triton=triton.__version__, dtype=args.dtype, table_dtype=args.table_dtype,
                  heads=H, head_dim=D,
                  params=params, results=results, summary=summary,
                  targets="t(1M)/t(128k) <= 9 for local and block; sparse throughput per visible score >= 0.8x dense")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = [Path(args.out) if args.out else ROOT / "bench" / "results" / f"sparse-attention-{stamp}.json"]
    if os.environ.get("OUT") and not args.out:  # a copy under $OUT unless --out chose the place
        paths.append(Path(os.environ["OUT"]) / f"sparse-attention-{stamp}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))

    print(f"\n{props.name}, {args.dtype}, H={H}, D={D}, batch 1; ms / peak extra MiB / G visible scores per s")
    print(f"{'mode':6s} {'kind':8s} " + " ".join(f"{L:>26d}" for L in lengths))
    for mode in modes:
        for kind in kinds:
            cells = []
            for L in lengths:
                r = next((r for r in results if r["mode"] == mode and r["kind"] == kind and r["L"] == L), None)
                cells.append("skipped" if r is None else f"{r['ms']:9.2f} {r['peak_extra_mb']:7.0f} {r['gscores_per_s']:7.1f}"
                             if r.get("status") == "ok" else r["status"][:26])
            print(f"{mode:6s} {kind:8s} " + " ".join(f"{c:>26s}" for c in cells))
    for e in summary:
        print(f"{e['mode']:6s} {e['kind']:8s} " + ", ".join(
            f"{k}={v:.2f}" if v is not None else f"{k}=n/a" for k, v in e.items() if k not in ("mode", "kind")))


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    if args.sparse:
        return sparse_main(args)
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
                        table = (torch.randn(32, H, device="cuda") * 3).to(getattr(torch, args.table_dtype))
                        table.requires_grad_(need_grad)
                        fn = make_peer(name, q, k, v, table, args.causal, L, args.num_buckets, args.max_distance)
                        ms, peak = measure(fn, mode, getattr(fn, "leaves", [q, k, v, table]))
                        row.update(status="ok", ms=ms, tflops=flops / ms / 1e9, peak_extra_mb=peak / 2**20)
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "OOM"
                    except MemoryError as err:
                        row["status"] = str(err)
                    except Exception as err:  # one failing peer must not stop the run
                        row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
                        traceback.print_exc()
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
            entry = dict(L=L, mode=mode)
            for ours, peer in (("t5core", "sdpa"), ("t5core_bf16_table", "sdpa"), ("t5core", "flex_bucket")):
                mine, theirs = tflops(ours, mode, L), tflops(peer, mode, L)
                entry[f"{ours}/{peer}"] = mine / theirs if mine and theirs else None
            ratios.append(entry)

    props = torch.cuda.get_device_properties(0)
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), gpu=props.name,
        capability=f"{props.major}.{props.minor}", torch=torch.__version__, triton=triton.__version__,
        transformers=transformers.__version__, dtype=args.dtype, table_dtype=args.table_dtype, causal=args.causal,
        heads=H, head_dim=D,
        tokens=args.tokens, tiles={k: flash.tile(k, dtype == torch.float32) for k in ("fwd", "dq", "dkdv")},
        autotuned=flash.best_configs(), flops_note="fwd 4BHL^2D, fwd+bwd 2.5x fwd, causal halves",
        results=results, ratios=ratios,
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-causal" if args.causal else ""
    paths = [Path(args.out) if args.out else ROOT / "bench" / "results" / f"attention-{stamp}{suffix}.json"]
    if os.environ.get("OUT") and not args.out:  # a copy under $OUT unless --out chose the place
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
