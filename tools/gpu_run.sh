#!/bin/bash
# The GPU check-and-benchmark, in as few device calls as the limits allow. t5core is not
# installed on the device machine: t5core.weights and t5core.kernels are linked into the
# package folder of the copied tree.
#   STEPS="tests attention model generate" bash tools/gpu_run.sh     # the default steps
#   STEPS="sparse_tests sparse_attention encoder_modes" bash tools/gpu_run.sh
#   AB_FILES="gather=ab/gather.py mma=ab/mma.py" STEPS="ab profile_attention" bash tools/gpu_run.sh
#     # this tree's kernels against candidate kernels/flash.py files, each in a copy of the tree;
#     # tools/ab_files.sh CANDIDATE... writes them under ab/ (git-ignored: carry "ab" in the device call)
#   STEPS="tune attention tests" bash tools/gpu_run.sh   # tile sweep; the later steps run with its best tiles
#   AB_FILES=... STEPS="ab_sparse" bash tools/gpu_run.sh   # sparse modes (SPARSE_AB_ARGS) on this tree and each candidate
#   STEPS="floor" bash tools/gpu_run.sh   # the `local` forward against the floors of its tile schedule
#   STEPS="train" bash tools/gpu_run.sh   # a flan-t5-base training step per attention mode against transformers
#   STEPS="host" bash tools/gpu_run.sh    # host time per attention call (host_overhead.py, custom_op_cost.py)
#   STEPS="ncu" bash tools/gpu_run.sh     # Nsight Compute counters of the attention kernels (NCU_RUNS)
# Outputs (logs, JSON) go under $OUT. Each step has its own time limit (T_<STEP> seconds),
# so one slow or failing step does not stop the others. The GPU test steps are bound by Triton
# compiling kernel variants on the host, so they run in XDIST parallel pytest workers
# (pytest-xdist is on the device image; the H200 machine has 16 cores).
set -u
ln -sfn "$PWD/weights" t5core/weights
ln -sfn "$PWD/kernels" t5core/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 T5CORE_AUTOTUNE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
# The host's speed: small-input model figures (1k tokens x 16) are bound by launches, which vary
# between device hosts; this line tells a slower host from a slower t5core.
python3 -c "
import time, torch
x = torch.zeros(1, device='cuda'); torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5000): x.add_(1)
torch.cuda.synchronize(); print(f'host: {(time.perf_counter() - t) / 5000 * 1e6:.1f} us per torch launch')" | tee -a "$OUT/env.txt"
# Parallel pytest workers where pytest-xdist is installed; one process otherwise.
if python3 -c "import xdist" 2>/dev/null; then PAR="-n ${XDIST:-8}"; else PAR=""; echo "no pytest-xdist: tests run in one process"; fi
variant_tree() {  # /tmp/ab_$1: a copy of this tree with $2 as kernels/flash.py, or a folder's files
  local dir=/tmp/ab_$1  # as kernels/ files (for A/B steps)
  rm -rf "$dir" && mkdir -p "$dir/t5core" && cp -r kernels weights tools tests pyproject.toml "$dir/"
  find t5core -maxdepth 1 -type f -exec cp {} "$dir/t5core/" \;
  if [ -d "$2" ]; then cp "$2"/*.py "$dir/kernels/"; else cp "$2" "$dir/kernels/flash.py"; fi
  ln -sfn "$dir/kernels" "$dir/t5core/kernels"; ln -sfn "$dir/weights" "$dir/t5core/weights"
}
in_candidates() {  # prefix, seconds, command...: a step in each AB_FILES candidate's tree (NAME -> its name)
  local prefix=$1 limit=$2 spec name; shift 2
  for spec in ${AB_FILES:-}; do
    name=${spec%%=*}; variant_tree "$name" "${spec#*=}"
    (cd "/tmp/ab_$name" && PYTHONPATH="/tmp/ab_$name" step "${prefix}_$name" "$limit" "${@//NAME/$name}")
  done
}
step() {  # name, seconds, command...: in its own process group, all of it killed at the limit
  # (a plain `timeout` kills pytest but not its xdist workers, which then run beside the next step)
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  if ! command -v setsid > /dev/null; then  # no util-linux: the old way
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start))s (no setsid: children may outlive the limit)"
    grep -vE '^\{|Warning|warn\(' "$OUT/$name.txt" | tail -${TAIL:-14}
    return
  fi
  setsid "$@" > "$OUT/$name.txt" 2>&1 &
  local pid=$!
  ( sleep "$limit"; kill -TERM -- -"$pid" 2>/dev/null; sleep 5; kill -KILL -- -"$pid" 2>/dev/null ) &
  local watchdog=$!
  wait "$pid"
  local rc=$?
  kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null
  kill -KILL -- -"$pid" 2>/dev/null  # whatever the step left running
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  grep -vE '^\{|Warning|warn\(' "$OUT/$name.txt" | tail -${TAIL:-14}
}
for s in ${STEPS:-tests attention model generate}; do
  case $s in
    tests) step gpu_tests ${T_TESTS:-240} python3 -m pytest -m gpu tests -q -p no:cacheprovider -rs \
             $PAR --durations=12 --ignore=tests/kernels/test_sparse_gpu.py ;;
    model_tests) step model_gpu_tests ${T_MODEL_TESTS:-120} python3 -m pytest -m gpu tests/test_model_gpu.py \
             tests/kernels/test_fused_gpu.py -q -p no:cacheprovider -rs $PAR --durations=5 ;;
    attention) step bench_attention ${T_ATTENTION:-150} python3 tools/bench_attention.py \
             --flex-max-len 16384 --eager-max-len 16384 --out "$OUT/attention.json" \
             ${ATTENTION_LENGTHS:+--lengths $ATTENTION_LENGTHS} ${ATTENTION_PEERS:+--peers $ATTENTION_PEERS} ;;
    model) step bench_model ${T_MODEL:-110} python3 tools/bench_model.py --lengths 1024 8192 16384 131072 \
             --peer-max-length 16384 --basic-max-length 16384 --out "$OUT" ;;
    generate) step bench_generate ${T_GENERATE:-150} python3 tools/bench_generate.py \
             --sizes 1x512,1x8192,1x32768,32x512 --budget-s 120 --out "$OUT" ;;
    train) step bench_train ${T_TRAIN:-250} python3 tools/bench_train.py --out "$OUT" ${TRAIN_ARGS:-}
        in_candidates train ${T_TRAIN:-250} python3 tools/bench_train.py --out "$OUT/train-NAME" ${TRAIN_ARGS:-} ;;
    sparse_tests) step sparse_gpu_tests ${T_SPARSE_TESTS:-300} python3 -m pytest -m gpu \
             tests/kernels/test_sparse_gpu.py -q -p no:cacheprovider -rs $PAR --durations=12 ;;
    sparse_attention) step bench_sparse_attention ${T_SPARSE_ATTENTION:-360} python3 tools/bench_attention.py \
             --sparse --out "$OUT/sparse-attention.json" ;;
    encoder_modes) step bench_encoder_modes ${T_ENCODER_MODES:-560} python3 tools/bench_model.py \
             --encoder-modes ${ENCODER_MODES:-flash,local,block,transient-global} --out "$OUT" \
             ${ENCODER_LENGTHS:+--encoder-lengths $ENCODER_LENGTHS} ;;
    tune) step sweep_tiles ${T_TUNE:-200} python3 tools/sweep_tiles.py --json "$OUT/sweep.json" --pick "$OUT/tiles.env"
          if [ -s "$OUT/tiles.env" ]; then source "$OUT/tiles.env"; cat "$OUT/tiles.env" | tee -a "$OUT/env.txt"; fi ;;
    tune_sparse) for pattern in local block; do fwd_tiles=SWEEP_FWD_${pattern^^}  # SWEEP_FWD_LOCAL, SWEEP_FWD_BLOCK
                   step "sweep_$pattern" ${T_TUNE:-200} python3 tools/sweep_tiles.py --pattern $pattern --lengths 131072 \
                   ${SWEEP_ONLY:+--only $SWEEP_ONLY} ${!fwd_tiles:+--fwd-tiles ${!fwd_tiles}} --json "$OUT/sweep-$pattern.json"
                 done ;;
    tune_side) step sweep_side ${T_TUNE:-200} python3 tools/sweep_tiles.py --pattern transient-global \
                 --lengths ${SIDE_LENGTHS:-131072} --json "$OUT/sweep-side.json" ;;
    ab) step sweep_this ${T_AB:-150} python3 tools/sweep_tiles.py --defaults --json "$OUT/sweep-this.json"
        in_candidates sweep ${T_AB:-150} python3 tools/sweep_tiles.py --defaults --json "$OUT/sweep-NAME.json" ;;
    profile_attention) step profile_attention ${T_PROFILE:-120} python3 tools/profile_attention.py ${PROFILE_ARGS:-}
        in_candidates profile ${T_PROFILE:-120} python3 tools/profile_attention.py ${PROFILE_ARGS:-} ;;
    profile_model) step profile_model ${T_PROFILE_MODEL:-150} python3 tools/profile_model.py ${PROFILE_MODEL_ARGS:-} ;;
    ab_sparse) sparse_args=${SPARSE_AB_ARGS:---sparse-modes dense,transient-global --sparse-lengths 32768,131072}
        step sparse_this ${T_AB:-150} python3 tools/bench_attention.py --sparse --out "$OUT/sparse-this.json" $sparse_args
        in_candidates sparse ${T_AB:-150} python3 tools/bench_attention.py --sparse --out "$OUT/sparse-NAME.json" \
                 $sparse_args ;;
    host) step host_overhead ${T_HOST:-150} python3 tools/host_overhead.py ${HOST_ARGS:-}
          step custom_op_cost ${T_HOST:-150} python3 tools/custom_op_cost.py ${COST_ARGS:-}
          in_candidates host_overhead ${T_HOST:-150} python3 tools/host_overhead.py ${HOST_ARGS:-} ;;
    ncu) ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        mkdir -p /tmp/ncu
        for spec in ${NCU_RUNS:-local:131072 block:131072 dense:32768}; do  # pattern:length, forward+backward
          pattern=${spec%%:*}; length=${spec#*:}
          step "ncu_$pattern" ${T_NCU:-120} "$ncu_bin" --clock-control none --set full \
            -k regex:'^(_fwd_kernel|_bwd_dq_kernel|_bwd_dkdv_kernel)$' --launch-skip 3 --launch-count 3 \
            -o "/tmp/ncu/$pattern" -f python3 tools/ncu_attention.py --pattern "$pattern" --length "$length" --backward
          "$ncu_bin" -i "/tmp/ncu/$pattern.ncu-rep" --page details > "/tmp/ncu/$pattern-details.txt" 2>&1
          "$ncu_bin" -i "/tmp/ncu/$pattern.ncu-rep" --page source --csv --print-source sass \
            > "/tmp/ncu/$pattern-sass.csv" 2>&1
          python3 tools/ncu_summary.py "/tmp/ncu/$pattern-sass.csv" > "/tmp/ncu/$pattern-summary.txt" 2>&1
          grep -E "^  [_a-z]|Duration|Compute \(SM\) Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|L2 Cache Throughput" \
            "/tmp/ncu/$pattern-details.txt" | head -60
        done
        (cd /tmp/ncu && tar czf "$OUT/ncu.tar.gz" ./*.txt ./*.csv) ;;
    floor) step local_floor ${T_FLOOR:-120} python3 tools/local_floor.py --out "$OUT/floor.json" ${FLOOR_ARGS:-} ;;
    ab_pytest) in_candidates pytest ${T_PYTEST:-200} python3 -m pytest -m gpu -q -p no:cacheprovider -rs $PAR \
                 ${PYTEST_ARGS:-tests} ;;
    pytest) step pytest ${T_PYTEST:-200} python3 -m pytest -m gpu -q -p no:cacheprovider -rs $PAR ${PYTEST_ARGS:-tests} ;;
    *) echo "unknown step $s" ;;
  esac
done
