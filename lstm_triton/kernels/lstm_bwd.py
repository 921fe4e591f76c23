"""Backward through time: reverse-step fused kernel producing dgates for every step, carrying dh and dc.

Dimension legend (as in lstm_fwd.py)
    D directions, T steps (each direction's own order), B batch, H hidden units, P projected size (P = H
    without projection), G = 4H unit-interleaved gate columns; BLOCK_B batch rows, BLOCK_H hidden units and
    BLOCK_P padded P per program, BLOCK_K reduction tile over G (stepwise).

Inputs (contiguous):
    dy      [D, T, B, P]   gradient reaching y (ignored past a sequence's end, where y is the constant 0)
    dh_n    [D, B, P], dc_n [D, B, H]
    gates   [D, T, B, G], cs [D, T+1, B, H]   saved by the forward, accumulation dtype
    w_hh    [D, G, P] (rows interleaved), w_hr [D, P, H] (with projection), input dtype
    lengths [B] int32 or None
Outputs (accumulation dtype):
    dgates  [D, T, B, G]   ∂L/∂(gate pre-activations); zero past a sequence's end. The input and weight
                           gradients are GEMMs over it after the loop (deterministic: no atomics on weights)
    dh      [D, T, B, P]   with projection only: the total gradient reaching h_t (for dW_hr = Σ dhᵀ·m)
    dh0 [D, B, P], dc0 [D, B, H]

Per step (reverse): dh_t = dy_t + dgates_{t+1}·W_hh; with projection dm = dh_t·W_hr, else dm = dh_t; the
pointwise derivatives (``cell_backward``); dc_{t-1} = dc_t ⊙ f_t. Past a sequence's end its state was frozen,
so dh and dc pass through unchanged. The paths mirror the forward's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._buffers import new_output
from ._gates import cell_backward, mma, sequence_lengths, unit_tile
from .config import LSTMKernelConfig, check_offset_limits
from .lstm_coop import lstm_bwd_coop
from .lstm_fwd import valid_rows


@triton.jit
def _lstm_bwd_persistent_kernel(
    dy_ptr, dhn_ptr, dcn_ptr, gates_ptr, cs_ptr, w_hh_ptr, w_hr_ptr, len_ptr,
    dgates_ptr, dh_ptr, dh0_ptr, dc0_ptr,
    T, B, H, P, stride_gd, stride_yd, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    acc_ty = dgates_ptr.dtype.element_ty
    G = 4 * H
    pid = tl.program_id(0)
    d = tl.program_id(1)
    rb, rh, rg, mb, m_h, m_g, off_h, off_g = unit_tile(pid, 0, B, H, BLOCK_B, BLOCK_H)
    rp = tl.arange(0, BLOCK_P)
    m_p = mb[:, None] & (rp < P)[None, :]
    off_p = rb[:, None] * P + rp[None, :]

    # W_hh [4·BLOCK_H, BLOCK_P] (and W_hr [BLOCK_P, BLOCK_H]) read once for all T steps.
    w = tl.load(w_hh_ptr + d * G * P + rg[:, None] * P + rp[None, :],
                mask=(rg < G)[:, None] & (rp < P)[None, :], other=0.0)
    if HAS_PROJ:
        wr = tl.load(w_hr_ptr + d * P * H + rp[:, None] * H + rh[None, :],
                     mask=(rp < P)[:, None] & (rh < H)[None, :], other=0.0)
    dh = tl.load(dhn_ptr + d * B * P + off_p, mask=m_p, other=0.0).to(acc_ty)
    dc = tl.load(dcn_ptr + d * B * H + off_h, mask=m_h, other=0.0).to(acc_ty)
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)
    tile_len = tl.max(lens, axis=0)

    # Every per-step pointer starts at step T-1 and walks back (64-bit pointer arithmetic).
    dy_s = dy_ptr + d * stride_yd + stride_yd - B * P + off_p
    dh_s = dh_ptr + d * stride_yd + stride_yd - B * P + off_p
    gates_s = gates_ptr + d * stride_gd + stride_gd - B * G + off_g
    dgates_s = dgates_ptr + d * stride_gd + stride_gd - B * G + off_g
    cs_s = cs_ptr + d * stride_cd + stride_cd - B * H + off_h  # c_t; c_{t-1} is one step below
    for _ in range(tile_len, T):  # steps past every sequence of this tile: nothing flows
        tl.store(dgates_s, tl.zeros((BLOCK_B, 4 * BLOCK_H), acc_ty), mask=m_g)
        if HAS_PROJ:
            tl.store(dh_s, tl.zeros((BLOCK_B, BLOCK_P), acc_ty), mask=m_p)
        dy_s -= B * P
        dh_s -= B * P
        gates_s -= B * G
        dgates_s -= B * G
        cs_s -= B * H
    for i in range(tile_len):
        valid = ((tile_len - 1 - i) < lens)[:, None]
        dh = dh + tl.where(valid, tl.load(dy_s, mask=m_p, other=0.0).to(acc_ty), 0.0)
        if HAS_PROJ:
            tl.store(dh_s, tl.where(valid, dh, 0.0), mask=m_p)
            dm = mma(dh.to(w.dtype), wr, tl.zeros((BLOCK_B, BLOCK_H), acc_ty), DOT_PRECISION, UPCAST_DOT)
        else:
            dm = dh
        act = tl.load(gates_s, mask=m_g, other=0.0)
        c = tl.load(cs_s, mask=m_h, other=0.0)
        c_prev = tl.load(cs_s - B * H, mask=m_h, other=0.0)
        dgates, dc_prev = cell_backward(dm, dc, act, c, c_prev, BLOCK_B, BLOCK_H)
        dgates = tl.where(valid, dgates, 0.0)
        dc = tl.where(valid, dc_prev, dc)
        tl.store(dgates_s, dgates, mask=m_g)
        dh_rec = mma(dgates.to(w.dtype), w, tl.zeros((BLOCK_B, BLOCK_P), acc_ty), DOT_PRECISION, UPCAST_DOT)
        dh = tl.where(valid, dh_rec, dh)
        dy_s -= B * P
        dh_s -= B * P
        gates_s -= B * G
        dgates_s -= B * G
        cs_s -= B * H
    tl.store(dh0_ptr + d * B * P + off_p, dh, mask=m_p)
    tl.store(dc0_ptr + d * B * H + off_h, dc, mask=m_h)


@triton.jit
def _lstm_bwd_step_kernel(
    dy_ptr, dgates_next_ptr, dh_ptr, dc_ptr, gates_ptr, cs_ptr, w_hh_ptr, len_ptr,
    dgates_ptr,
    s, B, H, stride_gd, stride_yd, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    FUSED_DH: tl.constexpr, FIRST: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # One step s (reverse). dy, gates, dgates, dgates_next (= step s+1) and cs (= c after step s) point at
    # direction 0; direction d adds d·stride. dh [D, B, H] and dc [D, B, H] carry the state gradients across
    # launches, each program updating only its own units (in place is race-free).
    # FUSED_DH (no projection): dh_s = dy_s + dgates_{s+1}·W_hh is computed here; otherwise the caller has
    # already put dm_s = dh_s·W_hr into dh.
    acc_ty = dgates_ptr.dtype.element_ty
    G = 4 * H
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)
    rb, rh, rg, mb, m_h, m_g, off_h, off_g = unit_tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    off_g += d * stride_gd
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
    else:
        lens = tl.where(mb, s + 2, 0)  # every row valid at s and s+1
    valid = (s < lens)[:, None]

    dh = tl.load(dh_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    if FUSED_DH:
        if not FIRST:
            rec = tl.zeros((BLOCK_B, BLOCK_H), acc_ty)
            w_d = w_hh_ptr + d * G * H
            for k0 in range(0, G, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = rk < G
                dg_k = tl.load(dgates_next_ptr + d * stride_gd + rb[:, None] * G + rk[None, :],
                               mask=mb[:, None] & mk[None, :], other=0.0)
                w_k = tl.load(w_d + rk[:, None] * H + rh[None, :], mask=mk[:, None] & (rh < H)[None, :], other=0.0)
                rec = mma(dg_k.to(w_k.dtype), w_k, rec, DOT_PRECISION, UPCAST_DOT)
            # A sequence that had ended by step s+1 passes its dh through untouched.
            dh = tl.where((s + 1 < lens)[:, None], rec, dh)
        dh += tl.where(valid, tl.load(dy_ptr + d * stride_yd + off_h, mask=m_h, other=0.0).to(acc_ty), 0.0)
        tl.store(dh_ptr + d * B * H + off_h, dh, mask=m_h)
    cs_d = cs_ptr + d * stride_cd + off_h
    act = tl.load(gates_ptr + off_g, mask=m_g, other=0.0)
    c = tl.load(cs_d, mask=m_h, other=0.0)
    c_prev = tl.load(cs_d - B * H, mask=m_h, other=0.0)
    dc = tl.load(dc_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    dgates, dc_prev = cell_backward(dh, dc, act, c, c_prev, BLOCK_B, BLOCK_H)
    tl.store(dgates_ptr + off_g, tl.where(valid, dgates, 0.0), mask=m_g)
    tl.store(dc_ptr + d * B * H + off_h, tl.where(valid, dc_prev, dc), mask=m_h)


def lstm_bwd(
    dy: torch.Tensor,
    dh_n: torch.Tensor,
    dc_n: torch.Tensor,
    gates: torch.Tensor,
    cs: torch.Tensor,
    w_hh: torch.Tensor,
    w_hr: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    config: LSTMKernelConfig,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Backpropagate through the recurrence of D directions.

    Args:
        dy: [D, T, B, P]; dh_n: [D, B, P]; dc_n: [D, B, H]; gates [D, T, B, 4H] and cs [D, T+1, B, H] from
        :func:`lstm_fwd`; w_hh [D, 4H, P] interleaved; w_hr [D, P, H] or None; lengths [B] int32 or None;
        config: the configuration the forward ran with.
    Returns:
        (dgates [D, T, B, 4H], dh [D, T, B, P] with projection else None, dh0 [D, B, P], dc0 [D, B, H]),
        all in the accumulation dtype.
    """
    check_offset_limits(gates.shape[2], gates.shape[3] // 4, w_hh.shape[2])
    dy = dy.contiguous()
    if config.path == "cooperative":
        return lstm_bwd_coop(dy, dh_n, dc_n, gates, cs, w_hh, lengths, config)
    D, T, B, G = gates.shape
    H = G // 4
    P = w_hh.shape[2]
    acc = gates.dtype
    dev = gates.device
    has_proj, has_len = w_hr is not None, lengths is not None
    dgates = new_output(D, T, B, G, device=dev, dtype=acc)
    dh_all = new_output(D, T, B, P, device=dev, dtype=acc) if has_proj else None
    strides = (T * B * G, T * B * P, (T + 1) * B * H)
    len_arg = lengths if has_len else torch.empty(1, device=dev, dtype=torch.int32)
    if config.path == "persistent":
        dh0 = new_output(D, B, P, device=dev, dtype=acc)
        dc0 = new_output(D, B, H, device=dev, dtype=acc)
        _lstm_bwd_persistent_kernel[(triton.cdiv(B, config.block_b), D)](
            dy, dh_n.contiguous(), dc_n.contiguous(), gates, cs, w_hh,
            w_hr if has_proj else w_hh, len_arg, dgates, dh_all if has_proj else dgates, dh0, dc0,
            T, B, H, P, *strides,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_P=config.block_p,
            HAS_PROJ=has_proj, HAS_LENGTHS=has_len,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=1,
        )
        return dgates, dh_all, dh0, dc0

    dc = dc_n.to(acc, copy=True).contiguous()
    # Without projection `dh` carries dh_s (P = H) and the kernel fuses dgates_{s+1}·W_hh; with projection
    # the P-space recurrence is done here with batched GEMMs and `dh` receives dm_s = dh_s·W_hr.
    dh = dh_n.to(acc, copy=True).contiguous() if not has_proj else new_output(D, B, H, device=dev, dtype=acc)
    dh_p = dh_n.to(acc, copy=True) if has_proj else None
    w_acc = w_hh.to(acc)
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h), D)
    for s in range(T - 1, -1, -1):
        first = s == T - 1
        if has_proj:
            valid = valid_rows(lengths, s, B, dev)
            if not first:
                rec = torch.bmm(dgates[:, s + 1].to(w_hh.dtype).to(acc), w_acc)
                dh_p = torch.where(valid_rows(lengths, s + 1, B, dev), rec, dh_p)
            dh_p = dh_p + torch.where(valid, dy[:, s].to(acc), torch.zeros((), dtype=acc, device=dev))
            torch.where(valid, dh_p, torch.zeros((), dtype=acc, device=dev), out=dh_all[:, s])
            torch.bmm(dh_p.to(w_hr.dtype).to(acc), w_hr.to(acc), out=dh)
        _lstm_bwd_step_kernel[grid](
            dy[0, s], dgates[0, s] if first else dgates[0, s + 1], dh, dc, gates[0, s], cs[0, s + 1], w_hh, len_arg,
            dgates[0, s],
            s, B, H, *strides,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            FUSED_DH=not has_proj, FIRST=first, HAS_LENGTHS=has_len,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    # Every sequence has at least one step, so step 0 is valid for all rows: dh0 = dgates_0·W_hh,
    # rounded like every in-loop product (dgates in the weight dtype, accumulated in acc).
    dh0 = torch.bmm(dgates[:, 0].to(w_hh.dtype).to(acc), w_acc)
    return dgates, dh_all, dh0, dc

