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

__all__ = ["lstm_cell_reference", "lstm_layer_directions_reference", "lstm_layer_reference", "lstm_reference"]


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
    resets: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
    return_cell_states: bool = False,
):
    """One layer, one direction, over a whole sequence.

    Shapes: x [T, B, I]; h0 [B, P] or None (zeros); c0 [B, H] or None (zeros); weights as in
    :func:`lstm_cell_reference`. ``lengths`` (one int per batch element, optional) gives each
    sequence's own length: past it the state is frozen and the output is zero, as
    ``torch.nn.utils.rnn.pad_packed_sequence`` pads. ``reverse`` runs from each sequence's own last
    step back to its first.
    ``resets`` [T, B] bool: where ``resets[t, b]``, time step t starts a new segment of sequence b, which
    runs from (h0, c0) as if it were a sequence of its own; running in reverse, a segment starts at its
    last step (where ``resets[t + 1, b]``). ``dropout_mask`` [B, P]: multiplies h_{t-1} where it enters
    W_hh, at every step (recurrent dropout).
    Returns (y [T, B, P], h_n [B, P], c_n [B, H]), and with ``return_cell_states`` also the cell state
    after every step [T, B, H] (zero past a sequence's end, like y).
    """
    T, B, _ = x.shape
    H = w_hh.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    h_init = x.new_zeros(B, P) if h0 is None else h0
    c_init = x.new_zeros(B, H) if c0 is None else c0
    h, c = h_init, c_init
    if lengths is None:
        lengths = [T] * B
    lengths_t = torch.as_tensor(list(lengths), device=x.device)
    ys, cells = [None] * T, [None] * T
    for step in range(T):
        t = T - 1 - step if reverse else step
        valid = (t < lengths_t).unsqueeze(1)
        if resets is not None:
            if not reverse:
                starts = resets[t]
            elif t + 1 < T:
                starts = resets[t + 1]  # running backwards, a segment starts at its last step
            else:
                starts = torch.zeros_like(resets[t])
            starts = (starts & valid.squeeze(1)).unsqueeze(1)
            h = torch.where(starts, h_init, h)
            c = torch.where(starts, c_init, c)
        h_in = h if dropout_mask is None else h * dropout_mask
        h_new, c_new = lstm_cell_reference(x[t], h_in, c, w_ih, w_hh, b_ih, b_hh, w_hr)
        # Steps past a sequence's end leave its state alone; so in reverse its pass starts from
        # (h0, c0) at its own last step, lengths[b] - 1, as packed sequences do.
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
        cells[t] = torch.where(valid, c_new, torch.zeros_like(c_new))
    if return_cell_states:
        return torch.stack(ys), h, c, torch.stack(cells)
    return torch.stack(ys), h, c


def lstm_layer_directions_reference(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: Sequence[Sequence[Optional[Tensor]]],
    *,
    lengths: Optional[Tensor] = None,
    reverse: Sequence[bool] = (False, True),
    resets: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
    return_cell_states: bool = False,
    **_,
):
    """:func:`lstm_triton.lstm_layer_directions`' contract on this reference (what the module runs where the
    kernels cannot). x [T, B, I]; h0 [D, B, P]; c0 [D, B, H]; weights per direction (w_ih, w_hh, b_ih, b_hh,
    w_hr); lengths [B] tensor or None; resets [T, B] bool; dropout_mask [D, B, P]. Returns (y [T, B, D·P],
    h_n [D, B, P], c_n [D, B, H]) and with ``return_cell_states`` the cell states [T, B, D·H]."""
    lens = None if lengths is None else lengths.tolist()
    outs = [lstm_layer_reference(x, h0[d], c0[d], *weights[d], lengths=lens, reverse=reverse[d], resets=resets,
                                 dropout_mask=None if dropout_mask is None else dropout_mask[d],
                                 return_cell_states=True)
            for d in range(len(weights))]
    y, h_n, c_n, cells = (torch.cat([o[i] for o in outs], -1) if i in (0, 3) else torch.stack([o[i] for o in outs])
                          for i in range(4))
    return (y, h_n, c_n, cells) if return_cell_states else (y, h_n, c_n)


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
    resets: Optional[Tensor] = None,
    recurrent_dropout_masks: Optional[Sequence[Tensor]] = None,
    return_cell_states: bool = False,
):
    """A stacked (optionally bidirectional, projected) LSTM, seq-first.

    Shapes: x [T, B, I]; hx = (h0 [L*D, B, P], c0 [L*D, B, H]) or None; ``weights`` is
    ``torch.nn.LSTM.all_weights``' layout: one list per (layer, direction) of
    [w_ih, w_hh, (b_ih, b_hh if bias), (w_hr if proj_size)]. ``dropout_masks[l]`` ([T, B, D*P],
    already scaled by 1/(1-p)) multiplies layer l's output before layer l+1, for l < L-1.
    ``resets`` [T, B] bool: segment starts, in every layer and direction (see :func:`lstm_layer_reference`);
    ``recurrent_dropout_masks[l*D + d]`` [B, P]: layer l, direction d's recurrent-dropout mask.
    Returns (y [T, B, D*P], (h_n [L*D, B, P], c_n [L*D, B, H])), and with ``return_cell_states`` also the
    last layer's cell states [T, B, D*H].
    """
    D = 2 if bidirectional else 1
    L = len(weights) // D
    h_n, c_n = [], []
    layer_in = x
    for layer in range(L):
        outs, cells = [], []
        for d in range(D):
            idx = layer * D + d
            w = list(weights[idx])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            w_hr = w[-1] if proj_size > 0 else None
            h0 = hx[0][idx] if hx is not None else None
            c0 = hx[1][idx] if hx is not None else None
            y, h, c, cs = lstm_layer_reference(
                layer_in, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths=lengths, reverse=d == 1, resets=resets,
                dropout_mask=None if recurrent_dropout_masks is None else recurrent_dropout_masks[idx],
                return_cell_states=True,
            )
            outs.append(y)
            cells.append(cs)
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, dim=-1) if D == 2 else outs[0]
        if dropout_masks is not None and layer < L - 1:
            layer_in = layer_in * dropout_masks[layer]
    result = layer_in, (torch.stack(h_n), torch.stack(c_n))
    if return_cell_states:
        return result + (torch.cat(cells, dim=-1),)
    return result
