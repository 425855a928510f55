#!/bin/bash
# The whole GPU check-and-benchmark in one device call (t5core is not installed there:
# t5core.weights and t5core.kernels are linked into the package folder of the copied tree).
#   bash tools/gpu_run.sh            # outputs under $OUT: logs and JSON
# Each step has its own time limit, so one slow or failing step does not stop the others.
set -u
ln -sfn "$PWD/weights" t5core/weights
ln -sfn "$PWD/kernels" t5core/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 T5CORE_AUTOTUNE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start))s"
  grep -vE '^\{|Warning|warn\(' "$OUT/$name.txt" | tail -${TAIL:-14}
}
step gpu_tests ${T_TESTS:-170} python3 -m pytest -m gpu tests -q -p no:cacheprovider -rs
step bench_attention ${T_ATTN:-150} python3 tools/bench_attention.py --flex-max-len 16384 --eager-max-len 16384 --out "$OUT/attention.json"
step bench_model ${T_MODEL:-110} python3 tools/bench_model.py --lengths 1024 8192 16384 131072 --peer-max-length 16384 --basic-max-length 16384 --out "$OUT"
step bench_generate ${T_GEN:-150} python3 tools/bench_generate.py --sizes 1x512,1x32768,32x512 --budget-s 120 --out "$OUT"
