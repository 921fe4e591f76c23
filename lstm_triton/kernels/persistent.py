"""The persistent path: one program per batch tile (and direction) runs the whole time loop with every hidden unit.

Each program loads its weight tile — W_hh, and W_hr with a projection — once and keeps it on chip for all T
steps; h and c stay in registers. No program waits for another. Taken when the tile fits without spilling
(``dispatch.persistent_fits``).

Dimension legend (see common.py): D directions, T steps (each direction's own order), B batch, H hidden units,
P projected size (P = H without projection), G = 4H; BLOCK_B batch rows per program, BLOCK_H = HP and
BLOCK_P = PP (H and P padded to powers of two): one program covers every unit.

Tensors (contiguous; per direction d the leading index; gate columns gate-blocked as in torch.nn.LSTM):
    gx      [D, T, B, G]    x_t·W_ihᵀ + b_ih + b_hh for every step, input dtype
    w_hh    [G, P] per direction (base + d·w_hh_dir), w_hr [P, H] per direction (with projection), input dtype
    h0 [D, B, P] input dtype, c0 [D, B, H] accumulation dtype; lengths [B] int32
    resets  [D, T, B] int8  (step s of row b starts a new segment from h0/c0), mask [D, B, P] input dtype
            (recurrent dropout: multiplies h_{t-1} where it enters W_hh)
    y       [D, T, B, P]    h_t, input dtype; zero at steps past a sequence's length
    h_n [D, B, P], c_n [D, B, H]   the state after each sequence's own last step, input dtype
    gates   [D, T, B, G]    activated gates σ(i), σ(f), tanh(g), σ(o) (zero past a sequence's end), input dtype
    cs      [D, T+1, B, H]  c after each step (cs[:, 0] = c0; frozen past a sequence's end), accumulation dtype
Backward:
    dy [D, T, B, P], dh_n [D, B, P], dc_n [D, B, H], dcs [D, T, B, H] (gradient reaching the returned cell states)
    dgates  [D, T, B, G]    ∂L/∂(gate pre-activations), input dtype; zero past a sequence's end
    dh      [D, T, B, P]    with projection: the total gradient reaching h_t (for dW_hr), input dtype
    dh0 [D, B, P], dc0 [D, B, H]   accumulation dtype (summed over every segment that starts from h0/c0)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .buffers import PerDirection, absent, new_output, or_absent
from .common import (at, cell_backward, cell_forward, dropout_mask, in_direction, mma, program_tile, saved_step,
                     sequence_lengths, starts_segment)
from .dispatch import LSTMPlan, accumulation_dtype, saved_gates_dtype


@triton.jit
def _persistent_fwd_kernel(
    gx_ptr, w_hh_ptr, w_hr_ptr, h0_ptr, c0_ptr, len_ptr, reset_ptr, mask_ptr,
    y_ptr, hn_ptr, cn_ptr, gates_ptr, cs_ptr,
    T, B, H, P, stride_gd, stride_gt, stride_yd, stride_yt, stride_cd, stride_ct, stride_rd, w_hh_dir, w_hr_dir,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr,
    SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr,
):
    acc_ty = c0_ptr.dtype.element_ty
    G = 4 * H
    d, rb, rh, col_g, mb, m_col, m_h, m_g, off_h, off_g = program_tile(B, H, BLOCK_B, BLOCK_H)
    rp = tl.arange(0, BLOCK_P)
    m_p = mb[:, None] & (rp < P)[None, :]
    off_p = rb[:, None] * P + rp[None, :]

    # W_hhᵀ [BLOCK_P, 4·BLOCK_H] (and W_hrᵀ [BLOCK_H, BLOCK_P]) read once, reused by every step. Padded units
    # get zero weights and zero pre-activations, so their c stays 0 and h = σ(0)·tanh(0) = 0.
    w_t = tl.load(in_direction(w_hh_ptr, d, w_hh_dir) + col_g[None, :] * P + rp[:, None],
                  mask=(rp < P)[:, None] & m_col[None, :], other=0.0)
    if HAS_PROJ:
        wr_t = tl.load(in_direction(w_hr_ptr, d, w_hr_dir) + rp[None, :] * H + rh[:, None],
                       mask=(rh < H)[:, None] & (rp < P)[None, :], other=0.0)
    h0 = tl.load(h0_ptr + d * B * P + off_p, mask=m_p, other=0.0)
    c0 = tl.load(c0_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    keep = dropout_mask(mask_ptr, d, B * P, rp, m_p, rb, P, acc_ty, HAS_MASK)
    h = h0
    c = c0
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)
    tile_len = tl.max(lens, axis=0)

    s = 0
    while s < tile_len:
        valid = (s < lens)[:, None]
        pre = tl.load(at(gx_ptr, d, stride_gd, s, stride_gt) + off_g, mask=m_g, other=0.0).to(acc_ty)
        if HAS_RESETS:
            restart = starts_segment(reset_ptr, d, stride_rd, s, B, rb, mb, lens, HAS_RESETS)
            h = tl.where(restart, h0, h)
            c = tl.where(restart, c0, c)
        h_in = h
        if HAS_MASK:
            h_in = (h.to(acc_ty) * keep).to(h.dtype)
        pre = mma(h_in, w_t, pre, DOT_PRECISION, DOT_FORM)
        # Padded gate columns must stay exactly 0 even when h holds ±inf (inf·0 would make them NaN, and a
        # NaN in a padded unit would flow into every unit through the next step's dot).
        pre = tl.where(m_col[None, :], pre, 0.0)
        act, c_new, h_new = cell_forward(pre, c, BLOCK_B, BLOCK_H)
        if HAS_PROJ:
            h_new = mma(h_new.to(w_t.dtype), wr_t, tl.zeros((BLOCK_B, BLOCK_P), acc_ty), DOT_PRECISION, DOT_FORM)
        # The next step consumes h rounded to the input dtype, exactly as the other paths read it back.
        h_new = h_new.to(w_t.dtype)
        # Past its end a sequence keeps its state (so h_n/c_n are taken at its own last step) and outputs 0.
        c = tl.where(valid, c_new, c)
        h = tl.where(valid, h_new, h)
        tl.store(at(y_ptr, d, stride_yd, s, stride_yt) + off_p, tl.where(valid, h_new, 0.0), mask=m_p)
        if SAVE:
            tl.store(at(gates_ptr, d, stride_gd, s, stride_gt) + off_g,
                     tl.where(valid, act, 0.0).to(gates_ptr.dtype.element_ty), mask=m_g)
            tl.store(at(cs_ptr, d, stride_cd, s + 1, stride_ct) + off_h, c, mask=m_h)
        s += 1
    while s < T:  # steps past the tile's longest sequence: no work, only the outputs' zeros
        tl.store(at(y_ptr, d, stride_yd, s, stride_yt) + off_p, tl.zeros((BLOCK_B, BLOCK_P), y_ptr.dtype.element_ty),
                 mask=m_p)
        if SAVE:
            tl.store(at(gates_ptr, d, stride_gd, s, stride_gt) + off_g,
                     tl.zeros((BLOCK_B, 4 * BLOCK_H), gates_ptr.dtype.element_ty), mask=m_g)
            tl.store(at(cs_ptr, d, stride_cd, s + 1, stride_ct) + off_h, c, mask=m_h)
        s += 1
    tl.store(hn_ptr + d * B * P + off_p, h, mask=m_p)
    tl.store(cn_ptr + d * B * H + off_h, c.to(cn_ptr.dtype.element_ty), mask=m_h)


@triton.jit
def _persistent_bwd_kernel(
    dy_ptr, dhn_ptr, dcn_ptr, dcs_ptr, gates_ptr, cs_ptr, w_hh_ptr, w_hr_ptr, len_ptr, reset_ptr, mask_ptr,
    dgates_ptr, dh_ptr, dh0_ptr, dc0_ptr,
    T, B, H, P, stride_gd, stride_gt, stride_yd, stride_yt, stride_cd, stride_ct, stride_dcd, stride_dct, stride_rd,
    w_hh_dir, w_hr_dir,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DCS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr,
):
    acc_ty = dh0_ptr.dtype.element_ty
    G = 4 * H
    d, rb, rh, col_g, mb, m_col, m_h, m_g, off_h, off_g = program_tile(B, H, BLOCK_B, BLOCK_H)
    rp = tl.arange(0, BLOCK_P)
    m_p = mb[:, None] & (rp < P)[None, :]
    off_p = rb[:, None] * P + rp[None, :]

    # W_hh [4·BLOCK_H, BLOCK_P] (and W_hr [BLOCK_P, BLOCK_H]) read once for all T steps.
    w = tl.load(in_direction(w_hh_ptr, d, w_hh_dir) + col_g[:, None] * P + rp[None, :],
                mask=m_col[:, None] & (rp < P)[None, :], other=0.0)
    if HAS_PROJ:
        wr = tl.load(in_direction(w_hr_ptr, d, w_hr_dir) + rp[:, None] * H + rh[None, :],
                     mask=(rp < P)[:, None] & (rh < H)[None, :], other=0.0)
    dh = tl.load(dhn_ptr + d * B * P + off_p, mask=m_p, other=0.0).to(acc_ty)
    dc = tl.load(dcn_ptr + d * B * H + off_h, mask=m_h, other=0.0).to(acc_ty)
    keep = dropout_mask(mask_ptr, d, B * P, rp, m_p, rb, P, acc_ty, HAS_MASK)
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)
    tile_len = tl.max(lens, axis=0)
    if HAS_RESETS:
        dh0 = tl.zeros((BLOCK_B, BLOCK_P), acc_ty)
        dc0 = tl.zeros((BLOCK_B, BLOCK_H), acc_ty)

    s = T - 1
    while s >= tile_len:  # steps past every sequence of this tile: nothing flows
        tl.store(at(dgates_ptr, d, stride_gd, s, stride_gt) + off_g,
                 tl.zeros((BLOCK_B, 4 * BLOCK_H), dgates_ptr.dtype.element_ty), mask=m_g)
        if HAS_PROJ:
            tl.store(at(dh_ptr, d, stride_yd, s, stride_yt) + off_p,
                     tl.zeros((BLOCK_B, BLOCK_P), dh_ptr.dtype.element_ty), mask=m_p)
        s -= 1
    while s >= 0:
        valid = (s < lens)[:, None]
        dh = dh + tl.where(valid, tl.load(at(dy_ptr, d, stride_yd, s, stride_yt) + off_p, mask=m_p,
                                          other=0.0).to(acc_ty), 0.0)
        if HAS_PROJ:
            tl.store(at(dh_ptr, d, stride_yd, s, stride_yt) + off_p,
                     tl.where(valid, dh, 0.0).to(dh_ptr.dtype.element_ty), mask=m_p)
            dm = mma(dh.to(w.dtype), wr, tl.zeros((BLOCK_B, BLOCK_H), acc_ty), DOT_PRECISION, DOT_FORM)
        else:
            dm = dh
        dc, act, c, c_prev, restart = saved_step(gates_ptr, cs_ptr, dcs_ptr, reset_ptr, dc, valid, d, s, B, stride_gd, stride_gt, stride_cd,
                                            stride_ct, stride_dcd, stride_dct, stride_rd, rb, mb, lens, off_g, off_h,
                                            m_g, m_h, HAS_DCS, HAS_RESETS)
        dgates, dc_prev = cell_backward(dm, dc, act, c, c_prev, BLOCK_B, BLOCK_H)
        dgates = tl.where(valid, dgates, 0.0).to(dgates_ptr.dtype.element_ty)
        tl.store(at(dgates_ptr, d, stride_gd, s, stride_gt) + off_g, dgates, mask=m_g)
        dh_rec = mma(dgates.to(w.dtype), w, tl.zeros((BLOCK_B, BLOCK_P), acc_ty), DOT_PRECISION, DOT_FORM)
        if HAS_MASK:
            dh_rec = dh_rec * keep
        dc = tl.where(valid, dc_prev, dc)
        dh = tl.where(valid, dh_rec, dh)
        if HAS_RESETS:
            # The segment starting at s began from h0/c0: what reaches its initial state belongs to them, and
            # nothing crosses into the segment before it.
            dh0 += tl.where(restart, dh, 0.0)
            dc0 += tl.where(restart, dc, 0.0)
            dh = tl.where(restart, 0.0, dh)
            dc = tl.where(restart, 0.0, dc)
        s -= 1
    if HAS_RESETS:
        dh = dh + dh0
        dc = dc + dc0
    tl.store(dh0_ptr + d * B * P + off_p, dh, mask=m_p)
    tl.store(dc0_ptr + d * B * H + off_h, dc, mask=m_h)


def forward(plan: LSTMPlan, gx, w_hh: PerDirection, w_hr, h0, c0, lengths, resets, mask, save: bool):
    """The persistent forward; arguments and results as :func:`lstm_triton.kernels.lstm_fwd`."""
    D, T, B, G = gx.shape
    H, P = G // 4, w_hh.shape[1]
    dtype, dev = gx.dtype, gx.device
    acc = accumulation_dtype(dtype)
    y = new_output(D, T, B, P, device=dev, dtype=dtype)
    h_n = new_output(D, B, P, device=dev, dtype=dtype)
    c_n = new_output(D, B, H, device=dev, dtype=dtype)
    gates = new_output(D, T, B, G, device=dev, dtype=saved_gates_dtype(dtype)) if save else None
    cs = new_output(D, T + 1, B, H, device=dev, dtype=acc) if save else None
    c0 = c0.to(acc).contiguous()
    if save:
        cs[:, 0].copy_(c0)
    gates_arg, cs_arg = or_absent(gates, dev, acc), or_absent(cs, dev, acc)
    _persistent_fwd_kernel[plan.grid(B, H, D)](
        gx, w_hh.base, absent(dev, dtype) if w_hr is None else w_hr.base, h0.to(dtype).contiguous(), c0,
        or_absent(lengths, dev), or_absent(resets, dev), or_absent(mask, dev, dtype),
        y, h_n, c_n, gates_arg, cs_arg,
        T, B, H, P, gx.stride(0), gx.stride(1), y.stride(0), y.stride(1), cs_arg.stride(0),
        cs_arg.stride(1) if save else 0, 0 if resets is None else resets.stride(0),
        w_hh.stride, 0 if w_hr is None else w_hr.stride,
        BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_P=plan.block_p,
        HAS_PROJ=w_hr is not None, HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None,
        HAS_MASK=mask is not None, SAVE=save, DOT_PRECISION=plan.dot_precision, DOT_FORM=plan.dot_form,
        num_warps=plan.num_warps, num_stages=1,
    )
    return y, h_n, c_n, gates, cs


def backward(plan: LSTMPlan, dy, dh_n, dc_n, dcs, gates, cs, w_hh: PerDirection, w_hr, lengths, resets, mask):
    """The persistent backward; arguments and results as :func:`lstm_triton.kernels.lstm_bwd`."""
    D, T, B, G = gates.shape
    H, P = G // 4, w_hh.shape[1]
    dtype, dev = w_hh.dtype, gates.device
    acc = cs.dtype
    dgates = new_output(D, T, B, G, device=dev, dtype=dtype)
    dh_all = new_output(D, T, B, P, device=dev, dtype=dtype) if w_hr is not None else None
    dh0 = new_output(D, B, P, device=dev, dtype=acc)
    dc0 = new_output(D, B, H, device=dev, dtype=acc)
    dcs_arg = or_absent(dcs, dev, dtype)
    _persistent_bwd_kernel[plan.grid(B, H, D, backward=True)](
        dy, dh_n.contiguous(), dc_n.contiguous(), dcs_arg, gates, cs, w_hh.base,
        absent(dev, dtype) if w_hr is None else w_hr.base, or_absent(lengths, dev), or_absent(resets, dev),
        or_absent(mask, dev, dtype),
        dgates, or_absent(dh_all, dev, dtype), dh0, dc0,
        T, B, H, P, gates.stride(0), gates.stride(1), dy.stride(0), dy.stride(1), cs.stride(0), cs.stride(1),
        0 if dcs is None else dcs.stride(0), 0 if dcs is None else dcs.stride(1),
        0 if resets is None else resets.stride(0), w_hh.stride, 0 if w_hr is None else w_hr.stride,
        BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_P=plan.block_p,
        HAS_PROJ=w_hr is not None, HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None,
        HAS_MASK=mask is not None, HAS_DCS=dcs is not None,
        DOT_PRECISION=plan.dot_precision, DOT_FORM=plan.dot_form,
        num_warps=plan.num_warps_bwd, num_stages=1,
    )
    return dgates, dh_all, dh0, dc0
