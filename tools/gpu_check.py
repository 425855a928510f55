"""GPU check in one device call: the GPU kernel tests, then the attention benchmark.

    python tools/gpu_check.py [bench_attention args...]

Runs `pytest -m gpu tests/kernels -q` first (its result does not stop the benchmark), then
tools/bench_attention.py with the given arguments. Exit status: the tests' status.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    # Tests use each kernel's default tile (one compile per variant); the benchmark autotunes.
    tests = subprocess.run([sys.executable, "-P", "-m", "pytest", "-m", "gpu", "tests/kernels", "-q", "-x",
                            "-p", "no:cacheprovider"], cwd=ROOT,
                           env={**os.environ, "T5CORE_AUTOTUNE": "0"})
    subprocess.run([sys.executable, "-P", str(ROOT / "tools" / "bench_attention.py"), *sys.argv[1:]], cwd=ROOT)
    sys.exit(tests.returncode)


if __name__ == "__main__":
    main()
