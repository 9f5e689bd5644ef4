#!/usr/bin/env bash
# The test suite under the oldest torch setup.py accepts (the GPU machine's torch), in a venv of its own, with
# the GPU machine's Python (3.12) where this machine has it (SPHERE_FAST_FLOOR_PYTHON picks another): finds
# uses of torch and Python APIs the GPU machine lacks before a GPU lease does. PyPI's wheel of that torch is a
# CUDA build (about 5 GB with its CUDA libraries, from PyPI); without a GPU it runs the suite's CPU paths, like
# the CPU wheel. Not part of .ci/run (the download and a second suite run); run it after changing how torch is
# used.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' setup.py)
[ -n "$floor" ] || { echo "setup.py names no torch>= floor" >&2; exit 1; }
python=${SPHERE_FAST_FLOOR_PYTHON:-}
if [ -z "$python" ]; then
  if python3.12 -c "" 2>/dev/null; then python=python3.12
  elif command -v pyenv >/dev/null && prefix=$(pyenv prefix 3.12 2>/dev/null); then python=$prefix/bin/python
  else python=python3
  fi
fi
version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
venv=${SPHERE_FAST_FLOOR_VENV:-/tmp/sphere_fast_torch_floor_venv_py$version}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q "torch==$floor.0"
"$venv/bin/pip" install -q -e ".[test]"
"$venv/bin/python" -c "import torch; print('torch', torch.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
