#!/usr/bin/env bash
# One GPU run in one command: environment report, the test suite, the tier-1 benchmark.
#
#   benchmarks/run_gpu.sh OUT_DIR
#
# Installs nothing and needs no network. Writes OUT_DIR/env.txt, OUT_DIR/tests.log, OUT_DIR/bench.log and
# the benchmark's <device>-<date>.json/.csv/.png. Fits in about 9 minutes on an H100: the tests get at most
# TESTS_MAX_S (240 s), the benchmark what is left of TOTAL_S (510 s) less a margin for its last row and
# the plot. Rows it cannot start in time are recorded as skipped; fast providers (lstm_triton, cuDNN)
# run before slow ones and dtypes in the order bfloat16, float16, tf32, float32, so the cut drops the
# least important rows. The slow providers (naive: ~150 ms per forward at T=1024; torch_compile: a compile
# per row) run on F1 only. Exit status: 0 if both the tests and the benchmark passed.
set -u -o pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL_S=${TOTAL_S:-510}
TESTS_MAX_S=${TESTS_MAX_S:-240}
BENCH_MARGIN_S=45

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # the logs show each row as it finishes
unset TRITON_INTERPRET  # the GPU runs the compiled kernels

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import importlib.util
import platform

import torch
import triton

print("python", platform.python_version())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
print("triton", triton.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")
for name in ("matplotlib", "tqdm", "pytest_benchmark", "flashrnn"):
    print(name, "installed" if importlib.util.find_spec(name) else "missing")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== pytest tests/ -x -q (at most ${TESTS_MAX_S}s) > $OUT/tests.log"
timeout "$TESTS_MAX_S" "$PY" -m pytest tests/ -x -q > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -n 5 "$OUT/tests.log"
echo "pytest exit status: $tests_rc (124: stopped at the time limit)"

budget=$((TOTAL_S - SECONDS - BENCH_MARGIN_S))
if [ "$budget" -lt 30 ]; then budget=30; fi
echo "== python -m benchmarks (tier 1, time budget ${budget}s) > $OUT/bench.log"
"$PY" -m benchmarks --out "$OUT" --time-budget "$budget" --slow-shapes F1 2>&1 | tee "$OUT/bench.log"
bench_rc=$?
echo "benchmark exit status: $bench_rc; total ${SECONDS}s"

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
