#!/bin/bash
# The last short device call: quick correctness check, then the benchmark (see device_call.sh).
set -u
mkdir -p /tmp/shim/t5core && touch /tmp/shim/t5core/__init__.py && ln -sfn "$PWD/kernels" /tmp/shim/t5core/kernels
export PYTHONPATH=/tmp/shim PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -P bench/final_check.py 2>&1 | tee "$OUT/final_check.txt" | grep -v Warn
python3 -P tools/bench_attention.py "$@" --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.txt" | grep -v '^{'
