"""Host-side conventions shared by every launcher: fresh outputs, placeholders for absent operands, and
per-direction operands.

Every element of a kernel output must be written by a kernel. Setting ``POISON = True`` (the tests do, through
``tests/conftest.py``) fills each fresh output with NaN first, so an element a kernel forgot to write shows up
as a NaN in the comparison instead of passing by luck with whatever the allocator left there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

POISON = False


def new_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t


def absent(device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The pointer argument of an operand that a switch (HAS_…, SAVE) turns off: never read or written."""
    return torch.empty(1, device=device, dtype=dtype)


def or_absent(t: Optional[torch.Tensor], device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return absent(device, dtype) if t is None else t


@dataclass(frozen=True)
class PerDirection:
    """One operand given per direction (e.g. W_hh of the forward and of the reverse direction) without copying
    them into one tensor: direction d's tensor starts ``stride`` elements after direction 0's ``base``."""

    base: torch.Tensor
    stride: int
    tensors: tuple  # the D tensors themselves, for host-side GEMMs

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


def per_direction(tensors: Sequence[torch.Tensor]) -> PerDirection:
    """Describe D same-shaped tensors as base + d·stride. Parameters are contiguous and allocated apart, so this
    normally copies nothing; a non-contiguous tensor is made contiguous, and tensors whose distance is not a
    whole number of elements (possible only for views at odd byte offsets) are stacked into one."""
    ts = tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)
    if len(ts) > 2:
        raise ValueError("at most two directions")
    base = ts[0]
    if len(ts) == 1:
        return PerDirection(base, 0, ts)
    size = base.element_size()
    gap = ts[1].data_ptr() - base.data_ptr()
    if gap % size:
        stacked = torch.stack(ts)
        return PerDirection(stacked[0], stacked.stride(0), tuple(stacked))
    return PerDirection(base, gap // size, ts)
