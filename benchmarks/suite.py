"""Running the cases: plan, gate, measure, one row per (shape, mode, dtype, provider).

A case's life: build the provider (weights cast from the shape's float64 data), run the correctness gate
(one call compared with the float64 reference; it is also the call that pays any JIT / compile cost), then
on CUDA measure its memory and, for lstm_triton and cuDNN, count its device operations, then time it.
A case that does not apply, or runs out of memory, becomes a skipped row; one that raises becomes an error
row, and the suite goes on either way.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import providers
from .correctness import GRAD_NAMES, OUTPUT_NAMES, ShapeData, max_rel_err
from .shapes import DTYPES, ERROR_BOUNDS, INTERPRETER, Shape
from .timing import device_ops_per_call, peak_memory_mb, time_calls

REPO_ROOT = Path(__file__).resolve().parent.parent
SLOW_WARMUP = 2  # a slow provider's first calls (compile, build) happen in the gate, before warm-up
INTERPRETER_NOTE = "Triton interpreter: a correctness check; its time says nothing of GPU speed"


@dataclass(frozen=True)
class Case:
    shape: Shape
    mode: str
    dtype: str
    provider: str

    def label(self) -> str:
        return f"{self.shape.id} {self.mode} {self.dtype} {self.provider}"


@dataclass(frozen=True)
class Settings:
    device: str
    reps: int = 100
    warmup: int = 10
    slow_reps: int = 10
    time_budget: Optional[float] = None  # seconds for the whole run; cases not started by then are skipped


def plan(shapes, modes, dtypes, provider_names, slow_shapes: Optional[set[str]] = None) -> list[Case]:
    """The cases in run order: fast providers before slow ones, then dtype by dtype, shape by shape.

    So a time budget that runs out drops the slow providers and the last-listed dtypes first.
    ``slow_shapes`` (shape ids) limits the slow providers; None runs them on every shape.
    """
    cases = [Case(s, m, d, p) for d in dtypes for s in shapes for m in modes if m in s.modes
             for p in provider_names
             if p not in providers.SLOW or slow_shapes is None or s.id in slow_shapes]
    return sorted(cases, key=lambda c: c.provider in providers.SLOW)


@contextmanager
def precision(dtype_name: str):
    """TF32 on for "tf32" rows and off for every other, for both matmuls and cuDNN, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = dtype_name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class ShapeCache:
    """Each shape's data and float64 reference, kept while they fit in a memory cap (least recent goes first).

    Rows run dtype by dtype, so a shape comes back once per dtype; the reference is computed once.
    """

    def __init__(self, device: str):
        self.device = device
        total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 8 * 2**30
        self.cap_bytes = total // 4
        self._entries: OrderedDict[Shape, ShapeData] = OrderedDict()

    def get(self, shape: Shape) -> ShapeData:
        if shape in self._entries:
            self._entries.move_to_end(shape)
            return self._entries[shape]
        data = self._entries[shape] = ShapeData(shape, self.device)
        return data

    def trim(self) -> None:
        while len(self._entries) > 1 and sum(d.nbytes() for d in self._entries.values()) > self.cap_bytes:
            self._entries.popitem(last=False)


@dataclass
class Prepared:
    step: Callable[[], object]  # the timed call: forward (no grad), or forward + backward for every input
    forward: Callable[[], object]  # one forward as the mode runs it (grad enabled in train mode)
    info: dict  # row fields from the provider and the gate


def new_row(case: Case) -> dict:
    s = case.shape
    return {
        "provider": case.provider, "mode": case.mode, "dtype": case.dtype, "shape_id": s.id,
        "T": s.T, "B": s.B, "I": s.I, "H": s.H, "num_layers": 1,
        "status": None, "reason": None, "median_ms": None, "p10_ms": None, "p90_ms": None, "reps": None,
        "max_rel_err": None, "err_tensor": None, "err_bound": ERROR_BOUNDS[case.dtype], "gate_passed": None,
        "gate_T": None, "peak_mem_mb": None, "first_call_s": None,
    }


def prepare(case: Case, data: ShapeData, with_grads: bool, device: str) -> Prepared:
    """Build the provider, gate it against the reference, and return its timed call.

    ``with_grads``: compute the reference's gradients too (when some case of this shape trains), so the
    reference is computed once per shape whatever order the modes come in.
    """
    dtype = DTYPES[case.dtype]
    train = case.mode == "train"
    runner = providers.build(case.provider, case.shape, case.dtype, case.mode, data.weights, device)
    ref = data.reference(with_grads or train)
    gy, gh, gc = (t.to(dtype) for t in data.upstream)

    def leaves(T):
        return [t.to(dtype).requires_grad_(train) for t in (data.x[:T], data.h0, data.c0)]

    def run(x, h0, c0):
        """Outputs, and in train mode the gradients of every input and weight, as the timed call makes them."""
        if not train:
            with torch.no_grad():
                return runner.call(x, h0, c0), ()
        outs = runner.call(x, h0, c0)
        return outs, torch.autograd.grad(outs, [x, h0, c0, *runner.params], (gy[: x.shape[0]], gh, gc))

    info = runner.info  # the provider may fill in fields as it runs (lstm_triton: the kernel path it took)
    if ref is not None:
        start = time.perf_counter()
        outs, grads = run(*leaves(ref.T))
        if device == "cuda":
            torch.cuda.synchronize()
        info["first_call_s"] = time.perf_counter() - start
        results = {**dict(zip(OUTPUT_NAMES, outs)), **dict(zip(GRAD_NAMES, grads))}
        err, where = max_rel_err(results, {**ref.outputs, **(ref.grads if train else {})})
        info.update(max_rel_err=err, err_tensor=where, gate_T=ref.T, gate_passed=err <= ERROR_BOUNDS[case.dtype])
        del outs, grads, results

    x, h0, c0 = leaves(case.shape.T)

    def forward():
        with torch.set_grad_enabled(train):
            return runner.call(x, h0, c0)

    return Prepared(step=lambda: run(x, h0, c0), forward=forward, info=info)


def _classify(ops: int, T: int) -> str:
    # The standard algorithm launches at least one GEMM and one pointwise kernel per step.
    return "persistent" if ops < T / 2 else "standard"


def profile_fields(case: Case, prepared: Prepared) -> dict:
    """Device operations per call; for cuDNN, which algorithm ran (forward, or forward/backward)."""
    total = device_ops_per_call(prepared.step)
    fields = {"device_ops_per_call": total}
    if case.provider != "cudnn":
        return fields
    T, shape = case.shape.T, case.shape
    if case.mode == "forward":
        algo = _classify(total, T) if total is not None else None
    else:
        fwd = device_ops_per_call(prepared.forward)
        algo = f"{_classify(fwd, T)}/{_classify(total - fwd, T)}" if None not in (total, fwd) else None
    if algo is None:
        rule = [providers.cudnn_algorithm_rule(shape, case.dtype, forward=True)]
        if case.mode == "train":
            rule.append(providers.cudnn_algorithm_rule(shape, case.dtype, forward=False))
        algo = "/".join(rule) + " (rule)"
    fields["cudnn_algo"] = algo
    return fields


def run_case(case: Case, data: ShapeData, with_grads: bool, settings: Settings) -> dict:
    row = new_row(case)
    device = settings.device
    prepared = None
    try:
        with precision(case.dtype):
            prepared = prepare(case, data, with_grads, device)
            row.update(prepared.info)
            if device == "cuda":
                row["peak_mem_mb"] = peak_memory_mb(prepared.step)
                if case.provider in ("lstm_triton", "cudnn"):
                    row.update(profile_fields(case, prepared))
            if case.provider in providers.SLOW:
                timing = time_calls(prepared.step, device, settings.slow_reps, min(settings.warmup, SLOW_WARMUP))
            else:
                timing = time_calls(prepared.step, device, settings.reps, settings.warmup)
        row.update(prepared.info)
        row.update(status="ok", median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                   reps=timing.reps)
    except providers.Skip as e:
        row.update(status="skipped", reason=str(e))
    except torch.cuda.OutOfMemoryError:
        row.update(status="skipped", reason="out of GPU memory")
    except Exception as e:  # noqa: BLE001 (one failing case must not stop the suite; the row records it)
        traceback.print_exc(file=sys.stderr)
        row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
    finally:
        del prepared
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def run(cases: list[Case], settings: Settings, on_start=None, on_row=None) -> list[dict]:
    """Every case in order; ``on_start(case)`` before and ``on_row(rows, row)`` after each one."""
    train_shapes = {c.shape for c in cases if c.mode == "train"}
    cache = ShapeCache(settings.device)
    start = time.monotonic()
    rows: list[dict] = []
    for case in cases:
        if on_start:
            on_start(case)
        if settings.time_budget is not None and time.monotonic() - start > settings.time_budget:
            row = new_row(case)
            row.update(status="skipped", reason="time budget (--time-budget) used up")
        else:
            row = run_case(case, cache.get(case.shape), case.shape in train_shapes, settings)
            cache.trim()
        rows.append(row)
        if on_row:
            on_row(rows, row)
    return rows


def interpreter_rows(quick: bool) -> list[dict]:
    """lstm_triton's Triton kernels on CPU through the interpreter: tiny shapes, checked against float64.

    They run in a child process because TRITON_INTERPRET must be set before triton is imported, while this
    process runs lstm_triton's CPU fallback for the timed rows.
    """
    shapes = ["I-persistent"] if quick else ["interp"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "benchmarks", "--device", "cpu", "--shapes", *shapes,
               "--providers", "lstm_triton", "--dtypes", "float32", "--modes", "forward,train",
               "--reps", "1", "--warmup", "0", "--out", tmp, "--no-plot"]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        results = sorted(Path(tmp).glob("*.json"))
        if not results:
            tail = (proc.stderr or proc.stdout)[-500:]
            row = new_row(Case(INTERPRETER[0], "forward", "float32", "lstm_triton"))
            row.update(status="error", reason=f"interpreter run wrote no results (exit {proc.returncode}): {tail}")
            return [row]
        rows = json.loads(results[0].read_text())["rows"]
    for row in rows:
        row["note"] = INTERPRETER_NOTE
    return rows

