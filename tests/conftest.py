"""Test set-up: on a machine without a GPU the Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
Every kernel output is poisoned with NaN before the kernel runs (see lstm_triton/kernels/_buffers.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lstm_triton.kernels import _buffers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    _buffers.POISON = True
    yield
    _buffers.POISON = False


@pytest.fixture
def device():
    return DEVICE
