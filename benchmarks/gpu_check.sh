#!/usr/bin/env bash
# Every GPU check in one command (see benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# reference data carried into the checkout (a lent machine gets only the working tree)
if [[ -z "${SPHERE_FAST_REFERENCE:-}" && -d .reference ]]; then
  export SPHERE_FAST_REFERENCE="$PWD/.reference"
fi
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
