#!/usr/bin/env bash
# The GPU verification kit, benchmarks/gpu_check.py, as a lent GPU machine runs it: `python3` there is
# the Python that holds its CUDA torch; the JSON goes to $OUT. Arguments pass through
# (--parts d,e to rerun some parts, --deadline SECONDS, --dry-run --out DIR on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
