#!/usr/bin/env bash
# The test suite under the oldest torch setup.py accepts (the GPU machine's torch), in a venv of its own: finds
# uses of torch APIs newer than the floor before a GPU lease does. PyPI's wheel of that torch is a CUDA build
# (about 5 GB with its CUDA libraries, from PyPI); without a GPU it runs the suite's CPU paths, like the CPU
# wheel. Not part of .ci/run (the download and a second suite run); run it after changing how torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' setup.py)
[ -n "$floor" ] || { echo "setup.py names no torch>= floor" >&2; exit 1; }
venv=${SPHERE_FAST_FLOOR_VENV:-/tmp/sphere_fast_torch_floor_venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==$floor.0"
"$venv/bin/pip" install -q -e ".[test]"
"$venv/bin/python" -c "import torch; print('torch', torch.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
