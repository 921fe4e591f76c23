"""Cooperative persistent kernels: the programs of a batch tile split the hidden units and hand h to each other.

For hidden sizes whose W_hh does not fit one program (the persistent path) but does fit the whole chip, every
program keeps the W_hh rows of its own hidden units (all four gates) on chip for the whole sequence, and the
programs that share a batch tile exchange h_t (forward) or their dh partial sums (backward) every step through
global memory, ordered by a per-(direction, batch tile) step counter with release/acquire atomics.

Dimension legend
    D directions, T steps (each direction's own order), B batch, H hidden units (no projection: P = H),
    G = 4H unit-interleaved gate columns,
    BLOCK_B   batch rows per program;  BLOCK_H hidden units per program (its 4·BLOCK_H gate rows of W_hh);
    BLOCK_K   H padded to a power of two: the whole reduction over h_{t-1} is one ``tl.dot``;
    NH        programs per batch tile = cdiv(H, BLOCK_H)  (grid (cdiv(B, BLOCK_B), NH, D)).

Synchronisation and its limits
- Every program must be resident at once: the dispatcher only picks this path when the grid fits the GPU's
  SM count (one program per SM), and the launcher re-checks it.
- Waits are bounded: a program that spins ``max_spin`` times without seeing the counter it needs sets an
  error flag and stops waiting (its outputs are then garbage); the launcher raises instead of returning them.
- Under the interpreter, programs run one after another, so a single launch would deadlock. There the
  launcher runs the *same kernel* one step per launch (steps [s, s+1)): each wait is then already satisfied
  by the previous launch, and everything but true concurrency — the counters, the exchange buffers, the
  partial-sum reduction — is exercised.

State buffers (host-initialised, carried across launches):
    sync  [D, n_b] int32 step counters;  err [1] int32
    fwd:  h_x [2, D, B, H] h exchange (double-buffered by step parity), c_st [D, B, H] accumulation dtype
    bwd:  part [2, D, NH, B, BLOCK_K] each program's dgates·W_hh partial sums, dh_st / dc_st [D, B, H]
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._buffers import new_output
from ._gates import cell_backward, cell_forward, mma, sequence_lengths, unit_tile
from .config import LSTMKernelConfig

DEFAULT_MAX_SPIN = 1 << 26  # ≈ seconds of polling an L2 atomic: far beyond any healthy step


@triton.jit
def _wait_for(counter_ptr, target, max_spin, ok):
    """Spin until *counter_ptr ≥ target (acquire), at most max_spin polls. Returns whether it got there.

    A scalar atomic is performed by one thread of the program; the barrier after it makes what that thread
    acquired ordered before every thread's subsequent loads.
    """
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    spins = 0
    while ok & (seen < target) & (spins < max_spin):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        spins += 1
    tl.debug_barrier()
    return ok & (seen >= target)


@triton.jit
def _publish(counter_ptr):
    """Count this program's step as done. The barrier first makes every thread's stores of the step part of
    what the (single-thread) release publishes."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def _lstm_fwd_coop_kernel(
    gx_ptr, w_hh_ptr, len_ptr,
    y_ptr, hn_ptr, cn_ptr, gates_ptr, cs_ptr,
    hx_ptr, c_st_ptr, sync_ptr, err_ptr,
    T, B, H, stride_gd, stride_yd, stride_cd, s_begin, s_end, max_spin,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    acc_ty = c_st_ptr.dtype.element_ty
    G = 4 * H
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)
    NH = tl.num_programs(1)
    ND = tl.num_programs(2)
    rb, rh, rg, mb, m_h, m_g, off_h, off_g = unit_tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    m_k = mb[:, None] & (rk < H)[None, :]
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)

    # This program's W_hhᵀ columns [BLOCK_K, 4·BLOCK_H], on chip for every step of the launch.
    w_t = tl.load(w_hh_ptr + d * G * H + rg[None, :] * H + rk[:, None],
                  mask=(rk < H)[:, None] & (rg < G)[None, :], other=0.0)
    c = tl.load(c_st_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    h_own = tl.load(hx_ptr + ((s_begin % 2) * ND + d) * B * H + off_h, mask=m_h, other=0.0)
    counter = sync_ptr + d * tl.num_programs(0) + pid_b
    ok = tl.load(err_ptr) == 0
    for s in range(s_begin, s_end):
        # All NH programs of this batch tile have published h after step s-1.
        ok = _wait_for(counter, s * NH, max_spin, ok)
        valid = (s < lens)[:, None]
        s64 = s + tl.zeros((), tl.int64)  # step offsets s·B·G may exceed 2³¹
        hx_s = hx_ptr + ((s % 2) * ND + d) * B * H
        # .cg: read the freshly published h from L2, never a stale L1 line.
        h_prev = tl.load(hx_s + rb[:, None] * H + rk[None, :], mask=m_k, other=0.0, cache_modifier=".cg")
        pre = tl.load(gx_ptr + d * stride_gd + s64 * B * G + off_g, mask=m_g, other=0.0).to(acc_ty)
        pre = mma(h_prev, w_t, pre, DOT_PRECISION, UPCAST_DOT)
        pre = tl.where((rg < G)[None, :], pre, 0.0)  # padded columns stay 0 even for h = ±inf (see lstm_fwd)
        act, c_new, h_new = cell_forward(pre, c, BLOCK_B, BLOCK_H)
        h_new = h_new.to(y_ptr.dtype.element_ty)
        c = tl.where(valid, c_new, c)
        h_own = tl.where(valid, h_new, h_own)
        tl.store(hx_ptr + (((s + 1) % 2) * ND + d) * B * H + off_h, h_own, mask=m_h)
        tl.store(y_ptr + d * stride_yd + s64 * B * H + off_h, tl.where(valid, h_new, 0.0), mask=m_h)
        if SAVE:
            tl.store(gates_ptr + d * stride_gd + s64 * B * G + off_g, tl.where(valid, act, 0.0), mask=m_g)
            tl.store(cs_ptr + d * stride_cd + (s64 + 1) * B * H + off_h, c, mask=m_h)
        _publish(counter)  # the stores above are visible to whoever acquires the incremented counter
    tl.store(c_st_ptr + d * B * H + off_h, c, mask=m_h)
    if s_end == T:
        tl.store(hn_ptr + d * B * H + off_h, h_own, mask=m_h)
        tl.store(cn_ptr + d * B * H + off_h, c.to(cn_ptr.dtype.element_ty), mask=m_h)
    if not ok:
        tl.atomic_max(err_ptr, 1)


@triton.jit
def _lstm_bwd_coop_kernel(
    dy_ptr, gates_ptr, cs_ptr, w_hh_ptr, len_ptr,
    dgates_ptr, dh0_ptr, dc0_ptr,
    part_ptr, dh_st_ptr, dc_st_ptr, sync_ptr, err_ptr,
    T, B, H, stride_gd, stride_yd, stride_cd, s_hi, s_lo, finalize, max_spin,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # Steps s_hi-1 down to s_lo, then (if finalize) dh0 and dc0. After step s, program q has published part[s % 2, d, q] = dgates_s(own rows)·W_hh
    # (own rows), [B, BLOCK_K]; dh_{s-1} of unit j is the sum over q, taken in q order (deterministic).
    acc_ty = dgates_ptr.dtype.element_ty
    G = 4 * H
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    d = tl.program_id(2)
    NH = tl.num_programs(1)
    ND = tl.num_programs(2)
    rb, rh, rg, mb, m_h, m_g, off_h, off_g = unit_tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    m_k = mb[:, None] & (rk < H)[None, :]
    part_row = rb[:, None] * BLOCK_K + rh[None, :]  # this program's units inside one [B, BLOCK_K] partial
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)

    # This program's W_hh rows [4·BLOCK_H, BLOCK_K], on chip for every step of the launch.
    w = tl.load(w_hh_ptr + d * G * H + rg[:, None] * H + rk[None, :],
                mask=(rg < G)[:, None] & (rk < H)[None, :], other=0.0)
    dh = tl.load(dh_st_ptr + d * B * H + off_h, mask=m_h, other=0.0)  # dh carried into step s_hi-1
    dc = tl.load(dc_st_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    counter = sync_ptr + d * tl.num_programs(0) + pid_b
    ok = tl.load(err_ptr) == 0
    for i in range(s_hi - s_lo):
        s = s_hi - 1 - i
        s64 = s + tl.zeros((), tl.int64)  # step offsets s·B·G may exceed 2³¹
        if s < T - 1:
            # Step s+1 is published by every program: gather its partial sums for our units.
            ok = _wait_for(counter, (T - 1 - s) * NH, max_spin, ok)
            rec = tl.zeros((BLOCK_B, BLOCK_H), acc_ty)
            part_s = part_ptr + (((s + 1) % 2) * ND + d) * NH * B * BLOCK_K
            for q in range(NH):
                rec += tl.load(part_s + q * B * BLOCK_K + part_row, mask=m_h, other=0.0, cache_modifier=".cg")
            dh = tl.where((s + 1 < lens)[:, None], rec, dh)
        valid = (s < lens)[:, None]
        dy_s = tl.load(dy_ptr + d * stride_yd + s64 * B * H + off_h, mask=m_h, other=0.0)
        dh = dh + tl.where(valid, dy_s.to(acc_ty), 0.0)
        act = tl.load(gates_ptr + d * stride_gd + s64 * B * G + off_g, mask=m_g, other=0.0)
        c_t = tl.load(cs_ptr + d * stride_cd + (s64 + 1) * B * H + off_h, mask=m_h, other=0.0)
        c_prev = tl.load(cs_ptr + d * stride_cd + s64 * B * H + off_h, mask=m_h, other=0.0)
        dgates, dc_prev = cell_backward(dh, dc, act, c_t, c_prev, BLOCK_B, BLOCK_H)
        dgates = tl.where(valid, dgates, 0.0)
        dc = tl.where(valid, dc_prev, dc)
        tl.store(dgates_ptr + d * stride_gd + s64 * B * G + off_g, dgates, mask=m_g)
        partial = mma(dgates.to(w.dtype), w, tl.zeros((BLOCK_B, BLOCK_K), acc_ty), DOT_PRECISION, UPCAST_DOT)
        tl.store(part_ptr + ((s % 2) * ND + d) * NH * B * BLOCK_K + pid_h * B * BLOCK_K
                 + rb[:, None] * BLOCK_K + rk[None, :], partial, mask=m_k)
        _publish(counter)
    tl.store(dh_st_ptr + d * B * H + off_h, dh, mask=m_h)
    tl.store(dc_st_ptr + d * B * H + off_h, dc, mask=m_h)
    if finalize:
        # dh0 = Σ_q partials of step 0 (every sequence has a step 0).
        ok = _wait_for(counter, T * NH, max_spin, ok)
        rec = tl.zeros((BLOCK_B, BLOCK_H), acc_ty)
        for q in range(NH):
            rec += tl.load(part_ptr + d * NH * B * BLOCK_K + q * B * BLOCK_K + part_row,
                           mask=m_h, other=0.0, cache_modifier=".cg")
        tl.store(dh0_ptr + d * B * H + off_h, rec, mask=m_h)
        tl.store(dc0_ptr + d * B * H + off_h, dc, mask=m_h)
    if not ok:
        tl.atomic_max(err_ptr, 1)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _step_ranges(T: int):
    """One launch for the whole sequence on a GPU; one launch per step under the interpreter."""
    return [(s, s + 1) for s in range(T)] if _interpreted() else [(0, T)]


def _bwd_launches(T: int):
    """(s_lo, s_hi, finalize) per launch. Under the interpreter the final dh0 reduction, which waits for every
    program's step 0, gets a launch of its own (inside the step-0 launch it would wait on programs not yet run)."""
    if _interpreted():
        return [(s, s + 1, False) for s in range(T - 1, -1, -1)] + [(0, 0, True)]
    return [(0, T, True)]


def _raise_on_timeout(err: torch.Tensor, what: str) -> None:
    if int(err.item()):
        raise RuntimeError(
            f"lstm_triton: the cooperative {what} kernel timed out waiting for another program "
            "(not all programs were resident at once?); its outputs are invalid"
        )


def check_residency(grid: tuple, device: torch.device) -> None:
    """The cooperative path needs every program resident at once: at most one program per SM."""
    if device.type != "cuda":
        return
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n = grid[0] * grid[1] * grid[2]
    if n > sms:
        raise ValueError(f"lstm_triton: cooperative grid of {n} programs exceeds the {sms} SMs of {device}")


def lstm_fwd_coop(gx, w_hh, h0, c0, lengths, config: LSTMKernelConfig, save: bool, max_spin: int = DEFAULT_MAX_SPIN):
    """The cooperative forward; arguments and results as :func:`lstm_triton.kernels.lstm_fwd` (no projection)."""
    D, T, B, G = gx.shape
    H = G // 4
    dtype, dev = gx.dtype, gx.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h), D)
    check_residency(grid, dev)
    y = new_output(D, T, B, H, device=dev, dtype=dtype)
    h_n = new_output(D, B, H, device=dev, dtype=dtype)
    c_n = new_output(D, B, H, device=dev, dtype=dtype)
    gates = new_output(D, T, B, G, device=dev, dtype=acc) if save else None
    cs = new_output(D, T + 1, B, H, device=dev, dtype=acc) if save else None
    if save:
        cs[:, 0].copy_(c0)
    h_x = new_output(2, D, B, H, device=dev, dtype=dtype)
    h_x[0].copy_(h0)
    c_st = c0.to(acc, copy=True).contiguous()
    sync = torch.zeros(D, grid[0], device=dev, dtype=torch.int32)
    err = torch.zeros(1, device=dev, dtype=torch.int32)
    stub = torch.empty(1, device=dev, dtype=acc)
    len_arg = lengths if lengths is not None else torch.empty(1, device=dev, dtype=torch.int32)
    for s_begin, s_end in _step_ranges(T):
        _lstm_fwd_coop_kernel[grid](
            gx, w_hh, len_arg, y, h_n, c_n, gates if save else stub, cs if save else stub,
            h_x, c_st, sync, err,
            T, B, H, T * B * G, T * B * H, (T + 1) * B * H, s_begin, s_end, max_spin,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            HAS_LENGTHS=lengths is not None, SAVE=save,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=1,
        )
    _raise_on_timeout(err, "forward")
    return y, h_n, c_n, gates, cs


def lstm_bwd_coop(dy, dh_n, dc_n, gates, cs, w_hh, lengths, config: LSTMKernelConfig, max_spin: int = DEFAULT_MAX_SPIN):
    """The cooperative backward; arguments and results as :func:`lstm_triton.kernels.lstm_bwd` (no projection;
    dy contiguous)."""
    D, T, B, G = gates.shape
    H = G // 4
    acc, dev = gates.dtype, gates.device
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h), D)
    check_residency(grid, dev)
    dgates = new_output(D, T, B, G, device=dev, dtype=acc)
    dh0 = new_output(D, B, H, device=dev, dtype=acc)
    dc0 = new_output(D, B, H, device=dev, dtype=acc)
    part = new_output(2, D, grid[1], B, config.block_k, device=dev, dtype=acc)
    dh_st = dh_n.to(acc, copy=True).contiguous()
    dc_st = dc_n.to(acc, copy=True).contiguous()
    sync = torch.zeros(D, grid[0], device=dev, dtype=torch.int32)
    err = torch.zeros(1, device=dev, dtype=torch.int32)
    len_arg = lengths if lengths is not None else torch.empty(1, device=dev, dtype=torch.int32)
    for s_lo, s_hi, finalize in _bwd_launches(T):
        _lstm_bwd_coop_kernel[grid](
            dy, gates, cs, w_hh, len_arg, dgates, dh0, dc0,
            part, dh_st, dc_st, sync, err,
            T, B, H, T * B * G, T * B * H, (T + 1) * B * H, s_hi, s_lo, int(finalize), max_spin,
            BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            HAS_LENGTHS=lengths is not None,
            DOT_PRECISION=config.dot_precision, UPCAST_DOT=config.upcast_dot,
            num_warps=config.num_warps, num_stages=1,
        )
    _raise_on_timeout(err, "backward")
    return dgates, None, dh0, dc0
