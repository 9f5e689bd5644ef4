#!/usr/bin/env bash
# Every GPU check in one command (see benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
