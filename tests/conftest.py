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
