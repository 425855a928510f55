#!/bin/bash
# Candidate kernels for the A/B steps of tools/gpu_run.sh: writes each candidate's kernels/*.py to
# ab/<name>/ (ignored by git; pass "ab" in the device call's carry) and prints the AB_FILES value
# that names them. A candidate is a branch or a patch (its kernels/ part) against this tree.
#   bash tools/ab_files.sh exp/some-branch some-change.patch
set -eu
mkdir -p ab
spec=""
for candidate in "$@"; do
  name=$(basename "$candidate" .patch)
  rm -rf "ab/$name" && mkdir -p "ab/$name"
  if [ -f "$candidate" ]; then
    patch_file=$(realpath "$candidate")
    scratch=$(mktemp -d) && mkdir "$scratch/kernels" && cp kernels/*.py "$scratch/kernels/"
    (cd "$scratch" && git apply --include='kernels/*' "$patch_file")
    cp "$scratch"/kernels/*.py "ab/$name/" && rm -rf "$scratch"
  else
    for file in $(git ls-tree --name-only "$candidate" kernels/ | grep '\.py$'); do
      git show "$candidate:$file" > "ab/$name/$(basename "$file")"
    done
  fi
  spec="$spec $name=ab/$name"
done
echo "AB_FILES=\"${spec# }\""
