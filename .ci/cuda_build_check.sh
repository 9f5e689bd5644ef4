#!/usr/bin/env bash
# Compile check of the full CUDA extensions (bindings + kernels, sm_90a) against the CUDA torch that lies
# on this machine's disk, in a venv of its own so the CPU torch of the test suite stays untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SPHERE_FAST_CUDA_VENV:-/tmp/sphere_fast_cuda_venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.14.1 ninja numpy
"$venv/bin/pip" install -q --no-deps -e .
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "CUDA_HOME=$CUDA_HOME holds no bin/nvcc: set CUDA_HOME to the CUDA toolkit folder" >&2; exit 1; }
export TORCH_CUDA_ARCH_LIST=9.0a CPATH="$site/nvidia/cu13/include" MAX_JOBS=2
export TORCH_EXTENSIONS_DIR=$(mktemp -d)
"$venv/bin/python" .ci/cuda_build_check.py
