"""How one call is timed, and what else is measured about it (memory, device kernels per call).

On CUDA every rep is bracketed by CUDA events and preceded by a write of 256 MB, which evicts the 50 MB L2
(as ``triton.testing.do_bench`` does): a layer's weights are not L2-resident when a real network reaches it.
The time between the events includes any gap the host leaves, so launch-bound providers pay for their
launches. On CPU each rep is timed with ``time.perf_counter``. Inputs are built before, never inside.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    return Timing(percentile(samples_ms, 50), percentile(samples_ms, 10), percentile(samples_ms, 90), len(samples_ms))


def time_calls(fn: Callable[[], object], device: str, reps: int, warmup: int) -> Timing:
    """Median and p10/p90 of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return summarize(samples)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) for start, end in zip(starts, ends)])


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """MiB that one call allocates at its peak on the GPU, above what was allocated before it.

    Inputs, weights and the harness's own tensors are excluded, so providers compare by what the call
    itself needs: activations saved for backward, workspaces, outputs and gradients.
    """
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def device_ops_per_call(fn: Callable[[], object]) -> Optional[int]:
    """How many device operations (kernels, memsets, copies) one call runs: lstm_triton's per-call counter
    (:func:`lstm_triton.profiling.call_work`, the one the tests assert on). It tells a persistent kernel (a
    handful per call) from a per-step one (at least one per step). None if the profiler cannot run here."""
    from lstm_triton.profiling import call_work

    try:
        return call_work(fn).device_ops
    except (RuntimeError, AttributeError):
        return None
