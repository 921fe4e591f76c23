"""The correctness gate: every provider's outputs and gradients against the float64 reference.

One set of data per shape serves every dtype: the values are drawn in float64 and then rounded so that
bfloat16, float16 and float32 all hold them exactly. Casting to a row's dtype therefore loses nothing, the
float64 reference (``lstm_triton.lstm_layer_reference``) is computed once per shape, and a row's error is
the error of its computation alone, not of rounding its inputs.

Error definition (per row): for each compared tensor, ``max|a − ref| / max|ref|`` (both in float64); the
row reports the largest over y, h_n, c_n and, in train mode, dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from lstm_triton import lstm_layer_reference

from .shapes import Shape

OUTPUT_NAMES = ("y", "h_n", "c_n")
GRAD_NAMES = ("dx", "dh0", "dc0", "dW_ih", "dW_hh", "db_ih", "db_hh")

# Smallest normal float16: below it float16 keeps fewer bits than bfloat16 does.
_FP16_MIN_NORMAL = 2.0 ** -14


def representable(t: Tensor) -> Tensor:
    """Round float64 values to ones that bfloat16, float16 and float32 hold exactly (none of them zero).

    bfloat16 keeps 8 significant bits; float16 keeps 11 down to 2^-14 and has range to 65504, so bfloat16
    values of magnitude in [2^-14, 65504] fit all three (the data here are N(0, 1) or smaller). Tiny values
    move to ±2^-14, which also means no element is ever an exact zero.
    """
    t = t.to(torch.bfloat16).double()
    floor = torch.copysign(torch.full_like(t, _FP16_MIN_NORMAL), t)
    return torch.where(t.abs() < _FP16_MIN_NORMAL, floor, t)


@dataclass
class Reference:
    T: int  # steps the reference covers (shorter than the shape's T only where float64 ran out of memory)
    outputs: dict[str, Tensor]
    grads: dict[str, Tensor]


@dataclass
class ShapeData:
    """Inputs, weights and upstream gradients of one shape (float64, exactly representable), on the device.

    Weights follow ``torch.nn.LSTM``'s init scale, U(−1/√H, 1/√H); inputs and upstream gradients are N(0, 1),
    h0 and c0 N(0, 0.25). The seed is fixed, so every provider and every run sees the same numbers.
    """

    shape: Shape
    device: str
    x: Tensor = field(init=False)
    h0: Tensor = field(init=False)
    c0: Tensor = field(init=False)
    weights: tuple[Tensor, Tensor, Tensor, Tensor] = field(init=False)  # w_ih, w_hh, b_ih, b_hh
    upstream: tuple[Tensor, Tensor, Tensor] = field(init=False)  # dL/dy, dL/dh_n, dL/dc_n
    _reference: Optional[Reference] = field(init=False, default=None)

    def __post_init__(self):
        s = self.shape
        g = torch.Generator().manual_seed(1000003 * s.T + 1009 * s.B + 17 * s.I + s.H)
        k = s.H ** -0.5

        def normal(*size, scale=1.0):
            return representable(torch.randn(*size, generator=g, dtype=torch.float64) * scale).to(self.device)

        def uniform(*size):
            u = (torch.rand(*size, generator=g, dtype=torch.float64) * 2 - 1) * k
            return representable(u).to(self.device)

        self.x = normal(s.T, s.B, s.I)
        self.h0 = normal(s.B, s.H, scale=0.5)
        self.c0 = normal(s.B, s.H, scale=0.5)
        self.weights = (uniform(4 * s.H, s.I), uniform(4 * s.H, s.H), uniform(4 * s.H), uniform(4 * s.H))
        self.upstream = (normal(s.T, s.B, s.H), normal(s.B, s.H), normal(s.B, s.H))

    def nbytes(self) -> int:
        tensors = [self.x, self.h0, self.c0, *self.weights, *self.upstream]
        if self._reference is not None:
            tensors += [*self._reference.outputs.values(), *self._reference.grads.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reference(self, with_grads: bool) -> Optional[Reference]:
        """The float64 reference, computed on first use; halves T until it fits in device memory.

        Returns None if not even one step fits.
        """
        if self._reference is not None and (self._reference.grads or not with_grads):
            return self._reference
        T = self.shape.T
        while T >= 1:
            try:
                self._reference = self._compute_reference(T, with_grads)
                return self._reference
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                T //= 2
        return None

    def _compute_reference(self, T: int, with_grads: bool) -> Reference:
        leaves = [t.clone().requires_grad_(with_grads) for t in (self.x[:T], self.h0, self.c0, *self.weights)]
        with torch.set_grad_enabled(with_grads):
            outs = lstm_layer_reference(*leaves)
        grads = {}
        if with_grads:
            gy, gh, gc = self.upstream
            grads = dict(zip(GRAD_NAMES, torch.autograd.grad(outs, leaves, (gy[:T], gh, gc))))
        return Reference(T, dict(zip(OUTPUT_NAMES, (o.detach() for o in outs))), grads)


def max_rel_err(results: dict[str, Tensor], reference: dict[str, Tensor]) -> tuple[float, str]:
    """(largest per-tensor max|a − ref| / max|ref|, name of the tensor where it occurs).

    A NaN or infinity in a result makes the error infinite (the JSON writes it as null; the gate fails).
    """
    worst, where = 0.0, ""
    for name, ref in reference.items():
        a = results[name]
        scale = ref.abs().max().item()
        err = (a.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)
        if not math.isfinite(err):
            return math.inf, f"{name} (not finite)"
        if err >= worst:
            worst, where = err, name
    return worst, where
