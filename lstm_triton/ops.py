"""The autograd-aware LSTM layer op: input GEMM, the recurrent kernels, and the weight-gradient GEMMs.

``lstm_layer`` is the entry point; it runs one layer in one direction on the Triton kernels. The kernels
are wrapped in two ``torch.library`` custom ops (``lstm_triton::lstm_layer_fwd`` / ``_bwd``) joined by an
autograd formula (``register_autograd``, which builds a ``torch.autograd.Function`` under the hood), so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque op with a fake (meta) implementation.

Dimension legend: T steps, B batch, I input features, H hidden units, G = 4H gate rows.

Layout: the kernels want gate rows *unit-interleaved* (row 4j+k is gate k of unit j; see kernels/_gates.py).
``torch.nn.LSTM`` stores them gate-blocked (rows kH+j). The op interleaves W_ih, W_hh and the biases on the
way in and de-interleaves the gradients on the way out, so nothing outside this file sees the kernel layout.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels import lstm_bwd, lstm_fwd, select_config

__all__ = ["lstm_layer", "triton_enabled"]


def triton_enabled(t: Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interleave(w: Tensor) -> Tensor:
    """Gate-blocked rows (kH+j) → unit-interleaved rows (4j+k), for [4H, K] matrices and [4H] vectors."""
    G = w.shape[0]
    return w.reshape(4, G // 4, -1).transpose(0, 1).reshape(w.shape).contiguous()


def _deinterleave(w: Tensor) -> Tensor:
    G = w.shape[0]
    return w.reshape(G // 4, 4, -1).transpose(0, 1).reshape(w.shape).contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(x: Tensor, H: int, path: str, allow_tf32: bool):
    return select_config(x.shape[1], H, x.dtype, allow_tf32=allow_tf32, path=path)


@torch.library.custom_op("lstm_triton::lstm_layer_fwd", mutates_args=())
def _lstm_layer_fwd(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    save: bool, path: str, allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, I = x.shape
    H = w_hh.shape[1]
    gx = x.reshape(T * B, I) @ _interleave(w_ih).t()
    if b_ih is not None:
        gx += _interleave(b_ih + b_hh)
    y, h_n, c_n, gates, cs = lstm_fwd(
        gx.view(T, B, 4 * H), _interleave(w_hh), h0, c0, _config(x, H, path, allow_tf32), save=save
    )
    if not save:
        gates, cs = (x.new_empty(0, dtype=_acc_dtype(x.dtype)) for _ in range(2))
    return y, h_n, c_n, gates, cs


@_lstm_layer_fwd.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, save, path, allow_tf32):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    acc = _acc_dtype(x.dtype)
    gates = x.new_empty(T, B, 4 * H, dtype=acc) if save else x.new_empty(0, dtype=acc)
    cs = x.new_empty(T + 1, B, H, dtype=acc) if save else x.new_empty(0, dtype=acc)
    return x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H), gates, cs


@torch.library.custom_op("lstm_triton::lstm_layer_bwd", mutates_args=())
def _lstm_layer_bwd(
    dy: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, h0: Tensor, y: Tensor, gates: Tensor, cs: Tensor,
    w_ih: Tensor, w_hh: Tensor, needs: Sequence[bool], path: str, allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """needs = (dx, dh0, dc0, dW_ih, dW_hh, db); outputs not needed come back empty."""
    T, B, I = x.shape
    H = w_hh.shape[1]
    dgates, dh0, dc0 = lstm_bwd(dy, dh_n, dc_n, gates, cs, _interleave(w_hh), _config(x, H, path, allow_tf32))
    # The GEMMs after the loop run in the input dtype (fp32 accumulation inside the GEMM), like cuDNN's.
    dg = dgates.view(T * B, 4 * H)
    dg_lp = dg.to(x.dtype)
    empty = lambda: x.new_empty(0)  # noqa: E731 (outputs of a custom op must not alias each other)
    dx = (dg_lp @ _interleave(w_ih)).view(T, B, I) if needs[0] else empty()
    dw_ih = _deinterleave(dg_lp.t() @ x.reshape(T * B, I)) if needs[3] else empty()
    if needs[4]:
        h_prev = torch.cat([h0.to(x.dtype).unsqueeze(0), y[:-1]]).view(T * B, H)
        dw_hh = _deinterleave(dg_lp.t() @ h_prev)
    else:
        dw_hh = empty()
    db = _deinterleave(dg.sum(0)).to(x.dtype) if needs[5] else empty()
    return dx, dh0.to(h0.dtype) if needs[1] else empty(), dc0.to(h0.dtype) if needs[2] else empty(), dw_ih, dw_hh, db


@_lstm_layer_bwd.register_fake
def _(dy, dh_n, dc_n, x, h0, y, gates, cs, w_ih, w_hh, needs, path, allow_tf32):
    shapes = (x.shape, h0.shape, h0.shape, w_ih.shape, w_hh.shape, w_hh.shape[:1])
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, save, path, allow_tf32 = inputs
    y, _, _, gates, cs = output
    ctx.save_for_backward(x, h0, w_ih, w_hh, y, gates, cs)
    ctx.path, ctx.allow_tf32, ctx.has_bias = path, allow_tf32, b_ih is not None


def _backward(ctx, dy, dh_n, dc_n, _dgates, _dcs):
    x, h0, w_ih, w_hh, y, gates, cs = ctx.saved_tensors
    if gates.numel() == 0 and x.numel() > 0:
        raise RuntimeError("lstm_triton: the forward ran without saving activations (no input required grad)")
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[4], ctx.has_bias and (n[5] or n[6])]
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(y[0]) if dh_n is None else dh_n
    dc_n = torch.zeros_like(y[0]) if dc_n is None else dc_n
    dx, dh0, dc0, dw_ih, dw_hh, db = _lstm_layer_bwd(
        dy, dh_n, dc_n, x, h0, y, gates, cs, w_ih, w_hh, needs, ctx.path, ctx.allow_tf32
    )
    db_ih = db if ctx.has_bias and n[5] else None
    db_hh = db if ctx.has_bias and n[6] else None
    pick = lambda flag, t: t if flag else None  # noqa: E731
    return (
        pick(n[0], dx), pick(n[1], dh0), pick(n[2], dc0), pick(n[3], dw_ih), pick(n[4], dw_hh), db_ih, db_hh,
        None, None, None,
    )


torch.library.register_autograd("lstm_triton::lstm_layer_fwd", _backward, setup_context=_setup_context)


def lstm_layer(
    x: Tensor,
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    path: str = "auto",
    allow_tf32: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, on the fused Triton kernels, differentiable in every input.

    Args:
        x: [T, B, I], T ≥ 1.   h0: [B, H] or None (zeros).   c0: [B, H] or None (zeros).
        w_ih: [4H, I], w_hh: [4H, H], b_ih/b_hh: [4H] or None — ``torch.nn.LSTM``'s layout (gates i, f, g, o).
        path: "auto" (the dispatcher's choice), "persistent" or "stepwise".
        allow_tf32: for float32, let ``tl.dot`` use TF32; None follows ``torch.backends.cuda.matmul.allow_tf32``.
    Returns:
        (y [T, B, H], h_n [B, H], c_n [B, H]) in x's dtype.
    Runs wherever :func:`triton_enabled` holds (CUDA, or CPU with ``TRITON_INTERPRET=1``).
    """
    if (b_ih is None) != (b_hh is None):
        raise ValueError("lstm_layer: pass both biases or neither")
    T, B, _ = x.shape
    H = w_hh.shape[1]
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    h0 = x.new_zeros(B, H) if h0 is None else h0
    c0 = x.new_zeros(B, H) if c0 is None else c0
    params = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    y, h_n, c_n, _, _ = _lstm_layer_fwd(
        x.contiguous(), h0.contiguous(), c0.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
        None if b_ih is None else b_ih.contiguous(), None if b_hh is None else b_hh.contiguous(),
        save, path, allow_tf32,
    )
    return y, h_n, c_n
