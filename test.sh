#!/usr/bin/env bash
# Install lstm_triton with its test extra into a virtual environment (created if missing) and run the test suite.
# Without a CUDA GPU the Triton kernels run through Triton's CPU interpreter (tests/conftest.py sets it up).
#
#   ./test.sh [pytest arguments]             Python 3.11, torch 2.13.0, the newest triton setup.py admits (.venv)
#   STACK=gpu ./test.sh [pytest arguments]   the GPU machines' stack: Python 3.12, torch 2.11.0, triton 3.6.0,
#                                            numpy 2.5.2 (.venv-gpu-stack; Python 3.12 from pyenv if present)
set -euo pipefail
cd "$(dirname "$0")"
case "${STACK:-current}" in
  current)
    VENV=.venv
    PY=python3
    PINS=("torch==2.13.0") ;;
  gpu)
    VENV=.venv-gpu-stack
    PY=$( (PYENV_VERSION=3.12.1 pyenv which python3.12) 2>/dev/null || command -v python3.12)
    PINS=("torch==2.11.0" "triton==3.6.0" "numpy==2.5.2") ;;
  *)
    echo "STACK must be current or gpu, got ${STACK}" >&2
    exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The pinned stack first (an existing CUDA build of the current stack's torch is kept), then this package.
if [ "${STACK:-current}" = gpu ] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "test.sh: $("$VENV/bin/python" -c 'import platform, numpy, torch, triton; print(f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")')"
exec "$VENV/bin/python" -m pytest tests -q "$@"
