"""Test set-up: on a machine without a GPU the Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
Every kernel output is poisoned with NaN before the kernel runs (see lstm_triton/kernels/buffers.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lstm_triton.kernels import buffers  # noqa: E402

from helpers import DEVICE  # noqa: E402

# Parity with cuDNN in float32 means exact float32 there too (cuDNN would use TF32 by default).
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    buffers.POISON = True
    yield
    buffers.POISON = False


@pytest.fixture
def device():
    return DEVICE


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """On a GPU, a test that forces a kernel path the dispatcher refuses for its problem there (e.g. a float64
    persistent tile beyond the caps: compiled float64 forms its products on the FMA units) is skipped, naming
    the reason; under the interpreter every forced path runs, so there it stays a failure."""
    outcome = yield
    from lstm_triton.kernels.dispatch import PathUnavailable, interpreter_active

    excinfo = outcome.excinfo
    if (excinfo is not None and issubclass(excinfo[0], PathUnavailable) and not interpreter_active()
            and hasattr(outcome, "force_exception")):
        outcome.force_exception(pytest.skip.Exception(f"not on this device: {excinfo[1]}", _use_item_location=True))
