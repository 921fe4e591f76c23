"""What one call costs the host: operators, kernel launches, weight-sized copies and host syncs.

:func:`call_work` runs a function once under ``torch.profiler`` and counts what a GPU would pay for on every
call besides the kernels' own work. The tests assert on it (nothing grows with the sequence length on the
persistent and cooperative paths, no weight copy, no sync) and the benchmark reports it per row.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["CallWork", "call_work"]

# Operators that copy their input into new memory; one counts once, however it is nested (contiguous → clone →
# copy_ is one copy).
COPY_OPS = frozenset({
    "aten::copy_", "aten::clone", "aten::_to_copy", "aten::to", "aten::contiguous", "aten::cat", "aten::stack",
    "aten::index_select", "aten::gather", "aten::repeat", "aten::reshape", "aten::flip",
})
_MAYBE_COPY = frozenset({"aten::to", "aten::contiguous", "aten::reshape"})
# Operators and runtime calls that wait for the device (or read a device value back to the host).
SYNC_EVENTS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "cudaStreamSynchronize",
    "cudaDeviceSynchronize", "cudaEventSynchronize", "hipStreamSynchronize", "hipDeviceSynchronize",
})


@dataclass(frozen=True)
class CallWork:
    aten_ops: int  # aten:: operators run on the host, at any depth (inside lstm_triton's custom ops too), but
    # not inside a Triton launch (under the interpreter the kernel itself runs as tensor operations)
    kernel_launches: int  # Triton kernel launches (on the GPU, or through the interpreter)
    weight_copies: int  # copies of a tensor the size of one of the given weights (or of two stacked)
    host_syncs: int  # operators / runtime calls that wait for the device
    device_ops: Optional[int]  # kernels, copies and memsets the GPU ran (None without CUDA)


@contextlib.contextmanager
def _counting_triton_launches():
    """Count every Triton kernel launch (JITFunction.run on a GPU, InterpretedFunction.run in the interpreter)
    without changing what it does."""
    from triton.runtime import interpreter, jit

    count = [0]

    def counted(real):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup", False):
                return real(self, *args, **kwargs)
            count[0] += 1
            with torch.profiler.record_function(_LAUNCH):  # the interpreter's own tensor work is the kernel's
                return real(self, *args, **kwargs)
        return run

    with mock.patch.object(jit.JITFunction, "run", counted(jit.JITFunction.run)), \
            mock.patch.object(interpreter.InterpretedFunction, "run", counted(interpreter.InterpretedFunction.run)):
        yield count


def call_work(fn: Callable[[], object], weights: Iterable[torch.Tensor] = ()) -> CallWork:
    """Run ``fn()`` once and count its host work (see :class:`CallWork`); ``weights``: the tensors whose size
    makes a copy "weight-sized" (a copy of one, or of two stacked). Run it once before, so that compilation and caches are not counted."""
    # A weight's numel, or two directions' worth of it: a copy of a weight, or of weights stacked into one tensor.
    sizes = {k * w.numel() for w in weights for k in (1, 2)}
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _counting_triton_launches() as launches, profile(activities=activities, record_shapes=True) as prof:
        fn()
        if cuda:
            with torch.profiler.record_function(_FLUSH):  # the profiler's own wait: not the call's
                torch.cuda.synchronize()
    events = [e for e in prof.events() if not _under(e, _FLUSH) and not _under(e.cpu_parent, _LAUNCH)]
    aten = [e for e in events if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU]

    def copies(e) -> bool:  # to / contiguous / reshape copy only when they must: then a copy runs inside
        return e.name in COPY_OPS and (e.name not in _MAYBE_COPY or any(copies(c) for c in e.cpu_children))

    def is_weight_copy(e) -> bool:
        if not copies(e) or (e.cpu_parent is not None and e.cpu_parent.name in COPY_OPS):
            return False
        return any(_numel(s) in sizes for s in (e.input_shapes or []))

    device_ops = None
    if cuda:
        device_ops = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return CallWork(
        aten_ops=len(aten),
        kernel_launches=launches[0],
        weight_copies=sum(1 for e in aten if is_weight_copy(e)),
        host_syncs=sum(1 for e in events if e.name in SYNC_EVENTS),
        device_ops=device_ops,
    )


_FLUSH = "lstm_triton.call_work.flush"
_LAUNCH = "lstm_triton.call_work.triton_launch"


def _numel(shape) -> int:
    """Elements of a recorded input shape (a list of sizes; a tensor list's shapes are summed); 0 for a scalar."""
    if not isinstance(shape, (list, tuple)) or not shape:
        return 0
    if all(isinstance(s, (list, tuple)) for s in shape):
        return sum(_numel(s) for s in shape)
    n = 1
    for size in shape:
        n *= int(size)
    return n


def _under(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False
