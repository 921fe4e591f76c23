"""The one plain-PyTorch LSTM: the ground truth for every test and the benchmark's "naive" row.

It follows the equations of ``torch.nn.LSTM`` literally (gate order i, f, g, o; two biases simply added;
optional projection ``h = W_hr (o * tanh(c))``), one time step after another, in whatever dtype its
inputs have, float64 included. It makes no attempt to be fast.

Dimension legend: T time steps, B batch, I input features, H hidden units, P projected size
(P = H without projection), D directions, L layers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["lstm_cell_reference", "lstm_layer_reference", "lstm_reference"]


def lstm_cell_reference(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step.

    Shapes: x [B, I], h [B, P], c [B, H], w_ih [4H, I], w_hh [4H, P], b_ih/b_hh [4H], w_hr [P, H].
    Returns (h' [B, P], c' [B, H]).
    """
    gates = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def lstm_layer_reference(
    x: Tensor,
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    lengths: Optional[Sequence[int]] = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction, over a whole sequence.

    Shapes: x [T, B, I]; h0 [B, P] or None (zeros); c0 [B, H] or None (zeros); weights as in
    :func:`lstm_cell_reference`. ``lengths`` (one int per batch element, optional) gives each
    sequence's own length: past it the state is frozen and the output is zero, as
    ``torch.nn.utils.rnn.pad_packed_sequence`` pads. ``reverse`` runs from each sequence's own last
    step back to its first.
    Returns (y [T, B, P], h_n [B, P], c_n [B, H]).
    """
    T, B, _ = x.shape
    H = w_hh.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    h = x.new_zeros(B, P) if h0 is None else h0
    c = x.new_zeros(B, H) if c0 is None else c0
    if lengths is None:
        lengths = [T] * B
    lengths_t = torch.as_tensor(list(lengths), device=x.device)
    ys = [None] * T
    for step in range(T):
        t = T - 1 - step if reverse else step
        h_new, c_new = lstm_cell_reference(x[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
        # Steps past a sequence's end leave its state alone; so in reverse its pass starts from
        # (h0, c0) at its own last step, lengths[b] - 1, as packed sequences do.
        valid = (t < lengths_t).unsqueeze(1)
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def lstm_reference(
    x: Tensor,
    hx: Optional[tuple[Tensor, Tensor]],
    weights: Sequence[Sequence[Tensor]],
    *,
    bias: bool = True,
    bidirectional: bool = False,
    proj_size: int = 0,
    dropout_masks: Optional[Sequence[Tensor]] = None,
    lengths: Optional[Sequence[int]] = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A stacked (optionally bidirectional, projected) LSTM, seq-first.

    Shapes: x [T, B, I]; hx = (h0 [L*D, B, P], c0 [L*D, B, H]) or None; ``weights`` is
    ``torch.nn.LSTM.all_weights``' layout: one list per (layer, direction) of
    [w_ih, w_hh, (b_ih, b_hh if bias), (w_hr if proj_size)]. ``dropout_masks[l]`` ([T, B, D*P],
    already scaled by 1/(1-p)) multiplies layer l's output before layer l+1, for l < L-1.
    Returns (y [T, B, D*P], (h_n [L*D, B, P], c_n [L*D, B, H])).
    """
    D = 2 if bidirectional else 1
    L = len(weights) // D
    h_n, c_n = [], []
    layer_in = x
    for layer in range(L):
        outs = []
        for d in range(D):
            idx = layer * D + d
            w = list(weights[idx])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            w_hr = w[-1] if proj_size > 0 else None
            h0 = hx[0][idx] if hx is not None else None
            c0 = hx[1][idx] if hx is not None else None
            y, h, c = lstm_layer_reference(
                layer_in, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths=lengths, reverse=d == 1
            )
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, dim=-1) if D == 2 else outs[0]
        if dropout_masks is not None and layer < L - 1:
            layer_in = layer_in * dropout_masks[layer]
    return layer_in, (torch.stack(h_n), torch.stack(c_n))
