"""Every Triton kernel variant t5core launches compiles for sm90 (tools/compile_check.py --quick).

The interpreter tests run the kernels' arithmetic but not Triton's compiler, which rejects
things the interpreter accepts (a variable given different types in the two branches of an
`if`, for one). This compiles each launch of every attention mode to a cubin, without a GPU,
in a subprocess (this test process runs Triton in interpreter mode).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[2]


def test_every_launched_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py"), "--arch", "90", "--quick"],
                            capture_output=True, text=True, env=env, timeout=1800)
    summary = [line for line in result.stdout.splitlines() if line.startswith("==") or line.startswith("FAIL")]
    assert result.returncode == 0, "\n".join(summary) + "\n" + result.stderr[-3000:]
    assert summary and "0 failed" in summary[0] and " 0 variants" not in summary[0], summary


def test_occupancy_follows_the_cuda_rules():
    """Blocks per SM from registers, shared memory and warps (sm90), the figures docs/kernels.md cites:
    the forward with the bias (140 registers, 64 KB) fits 3 blocks, without it (128, 56 KB) 4."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import compile_check as c; o = c.Compiler(90).occupancy; "
            "print(o(140, 65536, 4), o(128, 57344, 4), o(255, 57856, 4), o(117, 49152, 4), o(0, 0, 8), o(64, 0, 4))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=ROOT / "tools", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # regs: 140 -> 3 (smem 64 KB also 3); 128 regs x 128 threads = 64 K -> 4 and 4 x 57 KB fit 228 KB;
    # 255 -> 2; 117 with 48 KB -> 4; no registers or smem: 64 warps / 8 = 8; 64 regs x 128 threads: 8
    assert result.stdout.split() == ["3", "4", "2", "4", "8", "8"]
