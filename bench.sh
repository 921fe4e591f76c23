#!/usr/bin/env bash
# Install lstm_triton with its benchmark extra into ./.venv (created if missing) and run the benchmark:
# lstm_triton vs cuDNN (torch.nn.LSTM) vs the naive reference on a CUDA GPU; on a machine without one it
# says so and runs the small CPU comparison. Extra arguments go to `python -m benchmarks` (see --help).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[bench]"
exec .venv/bin/python -m benchmarks "$@"
