#!/bin/bash
# Candidate kernels for the A/B steps of tools/gpu_run.sh: writes each branch's kernels/flash.py
# to ab/<branch name>.py (ignored by git; pass "ab" in the device call's carry) and prints the
# AB_FILES value that names them.
#   bash tools/ab_files.sh exp/dq-gather-segments exp/near-bias-mma
set -eu
mkdir -p ab
spec=""
for branch in "$@"; do
  name=$(basename "$branch")
  git show "$branch:kernels/flash.py" > "ab/$name.py"
  spec="$spec $name=ab/$name.py"
done
echo "AB_FILES=\"${spec# }\""
