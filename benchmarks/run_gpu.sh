#!/usr/bin/env bash
# The GPU job: one command, in value order, inside about 8 minutes of an H100/H200.
#
#   benchmarks/run_gpu.sh OUT_DIR              on a machine with a CUDA GPU (installs nothing, needs no network)
#   benchmarks/run_gpu.sh --rehearse OUT_DIR   the same stages on a CPU, through Triton's interpreter (< 3 min)
#
# Stages, each writing under OUT_DIR as it goes (a run cut short keeps what it finished):
#   a. env.txt          GPU, driver, Python, torch, triton, numpy, CUDA, cuDNN; gcc and Python.h (triton builds
#                       its launcher with the C compiler)
#   b. smoke/           every kernel path once, forward and backward vs float64, short watchdog (≤ 90 s)
#   c. bench-core/      F1, L3-b16, M1, L2, X1 in bf16 and fp16, forward and train, lstm_triton and cuDNN
#   d. tests.log        the whole test suite, never -x, stopped by SIGINT at its time limit so that pytest still
#                       prints its summary (-rfE --durations=20)
#   e. bench-rest-*/    the remaining tier-1 rows (the other shapes, tf32 and fp32, the naive loop on F1) while
#                       time is left
# Every benchmark row prints a line when it starts and when it ends. Exit status 0 if every stage passed.
set -u -o pipefail

REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--rehearse] OUT_DIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL_S=${TOTAL_S:-480}          # the whole job
SMOKE_S=${SMOKE_S:-90}
CORE_S=${CORE_S:-150}            # benchmark time budget of stage c (rows not started in time are skipped)
TESTS_S=${TESTS_S:-150}
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$REHEARSE" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_DEVICE=(--device cpu --reps 1 --warmup 0 --slow-reps 1 --no-plot)
  CORE_ROWS=(--shapes I-persistent --dtypes float32 --providers lstm_triton,torch_cpu)
  REST_ROWS=("--shapes I-stepwise --dtypes float32 --providers lstm_triton,naive --modes forward")
  TEST_ARGS=(tests/test_reference.py tests/test_per_call_work.py -k "stepwise or reference")
else
  unset TRITON_INTERPRET  # the GPU runs the compiled kernels
  BENCH_DEVICE=()
  CORE_ROWS=(--shapes F1 L3-b16 M1 L2 X1 --dtypes bfloat16,float16 --providers lstm_triton,cudnn)
  REST_ROWS=("--shapes L1-b1 L1-b4 L3-b32 M2 --dtypes bfloat16,float16 --providers lstm_triton,cudnn"
             "--shapes tier1 --dtypes tf32,float32 --providers lstm_triton,cudnn"
             "--shapes F1 --dtypes bfloat16 --providers naive")
  TEST_ARGS=(tests)
fi
left() { echo $((TOTAL_S - SECONDS)); }
stage() { echo; echo "== stage $1 ($(left) s left): $2"; }
status=0

stage a "environment > $OUT/env.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "mode: $([ "$REHEARSE" = 1 ] && echo 'CPU rehearsal (TRITON_INTERPRET=1)' || echo GPU)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  echo "gcc: $(gcc --version 2>/dev/null | head -n 1 || echo missing)"
  "$PY" - <<'PYEOF'
import importlib.util
import os
import platform
import sysconfig

import numpy
import torch
import triton

print("python", platform.python_version())
include = sysconfig.get_paths()["include"]
print("Python.h", "present" if os.path.exists(os.path.join(include, "Python.h")) else f"MISSING in {include}")
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
print("triton", triton.__version__, "| numpy", numpy.__version__)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, f"| sm_{props.major}{props.minor} | {props.multi_processor_count} SMs |",
          f"{props.total_memory / 2**30:.0f} GiB")
else:
    print("gpu none visible to torch")
for name in ("pytest", "hypothesis", "matplotlib", "tqdm", "pytest_benchmark", "flashrnn"):
    print(name, "installed" if importlib.util.find_spec(name) else "missing")
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage b "smoke test of every kernel path > $OUT/smoke/"
timeout -s INT "$SMOKE_S" "$PY" -m benchmarks.gpu_smoke --out "$OUT/smoke" $([ "$REHEARSE" = 1 ] && echo --rehearse) \
  2>&1 | tee "$OUT/smoke.log"
rc=$?; echo "smoke exit status: $rc (124: stopped at its time limit)"; [ "$rc" -eq 0 ] || status=1

stage c "core benchmark rows > $OUT/bench-core/"
"$PY" -m benchmarks "${BENCH_DEVICE[@]}" "${CORE_ROWS[@]}" --out "$OUT/bench-core" --time-budget "$CORE_S" \
  2>&1 | tee "$OUT/bench-core.log"
rc=$?; echo "core benchmark exit status: $rc"; [ "$rc" -eq 0 ] || status=1

budget=$(( $(left) - 120 )); [ "$budget" -lt "$TESTS_S" ] && [ "$budget" -gt 30 ] && TESTS_S=$budget
stage d "test suite (at most ${TESTS_S} s) > $OUT/tests.log"
timeout -s INT "$TESTS_S" "$PY" -m pytest "${TEST_ARGS[@]}" -q -rfE --durations=20 -p no:cacheprovider \
  > "$OUT/tests.log" 2>&1
rc=$?; tail -n 15 "$OUT/tests.log"; echo "pytest exit status: $rc (124: stopped at its time limit)"
[ "$rc" -eq 0 ] || status=1

i=0
for rows in "${REST_ROWS[@]}"; do
  i=$((i + 1))
  budget=$(( $(left) - 30 ))
  if [ "$budget" -lt 20 ]; then echo "stage e: no time left for: $rows"; continue; fi
  stage e "remaining rows ($rows; ${budget} s) > $OUT/bench-rest-$i/"
  # shellcheck disable=SC2086  # $rows is a list of arguments
  "$PY" -m benchmarks "${BENCH_DEVICE[@]}" $rows --out "$OUT/bench-rest-$i" --time-budget "$budget" \
    2>&1 | tee "$OUT/bench-rest-$i.log"
  rc=$?; echo "benchmark exit status: $rc"; [ "$rc" -eq 0 ] || status=1
done
echo
echo "== done in ${SECONDS} s, exit status $status"
exit $status
