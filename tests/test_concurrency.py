"""Concurrency: calls from several threads at once share no scratch buffer.

One model, two threads, each running forward + backward on its own input: every result equals the
single-threaded one bitwise, on the persistent and the stepwise path (under the interpreter, with each kernel
launch serialised and everything else interleaving). On a GPU instead (skipped without one): two threads on two
CUDA streams, on the persistent, cooperative and stepwise paths.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from unittest import mock

import pytest
import torch

import lstm_triton
from helpers import CUDA, F64, bitwise_equal, forward_backward, needs_cuda
from lstm_triton.kernels import plan_lstm


@contextlib.contextmanager
def serialized_interpreter_launches():
    """Triton's interpreter keeps the running program's grid index and its patch of triton.language in module
    globals, so two interpreted launches must not overlap (they do not on a GPU). Serialise each launch and
    nothing else: the library's Python code, its allocations, the stepwise path's per-step loop and the
    autograd engine still interleave between threads. Yields the thread id of every launch, in order."""
    from triton.runtime import interpreter

    lock = threading.Lock()
    order = []
    original = interpreter.GridExecutor.__call__

    def locked(self, *args, **kwargs):
        with lock:
            order.append(threading.get_ident())
            return original(self, *args, **kwargs)

    with mock.patch.object(interpreter.GridExecutor, "__call__", locked):
        yield order


def _thread_work(model, x, stream=None):
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        leaves = [x.clone().requires_grad_()]
        outs, grads = forward_backward(model, leaves, lambda ls: (ls[0], None))
    if stream is not None:
        stream.synchronize()
    return outs + grads


def _run_in_threads(work, n=2, repeats=2):
    results, errors = {}, []
    barrier = threading.Barrier(n)

    def target(i):
        try:
            barrier.wait()
            results[i] = [work(i) for _ in range(repeats)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.mark.skipif(CUDA, reason="the GPU variant runs the threads on two CUDA streams")
@pytest.mark.parametrize("hidden,bidirectional", [(6, True), (40, False)], ids=["persistent", "stepwise"])
def test_two_threads_at_once_on_cpu(hidden, bidirectional):
    """One model, two threads, each running forward + backward on its own input (twice): every result equals
    the single-threaded one bitwise, i.e. the calls share no scratch buffer. H = 40 in float64 takes the
    stepwise path, whose per-step launches interleave between the threads."""
    torch.manual_seed(0)
    model = lstm_triton.LSTM(3, hidden, num_layers=2, bidirectional=bidirectional).double()
    if hidden == 40:
        assert plan_lstm(2, hidden, F64).path == "stepwise"
    xs = [torch.randn(3, 2, 3, dtype=F64) * (i + 1) for i in range(2)]
    expected = [_thread_work(model, x) for x in xs]
    with serialized_interpreter_launches() as order:
        results = _run_in_threads(lambda i: _thread_work(model, xs[i]))
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches >= 2, "the two threads' launches never interleaved; the test proves nothing"
    for i in range(2):
        for got in results[i]:
            for a, b in zip(got, expected[i]):
                assert bitwise_equal(a, b), f"thread {i}: a result differs from the single-threaded run"


@needs_cuda
@pytest.mark.parametrize("hidden,bidirectional,dtype,path", [(16, True, F64, "persistent"),
                                                             (256, False, torch.bfloat16, "cooperative"),
                                                             (300, True, F64, "stepwise")],
                         ids=["persistent", "cooperative", "stepwise"])
def test_two_threads_on_two_cuda_streams(hidden, bidirectional, dtype, path):
    """Two threads, each on its own CUDA stream, running forward + backward at the same time: results equal the
    serial ones bitwise. On the cooperative path (bfloat16 H = 256: a grid of programs that wait for each
    other) two such launches side by side must both complete, correctly, whatever share of the SMs each one
    gets: the cooperative-grid launch starts all of a launch's programs together or not at all."""
    torch.manual_seed(0)
    model = lstm_triton.LSTM(16, hidden, num_layers=2, bidirectional=bidirectional).to("cuda", dtype)
    xs = [torch.randn(50, 8, 16, dtype=dtype, device="cuda") * (i + 1) for i in range(2)]
    with lstm_triton.recorded_plans() as plans:
        expected = [_thread_work(model, x) for x in xs]
    if {p.path for p in plans} != {path}:
        pytest.skip(f"this GPU runs {sorted({p.path for p in plans})}, not the {path} path, for this problem")
    streams = [torch.cuda.Stream() for _ in range(2)]
    results = _run_in_threads(lambda i: _thread_work(model, xs[i], streams[i]), repeats=3)
    torch.cuda.synchronize()
    lstm_triton.check_errors()
    for i in range(2):
        for got in results[i]:
            for a, b in zip(got, expected[i]):
                assert bitwise_equal(a, b)
