"""The suite as pytest-benchmark tests: ``pytest benchmarks/``, so runs compare with pytest-benchmark's own tools
(``--benchmark-autosave``, ``--benchmark-compare``, ``pytest-benchmark compare``).

On a GPU: the tier-1 rows of lstm_triton and cuDNN in bfloat16, float16 and tf32. pytest-benchmark times
with the host clock, so each timed call ends with ``torch.cuda.synchronize()``: the measured span then
covers the device work (and one sync, ~10 µs, which ``python -m benchmarks`` does not pay). Without a GPU
those skip and a small CPU set runs. Every case passes the float64 gate first; an lstm_triton case that
fails it fails the test.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks import providers, suite
from benchmarks.correctness import ShapeData
from benchmarks.shapes import CPU, MODES, TIER1

pytest.importorskip("pytest_benchmark")

GPU = torch.cuda.is_available()
# Shape-major, so one shape's float64 reference serves all of its cases.
TIER1_CASES = [suite.Case(s, m, d, p) for s in TIER1 for m in s.modes for d in ("bfloat16", "float16", "tf32")
               for p in ("lstm_triton", "cudnn")]
CPU_CASES = [suite.Case(CPU[0], m, "float32", p) for m in MODES for p in ("lstm_triton", "torch_cpu", "naive")]
# A root-level ``pytest`` may have loaded tests/conftest.py, which turns the Triton interpreter on.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _shape_data(shape, device: str) -> ShapeData:
    return ShapeData(shape, device)


def _run(benchmark, case: suite.Case, device: str, rounds: int, warmup: int) -> None:
    with suite.precision(case.dtype):
        try:
            prepared = suite.prepare(case, _shape_data(case.shape, device), with_grads=True, device=device)
        except providers.Skip as e:
            pytest.skip(str(e))
        info = {k: v for k, v in prepared.info.items() if v is not None}
        benchmark.extra_info.update(T=case.shape.T, B=case.shape.B, I=case.shape.I, H=case.shape.H,
                                    mode=case.mode, dtype=case.dtype, provider=case.provider, **info)
        if case.provider == "lstm_triton":
            assert prepared.info["gate_passed"], f"{case.label()}: max_rel_err {prepared.info['max_rel_err']:.2e}"
        step = prepared.step
        if device == "cuda":
            def timed():
                step()
                torch.cuda.synchronize()
        else:
            timed = step
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


@pytest.mark.skipif(not GPU, reason="tier-1 rows need a CUDA GPU")
@pytest.mark.parametrize("case", TIER1_CASES, ids=lambda c: c.label().replace(" ", "-"))
def test_tier1(benchmark, case):
    _run(benchmark, case, "cuda", rounds=100, warmup=10)


@pytest.fixture
def one_thread():
    """One torch thread, as ``python -m benchmarks`` uses on CPU: oversubscribed threads make timings noise."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.skipif(GPU, reason="the CPU set stands in for tier 1 where there is no GPU")
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.label().replace(" ", "-"))
def test_cpu(benchmark, case, one_thread):
    slow = case.provider in providers.SLOW or (INTERPRETED and case.provider == "lstm_triton")
    _run(benchmark, case, "cpu", rounds=3 if slow else 20, warmup=1)
