#!/bin/bash
# One device call: GPU kernel tests, an optional tile sweep, and the benchmark.
# Usage (on the GPU machine, from the repo root; outputs under $OUT):
#   TESTS=tests/kernels/test_flash_gpu.py SWEEP=1 BENCH=0 bash bench/device_call.sh [bench args...]
# t5core is not installed there: a shim package maps t5core.kernels to ./kernels.
set -u
mkdir -p /tmp/shim/t5core && touch /tmp/shim/t5core/__init__.py && ln -sfn "$PWD/kernels" /tmp/shim/t5core/kernels
export PYTHONPATH=/tmp/shim PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
TESTS=${TESTS:-tests/kernels/test_flash_gpu.py}
if [ "$TESTS" != none ]; then
  T5CORE_AUTOTUNE=0 python3 -P -m pytest -m gpu $TESTS -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
fi
if [ "${SWEEP:-0}" = 1 ]; then
  python3 -P bench/sweep_tiles.py --lengths ${SWEEP_LENGTHS:-4096,16384} --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt" | grep -v Warning
fi
if [ "${BENCH:-1}" = 1 ]; then
  python3 -P tools/bench_attention.py "$@" --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.txt" | grep -v '^{'
fi
