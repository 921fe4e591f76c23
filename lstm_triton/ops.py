"""The autograd-aware LSTM layer op: input GEMMs, the recurrent kernels, and the weight-gradient GEMMs.

``lstm_layer`` (one direction) and ``lstm_layer_directions`` (one or two directions in a single launch) are
the entry points. The kernels are wrapped in two ``torch.library`` custom ops (``lstm_triton::lstm_layer_fwd``
/ ``_bwd``) joined by an autograd formula (``register_autograd``), so ``torch.compile(fullgraph=True)`` and
``torch.export`` see one opaque op with a fake (meta) implementation.

Dimension legend: D directions, T steps, B batch, I input features, H hidden units, P projected size
(P = H without projection), G = 4H gate rows.

Conventions inside the custom ops:
- Direction d runs over its own *step order*: the reverse direction's input (and its resets) arrive
  time-reversed per sequence (:func:`reverse_sequences`), so the kernels only ever walk forward.
- Weights, biases and gates stay in ``torch.nn.LSTM``'s gate-blocked layout; the op takes each direction's
  parameters as they are (lists, no stacking), so a forward copies no weight, and returns each parameter's
  gradient as a tensor of its own (no two ``.grad`` share memory, as with torch's own module).
- The plan (path and tiles) is decided once per call by :func:`lstm_triton.kernels.plan_lstm` and travels
  through the op as a string, so the backward runs what the forward ran.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels import LSTMPlan, lstm_bwd, lstm_fwd, per_direction, plan_lstm
from .kernels.dispatch import accumulation_dtype, check_offset_limits, interpreter_active, saved_gates_dtype
from .reference import lstm_layer_directions_reference, lstm_layer_reference

__all__ = ["functorch_active", "lstm_layer", "lstm_layer_directions", "recorded_plans", "reverse_sequences",
           "triton_enabled"]


def triton_enabled(t: Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreter_active()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...) is running the current call.

    The autograd.Function that ``torch.library.register_autograd`` generates for our custom op has no
    ``setup_context`` staticmethod, and functorch refuses such functions ("must override the setup_context
    staticmethod"; pytorch/pytorch#168393, #179652), so under a transform the op cannot run: callers use plain
    PyTorch ops instead (the module: PyTorch's own LSTM; :func:`lstm_layer_directions`: the reference). Not
    consulted while Dynamo traces, which sees the custom op as one node.
    """
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


_recording = threading.local()


@contextlib.contextmanager
def recorded_plans():
    """Collect the :class:`~lstm_triton.kernels.LSTMPlan` of every layer call made in this thread inside the
    block (what ran, e.g. for a benchmark row): ``with recorded_plans() as plans: model(x)``."""
    previous = getattr(_recording, "plans", None)
    _recording.plans = plans = []
    try:
        yield plans
    finally:
        _recording.plans = previous


def _gx(xs, w_ih, b_ih, b_hh) -> Tensor:
    """[D, T, B, G] = x_d·W_ih,dᵀ + b_ih,d + b_hh,d for each direction d (one GEMM each, into one tensor)."""
    D, (T, B, I), G = len(xs), xs[0].shape, w_ih[0].shape[0]
    gx = xs[0].new_empty(D, T, B, G)
    for d in range(D):
        x2 = xs[d].reshape(T * B, I)
        if b_ih:
            torch.addmm(b_ih[d] + b_hh[d], x2, w_ih[d].t(), out=gx[d].view(T * B, G))
        else:
            torch.mm(x2, w_ih[d].t(), out=gx[d].view(T * B, G))
    return gx


@torch.library.custom_op("lstm_triton::lstm_layer_fwd", mutates_args=())
def _layer_fwd(
    xs: list[Tensor], h0: Tensor, c0: Tensor, w_ih: list[Tensor], w_hh: list[Tensor], b_ih: list[Tensor],
    b_hh: list[Tensor], w_hr: list[Tensor], lengths: Optional[Tensor], resets: Optional[Tensor],
    mask: Optional[Tensor], save: bool, plan: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """xs: per direction [T, B, I] in its step order; h0 [D, B, P]; c0 [D, B, H]; w_ih / w_hh / b_ih / b_hh /
    w_hr: per direction (empty lists: no bias / no projection); lengths [B] int32; resets [D, T, B] int8 in
    step order; mask [D, B, P]. Returns y [D, T, B, P], h_n, c_n and (when save) the saved gates and cell
    states (else empty tensors)."""
    run = LSTMPlan.decode(plan)
    D, (T, B, I) = len(xs), xs[0].shape
    w_hh_d = per_direction(w_hh)
    w_hr_d = per_direction(w_hr) if w_hr else None
    if run.fused_step:
        bias = torch.stack([b_ih[d] + b_hh[d] for d in range(D)]) if b_ih else None
        x = torch.stack([xs[d][0] for d in range(D)]) if D > 1 else xs[0]
        outs = lstm_fwd(run, None, w_hh_d, None, h0, c0, lengths, resets, mask, save,
                        fused_input=(x.contiguous(), per_direction(w_ih), bias))
    else:
        outs = lstm_fwd(run, _gx(xs, w_ih, b_ih, b_hh), w_hh_d, w_hr_d, h0, c0, lengths, resets, mask, save)
    y, h_n, c_n, gates, cs = outs
    if not save:
        gates = xs[0].new_empty(0)
        cs = xs[0].new_empty(0, dtype=accumulation_dtype(xs[0].dtype))
    return y, h_n, c_n, gates, cs


@_layer_fwd.register_fake
def _(xs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, resets, mask, save, plan):
    D, (T, B, _), (G, P) = len(xs), xs[0].shape, w_hh[0].shape
    x, H = xs[0], G // 4
    acc = accumulation_dtype(x.dtype)
    gates = x.new_empty(D, T, B, G, dtype=saved_gates_dtype(x.dtype)) if save else x.new_empty(0)
    cs = x.new_empty(D, T + 1, B, H, dtype=acc) if save else x.new_empty(0, dtype=acc)
    return x.new_empty(D, T, B, P), x.new_empty(D, B, P), x.new_empty(D, B, H), gates, cs


@torch.library.custom_op("lstm_triton::lstm_layer_bwd", mutates_args=())
def _layer_bwd(
    dy: Tensor, dh_n: Tensor, dc_n: Tensor, dcs: Optional[Tensor], xs: list[Tensor], h0: Tensor, y: Tensor,
    gates: Tensor, cs: Tensor, w_ih: list[Tensor], w_hh: list[Tensor], w_hr: list[Tensor],
    lengths: Optional[Tensor], resets: Optional[Tensor], mask: Optional[Tensor], needs: list[bool], plan: str,
) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """needs = (dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, dW_hr). Returns per direction dx, then dh0, dc0, then
    per direction dW_ih, dW_hh, db_ih, db_hh, dW_hr; what is not needed comes back as empty tensors."""
    run = LSTMPlan.decode(plan)
    D, (T, B, I) = len(xs), xs[0].shape
    G, P = w_hh[0].shape
    H, dtype = G // 4, xs[0].dtype
    w_hr_d = per_direction(w_hr) if w_hr else None
    dgates, dh_all, dh0, dc0 = lstm_bwd(run, dy, dh_n, dc_n, None if dcs is None else dcs[:, 1:], gates, cs,
                                        per_direction(w_hh), w_hr_d, lengths, resets, mask)
    if dcs is not None:
        dc0 = dc0 + dcs[:, 0]
    # The GEMMs after the loop run in the input dtype (fp32 accumulation inside the GEMM), like cuDNN's; dgates
    # is already stored in it. Every gradient is a tensor of its own (outputs of a custom op must not alias).
    dg = [dgates[d].view(T * B, G) for d in range(D)]
    none = xs[0].new_empty(0)
    per_dir = lambda need, fn: [fn(d) if need else none.clone() for d in range(D)]  # noqa: E731
    dx = per_dir(needs[0], lambda d: (dg[d] @ w_ih[d]).view(T, B, I))
    dw_ih = per_dir(needs[3], lambda d: dg[d].t() @ xs[d].reshape(T * B, I))

    def dw_hh(d):
        # h before step s is y at step s-1 (h0 at s = 0, and where step s starts a segment), times the dropout
        # mask; past a sequence's end dgates is 0, so y's zeros there never contribute.
        h_prev = torch.cat([h0[d].to(dtype).unsqueeze(0), y[d, :-1]])
        if resets is not None:
            h_prev = torch.where(resets[d].unsqueeze(-1) != 0, h0[d].to(dtype), h_prev)
        if mask is not None:
            h_prev = h_prev * mask[d]
        return dg[d].t() @ h_prev.reshape(T * B, P)

    db = [dgates[d].sum((0, 1), dtype=accumulation_dtype(dtype)).to(dtype) for d in range(D)] \
        if needs[5] or needs[6] else None
    db_ih = per_dir(needs[5], lambda d: db[d])
    db_hh = per_dir(needs[6], lambda d: db[d].clone() if needs[5] else db[d])

    def dw_hr(d):
        m = (gates[d, ..., 3 * H:].to(cs.dtype) * torch.tanh(cs[d, 1:])).to(dtype)  # o ⊙ tanh(c)
        return dh_all[d].reshape(T * B, P).t() @ m.reshape(T * B, H)

    return (dx, dh0.to(h0.dtype) if needs[1] else none.clone(), dc0.to(h0.dtype) if needs[2] else none.clone(),
            dw_ih, per_dir(needs[4], dw_hh), db_ih, db_hh, per_dir(needs[7] and bool(w_hr), dw_hr))


@_layer_bwd.register_fake
def _(dy, dh_n, dc_n, dcs, xs, h0, y, gates, cs, w_ih, w_hh, w_hr, lengths, resets, mask, needs, plan):
    D, G = len(xs), w_hh[0].shape[0]
    like = lambda ts, need: [t.new_empty(t.shape if need else (0,)) for t in ts]  # noqa: E731
    state = lambda shape, need: h0.new_empty(shape if need else (0,))  # noqa: E731
    biases = [w.new_empty(G) for w in w_hh]
    return (like(xs, needs[0]), state(h0.shape, needs[1]), state((D, h0.shape[1], G // 4), needs[2]),
            like(w_ih, needs[3]), like(w_hh, needs[4]), like(biases, needs[5]), like(biases, needs[6]),
            like(w_hr, needs[7] and bool(w_hr)) if w_hr else like(w_hh, False))


def _setup_context(ctx, inputs, output):
    xs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, resets, mask, save, plan = inputs
    y, _, _, gates, cs = output
    ctx.save_for_backward(h0, c0, y, gates, cs, lengths, resets, mask, *xs, *w_ih, *w_hh, *b_ih, *b_hh, *w_hr)
    ctx.counts = (len(xs), len(b_ih), len(w_hr))
    ctx.plan = plan


def _backward(ctx, dy, dh_n, dc_n, _dgates, dcs):
    h0, c0, y, gates, cs, lengths, resets, mask, *params = ctx.saved_tensors
    D, n_bias, n_proj = ctx.counts
    xs, w_ih, w_hh, b_ih, b_hh, w_hr = _split(params, (D, D, D, n_bias, n_bias, n_proj))
    n = ctx.needs_input_grad  # the op's inputs' structure: a list for every list input
    zero = lambda t, g: torch.zeros_like(t) if g is None else g  # noqa: E731
    dy, dh_n, dc_n = zero(y, dy), zero(h0, dh_n), zero(c0, dc_n)
    if dcs is not None and dcs.numel() == 0:
        dcs = None
    if torch.is_grad_enabled():
        # create_graph=True (double backward): differentiate the reference, which autograd can differentiate again.
        return _differentiable_backward(xs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, resets, mask,
                                        dy, dh_n, dc_n, dcs, n)
    if gates.numel() == 0:  # forward ran with recompute=True: rebuild the activations now
        _, _, _, gates, cs = _layer_fwd(xs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, resets, mask, True,
                                        ctx.plan)
    needs = [any(n[0]), n[1], n[2], any(n[3]), any(n[4]), any(n[5]), any(n[6]), any(n[7])]
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = _layer_bwd(
        dy, dh_n, dc_n, dcs, xs, h0, y, gates, cs, w_ih, w_hh, w_hr, lengths, resets, mask, needs, ctx.plan)
    keep = lambda gs, flags: [g if f else None for g, f in zip(gs, flags)]  # noqa: E731
    return (keep(dx, n[0]), dh0 if n[1] else None, dc0 if n[2] else None, keep(dw_ih, n[3]), keep(dw_hh, n[4]),
            keep(db_ih, n[5]), keep(db_hh, n[6]), keep(dw_hr, n[7]), None, None, None, None, None)


def _split(seq, sizes):
    out, i = [], 0
    for k in sizes:
        out.append(list(seq[i:i + k]))
        i += k
    return out


def _differentiable_backward(xs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, resets, mask, dy, dh_n, dc_n, dcs,
                             needs):
    """Gradients as a differentiable function of the op's inputs, by differentiating the reference.

    The saved inputs keep their place in the autograd graph, so the returned gradients can be differentiated
    again (``create_graph=True``); this is the double-backward path, not the fast one.
    """
    D = len(xs)
    groups = [xs, [h0], [c0], w_ih, w_hh, b_ih, b_hh, w_hr]
    flags = [needs[0], [needs[1]], [needs[2]], needs[3], needs[4], needs[5], needs[6], needs[7]]
    with torch.enable_grad():
        # Inputs that carry no grad still need to be leaves of the recomputation to be differentiated. Those
        # that do enter it through an alias of their own: autograd.grad with respect to the input itself would
        # give its *total* derivative, and the op's inputs can depend on each other — the reverse direction's
        # input is the forward one's, time-reversed, so d/dx_fwd would also collect the reverse direction's
        # gradient, which autograd adds again through the reversal (a bidirectional layer's dx came back wrong
        # under create_graph=True). Through the aliases each input gets its partial derivative only.
        args = [[t.view_as(t) if t.requires_grad else t.detach().requires_grad_() if f else t
                 for t, f in zip(g, fl)] for g, fl in zip(groups, flags)]
        axs, (ah0,), (ac0,), aw_ih, aw_hh, ab_ih, ab_hh, aw_hr = args
        lens = None if lengths is None else lengths.tolist()
        outs = [
            lstm_layer_reference(axs[d], ah0[d], ac0[d], aw_ih[d], aw_hh[d], ab_ih[d] if ab_ih else None,
                                 ab_hh[d] if ab_hh else None, aw_hr[d] if aw_hr else None, lengths=lens,
                                 resets=None if resets is None else resets[d] != 0,  # step order: forward
                                 dropout_mask=None if mask is None else mask[d], return_cell_states=True)
            for d in range(D)
        ]
        y, h_n, c_n, cs = (torch.stack(o) for o in zip(*outs))
        outputs, cotangents = [y, h_n, c_n], [dy, dh_n, dc_n]
        if dcs is not None:
            outputs.append(cs)
            cotangents.append(dcs[:, 1:])
        wrt = [a for group, fl in zip(args, flags) for a, f in zip(group, fl) if f]
        grads = iter(torch.autograd.grad(outputs, wrt, cotangents, create_graph=True, allow_unused=True))
    result = [[next(grads) if f else None for f in fl] for fl in flags]
    dxs, (dh0,), (dc0,), *rest = result
    return (dxs, dh0, dc0, *rest, None, None, None, None, None)


torch.library.register_autograd("lstm_triton::lstm_layer_fwd", _backward, setup_context=_setup_context)


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


def reverse_resets(resets: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Segment starts [T, B] (time order) of the reverse direction, in its own step order.

    Running backwards, a segment starts at its last step: where the next time step starts a forward segment
    (and at each sequence's own last step, which is the reverse direction's step 0 anyway).
    """
    ends = torch.cat([resets[1:], torch.zeros_like(resets[:1])])
    return reverse_sequences(ends, lengths)


def _per_step_operands(x: Tensor, D: int, P: int, lengths: Optional[Tensor], resets: Optional[Tensor],
                       dropout_mask: Optional[Tensor]):
    """Check lengths [B], resets [T, B] bool and dropout_mask [D, B, P] against x [T, B, ·], and return them
    contiguous (the mask in x's dtype).

    The kernels address these operands as dense row-major arrays of exactly these shapes (stride B per step,
    B·P per direction). A caller's view — a transposed or expanded mask, a strided slice of lengths — was read
    with the wrong strides, and a broadcastable resets such as [T, 1] read past its end: silently wrong results
    (or a fault on a GPU) instead of an error."""
    T, B = x.shape[0], x.shape[1]
    if lengths is not None:
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lstm_layer: lengths must have shape [B] = ({B},), got {tuple(lengths.shape)}")
        lengths = lengths.contiguous()
    if resets is not None:
        if resets.dtype != torch.bool or tuple(resets.shape) != (T, B):
            raise ValueError(f"lstm_layer: resets must be a bool tensor of shape [T, B] = {(T, B)}, got "
                             f"{resets.dtype} of shape {tuple(resets.shape)}")
    if dropout_mask is not None:
        if tuple(dropout_mask.shape) != (D, B, P):
            raise ValueError(f"lstm_layer: dropout_mask must have shape [D, B, P] = {(D, B, P)}, got "
                             f"{tuple(dropout_mask.shape)}")
        dropout_mask = dropout_mask.to(x.dtype).contiguous()
    return lengths, resets, dropout_mask


def lstm_layer_directions(
    x: Tensor,
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    weights: Sequence[Sequence[Optional[Tensor]]],
    *,
    lengths: Optional[Tensor] = None,
    reverse: Sequence[bool] = (False, True),
    resets: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
    return_cell_states: bool = False,
    path: str = "auto",
    allow_tf32: Optional[bool] = None,
    recompute: bool = False,
):
    """One LSTM layer in D = len(weights) directions, all in one kernel launch.

    Args:
        x: [T, B, I], T ≥ 1.
        h0: [D, B, P] or None (zeros).  c0: [D, B, H] or None (zeros).
        weights: per direction (w_ih [4H, I], w_hh [4H, P], b_ih [4H] or None, b_hh [4H] or None,
            w_hr [P, H] or None) — ``torch.nn.LSTM``'s layout (gates i, f, g, o).
        lengths: [B] per-sequence lengths (≤ T) or None; past its length a sequence's state is frozen and its
            output is zero, as for packed sequences.
        reverse: per direction, whether it runs from each sequence's last step to its first.
        resets: [T, B] bool or None: where ``resets[t, b]``, step t starts a new segment of sequence b from
            (h0, c0) — in the reverse direction, each segment restarts at its own last step.
        dropout_mask: [D, B, P] or None: multiplies h_{t-1} where it enters W_hh, at every step (recurrent
            dropout; already scaled by 1/(1-p)).
        return_cell_states: also return every step's cell state.
        path: "auto" (the dispatcher's choice), "persistent", "cooperative" or "stepwise".
        allow_tf32: for float32, let ``tl.dot`` use TF32; None follows ``torch.backends.cuda.matmul.allow_tf32``.
        recompute: keep no activations between forward and backward (gates [D, T, B, 4H] and cell states
            [D, T+1, B, H], both float32); the backward re-runs the forward kernel instead.
    Returns:
        (y [T, B, D·P] with direction d in columns [d·P, (d+1)·P), h_n [D, B, P], c_n [D, B, H]) in x's dtype;
        with ``return_cell_states`` also cell_states [T, B, D·H] (c_t of each direction, zero past a sequence's
        end), differentiable.
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
    lengths, resets, dropout_mask = _per_step_operands(x, D, P, lengths, resets, dropout_mask)
    if functorch_active():  # torch.func cannot run the custom op (see functorch_active): the same math, plain ops
        return lstm_layer_directions_reference(x, h0, c0, weights, lengths=lengths, reverse=reverse, resets=resets,
                                               dropout_mask=dropout_mask, return_cell_states=return_cell_states)
    if B == 0:  # nothing for a kernel to do; the reference keeps shapes and autograd right
        outs = [lstm_layer_reference(x, h0[d], c0[d], *weights[d], return_cell_states=True) for d in range(D)]
        result = (torch.cat([o[0] for o in outs], -1), torch.stack([o[1] for o in outs]),
                  torch.stack([o[2] for o in outs]))
        return result + (torch.cat([o[3] for o in outs], -1),) if return_cell_states else result
    plan = plan_lstm(B, H, x.dtype, proj_size=P if w_hr[0] is not None else 0, T=T, directions=D,
                     allow_tf32=allow_tf32, path=path, device=x.device)
    if getattr(_recording, "plans", None) is not None:
        _recording.plans.append(plan)
    lens32 = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
    rev = list(reverse[:D])
    xs = [reverse_sequences(x, lengths) if r else x for r in rev]
    steps_resets = None
    if resets is not None:
        steps_resets = torch.stack([reverse_resets(resets, lengths) if r else resets for r in rev]).to(torch.int8)
    params = [w_ih, w_hh, [] if b_ih[0] is None else b_ih, [] if b_hh[0] is None else b_hh,
              [] if w_hr[0] is None else w_hr]
    grad_needed = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, h0, c0, *(p for group in params for p in group)))
    save = return_cell_states or (grad_needed and not recompute)
    y, h_n, c_n, _, cs = _layer_fwd(xs, h0, c0, *params, lens32, steps_resets, dropout_mask, save, plan.encode())
    ys = [reverse_sequences(y[d], lengths) if r else y[d] for d, r in enumerate(rev)]
    out = (torch.cat(ys, dim=-1) if D > 1 else ys[0]), h_n, c_n
    if not return_cell_states:
        return out
    cells = cs[:, 1:].to(x.dtype)
    if lengths is not None:
        running = torch.arange(T, device=x.device).unsqueeze(1) < lens32.unsqueeze(0)
        cells = torch.where(running.unsqueeze(-1), cells, torch.zeros((), dtype=x.dtype, device=x.device))
    cells = [reverse_sequences(cells[d], lengths) if r else cells[d] for d, r in enumerate(rev)]
    return out + (torch.cat(cells, dim=-1) if D > 1 else cells[0],)


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
    resets: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
    return_cell_states: bool = False,
    path: str = "auto",
    allow_tf32: Optional[bool] = None,
    recompute: bool = False,
):
    """One LSTM layer, one direction, on the fused Triton kernels, differentiable in every input.

    Shapes: x [T, B, I]; h0 [B, P] or None; c0 [B, H] or None; w_ih [4H, I]; w_hh [4H, P]; b_ih/b_hh [4H] or
    None; w_hr [P, H] or None; lengths [B] or None; resets [T, B] bool or None; dropout_mask [B, P] or None.
    Returns (y [T, B, P], h_n [B, P], c_n [B, H]) (and cell_states [T, B, H] with ``return_cell_states``).
    See :func:`lstm_layer_directions` for the options.
    """
    outs = lstm_layer_directions(
        x, None if h0 is None else h0.unsqueeze(0), None if c0 is None else c0.unsqueeze(0),
        [(w_ih, w_hh, b_ih, b_hh, w_hr)], lengths=lengths, reverse=(reverse,), resets=resets,
        dropout_mask=None if dropout_mask is None else dropout_mask.unsqueeze(0),
        return_cell_states=return_cell_states, path=path, allow_tf32=allow_tf32, recompute=recompute,
    )
    return (outs[0], outs[1][0], outs[2][0]) + tuple(outs[3:])
