"""Triton kernels and their thin launchers, one module per path; nothing here knows about autograd or nn.

    dispatch.py     the plan: which path and tiles run a problem (:func:`plan_lstm`)
    common.py       what every kernel shares: activations, the cell update and its derivative, tiles, options
    persistent.py   one program per batch tile runs the whole sequence (small H)
    cooperative.py  the programs of a batch tile split the hidden units and exchange each step through L2
    stepwise.py     one launch per step (any size; the single fused step of LSTMCell)
    buffers.py      host-side conventions: outputs, absent operands, per-direction operands

:func:`lstm_fwd` and :func:`lstm_bwd` run a plan on whichever path it names.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cooperative, persistent, stepwise
from .buffers import PerDirection, per_direction
from .dispatch import LSTMPlan, check_offset_limits, persistent_fits, plan_lstm

_PATHS = {"persistent": persistent, "cooperative": cooperative, "stepwise": stepwise}

__all__ = ["LSTMPlan", "PerDirection", "lstm_bwd", "lstm_fwd", "per_direction", "persistent_fits", "plan_lstm"]


def lstm_fwd(
    plan: LSTMPlan,
    gx: Optional[torch.Tensor],
    w_hh: PerDirection,
    w_hr: Optional[PerDirection],
    h0: torch.Tensor,
    c0: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    save: bool = False,
    fused_input: Optional[tuple] = None,
):
    """Run the recurrence of D directions over all T steps, each direction in its own step order.

    Args:
        plan: the path and tiles (:func:`plan_lstm`).
        gx:   [D, T, B, 4H] x_t·W_ihᵀ + b_ih + b_hh, gate-blocked columns (torch's order), input dtype; or None
              with ``fused_input = (x [D, B, I], w_ih PerDirection of [4H, I], bias [D, 4H] or None)``: a single
              step whose one stepwise kernel also computes the input projection (``plan.fused_step``).
        w_hh: [4H, P] per direction (:func:`per_direction`), input dtype.  w_hr: [P, H] per direction or None.
        h0:   [D, B, P];  c0: [D, B, H] (any float dtype).
        lengths: [B] int32, each in 1..T, or None (every sequence has T steps).
        resets:  [D, T, B] int8 or None: step s of row b starts a new segment from (h0, c0).
        mask:    [D, B, P] input dtype or None: recurrent-dropout mask multiplying h_{t-1} into W_hh.
        save: also return the activated gates [D, T, B, 4H] (input dtype) and cell states [D, T+1, B, H]
              (accumulation dtype; cs[:, 0] = c0) that the backward needs.
    Returns:
        (y [D, T, B, P], h_n [D, B, P], c_n [D, B, H], gates or None, cs or None); y, h_n, c_n in the input dtype.
    """
    if fused_input is not None:
        x = fused_input[0]
        check_offset_limits(x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1], x.shape[-1])
        if not plan.fused_step:
            raise ValueError("the fused input projection runs a single step on the stepwise path")
        return stepwise.forward(plan, None, w_hh, w_hr, h0, c0, lengths, resets, mask, save, fused_input=fused_input)
    check_offset_limits(gx.shape[2], w_hh.shape[0] // 4, w_hh.shape[1])
    return _PATHS[plan.path].forward(plan, gx, w_hh, w_hr, h0, c0, lengths, resets, mask, save)


def lstm_bwd(
    plan: LSTMPlan,
    dy: torch.Tensor,
    dh_n: torch.Tensor,
    dc_n: torch.Tensor,
    dcs: Optional[torch.Tensor],
    gates: torch.Tensor,
    cs: torch.Tensor,
    w_hh: PerDirection,
    w_hr: Optional[PerDirection],
    lengths: Optional[torch.Tensor] = None,
    resets: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
):
    """Backpropagate through the recurrence that :func:`lstm_fwd` ran with the same ``plan``.

    Args:
        dy [D, T, B, P]; dh_n [D, B, P]; dc_n [D, B, H]; dcs [D, T, B, H] or None (gradient reaching the cell
        states c_1..c_T); gates, cs from :func:`lstm_fwd`; the other operands as given to it.
    Returns:
        (dgates [D, T, B, 4H] input dtype (gate-blocked; zero past a sequence's end), dh [D, T, B, P] input dtype
        with projection else None, dh0 [D, B, P], dc0 [D, B, H] accumulation dtype).
    """
    check_offset_limits(gates.shape[2], gates.shape[3] // 4, w_hh.shape[1])
    return _PATHS[plan.path].backward(plan, dy.contiguous(), dh_n, dc_n, dcs, gates, cs, w_hh, w_hr, lengths,
                                      resets, mask)
