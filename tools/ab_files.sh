#!/bin/bash
# Candidate kernels for the A/B steps of tools/gpu_run.sh: writes each candidate's kernels/flash.py
# to ab/<name>.py (ignored by git; pass "ab" in the device call's carry) and prints the AB_FILES
# value that names them. A candidate is a branch or a patch of kernels/flash.py against this tree.
#   bash tools/ab_files.sh exp/some-branch some-change.patch
set -eu
mkdir -p ab
spec=""
for candidate in "$@"; do
  case $candidate in *-tests.patch) continue ;; esac  # a candidate's test changes, not kernels
  name=$(basename "$candidate" .patch)
  if [ -f "$candidate" ]; then
    patch --quiet -o "ab/$name.py" kernels/flash.py "$candidate"
  else
    git show "$candidate:kernels/flash.py" > "ab/$name.py"
  fi
  spec="$spec $name=ab/$name.py"
done
echo "AB_FILES=\"${spec# }\""
