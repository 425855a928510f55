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
