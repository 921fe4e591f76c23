"""The stepwise path: one launch per step, each program a (batch tile, hidden-unit tile) of that step; any H, any B.

The fallback where neither the persistent tile nor a resident cooperative grid fits, and the single-step kernel
(``LSTMCell``, T = 1: ``fused_step``, which also computes x·W_ihᵀ + b, so the whole step is one kernel). W_hh is
read from global memory (L2) every step, in BLOCK_K-wide slices of the reduction.

Dimension legend and tensors as in persistent.py; in addition
    BLOCK_K  the reduction tile over h (and x)
    h_buf [D, 2, B, P], c_buf [D, 2, B, H] the state ping-pong buffers (c goes straight into ``cs`` when saved)
    m_buf [D, B, H] with projection: o⊙tanh(c) of the step, which the launcher multiplies by W_hrᵀ (a projection
          needs every unit of a row, which one program does not own)
State addressing is the same for every buffer: direction stride, step stride, and the index of the step slot
to read and to write (s and s+1 in ``cs``; s mod 2 and (s+1) mod 2 in a ping-pong buffer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import PerDirection, absent, new_output, or_absent
from .common import (add_rows_times_wt, at, cell_backward, cell_forward, in_direction, mma, program_tile,
                     saved_step, sequence_lengths, starts_segment)
from .dispatch import LSTMPlan, accumulation_dtype, saved_gates_dtype


@triton.jit
def _stepwise_fwd_kernel(
    gx_ptr, x_ptr, w_ih_ptr, bias_ptr, w_hh_ptr, h_ptr, c_ptr, h0_ptr, c0_ptr, len_ptr, reset_ptr, mask_ptr,
    out_ptr, gates_ptr,
    s, h_read, h_write, c_read, c_write, T, B, H, P, I,
    stride_gd, stride_gt, stride_hd, stride_ht, stride_cd, stride_ct, stride_od, stride_ot, stride_rd,
    w_ih_dir, w_hh_dir,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    FUSE_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr,
):
    # Step s of every direction. Without a projection ``out`` is y (h_t at step s); with one it is m_buf
    # (step stride 0) and the launcher finishes h_t = m·W_hrᵀ.
    acc_ty = c_ptr.dtype.element_ty
    G = 4 * H
    d, rb, rh, col_g, mb, m_col, m_h, m_g, off_h, off_g = program_tile(B, H, BLOCK_B, BLOCK_H)
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)
    valid = (s < lens)[:, None]
    restart = starts_segment(reset_ptr, d, stride_rd, s, B, rb, mb, lens, HAS_RESETS)

    if FUSE_INPUT:
        pre = tl.zeros((BLOCK_B, 4 * BLOCK_H), acc_ty)
        if HAS_BIAS:
            pre += tl.load(in_direction(bias_ptr, d, G) + col_g, mask=m_col, other=0.0).to(acc_ty)[None, :]
        pre = add_rows_times_wt(pre, in_direction(x_ptr, d, B * I), in_direction(w_ih_ptr, d, w_ih_dir), I, rb, mb,
                                col_g, m_col, BLOCK_K, DOT_PRECISION, DOT_FORM, x_ptr, restart, x_ptr, False, False)
    else:
        pre = tl.load(at(gx_ptr, d, stride_gd, s, stride_gt) + off_g, mask=m_g,
                      other=0.0).to(acc_ty)
    h_prev_ptr = at(h_ptr, d, stride_hd, h_read, stride_ht)
    pre = add_rows_times_wt(pre, h_prev_ptr, in_direction(w_hh_ptr, d, w_hh_dir), P, rb, mb, col_g, m_col, BLOCK_K,
                            DOT_PRECISION, DOT_FORM, in_direction(h0_ptr, d, B * P), restart,
                            in_direction(mask_ptr, d, B * P), HAS_RESETS, HAS_MASK)
    pre = tl.where(m_col[None, :], pre, 0.0)  # padded columns stay 0 even for h = ±inf (see persistent.py)
    c_prev = tl.load(at(c_ptr, d, stride_cd, c_read, stride_ct) + off_h, mask=m_h, other=0.0)
    if HAS_RESETS:
        c_prev = tl.where(restart, tl.load(in_direction(c0_ptr, d, B * H) + off_h, mask=m_h, other=0.0), c_prev)
    act, c, h = cell_forward(pre, c_prev, BLOCK_B, BLOCK_H)
    tl.store(at(c_ptr, d, stride_cd, c_write, stride_ct) + off_h, tl.where(valid, c, c_prev), mask=m_h)
    if SAVE:
        tl.store(at(gates_ptr, d, stride_gd, s, stride_gt) + off_g,
                 tl.where(valid, act, 0.0).to(gates_ptr.dtype.element_ty), mask=m_g)
    if HAS_PROJ:
        tl.store(at(out_ptr, d, stride_od, s, stride_ot) + off_h, h.to(out_ptr.dtype.element_ty), mask=m_h)
    else:
        h = h.to(out_ptr.dtype.element_ty)
        h_prev = tl.load(h_prev_ptr + off_h, mask=m_h, other=0.0)
        tl.store(at(h_ptr, d, stride_hd, h_write, stride_ht) + off_h, tl.where(valid, h, h_prev), mask=m_h)
        tl.store(at(out_ptr, d, stride_od, s, stride_ot) + off_h, tl.where(valid, h, 0.0), mask=m_h)


@triton.jit
def _recurrent_dh(dg_ptr, w_d, mask_d, rb, mb, rh, m_h, off_h, H, acc_ty: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr):
    """dgates[rb, :] · W_hh[:, rh] of one step's dgates [B, 4H], reduced over the 4H gate rows in BLOCK_K chunks,
    times the dropout mask: the gradient reaching this program's units of h before that step."""
    G = 4 * H
    rec = tl.zeros((BLOCK_B, BLOCK_H), acc_ty)
    k0 = 0
    while k0 < G:
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < G
        dg_k = tl.load(dg_ptr + rb[:, None] * G + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        w_k = tl.load(w_d + rk[:, None] * H + rh[None, :], mask=mk[:, None] & (rh < H)[None, :], other=0.0)
        rec = mma(dg_k.to(w_k.dtype), w_k, rec, DOT_PRECISION, DOT_FORM)
        k0 += BLOCK_K
    if HAS_MASK:
        rec = rec * tl.load(mask_d + off_h, mask=m_h, other=0.0).to(acc_ty)
    return rec


@triton.jit
def _stepwise_bwd_kernel(
    dy_ptr, dcs_ptr, gates_ptr, cs_ptr, w_hh_ptr, len_ptr, reset_ptr, mask_ptr,
    dgates_ptr, dh_ptr, dc_ptr, dh0_ptr, dc0_ptr,
    s, T, B, H, stride_gd, stride_gt, stride_yd, stride_yt, stride_cd, stride_ct, stride_dcd, stride_dct,
    stride_rd, w_hh_dir,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    FUSED_DH: tl.constexpr, FINAL: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DCS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr,
):
    # Step s (reverse). dh, dc [D, B, H] carry the state gradients across launches and dh0, dc0 [D, B, *]
    # accumulate what reaches the initial state at segment starts; each program updates only its own units
    # (in place is race-free). FUSED_DH (no projection): dh_s = dy_s + dgates_{s+1}·W_hh is computed here;
    # otherwise the launcher has already put dm_s = dh_s·W_hr into dh. FINAL (s = -1, after step 0): only
    # dh0 += dgates_0·W_hh (every sequence has a step 0, which always starts from h0).
    acc_ty = dc_ptr.dtype.element_ty
    G = 4 * H
    d, rb, rh, col_g, mb, m_col, m_h, m_g, off_h, off_g = program_tile(B, H, BLOCK_B, BLOCK_H)
    off_hd = d * B * H + off_h
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)
    valid = (s < lens)[:, None]

    dh = tl.load(dh_ptr + off_hd, mask=m_h, other=0.0)
    if FINAL:
        rec = _recurrent_dh(in_direction(dgates_ptr, d, stride_gd), in_direction(w_hh_ptr, d, w_hh_dir),
                            in_direction(mask_ptr, d, B * H), rb, mb, rh, m_h, off_h, H, acc_ty, BLOCK_B, BLOCK_H,
                            BLOCK_K, HAS_MASK, DOT_PRECISION, DOT_FORM)
        tl.store(dh0_ptr + off_hd, tl.load(dh0_ptr + off_hd, mask=m_h, other=0.0) + rec, mask=m_h)
        return
    if FUSED_DH:
        if s + 1 < T:
            rec = _recurrent_dh(at(dgates_ptr, d, stride_gd, s + 1, stride_gt), in_direction(w_hh_ptr, d, w_hh_dir),
                                in_direction(mask_ptr, d, B * H), rb, mb, rh, m_h, off_h, H, acc_ty, BLOCK_B,
                                BLOCK_H, BLOCK_K, HAS_MASK, DOT_PRECISION, DOT_FORM)
            if HAS_RESETS:
                # Step s+1 started a segment from h0: its gradient goes there, and none crosses into step s.
                restart_next = starts_segment(reset_ptr, d, stride_rd, s + 1, B, rb, mb, lens, HAS_RESETS)
                tl.store(dh0_ptr + off_hd, tl.load(dh0_ptr + off_hd, mask=m_h, other=0.0)
                         + tl.where(restart_next, rec, 0.0), mask=m_h)
                rec = tl.where(restart_next, 0.0, rec)
            # A sequence that had ended by step s+1 passes its dh through untouched.
            dh = tl.where((s + 1 < lens)[:, None], rec, dh)
        dh += tl.where(valid, tl.load(at(dy_ptr, d, stride_yd, s, stride_yt) + off_h, mask=m_h,
                                      other=0.0).to(acc_ty), 0.0)
        tl.store(dh_ptr + off_hd, dh, mask=m_h)
    dc = tl.load(dc_ptr + off_hd, mask=m_h, other=0.0)
    dc, act, c, c_prev, restart = saved_step(gates_ptr, cs_ptr, dcs_ptr, reset_ptr, dc, valid, d, s, B, stride_gd,
                                             stride_gt, stride_cd, stride_ct, stride_dcd, stride_dct, stride_rd, rb, mb,
                                             lens, off_g, off_h, m_g, m_h, HAS_DCS, HAS_RESETS)
    dgates, dc_prev = cell_backward(dh, dc, act, c, c_prev, BLOCK_B, BLOCK_H)
    tl.store(at(dgates_ptr, d, stride_gd, s, stride_gt) + off_g,
             tl.where(valid, dgates, 0.0).to(dgates_ptr.dtype.element_ty), mask=m_g)
    dc = tl.where(valid, dc_prev, dc)
    if HAS_RESETS:
        tl.store(dc0_ptr + off_hd, tl.load(dc0_ptr + off_hd, mask=m_h, other=0.0) + tl.where(restart, dc, 0.0),
                 mask=m_h)
        dc = tl.where(restart, 0.0, dc)
    tl.store(dc_ptr + off_hd, dc, mask=m_h)


def _valid_rows(lengths, s: int, B: int, device) -> torch.Tensor:
    """[B, 1] bool: which sequences are still running at step s."""
    if lengths is None:
        return torch.ones(B, 1, dtype=torch.bool, device=device)
    return (lengths > s).unsqueeze(1)


def _restarts(resets, lengths, s: int, B: int, device) -> torch.Tensor:
    """[D, B, 1] bool: rows whose step s starts a segment (and still run)."""
    return (resets[:, s] != 0).unsqueeze(-1) & _valid_rows(lengths, s, B, device)


def forward(plan: LSTMPlan, gx, w_hh: PerDirection, w_hr, h0, c0, lengths, resets, mask, save: bool,
            fused_input=None):
    """The stepwise forward; arguments and results as :func:`lstm_triton.kernels.lstm_fwd`."""
    if fused_input is not None:
        x, w_ih, bias = fused_input
        D, B, I = x.shape
        T, G = 1, w_hh.shape[0]
        dtype, dev = x.dtype, x.device
    else:
        D, T, B, G = gx.shape
        x, w_ih, bias, I = absent(gx.device, gx.dtype), None, None, 0
        dtype, dev = gx.dtype, gx.device
    H, P = G // 4, w_hh.shape[1]
    acc = accumulation_dtype(dtype)
    has_proj = w_hr is not None
    y = new_output(D, T, B, P, device=dev, dtype=dtype)
    gates = new_output(D, T, B, G, device=dev, dtype=saved_gates_dtype(dtype)) if save else None
    c0 = c0.to(acc).contiguous()
    h_buf = new_output(D, 2, B, P, device=dev, dtype=dtype)
    h_buf[:, 0].copy_(h0)
    if save:
        c_buf = new_output(D, T + 1, B, H, device=dev, dtype=acc)  # becomes cs
        c_slot = lambda s: s  # noqa: E731
    else:
        c_buf = new_output(D, 2, B, H, device=dev, dtype=acc)
        c_slot = lambda s: s % 2  # noqa: E731
    c_buf[:, 0].copy_(c0)
    m_buf = new_output(D, B, H, device=dev, dtype=dtype) if has_proj else None
    out = m_buf if has_proj else y
    out_strides = (B * H, 0) if has_proj else (y.stride(0), y.stride(1))
    gate_strides = gates.stride()[:2] if save else (gx.stride()[:2] if gx is not None else (0, 0))
    zero = torch.zeros((), dtype=dtype, device=dev)
    # Everything but the step's own indices is the same for every launch.
    args = (gx if gx is not None else x, x, w_ih.base if w_ih is not None else x, or_absent(bias, dev, dtype),
            w_hh.base, h_buf, c_buf, h0.to(dtype).contiguous() if resets is not None else x, c0,
            or_absent(lengths, dev), or_absent(resets, dev), or_absent(mask, dev, dtype),
            out, or_absent(gates, dev, acc))
    sizes = (T, B, H, P, I, *gate_strides, h_buf.stride(0), h_buf.stride(1), c_buf.stride(0), c_buf.stride(1),
             *out_strides, 0 if resets is None else resets.stride(0), 0 if w_ih is None else w_ih.stride, w_hh.stride)
    for s in range(T):
        _stepwise_fwd_kernel[plan.grid(B, H, D)](
            *args, s, s % 2, (s + 1) % 2, c_slot(s), c_slot(s + 1), *sizes,
            BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_K=plan.block_k,
            FUSE_INPUT=fused_input is not None, HAS_BIAS=bias is not None, HAS_PROJ=has_proj,
            HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None, HAS_MASK=mask is not None, SAVE=save,
            DOT_PRECISION=plan.dot_precision, DOT_FORM=plan.dot_form,
            num_warps=plan.num_warps, num_stages=1,
        )
        if has_proj:
            h_prev, h_next = h_buf[:, s % 2], h_buf[:, (s + 1) % 2]
            h_new = torch.stack([m_buf[d] @ w_hr.tensors[d].t() for d in range(D)])
            valid = _valid_rows(lengths, s, B, dev)
            torch.where(valid, h_new, h_prev, out=h_next)
            torch.where(valid, h_new, zero, out=y[:, s])
    h_n = h_buf[:, T % 2].clone()
    c_n = c_buf[:, c_slot(T)].to(dtype, copy=True)
    return y, h_n, c_n, gates, c_buf if save else None


def backward(plan: LSTMPlan, dy, dh_n, dc_n, dcs, gates, cs, w_hh: PerDirection, w_hr, lengths, resets, mask):
    """The stepwise backward; arguments and results as :func:`lstm_triton.kernels.lstm_bwd`."""
    D, T, B, G = gates.shape
    H, P = G // 4, w_hh.shape[1]
    dtype, dev = w_hh.dtype, gates.device
    acc = cs.dtype
    has_proj = w_hr is not None
    dgates = new_output(D, T, B, G, device=dev, dtype=dtype)
    dh_all = new_output(D, T, B, P, device=dev, dtype=dtype) if has_proj else None
    dc = dc_n.to(acc, copy=True).contiguous()
    # Without projection ``dh`` carries dh_s (P = H) and the kernel fuses dgates_{s+1}·W_hh; with projection
    # the P-space recurrence is done here with GEMMs and ``dh`` receives dm_s = dh_s·W_hr.
    dh = dh_n.to(acc, copy=True).contiguous() if not has_proj else new_output(D, B, H, device=dev, dtype=acc)
    dh0 = torch.zeros(D, B, P, device=dev, dtype=acc)
    dc0 = torch.zeros(D, B, H, device=dev, dtype=acc)
    zero = torch.zeros((), dtype=acc, device=dev)
    if has_proj:
        # The P-space recurrence runs here as GEMMs in the accumulation dtype: for 16-bit inputs that casts
        # W_hh and W_hr once per call (the one weight-sized copy left on any path; see the compile report).
        w_acc = [w.to(acc) for w in w_hh.tensors]
        w_hr_acc = [w.to(acc) for w in w_hr.tensors]
        keep = None if mask is None else mask.to(acc)

    def recurrent(dg):  # dgates [D, B, G] → the gradient reaching h before that step (P-space, masked)
        rec = torch.stack([dg[d].to(acc) @ w_acc[d] for d in range(D)])
        return rec if keep is None else rec * keep

    dh_p = dh_n.to(acc, copy=True) if has_proj else None
    dcs_arg = or_absent(dcs, dev, dtype)
    lengths_arg, resets_arg, mask_arg = or_absent(lengths, dev), or_absent(resets, dev), or_absent(mask, dev, dtype)
    strides = (gates.stride(0), gates.stride(1), dy.stride(0), dy.stride(1), cs.stride(0), cs.stride(1),
               0 if dcs is None else dcs.stride(0), 0 if dcs is None else dcs.stride(1),
               0 if resets is None else resets.stride(0), w_hh.stride)
    for s in list(range(T - 1, -1, -1)) + ([] if has_proj else [-1]):
        if has_proj:
            valid = _valid_rows(lengths, s, B, dev)
            if s + 1 < T:
                rec = recurrent(dgates[:, s + 1])
                if resets is not None:
                    restart = _restarts(resets, lengths, s + 1, B, dev)
                    dh0 += torch.where(restart, rec, zero)
                    rec = torch.where(restart, zero, rec)
                dh_p = torch.where(_valid_rows(lengths, s + 1, B, dev), rec, dh_p)
            dh_p = dh_p + torch.where(valid, dy[:, s].to(acc), zero)
            dh_all[:, s] = torch.where(valid, dh_p, zero)  # rounded to the input dtype, as the kernels store it
            torch.stack([dh_p[d].to(dtype).to(acc) @ w_hr_acc[d] for d in range(D)], out=dh)
        _stepwise_bwd_kernel[plan.grid(B, H, D, backward=True)](
            dy, dcs_arg, gates, cs, w_hh.base, lengths_arg, resets_arg, mask_arg,
            dgates, dh, dc, dh0, dc0,
            s, T, B, H, *strides,
            BLOCK_B=plan.block_b, BLOCK_H=plan.block_h_bwd, BLOCK_K=plan.block_k,
            FUSED_DH=not has_proj, FINAL=s < 0, HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None,
            HAS_MASK=mask is not None, HAS_DCS=dcs is not None,
            DOT_PRECISION=plan.dot_precision, DOT_FORM=plan.dot_form,
            num_warps=plan.num_warps_bwd, num_stages=1,
        )
    if has_proj:
        # Every sequence has at least one step, so step 0 is valid for all rows: dh0 gets dgates_0·W_hh, rounded
        # like every in-loop product (dgates in the weight dtype, accumulated in acc). (Without a projection
        # the FINAL launch above did this in the kernel.)
        dh0 += recurrent(dgates[:, 0])
    return dgates, dh_all, dh0, dc0 + dc
