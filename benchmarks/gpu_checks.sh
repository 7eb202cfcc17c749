#!/usr/bin/env bash
# The GPU tests one file at a time, each under its own time limit, with a log per file and a
# one-line verdict each: a hang or a slow file then costs only its own budget (the device
# tool's calls are capped at 10 minutes). Run from the repo root after the TE install:
#   bash benchmarks/gpu_checks.sh [OUT_DIR] [FILE ...]     (default: every tests/gpu file)
# Two-GPU files skip themselves on one GPU.
set -u
out=${1:-${OUT:-/tmp/gpu_checks}}
shift || true
mkdir -p "$out"
export PYTHONPATH=$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=disabled
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(tests/gpu/test_*.py)
limit=${GPU_CHECK_LIMIT:-300}
# multi-process tests (testing/distributed.py): each rank dumps its Python stacks and exits
# shortly before the limit, so a hang names the collective it waits in
export MEGATRON_LATENT_HANG_DUMP_S=${MEGATRON_LATENT_HANG_DUMP_S:-$(( limit > 60 ? limit - 30 : limit ))}
for f in "${files[@]}"; do
  name=$(basename "$f" .py)
  start=$(date +%s)
  timeout -k 15 -s INT "$limit" python3 -m pytest -p no:cacheprovider -q -s "$f" >"$out/$name.log" 2>&1
  rc=$?
  verdict=$(grep -E "^[0-9]+ (passed|failed|skipped)|passed|failed" "$out/$name.log" | tail -1)
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  echo "$name: rc=$rc $(( $(date +%s) - start ))s ${verdict}"
done
