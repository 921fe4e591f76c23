"""Allocation of kernel outputs.

Every element of a kernel output must be written by a kernel. Setting ``POISON = True`` (the tests do, through
``tests/conftest.py``) fills each fresh output with NaN first, so an element a kernel forgot to write shows up
as a NaN in the comparison instead of passing by luck with whatever the allocator left there.
"""
import torch

POISON = False


def new_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t
