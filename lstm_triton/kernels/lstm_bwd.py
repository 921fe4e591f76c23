"""Backward through time: reverse-time fused kernel producing dgates for every step, carrying dh and dc.

Dimension legend (as in lstm_fwd.py)
    T time steps, B batch, H hidden units, G = 4H unit-interleaved gate columns,
    BLOCK_B batch rows per program, BLOCK_H hidden units per program, BLOCK_K reduction tile over G.

Inputs (contiguous):
    dy      [T, B, H]   gradient reaching y (input dtype or accumulation dtype)
    dh_n    [B, H], dc_n [B, H]
    gates   [T, B, G], cs [T+1, B, H]   saved by the forward, accumulation dtype
    w       [G, H]      W_hh, rows interleaved, input dtype
Outputs:
    dgates  [T, B, G]   ∂L/∂(pre-activation gates), accumulation dtype — the weight and input gradients are
                        GEMMs over it after the loop (deterministic: no atomics on weights)
    dh0, dc0 [B, H]     accumulation dtype

Per step (reverse): dh = dy_t + dgates_{t+1}·W_hh; pointwise derivatives (``cell_backward``);
dc_{t-1} = dc_t ⊙ f_t. The two paths mirror the forward's (persistent: W_hh on chip, one program per batch tile;
stepwise: one launch per step, any H).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._buffers import new_output
from ._gates import cell_backward, mma
from .config import LSTMKernelConfig


@triton.jit
def _lstm_bwd_persistent_kernel(
    dy_ptr, dhn_ptr, dcn_ptr, gates_ptr, cs_ptr, w_ptr,
    dgates_ptr, dh0_ptr, dc0_ptr,
    T, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    acc_ty = dgates_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    rg = tl.arange(0, 4 * BLOCK_H)
    mb = rb < B
    m_h = mb[:, None] & (rh < H)[None, :]
    m_g = mb[:, None] & (rg < 4 * H)[None, :]
    off_h = rb[:, None] * H + rh[None, :]
    off_g = rb[:, None] * (4 * H) + rg[None, :]

    # W_hh [4·BLOCK_H, BLOCK_H], read once for all T steps.
    w = tl.load(w_ptr + rg[:, None] * H + rh[None, :], mask=(rg < 4 * H)[:, None] & (rh < H)[None, :], other=0.0)
    dh = tl.load(dhn_ptr + off_h, mask=m_h, other=0.0).to(acc_ty)
    dc = tl.load(dcn_ptr + off_h, mask=m_h, other=0.0).to(acc_ty)
    # The launcher passes every per-step pointer at t = T-1; they walk back (64-bit pointer arithmetic).
    dy_t = dy_ptr + off_h
    gates_t = gates_ptr + off_g
    dgates_t = dgates_ptr + off_g
    cs_t = cs_ptr + off_h  # c_t; c_{t-1} is one step below
    for _ in range(T):
        dh += tl.load(dy_t, mask=m_h, other=0.0).to(acc_ty)
        act = tl.load(gates_t, mask=m_g, other=0.0)
        c = tl.load(cs_t, mask=m_h, other=0.0)
        c_prev = tl.load(cs_t - B * H, mask=m_h, other=0.0)
        dgates, dc = cell_backward(dh, dc, act, c, c_prev, BLOCK_B, BLOCK_H)
        tl.store(dgates_t, dgates, mask=m_g)
        dh = mma(dgates.to(w.dtype), w, tl.zeros_like(dh), DOT_PRECISION, UPCAST_DOT)
        dy_t -= B * H
        gates_t -= B * 4 * H
        dgates_t -= B * 4 * H
        cs_t -= B * H
    tl.store(dh0_ptr + off_h, dh, mask=m_h)
    tl.store(dc0_ptr + off_h, dc, mask=m_h)


@triton.jit
def _lstm_bwd_step_kernel(
    dy_ptr, dgates_next_ptr, dhn_ptr, dc_ptr, gates_ptr, c_ptr, c_prev_ptr, w_ptr,
    dgates_ptr,
    B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    LAST_STEP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # Pointers are offset to step t: dy [B, H], dgates_next = dgates_{t+1} [B, G], gates/dgates [B, G],
    # c = c_t, c_prev = c_{t-1} [B, H]; dc [B, H] carries dc across launches (each program its own units).
    acc_ty = dgates_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rg = pid_h * 4 * BLOCK_H + tl.arange(0, 4 * BLOCK_H)
    mb = rb < B
    m_h = mb[:, None] & (rh < H)[None, :]
    m_g = mb[:, None] & (rg < 4 * H)[None, :]
    off_h = rb[:, None] * H + rh[None, :]
    off_g = rb[:, None] * (4 * H) + rg[None, :]

    dh = tl.load(dy_ptr + off_h, mask=m_h, other=0.0).to(acc_ty)
    if LAST_STEP:
        dh += tl.load(dhn_ptr + off_h, mask=m_h, other=0.0).to(acc_ty)
    else:
        for k0 in range(0, 4 * H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < 4 * H
            dg_k = tl.load(dgates_next_ptr + rb[:, None] * (4 * H) + rk[None, :],
                           mask=mb[:, None] & mk[None, :], other=0.0)
            w_k = tl.load(w_ptr + rk[:, None] * H + rh[None, :], mask=mk[:, None] & (rh < H)[None, :], other=0.0)
            dh = mma(dg_k.to(w_k.dtype), w_k, dh, DOT_PRECISION, UPCAST_DOT)
    act = tl.load(gates_ptr + off_g, mask=m_g, other=0.0)
    c = tl.load(c_ptr + off_h, mask=m_h, other=0.0)
    c_prev = tl.load(c_prev_ptr + off_h, mask=m_h, other=0.0)
    dc = tl.load(dc_ptr + off_h, mask=m_h, other=0.0)
    dgates, dc = cell_backward(dh, dc, act, c, c_prev, BLOCK_B, BLOCK_H)
    tl.store(dgates_ptr + off_g, dgates, mask=m_g)
    tl.store(dc_ptr + off_h, dc, mask=m_h)


def lstm_bwd(
    dy: torch.Tensor,
    dh_n: torch.Tensor,
    dc_n: torch.Tensor,
    gates: torch.Tensor,
    cs: torch.Tensor,
    w_hh: torch.Tensor,
    config: LSTMKernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backpropagate through the recurrence.

    Args:
        dy: [T, B, H]; dh_n, dc_n: [B, H]; gates: [T, B, 4H] and cs: [T+1, B, H] from :func:`lstm_fwd`;
        w_hh: [4H, H] interleaved; config: the same configuration the forward ran with.
    Returns:
        (dgates [T, B, 4H], dh0 [B, H], dc0 [B, H]) in the accumulation dtype.
    """
    T, B, G = gates.shape
    H = G // 4
    acc = gates.dtype
    dy, dh_n, dc_n = dy.contiguous(), dh_n.contiguous(), dc_n.contiguous()
    dgates = new_output(T, B, G, device=gates.device, dtype=acc)
    if config.path == "persistent":
        dh0 = new_output(B, H, device=gates.device, dtype=acc)
        dc0 = new_output(B, H, device=gates.device, dtype=acc)
        _lstm_bwd_persistent_kernel[(triton.cdiv(B, config.block_b),)](
            dy[T - 1], dh_n, dc_n, gates[T - 1], cs[T], w_hh, dgates[T - 1], dh0, dc0, T, B, H,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=1,
        )
        return dgates, dh0, dc0

    dc = dc_n.to(acc, copy=True)
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h))
    for t in range(T - 1, -1, -1):
        last = t == T - 1
        _lstm_bwd_step_kernel[grid](
            dy[t], dgates[t] if last else dgates[t + 1], dh_n, dc, gates[t], cs[t + 1], cs[t], w_hh, dgates[t], B, H,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            LAST_STEP=last, DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    # dh0 = dgates_0 · W_hh, rounded like every in-loop product (dgates in the weight dtype).
    dh0 = (dgates[0].to(w_hh.dtype) @ w_hh).to(acc)
    return dgates, dh0, dc
