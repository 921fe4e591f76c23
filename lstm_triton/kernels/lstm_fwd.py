"""Forward LSTM recurrence: fused h·W_hhᵀ for all four gates + the pointwise cell/hidden update.

Dimension legend
    T        time steps
    B        batch
    H        hidden units
    G = 4H   gate columns, unit-interleaved (column 4j+k is gate k ∈ {i, f, g, o} of unit j)
    BLOCK_B  batch rows per program (≥ 16: the smallest ``tl.dot`` tile)
    BLOCK_H  hidden units per program; the program owns gate columns [4·h0, 4·(h0+BLOCK_H))
    BLOCK_K  reduction tile over h_{t-1} (per-step path only)

Inputs (all contiguous):
    gx      [T, B, G]   x_t·W_ihᵀ + b_ih + b_hh for every step (one GEMM before the recurrence), input dtype
    w       [G, H]      W_hh with its rows unit-interleaved, input dtype
    h0      [B, H]      input dtype;  c0 [B, H] accumulation dtype
Outputs:
    y       [T, B, H]   h_t, input dtype;  h_n, c_n [B, H] input dtype
    gates   [T, B, G]   activated gates σ(i), σ(f), tanh(g), σ(o), accumulation dtype (saved for backward)
    cs      [T+1, B, H] c_{t} for t = 0..T (cs[0] = c0), accumulation dtype (saved for backward)
Accumulation dtype: float32, or float64 for float64 inputs. The cell state never leaves it.

Two paths:
    persistent  grid (cdiv(B, BLOCK_B),): one program per batch tile covers every hidden unit, loads its
                W_hhᵀ tile once and runs the whole time loop, h_t and c_t staying in registers.
    stepwise    grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)) launched once per step: any H.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._buffers import new_output
from ._gates import cell_forward, mma
from .config import LSTMKernelConfig


@triton.jit
def _lstm_fwd_persistent_kernel(
    gx_ptr, w_ptr, h0_ptr, c0_ptr,
    y_ptr, hn_ptr, cn_ptr, gates_ptr, cs_ptr,
    T, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    acc_ty = cs_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    rg = tl.arange(0, 4 * BLOCK_H)
    mb = rb < B
    m_h = mb[:, None] & (rh < H)[None, :]
    m_g = mb[:, None] & (rg < 4 * H)[None, :]
    off_h = rb[:, None] * H + rh[None, :]
    off_g = rb[:, None] * (4 * H) + rg[None, :]

    # W_hhᵀ [BLOCK_H, 4·BLOCK_H]: read once, reused by every step. Padded units get zero weights and
    # zero pre-activations, so their c stays 0 and their h = σ(0)·tanh(0) = 0 never pollutes the dot.
    w_t = tl.load(w_ptr + rg[None, :] * H + rh[:, None],
                  mask=(rh < H)[:, None] & (rg < 4 * H)[None, :], other=0.0)
    h = tl.load(h0_ptr + off_h, mask=m_h, other=0.0).to(w_t.dtype)
    c = tl.load(c0_ptr + off_h, mask=m_h, other=0.0).to(acc_ty)
    # Walking pointers (64-bit) rather than t·B·4H offsets, which could overflow 32-bit arithmetic.
    gx_t = gx_ptr + off_g
    y_t = y_ptr + off_h
    gates_t = gates_ptr + off_g
    cs_t = cs_ptr + B * H + off_h
    for _ in range(T):
        pre = tl.load(gx_t, mask=m_g, other=0.0).to(acc_ty)
        pre = mma(h, w_t, pre, DOT_PRECISION, UPCAST_DOT)
        act, c, h = cell_forward(pre, c, BLOCK_B, BLOCK_H)
        # The next step consumes h rounded to the input dtype, exactly as the stepwise path reads it back.
        h = h.to(w_t.dtype)
        tl.store(y_t, h, mask=m_h)
        if SAVE:
            tl.store(gates_t, act, mask=m_g)
            tl.store(cs_t, c, mask=m_h)
        gx_t += B * 4 * H
        y_t += B * H
        gates_t += B * 4 * H
        cs_t += B * H
    tl.store(hn_ptr + off_h, h, mask=m_h)
    tl.store(cn_ptr + off_h, c.to(cn_ptr.dtype.element_ty), mask=m_h)


@triton.jit
def _lstm_fwd_step_kernel(
    gx_ptr, w_ptr, h_prev_ptr, c_prev_ptr,
    y_ptr, c_ptr, gates_ptr, hn_ptr, cn_ptr,
    B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    SAVE_GATES: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # Pointers are already offset to step t: gx [B, G], h_prev/y [B, H], c_prev/c [B, H], gates [B, G].
    acc_ty = c_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rg = pid_h * 4 * BLOCK_H + tl.arange(0, 4 * BLOCK_H)
    mb = rb < B
    m_h = mb[:, None] & (rh < H)[None, :]
    m_g = mb[:, None] & (rg < 4 * H)[None, :]
    off_h = rb[:, None] * H + rh[None, :]

    pre = tl.load(gx_ptr + rb[:, None] * (4 * H) + rg[None, :], mask=m_g, other=0.0).to(acc_ty)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        h_k = tl.load(h_prev_ptr + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        w_k = tl.load(w_ptr + rg[None, :] * H + rk[:, None], mask=mk[:, None] & (rg < 4 * H)[None, :], other=0.0)
        pre = mma(h_k, w_k, pre, DOT_PRECISION, UPCAST_DOT)
    act, c, h = cell_forward(pre, tl.load(c_prev_ptr + off_h, mask=m_h, other=0.0), BLOCK_B, BLOCK_H)
    h = h.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + off_h, h, mask=m_h)
    tl.store(c_ptr + off_h, c, mask=m_h)
    if SAVE_GATES:
        tl.store(gates_ptr + rb[:, None] * (4 * H) + rg[None, :], act, mask=m_g)
    if STORE_FINAL:
        tl.store(hn_ptr + off_h, h, mask=m_h)
        tl.store(cn_ptr + off_h, c.to(cn_ptr.dtype.element_ty), mask=m_h)


def lstm_fwd(
    gx: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    config: LSTMKernelConfig,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run the recurrence over all T steps.

    Args:
        gx:   [T, B, 4H] input projections with both biases, interleaved gate columns, input dtype.
        w_hh: [4H, H] recurrent weights, rows interleaved the same way, input dtype.
        h0:   [B, H] (any dtype; cast to the input dtype);  c0: [B, H] (any float dtype).
        config: the path and tile sizes (:func:`lstm_triton.kernels.config.select_config`).
        save: also return the activated gates [T, B, 4H] and cell states [T+1, B, H] for backward.
    Returns:
        (y [T, B, H], h_n [B, H], c_n [B, H], gates or None, cs or None); y/h_n/c_n in the input dtype.
    """
    T, B, G = gx.shape
    H = G // 4
    dtype = gx.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = gx.device
    y = new_output(T, B, H, device=dev, dtype=dtype)
    h_n = new_output(B, H, device=dev, dtype=dtype)
    c_n = new_output(B, H, device=dev, dtype=dtype)
    h0 = h0.to(dtype).contiguous()
    if save:
        gates = new_output(T, B, G, device=dev, dtype=acc)
        cs = new_output(T + 1, B, H, device=dev, dtype=acc)
        cs[0].copy_(c0)
    else:
        gates = None
        cs = None
    c0 = c0.to(acc).contiguous()

    if config.path == "persistent":
        # A [1]-element stand-in keeps the kernel's accumulation dtype readable from cs_ptr when not saving.
        cs_arg = cs if save else torch.empty(1, device=dev, dtype=acc)
        grid = (triton.cdiv(B, config.block_b),)
        _lstm_fwd_persistent_kernel[grid](
            gx, w_hh, h0, c0, y, h_n, c_n, gates if save else cs_arg, cs_arg, T, B, H,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, SAVE=save,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot, num_warps=config.num_warps, num_stages=1,
        )
        return y, h_n, c_n, gates, cs

    # Stepwise: without saving, two [B, H] cell buffers take turns.
    c_buf = cs if save else torch.empty(2, B, H, device=dev, dtype=acc)
    if not save:
        c_buf[0].copy_(c0)
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h))
    for t in range(T):
        h_prev = h0 if t == 0 else y[t - 1]
        c_prev, c_out = (c_buf[t], c_buf[t + 1]) if save else (c_buf[t % 2], c_buf[(t + 1) % 2])
        _lstm_fwd_step_kernel[grid](
            gx[t], w_hh, h_prev, c_prev, y[t], c_out, gates[t] if save else gx[t], h_n, c_n, B, H,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            SAVE_GATES=save, STORE_FINAL=t == T - 1,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return y, h_n, c_n, gates, cs
