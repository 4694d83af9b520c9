#!/usr/bin/env bash
# What a lent GPU (or TPU) runs first: versions, devices, ResNet-20/50 images/s and compile
# times at 1 and 10 steps per call and bf16, checkpoint cost, and two identical runs compared
# bit for bit with and without deterministic ops; one markdown table (benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh                 # on the accelerator; stopped at 8 minutes
#   benchmarks/gpu_check.sh --quick         # tiny sizes: checks the script on any CPU
#
# The table goes to $OUT (default benchmarks/results/gpu_check.md, gpu_check_quick.md with
# --quick) and to stdout. PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
quick=""
for arg in "$@"; do [ "$arg" = "--quick" ] && quick="_quick"; done
OUT=${OUT:-benchmarks/results/gpu_check${quick}.md}
mkdir -p "$(dirname "$OUT")"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 480 "$PY" benchmarks/gpu_check.py "$@" --out "$OUT"
