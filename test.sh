#!/usr/bin/env bash
# Install lstm_triton with its test extra into ./.venv (created if missing) and run the test suite.
# Without a CUDA GPU the Triton kernels run through Triton's CPU interpreter (tests/conftest.py sets it up).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: 2.13.0 is what the suite is pinned to on CPU machines; an existing CUDA build is kept.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest tests -q "$@"
