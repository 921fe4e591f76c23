"""The autograd-aware LSTM layer op: input GEMM, the recurrent kernels, and the weight-gradient GEMMs.

``lstm_layer`` (one direction) and ``lstm_layer_directions`` (one or two directions in a single launch) are
the entry points. The kernels are wrapped in two ``torch.library`` custom ops (``lstm_triton::lstm_dirs_fwd``
/ ``_bwd``) joined by an autograd formula (``register_autograd``, which builds a ``torch.autograd.Function``
under the hood), so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque op with a fake
(meta) implementation.

Dimension legend: D directions, T steps, B batch, I input features, H hidden units, P projected size
(P = H without projection), G = 4H gate rows.

Conventions inside the custom ops:
- Direction d runs over its own *step order*: the reverse direction's input arrives time-reversed per sequence
  (:func:`reverse_sequences`), so the kernels only ever walk forward.
- Gate rows are *unit-interleaved* (row 4j+k is gate k of unit j; see kernels/_gates.py), while
  ``torch.nn.LSTM`` stores them gate-blocked (rows kH+j). The ops interleave W_ih, W_hh and the bias on the way
  in and de-interleave the gradients on the way out, so nothing outside this file sees the kernel layout.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels import lstm_bwd, lstm_fwd, select_config
from .kernels.config import check_offset_limits
from .reference import lstm_layer_reference

__all__ = ["lstm_layer", "lstm_layer_directions", "reverse_sequences", "triton_enabled"]


def triton_enabled(t: Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interleave(w: Tensor) -> Tensor:
    """[D, 4H, ...] gate-blocked rows (kH+j) → unit-interleaved rows (4j+k)."""
    D, G = w.shape[:2]
    return w.reshape(D, 4, G // 4, -1).transpose(1, 2).reshape(w.shape).contiguous()


def _deinterleave(w: Tensor) -> Tensor:
    D, G = w.shape[:2]
    return w.reshape(D, G // 4, 4, -1).transpose(1, 2).reshape(w.shape).contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(x: Tensor, H: int, P: int, proj: bool, path: str, allow_tf32: bool):
    """x: [D, T, B, I]. The cooperative path needs every program resident: at most one per SM."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 0
    return select_config(x.shape[2], H, x.dtype, allow_tf32=allow_tf32, path=path, proj_size=P if proj else 0,
                         directions=x.shape[0], resident_programs=sms)


@torch.library.custom_op("lstm_triton::lstm_dirs_fwd", mutates_args=())
def _lstm_dirs_fwd(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], w_hr: Optional[Tensor],
    lengths: Optional[Tensor], save: bool, path: str, allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [D, T, B, I] in step order; h0 [D, B, P]; c0 [D, B, H]; w_ih [D, G, I]; w_hh [D, G, P];
    bias [D, G] (b_ih + b_hh) or None; w_hr [D, P, H] or None; lengths [B] int32 or None.
    Returns y [D, T, B, P], h_n, c_n and (when save) the kernel's saved gates and cell states."""
    D, T, B, I = x.shape
    H, P = w_hh.shape[1] // 4, w_hh.shape[2]
    bias_p = None if bias is None else _interleave(bias)
    if T == 1 and w_hr is None and path in ("auto", "stepwise"):
        # A single step (LSTMCell, decoding): one kernel computes x·W_ihᵀ + h·W_hhᵀ + bias and the update.
        config = _config(x, H, P, False, "stepwise", allow_tf32)
        y, h_n, c_n, gates, cs = lstm_fwd(
            None, _interleave(w_hh), None, h0, c0, lengths, config, save=save,
            fused_input=(x.contiguous(), _interleave(w_ih), bias_p),
        )
    else:
        w_ih_t = _interleave(w_ih).transpose(1, 2)
        xs = x.reshape(D, T * B, I)
        gx = torch.baddbmm(bias_p.unsqueeze(1), xs, w_ih_t) if bias is not None else torch.bmm(xs, w_ih_t)
        y, h_n, c_n, gates, cs = lstm_fwd(
            gx.view(D, T, B, 4 * H), _interleave(w_hh), w_hr, h0, c0, lengths,
            _config(x, H, P, w_hr is not None, path, allow_tf32), save=save,
        )
    if not save:
        gates, cs = (x.new_empty(0, dtype=_acc_dtype(x.dtype)) for _ in range(2))
    return y, h_n, c_n, gates, cs


@_lstm_dirs_fwd.register_fake
def _(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, save, path, allow_tf32):
    D, T, B, _ = x.shape
    H, P = w_hh.shape[1] // 4, w_hh.shape[2]
    acc = _acc_dtype(x.dtype)
    gates = x.new_empty(D, T, B, 4 * H, dtype=acc) if save else x.new_empty(0, dtype=acc)
    cs = x.new_empty(D, T + 1, B, H, dtype=acc) if save else x.new_empty(0, dtype=acc)
    return x.new_empty(D, T, B, P), x.new_empty(D, B, P), x.new_empty(D, B, H), gates, cs


@torch.library.custom_op("lstm_triton::lstm_dirs_bwd", mutates_args=())
def _lstm_dirs_bwd(
    dy: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, h0: Tensor, y: Tensor, gates: Tensor, cs: Tensor,
    w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
    needs: Sequence[bool], path: str, allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """needs = (dx, dh0, dc0, dW_ih, dW_hh, dbias, dW_hr); outputs not needed come back empty."""
    D, T, B, I = x.shape
    H, P = w_hh.shape[1] // 4, w_hh.shape[2]
    dtype = x.dtype
    dgates, dh_all, dh0, dc0 = lstm_bwd(
        dy, dh_n, dc_n, gates, cs, _interleave(w_hh), w_hr, lengths,
        _config(x, H, P, w_hr is not None, path, allow_tf32),
    )
    # The GEMMs after the loop run in the input dtype (fp32 accumulation inside the GEMM), like cuDNN's.
    dg = dgates.view(D, T * B, 4 * H)
    dg_lp = dg.to(dtype)
    empty = lambda: x.new_empty(0)  # noqa: E731 (outputs of a custom op must not alias each other)
    dx = torch.bmm(dg_lp, _interleave(w_ih)).view(D, T, B, I) if needs[0] else empty()
    dw_ih = _deinterleave(torch.bmm(dg_lp.transpose(1, 2), x.reshape(D, T * B, I))) if needs[3] else empty()
    if needs[4]:
        # h before step s is y at step s-1 (h0 at s = 0); past a sequence's end dgates is 0, so y's zeros there
        # never contribute.
        h_prev = torch.cat([h0.to(dtype).unsqueeze(1), y[:, :-1]], dim=1).view(D, T * B, P)
        dw_hh = _deinterleave(torch.bmm(dg_lp.transpose(1, 2), h_prev))
    else:
        dw_hh = empty()
    db = _deinterleave(dg.sum(1)).to(dtype) if needs[5] else empty()
    if needs[6]:
        o = gates[..., 3::4]  # σ(o) of every unit (interleaved columns 4j+3)
        m = (o * torch.tanh(cs[:, 1:])).to(dtype).view(D, T * B, H)
        dw_hr = torch.bmm(dh_all.view(D, T * B, P).transpose(1, 2).to(dtype), m)
    else:
        dw_hr = empty()
    dh0 = dh0.to(h0.dtype) if needs[1] else empty()
    dc0 = dc0.to(h0.dtype) if needs[2] else empty()
    return dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr


@_lstm_dirs_bwd.register_fake
def _(dy, dh_n, dc_n, x, h0, y, gates, cs, w_ih, w_hh, w_hr, lengths, needs, path, allow_tf32):
    D = x.shape[0]
    bias_shape = (D, w_hh.shape[1])
    hr_shape = w_hr.shape if w_hr is not None else (0,)
    shapes = (x.shape, h0.shape, (D, y.shape[2], w_hh.shape[1] // 4), w_ih.shape, w_hh.shape, bias_shape, hr_shape)
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, save, path, allow_tf32 = inputs
    y, _, _, gates, cs = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, y, gates, cs)
    ctx.path, ctx.allow_tf32 = path, allow_tf32


def _backward(ctx, dy, dh_n, dc_n, _dgates, _dcs):
    x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, y, gates, cs = ctx.saved_tensors
    n = ctx.needs_input_grad
    zero = lambda t, g: torch.zeros_like(t) if g is None else g  # noqa: E731
    dy, dh_n, dc_n = zero(y, dy), zero(h0, dh_n), zero(c0, dc_n)
    if torch.is_grad_enabled():
        # create_graph=True (double backward): differentiate the reference, which autograd can differentiate again.
        return _differentiable_backward(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, dy, dh_n, dc_n, n)
    if gates.numel() == 0:  # forward ran with recompute=True: rebuild the activations now
        _, _, _, gates, cs = _lstm_dirs_fwd(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, True, ctx.path, ctx.allow_tf32)
    needs = [n[0], n[1], n[2], n[3], n[4], bias is not None and n[5], w_hr is not None and n[6]]
    grads = _lstm_dirs_bwd(
        dy, dh_n, dc_n, x, h0, y, gates, cs, w_ih, w_hh, w_hr, lengths, needs, ctx.path, ctx.allow_tf32
    )
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None, None)


def _differentiable_backward(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, dy, dh_n, dc_n, needs):
    """Gradients as a differentiable function of the op's inputs, by differentiating the reference.

    The saved inputs keep their place in the autograd graph, so the returned gradients can be differentiated
    again (``create_graph=True``); this is the double-backward path, not the fast one.
    """
    inputs = (x, h0, c0, w_ih, w_hh, bias, w_hr)
    with torch.enable_grad():
        # Inputs that carry no grad still need to be leaves of the recomputation to be differentiated.
        args = [t if t is None or t.requires_grad or not need else t.detach().requires_grad_()
                for t, need in zip(inputs, needs)]
        lens = None if lengths is None else lengths.tolist()
        outs = [
            lstm_layer_reference(args[0][d], args[1][d], args[2][d], args[3][d], args[4][d],
                                 None if bias is None else args[5][d], None,
                                 None if w_hr is None else args[6][d], lengths=lens)
            for d in range(x.shape[0])
        ]
        outs = tuple(torch.stack(o) for o in zip(*outs))
        wrt = [a for a, need in zip(args, needs) if a is not None and need]
        grads = iter(torch.autograd.grad(outs, wrt, (dy, dh_n, dc_n), create_graph=True, allow_unused=True))
    result = [next(grads) if t is not None and need else None for t, need in zip(inputs, needs)]
    return tuple(result) + (None, None, None, None)


torch.library.register_autograd("lstm_triton::lstm_dirs_fwd", _backward, setup_context=_setup_context)


def reverse_sequences(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse each sequence of x [T, B, ...] within its own length (padding stays where it is).

    The map is its own inverse, so it also takes a reverse direction's outputs back to time order.
    """
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    s = torch.arange(T, device=x.device).unsqueeze(1)
    lens = lengths.to(device=x.device, dtype=torch.long).unsqueeze(0)
    idx = torch.where(s < lens, lens - 1 - s, s)
    return x.gather(0, idx.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x))


def lstm_layer_directions(
    x: Tensor,
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    weights: Sequence[Sequence[Optional[Tensor]]],
    *,
    lengths: Optional[Tensor] = None,
    reverse: Sequence[bool] = (False, True),
    path: str = "auto",
    allow_tf32: Optional[bool] = None,
    recompute: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in D = len(weights) directions, all in one kernel launch.

    Args:
        x: [T, B, I], T ≥ 1.
        h0: [D, B, P] or None (zeros).  c0: [D, B, H] or None (zeros).
        weights: per direction (w_ih [4H, I], w_hh [4H, P], b_ih [4H] or None, b_hh [4H] or None,
            w_hr [P, H] or None) — ``torch.nn.LSTM``'s layout (gates i, f, g, o).
        lengths: [B] per-sequence lengths (≤ T) or None; past its length a sequence's state is frozen and its
            output is zero, as for packed sequences.
        reverse: per direction, whether it runs from each sequence's last step to its first.
        path: "auto" (the dispatcher's choice), "persistent" or "stepwise".
        allow_tf32: for float32, let ``tl.dot`` use TF32; None follows ``torch.backends.cuda.matmul.allow_tf32``.
        recompute: keep no activations between forward and backward (gates [D, T, B, 4H] and cell states
            [D, T+1, B, H] in float32: 20·D·T·B·H bytes); the backward re-runs the forward kernel instead.
    Returns:
        (y [T, B, D·P] with direction d in columns [d·P, (d+1)·P), h_n [D, B, P], c_n [D, B, H]) in x's dtype.
    Runs wherever :func:`triton_enabled` holds (CUDA, or CPU with ``TRITON_INTERPRET=1``).
    """
    D = len(weights)
    T, B, _ = x.shape
    w_ih, w_hh, b_ih, b_hh, w_hr = (list(w) for w in zip(*weights))
    H, P = w_hh[0].shape[0] // 4, w_hh[0].shape[1]
    if (b_ih[0] is None) != (b_hh[0] is None):
        raise ValueError("lstm_layer: pass both biases or neither")
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    check_offset_limits(B, H, P, w_ih[0].shape[1])
    h0 = x.new_zeros(D, B, P) if h0 is None else h0
    c0 = x.new_zeros(D, B, H) if c0 is None else c0
    if B == 0:  # nothing for a kernel to do; the reference keeps shapes and autograd right
        outs = [lstm_layer_reference(x, h0[d], c0[d], *weights[d]) for d in range(D)]
        return torch.cat([o[0] for o in outs], -1), torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])
    lens32 = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
    xs = torch.stack([reverse_sequences(x, lengths) if rev else x for rev in reverse[:D]])
    bias = None if b_ih[0] is None else torch.stack(b_ih) + torch.stack(b_hh)
    tensors = (xs, h0, c0, torch.stack(w_ih), torch.stack(w_hh), bias, None if w_hr[0] is None else torch.stack(w_hr))
    save = not recompute and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, h_n, c_n, _, _ = _lstm_dirs_fwd(
        *(None if t is None else t.contiguous() for t in tensors), lens32, save, path, allow_tf32
    )
    ys = [reverse_sequences(y[d], lengths) if rev else y[d] for d, rev in enumerate(reverse[:D])]
    return (torch.cat(ys, dim=-1) if D > 1 else ys[0]), h_n, c_n


def lstm_layer(
    x: Tensor,
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    path: str = "auto",
    allow_tf32: Optional[bool] = None,
    recompute: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, on the fused Triton kernels, differentiable in every input.

    Shapes: x [T, B, I]; h0 [B, P] or None; c0 [B, H] or None; w_ih [4H, I]; w_hh [4H, P]; b_ih/b_hh [4H] or
    None; w_hr [P, H] or None; lengths [B] or None. Returns (y [T, B, P], h_n [B, P], c_n [B, H]).
    See :func:`lstm_layer_directions` for the options.
    """
    y, h_n, c_n = lstm_layer_directions(
        x, None if h0 is None else h0.unsqueeze(0), None if c0 is None else c0.unsqueeze(0),
        [(w_ih, w_hh, b_ih, b_hh, w_hr)], lengths=lengths, reverse=(reverse,), path=path, allow_tf32=allow_tf32,
        recompute=recompute,
    )
    return y, h_n[0], c_n[0]
