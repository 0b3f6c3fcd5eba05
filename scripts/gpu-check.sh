#!/usr/bin/env bash
# The one command for a lent GPU (issue 35; docs/benchmarks.md, "GPU run"):
#   bash scripts/gpu-check.sh [--dry-run] [--part A|B|all] [--only NAME,...]
# Part A: facts, CUDA tests, decoding benches (eager vs compiled backends, default and BLT-1B-shaped
# models), an HBM roofline, transformers' generate, train-bench. Part B: the default model's shape
# trained on the carried code corpus, checkpoint split to <= 15 MiB files. Everything lands under
# $OUT (./out-gpu-dry when unset): results.json, summary.md, steps.log, artifacts.tar.gz (+ part B's
# model pieces). --dry-run: tiny sizes on the CPU, seconds (CI runs it: tests/scripts/test_gpu_check.py).
# No `set -e`: the driver records a failed step and goes on; its own exit status says whether any failed.
set -u
cd "$(dirname "$0")/.." || exit 2
export OUT="${OUT:-$PWD/out-gpu-dry}"
# Python holds its output back otherwise, and the device tool returns only the output's tail
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py --out "$OUT" "$@"
