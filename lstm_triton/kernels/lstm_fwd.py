"""Forward LSTM recurrence: fused h·W_hhᵀ for all four gates + the pointwise cell/hidden update (+ projection).

Dimension legend
    D        directions run by one launch (1, or 2 for a bidirectional layer: grid axis "d")
    T        steps, in the direction's own order (the caller time-reverses the reverse direction's input)
    B        batch
    H        hidden units (cell size);  P = projected size (P = H without projection)
    G = 4H   gate columns, unit-interleaved (column 4j+k is gate k ∈ {i, f, g, o} of unit j)
    BLOCK_B  batch rows per program (≥ 16: the smallest ``tl.dot`` tile)
    BLOCK_H  hidden units per program; BLOCK_P: padded P (persistent path)
    BLOCK_K  reduction tile over h_{t-1} (stepwise path)

Tensors (contiguous; per direction d the leading index):
    gx      [D, T, B, G]   x_t·W_ihᵀ + b_ih + b_hh for every step (one GEMM before the recurrence), input dtype
    w_hh    [D, G, P]      W_hh with its rows unit-interleaved, input dtype
    w_hr    [D, P, H]      projection (only with HAS_PROJ), input dtype
    h0 [D, B, P], c0 [D, B, H];  lengths [B] int32 (only with HAS_LENGTHS)
    y       [D, T, B, P]   h_t, input dtype; zero at steps past a sequence's length
    h_n [D, B, P], c_n [D, B, H]   the state at each sequence's own last step, input dtype
    gates   [D, T, B, G]   activated gates σ(i), σ(f), tanh(g), σ(o) (zero past a sequence's end), accumulation dtype
    cs      [D, T+1, B, H] c after each step (cs[:, 0] = c0; frozen past a sequence's end), accumulation dtype
Accumulation dtype: float32, or float64 for float64 inputs. The cell state never leaves it.

Two paths:
    persistent  grid (cdiv(B, BLOCK_B), D): one program per batch tile covers every hidden unit, loads its
                W_hh (and W_hr) tile once and runs the whole time loop, h and c staying in registers. It stops
                computing at its tile's longest sequence and only writes zeros past it (no work on padding).
    cooperative (lstm_coop.py) the programs of a batch tile split the hidden units, each keeping its W_hh rows on
                chip, and exchange h every step through global memory: H too large for one program.
    stepwise    grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H), D), launched once per step: any H.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._buffers import new_output
from ._gates import add_rows_times_wt, cell_forward, mma, sequence_lengths, unit_tile
from .config import LSTMKernelConfig, check_offset_limits
from .lstm_coop import lstm_fwd_coop


@triton.jit
def _lstm_fwd_persistent_kernel(
    gx_ptr, w_hh_ptr, w_hr_ptr, h0_ptr, c0_ptr, len_ptr,
    y_ptr, hn_ptr, cn_ptr, gates_ptr, cs_ptr,
    T, B, H, P, stride_gd, stride_yd, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    acc_ty = cs_ptr.dtype.element_ty
    G = 4 * H
    pid = tl.program_id(0)
    d = tl.program_id(1)
    rb, rh, rg, mb, m_h, m_g, off_h, off_g = unit_tile(pid, 0, B, H, BLOCK_B, BLOCK_H)
    rp = tl.arange(0, BLOCK_P)
    m_p = mb[:, None] & (rp < P)[None, :]
    off_p = rb[:, None] * P + rp[None, :]

    # W_hhᵀ [BLOCK_P, 4·BLOCK_H] (and W_hrᵀ [BLOCK_H, BLOCK_P]) read once, reused by every step. Padded units
    # get zero weights and zero pre-activations, so their c stays 0 and h = σ(0)·tanh(0) = 0.
    w_t = tl.load(w_hh_ptr + d * G * P + rg[None, :] * P + rp[:, None],
                  mask=(rp < P)[:, None] & (rg < G)[None, :], other=0.0)
    if HAS_PROJ:
        wr_t = tl.load(w_hr_ptr + d * P * H + rp[None, :] * H + rh[:, None],
                       mask=(rh < H)[:, None] & (rp < P)[None, :], other=0.0)
    h = tl.load(h0_ptr + d * B * P + off_p, mask=m_p, other=0.0).to(w_t.dtype)
    c = tl.load(c0_ptr + d * B * H + off_h, mask=m_h, other=0.0).to(acc_ty)
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)
    tile_len = tl.max(lens, axis=0)

    # Per-direction strides come from the launcher (Triton passes them as 64-bit once they exceed 2³¹), and
    # steps advance by walking 64-bit pointers: no T·B·G product is ever formed in 32-bit arithmetic.
    gx_s = gx_ptr + d * stride_gd + off_g
    y_s = y_ptr + d * stride_yd + off_p
    gates_s = gates_ptr + d * stride_gd + off_g
    cs_s = cs_ptr + d * stride_cd + B * H + off_h
    for s in range(tile_len):
        valid = (s < lens)[:, None]
        pre = tl.load(gx_s, mask=m_g, other=0.0).to(acc_ty)
        pre = mma(h, w_t, pre, DOT_PRECISION, UPCAST_DOT)
        # Padded gate columns must stay exactly 0 even when h holds ±inf (inf·0 would make them NaN, and a
        # NaN in a padded unit would flow into every unit through the next step's dot).
        pre = tl.where((rg < G)[None, :], pre, 0.0)
        act, c_new, h_new = cell_forward(pre, c, BLOCK_B, BLOCK_H)
        if HAS_PROJ:
            h_new = mma(h_new.to(w_t.dtype), wr_t, tl.zeros((BLOCK_B, BLOCK_P), acc_ty), DOT_PRECISION, UPCAST_DOT)
        # The next step consumes h rounded to the input dtype, exactly as the stepwise path reads it back.
        h_new = h_new.to(w_t.dtype)
        # Past its end a sequence keeps its state (so h_n/c_n are taken at its own last step) and outputs 0.
        c = tl.where(valid, c_new, c)
        h = tl.where(valid, h_new, h)
        tl.store(y_s, tl.where(valid, h_new, 0.0), mask=m_p)
        if SAVE:
            tl.store(gates_s, tl.where(valid, act, 0.0), mask=m_g)
            tl.store(cs_s, c, mask=m_h)
        gx_s += B * G
        y_s += B * P
        gates_s += B * G
        cs_s += B * H
    for _ in range(tile_len, T):
        tl.store(y_s, tl.zeros((BLOCK_B, BLOCK_P), y_ptr.dtype.element_ty), mask=m_p)
        if SAVE:
            tl.store(gates_s, tl.zeros((BLOCK_B, 4 * BLOCK_H), acc_ty), mask=m_g)
            tl.store(cs_s, c, mask=m_h)
        y_s += B * P
        gates_s += B * G
        cs_s += B * H
    tl.store(hn_ptr + d * B * P + off_p, h, mask=m_p)
    tl.store(cn_ptr + d * B * H + off_h, c.to(cn_ptr.dtype.element_ty), mask=m_h)


@triton.jit
def _lstm_fwd_step_kernel(
    gx_ptr, x_ptr, w_ih_ptr, bias_ptr, w_hh_ptr, h_prev_ptr, c_prev_ptr, len_ptr,
    out_ptr, h_next_ptr, c_next_ptr, gates_ptr,
    s, B, H, P, I, stride_gd, stride_yd, stride_cd,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    FUSE_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # One step s. gx/gates (and y) point at step s of direction 0; direction d adds d·stride_gd (d·stride_yd).
    # FUSE_INPUT (a single step, e.g. LSTMCell): no gx; the step computes bias + x·W_ihᵀ itself from
    # x [D, B, I], w_ih [D, G, I] and bias [D, G] — the whole step is this one kernel.
    # h_prev/h_next [D, B, P] are the state before/after the step (ping-pong); c_prev/c_next [B, H] per
    # direction, directions stride_cd apart (slices of the saved cs, or ping-pong buffers).
    # Without projection out = y[:, s] gets h_t; with it out = [D, B, H] scratch gets o⊙tanh(c) and the caller
    # applies W_hr (a projection needs every unit of the row, which this program does not own).
    acc_ty = c_next_ptr.dtype.element_ty
    G = 4 * H
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)
    rb, rh, rg, mb, m_h, m_g, off_h, off_g = unit_tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    off_h += d * B * H
    if HAS_LENGTHS:
        valid = (s < tl.load(len_ptr + rb, mask=mb, other=0))[:, None]
    else:
        valid = tl.full((BLOCK_B, 1), 1, tl.int1)

    if FUSE_INPUT:
        pre = tl.zeros((BLOCK_B, 4 * BLOCK_H), acc_ty)
        if HAS_BIAS:
            pre += tl.load(bias_ptr + d * G + rg, mask=rg < G, other=0.0).to(acc_ty)[None, :]
        pre = add_rows_times_wt(pre, x_ptr + d * B * I, w_ih_ptr + d * G * I, I, rb, mb, rg, G, BLOCK_K,
                                DOT_PRECISION, UPCAST_DOT)
    else:
        pre = tl.load(gx_ptr + d * stride_gd + off_g, mask=m_g, other=0.0).to(acc_ty)
    pre = add_rows_times_wt(pre, h_prev_ptr + d * B * P, w_hh_ptr + d * G * P, P, rb, mb, rg, G, BLOCK_K,
                            DOT_PRECISION, UPCAST_DOT)
    off_c = d * stride_cd + rb[:, None] * H + rh[None, :]
    c_prev = tl.load(c_prev_ptr + off_c, mask=m_h, other=0.0)
    act, c, h = cell_forward(pre, c_prev, BLOCK_B, BLOCK_H)
    tl.store(c_next_ptr + off_c, tl.where(valid, c, c_prev), mask=m_h)
    if SAVE_GATES:
        tl.store(gates_ptr + d * stride_gd + off_g, tl.where(valid, act, 0.0), mask=m_g)
    if HAS_PROJ:
        tl.store(out_ptr + off_h, h.to(out_ptr.dtype.element_ty), mask=m_h)
    else:
        h = h.to(out_ptr.dtype.element_ty)
        h_prev = tl.load(h_prev_ptr + off_h, mask=m_h, other=0.0)
        tl.store(h_next_ptr + off_h, tl.where(valid, h, h_prev), mask=m_h)
        tl.store(out_ptr + d * stride_yd + rb[:, None] * H + rh[None, :], tl.where(valid, h, 0.0), mask=m_h)


def lstm_fwd(
    gx: Optional[torch.Tensor],
    w_hh: torch.Tensor,
    w_hr: Optional[torch.Tensor],
    h0: torch.Tensor,
    c0: torch.Tensor,
    lengths: Optional[torch.Tensor],
    config: LSTMKernelConfig,
    save: bool,
    fused_input: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run the recurrence of D directions over all T steps (each direction in its own step order).

    Args:
        gx:   [D, T, B, 4H] input projections with both biases, interleaved gate columns, input dtype; or None
              with ``fused_input = (x [D, 1, B, I], w_ih [D, 4H, I], bias [D, 4H] or None)`` (interleaved rows):
              a single step whose one stepwise kernel also computes the input projection (``LSTMCell``).
        w_hh: [D, 4H, P] recurrent weights, rows interleaved the same way, input dtype.
        w_hr: [D, P, H] projection weights or None (then P = H).
        h0:   [D, B, P];  c0: [D, B, H] (any float dtype).
        lengths: [B] int32 on gx's device, each ≤ T, or None (every sequence has T steps).
        config: the path and tile sizes (:func:`lstm_triton.kernels.config.select_config`).
        save: also return the activated gates [D, T, B, 4H] and cell states [D, T+1, B, H] for backward.
    Returns:
        (y [D, T, B, P], h_n [D, B, P], c_n [D, B, H], gates or None, cs or None); y/h_n/c_n in the input dtype.
    """
    batch = (gx if gx is not None else fused_input[0]).shape[2]
    check_offset_limits(batch, w_hh.shape[1] // 4, w_hh.shape[2], fused_input[0].shape[-1] if fused_input else 0)
    if fused_input is not None:
        x, w_ih, bias = fused_input
        if config.path != "stepwise" or x.shape[1] != 1:
            raise ValueError("the fused input projection runs a single step on the stepwise path")
        # Shape and dtype only, never read: a one-element tensor viewed at gx's shape allocates nothing per step.
        gx = x.new_empty(1).expand(x.shape[0], 1, x.shape[2], w_hh.shape[1])
    if config.path == "cooperative":
        return lstm_fwd_coop(gx, w_hh, h0.to(gx.dtype), c0, lengths, config, save)
    D, T, B, G = gx.shape
    H = G // 4
    P = w_hh.shape[2]
    dtype = gx.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = gx.device
    y = new_output(D, T, B, P, device=dev, dtype=dtype)
    h0 = h0.to(dtype).contiguous()
    c0 = c0.to(acc).contiguous()
    gates = new_output(D, T, B, G, device=dev, dtype=acc) if save else None
    cs = new_output(D, T + 1, B, H, device=dev, dtype=acc) if save else None
    if save:
        cs[:, 0].copy_(c0)
    has_proj, has_len = w_hr is not None, lengths is not None
    # Unused pointer arguments get a valid [1]-element tensor of the right dtype.
    stub = torch.empty(1, device=dev, dtype=dtype)
    stub_acc = torch.empty(1, device=dev, dtype=acc)
    len_arg = lengths if has_len else torch.empty(1, device=dev, dtype=torch.int32)

    if config.path == "persistent":
        h_n = new_output(D, B, P, device=dev, dtype=dtype)
        c_n = new_output(D, B, H, device=dev, dtype=dtype)
        grid = (triton.cdiv(B, config.block_b), D)
        _lstm_fwd_persistent_kernel[grid](
            gx, w_hh, w_hr if has_proj else stub, h0, c0, len_arg,
            y, h_n, c_n, gates if save else stub_acc, cs if save else stub_acc,
            T, B, H, P, T * B * G, T * B * P, (T + 1) * B * H,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_P=config.block_p,
            HAS_PROJ=has_proj, HAS_LENGTHS=has_len, SAVE=save,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=1,
        )
        return y, h_n, c_n, gates, cs

    # Stepwise: the state lives in ping-pong buffers; with `save`, c goes straight into cs.
    h_buf = new_output(2, D, B, P, device=dev, dtype=dtype)
    h_buf[0].copy_(h0)
    c_buf = cs if save else new_output(2, D, B, H, device=dev, dtype=acc)
    if not save:
        c_buf[0].copy_(c0)
    m_buf = new_output(D, B, H, device=dev, dtype=dtype) if has_proj else None
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h), D)
    x, w_ih, bias = fused_input if fused_input is not None else (stub, stub, None)
    I = x.shape[-1] if fused_input is not None else 1
    for s in range(T):
        h_prev, h_next = h_buf[s % 2], h_buf[(s + 1) % 2]
        c_prev, c_next = (c_buf[:, s], c_buf[:, s + 1]) if save else (c_buf[s % 2], c_buf[(s + 1) % 2])
        _lstm_fwd_step_kernel[grid](
            gx[0, s], x, w_ih, bias if bias is not None else stub, w_hh, h_prev, c_prev, len_arg,
            m_buf if has_proj else y[0, s], h_next, c_next, gates[0, s] if save else stub_acc,
            s, B, H, P, I, T * B * G, T * B * P, c_prev.stride(0),
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            FUSE_INPUT=fused_input is not None, HAS_BIAS=bias is not None,
            HAS_PROJ=has_proj, HAS_LENGTHS=has_len, SAVE_GATES=save,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if has_proj:
            h_new = torch.bmm(m_buf, w_hr.transpose(1, 2))
            valid = valid_rows(lengths, s, B, dev)
            torch.where(valid, h_new, h_prev, out=h_next)
            torch.where(valid, h_new, torch.zeros((), dtype=dtype, device=dev), out=y[:, s])
    c_last = c_buf[:, T] if save else c_buf[T % 2]
    return y, h_buf[T % 2].clone(), c_last.to(dtype, copy=True), gates, cs


def valid_rows(lengths: Optional[torch.Tensor], s: int, B: int, device) -> torch.Tensor:
    """[B, 1] bool: which sequences are still running at step s."""
    if lengths is None:
        return torch.ones(B, 1, dtype=torch.bool, device=device)
    return (lengths > s).unsqueeze(1)
