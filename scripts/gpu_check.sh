#!/usr/bin/env bash
# The GPU run kit (issue 30): scripts/gpu_kit.py does the work; its docstring and
# docs/benchmarks.md#gpu say what each mode does.
#
#   bash scripts/gpu_check.sh --prepare   # here, once per change: builds build/gpu-kit/ (~1-3 min)
#   bash scripts/gpu_check.sh --dry-run --out DIR   # here: every step on the CPU, < 3 min
#   bash scripts/gpu_check.sh             # on the GPU machine: gpu-run.json and logs in $OUT
#
# The device call (the run tool), after --prepare:
#   run(command="bash scripts/gpu_check.sh", carry=["build/gpu-kit"], timeout_s=600)
# It needs the GPU image's python3 with torch and CUDA; the rest travels in build/gpu-kit/.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$python" scripts/gpu_kit.py "$@"
