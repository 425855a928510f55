#!/usr/bin/env python
"""Compile every Triton kernel variant t5core launches, for sm90 and sm80, on a machine without a GPU.

    python tools/compile_check.py [--arch 90 80]

Triton's CPU interpreter runs the kernels' arithmetic but not the compiler: a kernel can pass
every interpreter test and still fail to compile for a GPU (an `if` whose branches give a
variable different types, say). This tool runs t5core's host code for each attention mode
(dense, causal, varlen, local, block, decode, the fused kernels) with every launch
intercepted: instead of running, each launch is compiled to a cubin for the target (Triton
ships ptxas) with the same arguments, constexprs, warps and stages, specialised as the
runtime launcher specialises them (16-byte alignment, divisibility by 16: without those facts
the software pipeliner leaves every load synchronous and the registers printed are not the
GPU's). It prints one line per distinct variant with registers, spilled bytes, shared
memory and the blocks per SM they allow (occupancy), and exits 1 if any variant fails.

To check against the Triton of another machine (the GPU box's), put that version's package
first on the path: `pip install --target /tmp/t36 triton==3.6.0` and
`PYTHONPATH=/tmp/t36 python tools/compile_check.py`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

def _launch_spec(fn: JITFunction, backend, args: tuple, kwargs: dict):
    """(key, signature, constexprs, attrs, options) of one launch, specialised as a real launch is.

    Triton's launcher specialises each pointer and integer argument (16-byte alignment,
    divisibility by 16); the software pipeliner needs those facts to turn loads into async
    copies. The same binder the runtime uses gives them here, so the registers, spills and
    shared memory printed are those of the kernel the GPU runs.
    """
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    names = [p.name for p in fn.params]
    consts = sorted((names[path[0]], value) for path, value in constexprs.items() if len(path) == 1)
    pointers = sorted((name, kind) for name, kind in signature.items() if str(kind).startswith("*"))
    digest = hashlib.sha1(str(specialization).encode()).hexdigest()[:6]  # alignment specialisations differ too
    key = (f"{fn.__name__} warps={options.num_warps} stages={options.num_stages} {consts} {pointers} "
           f"spec={digest}")
    return key, signature, constexprs, attrs, options


class Compiler:
    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 64 if arch >= 90 else 32)
        self.backend = make_backend(self.target)
        self.seen: dict[str, str] = {}
        self.failed = 0

    # Per SM: shared memory (bytes; 1 KB of it reserved per block), registers, warps, blocks.
    SM_LIMITS = {90: (233472, 65536, 64, 32), 80: (167936, 65536, 64, 32)}

    def occupancy(self, regs: int, smem: int, warps: int) -> int:
        """Blocks per SM the registers, shared memory and warps allow (the CUDA occupancy rules:
        registers are allocated per warp in units of 256, i.e. per thread rounded up to 8)."""
        smem_sm, regs_sm, warps_sm, blocks_sm = self.SM_LIMITS[90 if self.arch >= 90 else 80]
        per_warp = -(-regs * 32 // 256) * 256
        by_regs = regs_sm // (per_warp * warps) if regs else blocks_sm
        return min(by_regs, smem_sm // (smem + 1024), warps_sm // warps, blocks_sm)

    def resources(self, ptx: str) -> tuple[int, str]:
        """(registers, spilled bytes), from ptxas -v on the kernel's PTX (0 / "?" if not printed)."""
        import re
        import subprocess
        import tempfile

        from triton.backends.nvidia.compiler import get_ptxas

        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            arch = f"sm_{self.arch}a" if self.arch >= 90 else f"sm_{self.arch}"
            result = subprocess.run([get_ptxas(self.arch).path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                                    capture_output=True, text=True)
        regs = re.search(r"Used (\d+) registers", result.stderr)
        spills = re.search(r"(\d+) bytes spill stores", result.stderr)
        return int(regs.group(1)) if regs else 0, spills.group(1) if spills else "?"

    def run(self, fn: JITFunction, *args, grid=None, warmup=False, **kwargs):
        key, sig, constexprs, attrs, options = _launch_spec(fn, self.backend, args, kwargs)
        if key in self.seen:
            return None
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                      target=self.target, options=options.__dict__)
            regs, spills = self.resources(compiled.asm["ptx"])
            if os.environ.get("COMPILE_CHECK_DUMP"):  # a folder: each variant's TTGIR and PTX, for reading
                stem = Path(os.environ["COMPILE_CHECK_DUMP"]) / f"{fn.__name__}-{hashlib.sha1(str(key).encode()).hexdigest()[:6]}"
                stem.parent.mkdir(parents=True, exist_ok=True)
                for kind in ("ttgir", "ptx"):
                    stem.with_suffix(f".{kind}").write_text(compiled.asm[kind])
            smem = compiled.metadata.shared
            blocks = self.occupancy(regs, smem, options.num_warps)
            self.seen[key] = f"ok   regs {regs or '?':>3} spill {spills:>4} smem {smem:6d} blocks/SM {blocks}"
        except Exception as err:  # noqa: BLE001 - report every failing variant
            self.failed += 1
            self.seen[key] = f"FAIL {type(err).__name__}: {str(err).splitlines()[-1][:300]}"
            traceback.print_exc(limit=1)
        return None


def exercise(dtypes=(torch.bfloat16, torch.float16, torch.float32), head_dims=(32, 64, 128)) -> None:
    """Run the host code of every mode once (CPU tensors; the launches are intercepted)."""
    from t5core.kernels import decode, fused
    from t5core.kernels.ops import flash_attention, flash_attention_varlen, sparse_attention, transient_global_attention

    torch.manual_seed(0)
    for dtype in dtypes:
        for d in head_dims:
            q, k, v = (torch.randn(2, 4, 300, d, dtype=dtype, requires_grad=True) for _ in range(3))
            table = torch.randn(32, 4, requires_grad=True)
            table16 = torch.randn(32, 4, dtype=torch.bfloat16, requires_grad=True)  # a bf16 model's: bf16 blocks
            kl = torch.tensor([300, 170])
            runs = [
                lambda: flash_attention(q, k, v, table, key_lengths=kl),
                lambda: flash_attention(q, k, v, table, causal=True, bidirectional=False, q_offset=5),
                lambda: flash_attention(q, k, v, None, key_lengths=kl),
                lambda: flash_attention(q, k, v, table16, key_lengths=kl),
                lambda: sparse_attention(q, k, v, table16, pattern="local", local_radius=127, key_lengths=kl),
                lambda: sparse_attention(q, k, v, table, pattern="local", local_radius=127, key_lengths=kl),
                lambda: sparse_attention(q, k, v, None, pattern="local", local_radius=300),
                lambda: sparse_attention(q, k, v, table, pattern="block", block_size=64, num_global=16, key_lengths=kl),
            ]
            for run in runs:
                out = run()
                out.backward(torch.randn_like(out))
            many_chunks(dtype, d)
            side = torch.randn(2, 4, 18, d, dtype=dtype, requires_grad=True)
            block_ids = (torch.arange(300) // 16).clamp_max(17)[None].repeat(2, 1)
            out = transient_global_attention(q, k, v, table, side, side, torch.randn(32, 4, requires_grad=True),
                                             block_ids, local_radius=127, key_lengths=kl)
            out.backward(torch.randn_like(out))
            qv, kv, vv = (torch.randn(300, 4, d, dtype=dtype, requires_grad=True) for _ in range(3))
            cu = torch.tensor([0, 100, 300], dtype=torch.int32)
            out = flash_attention_varlen(qv, kv, vv, table, cu, cu, 200, 200)
            out.backward(torch.randn_like(out))
            cache_q = torch.randn(3, 4, 1, d, dtype=dtype)
            cache_k, cache_v = (torch.randn(3, 4, 700, d, dtype=dtype) for _ in range(2))
            lengths = torch.tensor([700, 5, 300], dtype=torch.int32)
            lut = decode.decode_bias_lut(table.detach())
            decode.decode_attention(cache_q, cache_k, cache_v, lengths, lut, causal=True)
            decode.decode_attention(cache_q, cache_k, cache_v, lengths, None)
        x = torch.randn(7, 768, dtype=dtype)
        fused.rms_norm(x, torch.ones(768, dtype=dtype), 1e-6)
        fused.rms_norm(x, torch.ones(768), 1e-6)
        fused.gated_gelu(x, x)


def many_chunks(dtype, d: int) -> None:
    """`block` split into more chunks than the merge kernel sums at once (a lowered GLOBAL_MIN_CHUNK,
    2100 tokens: 66 chunks), which the short inputs above never reach."""
    from t5core.kernels import flash
    from t5core.kernels.ops import sparse_attention

    saved = flash.GLOBAL_MIN_CHUNK
    flash.GLOBAL_MIN_CHUNK = 32
    try:
        q, k, v = (torch.randn(2, 4, 2100, d, dtype=dtype, requires_grad=True) for _ in range(3))
        out = sparse_attention(q, k, v, torch.randn(32, 4, requires_grad=True), pattern="block", block_size=64,
                               num_global=16)
        out.backward(torch.randn_like(out))
    finally:
        flash.GLOBAL_MIN_CHUNK = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--quick", action="store_true",
                        help="bf16 and fp32 at head dim 64 only: every code path, a fraction of the variants (the test suite)")
    args = parser.parse_args(argv)
    from t5core.kernels import flash
    from t5core.kernels import launch as launch_mod

    launch_mod.JIT_ONLY = True  # every launch through JITFunction.run, which the Compiler replaces
    original_run, original_major = JITFunction.run, flash._capability_major
    failed = 0
    try:
        for arch in args.arch:
            compiler = Compiler(arch)
            JITFunction.run = lambda self, *a, **kw: compiler.run(self, *a, **kw)  # noqa: E731
            flash._capability_major = lambda device, arch=arch: arch // 10  # the tile family of this target
            exercise(dtypes=(torch.bfloat16, torch.float32), head_dims=(64,)) if args.quick else exercise()
            print(f"== sm{arch}: {len(compiler.seen)} variants, {compiler.failed} failed")
            for key, result in sorted(compiler.seen.items()):
                print(f"{result:40s} {key[:400]}")
            failed += compiler.failed
    finally:
        JITFunction.run, flash._capability_major = original_run, original_major
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
