"""The cooperative path: the programs of a batch tile split the hidden units and hand each step's result to each
other through global memory (L2), ordered by a per-(direction, batch tile) step counter.

For hidden sizes whose W_hh does not fit one program (the persistent path) but does fit the whole chip, every
program keeps its slice of W_hh on chip for the whole sequence:
- forward: the 4·BLOCK_H rows of its own units (all four gates) over all of h: pre = h_{t-1}·W_sliceᵀ is one
  dot; after the step the program publishes its units of the next step's dot operand (h_t, or h0 where the
  next step starts a segment, times the recurrent-dropout mask) into a double-buffered exchange buffer;
- backward: the BLOCK_H columns of its own units over all 4H gate rows: after the step it publishes its units'
  dgates (stored in the input dtype, which is what the dot consumes) straight into the ``dgates`` output, and
  every program computes its own units of dh_{t-1} = dgates_t·W_hh[:, own units] from all of them. One
  exchange of B × 4·BLOCK_H elements per program per step; no partial sums to reduce.

Dimension legend (see common.py): D directions, T steps, B batch, H hidden units (no projection: P = H),
G = 4H; BLOCK_B batch rows per program; BLOCK_H hidden units per program (the forward's and the backward's
differ: ``plan.block_h`` / ``plan.block_h_bwd``); BLOCK_K = HP, H padded: the whole reduction is one dot;
NH = cdiv(H, BLOCK_H) programs per batch tile; grid (cdiv(B, BLOCK_B), NH, D).

Synchronisation. ``_publish`` is a barrier (every thread's stores of the step are done) followed by one
thread's release increment of the tile's counter; ``_wait_for`` is one thread's acquire poll followed by a
barrier (everything that thread acquired is ordered before every thread's later loads). A wait for
``counter ≥ n·NH`` therefore sees every store that all NH programs made before their n-th publish.
- Forward, step s reads exchange slot s mod 2 after waiting for counter ≥ s·NH (all programs published step
  s-1, which wrote that slot). A program writes slot (s+1) mod 2 at step s only after that same wait, i.e.
  after every program has published step s-1 — and each program read slot (s-1) mod 2 = (s+1) mod 2 during its
  step s-1, before that publish (release orders the prior loads too): the slot cannot be overwritten early.
- Backward, step s reads dgates[s+1] after waiting for counter ≥ (T-1-s)·NH (all programs published step s+1,
  which wrote it). Every step has its own slot in ``dgates``, so nothing is ever overwritten.

Residency and failure. All programs must be resident at once: the dispatcher sizes the grid from the compiled
kernels' registers and shared memory and the SM count (:func:`programs_per_sm`), and the launch asks the driver
for a cooperative grid (``launch_cooperative_grid``), which starts all programs together or fails the launch —
so two cooperative launches on two streams, or one beside another kernel, cannot take SMs from each other
mid-launch. Every wait is still bounded (``LSTM_TRITON_WAIT_TIMEOUT_MS``, default 250 ms of the GPU's global
timer; a fixed number of polls under the interpreter or on ROCm). A program that times out stops waiting,
writes NaN into every output it still produces and into the exchange (so every dependent value is NaN, never
a plausible wrong number), and sets the device's status flag. The flag is read without a host sync: at the
next cooperative call on that device (which raises), or by :func:`check_errors`; ``LSTM_TRITON_SYNC_CHECKS=1``
checks right after each launch instead (a debug mode; one host sync per launch).

Under the interpreter programs run one after another, so a single launch would deadlock; there the launcher
runs the *same kernel* one step per launch, each wait already satisfied by the previous launch, and carries the
state through global buffers. Everything but true concurrency — counters, exchange, masks — is exercised.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

from .buffers import PerDirection, absent, new_output, or_absent
from .common import (at, cell_backward, cell_forward, dropout_mask, in_direction, mma, program_tile, saved_step,
                     sequence_lengths, starts_segment)
from .dispatch import LSTMPlan, accumulation_dtype, interpreter_active, saved_gates_dtype

TIMEOUT_ENV = "LSTM_TRITON_WAIT_TIMEOUT_MS"
SYNC_CHECKS_ENV = "LSTM_TRITON_SYNC_CHECKS"
DEFAULT_TIMEOUT_MS = 250.0
POLL_NS = 1000  # a poll of an L2 atomic takes at least ~1 µs round trip: the poll budget where there is no clock


@triton.jit
def _wait_for(counter_ptr, target, timeout, ok, GLOBALTIMER: tl.constexpr):
    """Spin until *counter_ptr ≥ target (acquire) for at most ``timeout`` (ns of the global timer with
    GLOBALTIMER, else polls). Returns whether it got there (False at once if ``ok`` is already False)."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    if GLOBALTIMER:
        start = globaltimer()
    waited = tl.zeros((), tl.int64)
    while ok & (seen < target) & (waited < timeout):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        if GLOBALTIMER:
            waited = globaltimer() - start
        else:
            waited += 1
    tl.debug_barrier()
    return ok & (seen >= target)


@triton.jit
def _publish(counter_ptr):
    """Count this program's step as done. The barrier first makes every thread's stores of the step part of
    what the (single-thread) release publishes."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def _cooperative_fwd_kernel(
    gx_ptr, w_hh_ptr, h0_ptr, c0_ptr, len_ptr, reset_ptr, mask_ptr,
    y_ptr, hn_ptr, cn_ptr, gates_ptr, cs_ptr,
    hx_ptr, h_st_ptr, c_st_ptr, sync_ptr, status_ptr,
    T, B, H, stride_gd, stride_gt, stride_yd, stride_yt, stride_cd, stride_ct, stride_rd, w_hh_dir,
    s_begin, s_end, timeout,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr, GLOBALTIMER: tl.constexpr, K_SPLIT: tl.constexpr,
):
    # Steps [s_begin, s_end). hx [2, D, B, H]: slot s mod 2 holds the operand of step s's dot; h_st, c_st
    # [D, B, H] carry the program's own state between launches (interpreter) and hold it at the end.
    # K_SPLIT (1, 2 or 4): the reduction over h is split into that many independent dots, each with its own
    # accumulator, so a warp's tensor-core instructions form K_SPLIT dependency chains of HP/(16·K_SPLIT)
    # instead of one of HP/16: the step's dot latency is divided by K_SPLIT where the chain was the limit.
    acc_ty = c_st_ptr.dtype.element_ty
    G = 4 * H
    NH = tl.num_programs(1)
    ND = tl.num_programs(2)
    d, rb, rh, col_g, mb, m_col, m_h, m_g, off_h, off_g = program_tile(B, H, BLOCK_B, BLOCK_H)
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)

    # This program's W_hhᵀ columns [BLOCK_K, 4·BLOCK_H] in K_SPLIT row chunks, on chip for every step.
    KC: tl.constexpr = BLOCK_K // K_SPLIT
    w_d = in_direction(w_hh_ptr, d, w_hh_dir)
    w_0 = _w_rows(w_d, col_g, m_col, H, 0, KC)
    if K_SPLIT >= 2:
        w_1 = _w_rows(w_d, col_g, m_col, H, KC, KC)
    if K_SPLIT >= 4:
        w_2 = _w_rows(w_d, col_g, m_col, H, 2 * KC, KC)
        w_3 = _w_rows(w_d, col_g, m_col, H, 3 * KC, KC)
    c = tl.load(c_st_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    h_own = tl.load(h_st_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    if HAS_RESETS:
        h0 = tl.load(h0_ptr + d * B * H + off_h, mask=m_h, other=0.0)
        c0 = tl.load(c0_ptr + d * B * H + off_h, mask=m_h, other=0.0)
    keep = dropout_mask(mask_ptr, d, B * H, rh, m_h, rb, H, acc_ty, HAS_MASK)
    counter = sync_ptr + d * tl.num_programs(0) + tl.program_id(0)  # this batch tile's step counter
    ok = tl.load(status_ptr) == 0
    s = s_begin
    while s < s_end:
        valid = (s < lens)[:, None]
        # Nothing below waits for the other programs until the exchange: issue this step's own loads first.
        pre = tl.load(at(gx_ptr, d, stride_gd, s, stride_gt) + off_g, mask=m_g, other=0.0).to(acc_ty)
        if HAS_RESETS:
            c = tl.where(starts_segment(reset_ptr, d, stride_rd, s, B, rb, mb, lens, HAS_RESETS), c0, c)
        ok = _wait_for(counter, s * NH, timeout, ok, GLOBALTIMER)  # every program published step s-1
        hx_s = in_direction(hx_ptr, (s % 2) * ND + d, B * H)
        pre = mma(_h_cols(hx_s, rb, mb, H, 0, KC), w_0, pre, DOT_PRECISION, DOT_FORM)
        if K_SPLIT >= 2:
            zero = tl.zeros((BLOCK_B, 4 * BLOCK_H), acc_ty)
            pre += mma(_h_cols(hx_s, rb, mb, H, KC, KC), w_1, zero, DOT_PRECISION, DOT_FORM)
        if K_SPLIT >= 4:
            part_2 = mma(_h_cols(hx_s, rb, mb, H, 2 * KC, KC), w_2, zero, DOT_PRECISION, DOT_FORM)
            pre += part_2 + mma(_h_cols(hx_s, rb, mb, H, 3 * KC, KC), w_3, zero, DOT_PRECISION, DOT_FORM)
        pre = tl.where(m_col[None, :], pre, 0.0)  # padded columns stay 0 even for h = ±inf (see persistent.py)
        act, c_new, h_new = cell_forward(pre, c, BLOCK_B, BLOCK_H)
        h_new = h_new.to(y_ptr.dtype.element_ty)
        c = tl.where(valid, c_new, c)
        h_own = tl.where(valid, h_new, h_own)
        # The operand of step s+1's dot: h_s, or h0 where step s+1 starts a segment, times the dropout mask.
        nxt = h_own.to(acc_ty)
        if HAS_RESETS:
            nxt = tl.where(starts_segment(reset_ptr, d, stride_rd, s + 1, B, rb, mb, lens, HAS_RESETS),
                           h0.to(acc_ty), nxt)
        if HAS_MASK:
            nxt = nxt * keep
        nxt = tl.where(ok, nxt, float("nan")).to(h_own.dtype)
        tl.store(in_direction(hx_ptr, ((s + 1) % 2) * ND + d, B * H) + off_h, nxt, mask=m_h)
        _publish(counter)  # the exchange store above is visible to whoever acquires the incremented counter
        # The step's outputs leave after the publish, so the release does not wait for them.
        tl.store(at(y_ptr, d, stride_yd, s, stride_yt) + off_h, tl.where(valid & ok, h_new, 0.0), mask=m_h)
        if SAVE:
            tl.store(at(gates_ptr, d, stride_gd, s, stride_gt) + off_g,
                     tl.where(valid, act, 0.0).to(gates_ptr.dtype.element_ty), mask=m_g)
            tl.store(at(cs_ptr, d, stride_cd, s + 1, stride_ct) + off_h, c, mask=m_h)
        s += 1
    if not ok:
        c = tl.full(c.shape, float("nan"), acc_ty)
        h_own = tl.full(h_own.shape, float("nan"), acc_ty).to(h_own.dtype)
    tl.store(c_st_ptr + d * B * H + off_h, c, mask=m_h)
    tl.store(h_st_ptr + d * B * H + off_h, h_own, mask=m_h)
    if s_end == T:
        tl.store(hn_ptr + d * B * H + off_h, h_own, mask=m_h)
        tl.store(cn_ptr + d * B * H + off_h, c.to(cn_ptr.dtype.element_ty), mask=m_h)
    if not ok:
        tl.atomic_max(status_ptr, 1)


@triton.jit
def _w_rows(w_d, col_g, m_col, H, k0, KC: tl.constexpr):
    """Rows k0..k0+KC of this program's W_hhᵀ slice, [KC, 4·BLOCK_H] (rows past H are zero)."""
    rk = k0 + tl.arange(0, KC)
    return tl.load(w_d + col_g[None, :] * H + rk[:, None], mask=(rk < H)[:, None] & m_col[None, :], other=0.0)


@triton.jit
def _h_cols(hx_s, rb, mb, H, k0, KC: tl.constexpr):
    """Columns k0..k0+KC of the published operand [B, H] for rows rb. ``.cg``: from L2, never a stale L1 line."""
    rk = k0 + tl.arange(0, KC)
    return tl.load(hx_s + rb[:, None] * H + rk[None, :], mask=mb[:, None] & (rk < H)[None, :], other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _gate_columns(w_d, k, H, rk, rh, BLOCK_K: tl.constexpr):
    """W_hh[k·H + rk, rh] of one gate k: [BLOCK_K, BLOCK_H] (rows past H are zero)."""
    return tl.load(w_d + (k * H + rk[:, None]) * H + rh[None, :], mask=(rk < H)[:, None] & (rh < H)[None, :],
                   other=0.0)


@triton.jit
def _dh_from_dgates(dg_ptr, rb, mb, rk, H, w_i, w_f, w_g, w_o, zero,
                    DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr):
    """dgates[rb, :]·W_hh[:, own units] for one step's dgates [B, 4H] (gate-blocked; ``.cg``: from L2), as four
    independent gate dots (four accumulator chains, not one of four times the length), summed at the end.
    ``zero``: a zero accumulator tile."""
    m = mb[:, None] & (rk < H)[None, :]
    row = dg_ptr + rb[:, None] * (4 * H) + rk[None, :]
    d_i = mma(tl.load(row, mask=m, other=0.0, cache_modifier=".cg"), w_i, zero, DOT_PRECISION, DOT_FORM)
    d_f = mma(tl.load(row + H, mask=m, other=0.0, cache_modifier=".cg"), w_f, zero, DOT_PRECISION, DOT_FORM)
    d_g = mma(tl.load(row + 2 * H, mask=m, other=0.0, cache_modifier=".cg"), w_g, zero, DOT_PRECISION, DOT_FORM)
    d_o = mma(tl.load(row + 3 * H, mask=m, other=0.0, cache_modifier=".cg"), w_o, zero, DOT_PRECISION, DOT_FORM)
    return (d_i + d_f) + (d_g + d_o)


@triton.jit
def _cooperative_bwd_kernel(
    dy_ptr, dcs_ptr, gates_ptr, cs_ptr, w_hh_ptr, len_ptr, reset_ptr, mask_ptr,
    dgates_ptr, dh0_ptr, dc0_ptr,
    dh_st_ptr, dc_st_ptr, dh0_st_ptr, dc0_st_ptr, sync_ptr, status_ptr,
    T, B, H, stride_gd, stride_gt, stride_yd, stride_yt, stride_cd, stride_ct, stride_dcd, stride_dct, stride_rd,
    w_hh_dir, s_hi, s_lo, finalize, timeout,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr, GLOBALTIMER: tl.constexpr,
):
    # Steps s_hi-1 down to s_lo, then (if finalize) dh0 and dc0. dh_st, dc_st [D, B, H] carry dh and dc into
    # step s_hi-1; dh0_st, dc0_st [D, B, H] what reached the initial state at segment starts so far.
    acc_ty = dc_st_ptr.dtype.element_ty
    G = 4 * H
    NH = tl.num_programs(1)
    d, rb, rh, col_g, mb, m_col, m_h, m_g, off_h, off_g = program_tile(B, H, BLOCK_B, BLOCK_H)
    off_hd = d * B * H + off_h
    rk = tl.arange(0, BLOCK_K)
    lens = sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS)

    # This program's W_hh columns (its own units) of each gate's rows, [BLOCK_K, BLOCK_H] × 4, on chip.
    w_d = in_direction(w_hh_ptr, d, w_hh_dir)
    w_i = _gate_columns(w_d, 0, H, rk, rh, BLOCK_K)
    w_f = _gate_columns(w_d, 1, H, rk, rh, BLOCK_K)
    w_g = _gate_columns(w_d, 2, H, rk, rh, BLOCK_K)
    w_o = _gate_columns(w_d, 3, H, rk, rh, BLOCK_K)
    dh = tl.load(dh_st_ptr + off_hd, mask=m_h, other=0.0)
    dc = tl.load(dc_st_ptr + off_hd, mask=m_h, other=0.0)
    if HAS_RESETS:
        dh0 = tl.load(dh0_st_ptr + off_hd, mask=m_h, other=0.0)
        dc0 = tl.load(dc0_st_ptr + off_hd, mask=m_h, other=0.0)
    keep = dropout_mask(mask_ptr, d, B * H, rh, m_h, rb, H, acc_ty, HAS_MASK)
    counter = sync_ptr + d * tl.num_programs(0) + tl.program_id(0)  # this batch tile's step counter
    ok = tl.load(status_ptr) == 0
    s = s_hi - 1
    while s >= s_lo:
        valid = (s < lens)[:, None]
        # This step's own operands first; then the exchange.
        dy = tl.load(at(dy_ptr, d, stride_yd, s, stride_yt) + off_h, mask=m_h, other=0.0).to(acc_ty)
        dc, act, c, c_prev, restart = saved_step(gates_ptr, cs_ptr, dcs_ptr, reset_ptr, dc, valid, d, s, B, stride_gd, stride_gt, stride_cd,
                                            stride_ct, stride_dcd, stride_dct, stride_rd, rb, mb, lens, off_g, off_h,
                                            m_g, m_h, HAS_DCS, HAS_RESETS)
        if s + 1 < T:
            ok = _wait_for(counter, (T - 1 - s) * NH, timeout, ok, GLOBALTIMER)  # all published step s+1
            rec = _dh_from_dgates(at(dgates_ptr, d, stride_gd, s + 1, stride_gt), rb, mb, rk, H, w_i, w_f, w_g, w_o,
                                  tl.zeros((BLOCK_B, BLOCK_H), acc_ty), DOT_PRECISION, DOT_FORM) * keep
            if HAS_RESETS:
                # Step s+1 started a segment from h0: its gradient goes there, and none crosses into step s.
                restart_next = starts_segment(reset_ptr, d, stride_rd, s + 1, B, rb, mb, lens, HAS_RESETS)
                dh0 += tl.where(restart_next, rec, 0.0)
                rec = tl.where(restart_next, 0.0, rec)
            dh = tl.where((s + 1 < lens)[:, None], rec, dh)  # a sequence that had ended passes dh through
        dh = dh + tl.where(valid, dy, 0.0)
        dgates, dc_prev = cell_backward(dh, dc, act, c, c_prev, BLOCK_B, BLOCK_H)
        dgates = tl.where(valid & ok, dgates, tl.where(ok, 0.0, float("nan")))
        tl.store(at(dgates_ptr, d, stride_gd, s, stride_gt) + off_g, dgates.to(dgates_ptr.dtype.element_ty),
                 mask=m_g)
        _publish(counter)  # the dgates store above is the exchange
        dc = tl.where(valid, dc_prev, dc)
        if HAS_RESETS:
            dc0 += tl.where(restart, dc, 0.0)
            dc = tl.where(restart, 0.0, dc)
        s -= 1
    tl.store(dh_st_ptr + off_hd, dh, mask=m_h)
    tl.store(dc_st_ptr + off_hd, dc, mask=m_h)
    if HAS_RESETS:
        tl.store(dh0_st_ptr + off_hd, dh0, mask=m_h)
        tl.store(dc0_st_ptr + off_hd, dc0, mask=m_h)
    if finalize:
        # Step 0 always starts from h0/c0 (every sequence has a step 0).
        ok = _wait_for(counter, T * NH, timeout, ok, GLOBALTIMER)
        dh_first = _dh_from_dgates(in_direction(dgates_ptr, d, stride_gd), rb, mb, rk, H, w_i, w_f, w_g, w_o,
                                   tl.zeros((BLOCK_B, BLOCK_H), acc_ty), DOT_PRECISION, DOT_FORM) * keep
        dc_first = dc
        if HAS_RESETS:
            dh_first += dh0
            dc_first += dc0
        tl.store(dh0_ptr + off_hd, tl.where(ok, dh_first, float("nan")), mask=m_h)
        tl.store(dc0_ptr + off_hd, tl.where(ok, dc_first, float("nan")), mask=m_h)
    if not ok:
        tl.atomic_max(status_ptr, 1)


# ------------------------------------------------------------------------------------------------ host side


def _timeout(device: torch.device) -> tuple[int, bool]:
    """(bound, whether it is in global-timer nanoseconds) for the waits of a launch on ``device``."""
    ms = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MS))
    ns = int(ms * 1e6)
    globaltimer_ok = device.type == "cuda" and torch.version.hip is None and not interpreter_active()
    return (ns, True) if globaltimer_ok else (max(1, ns // POLL_NS), False)


class _Watchdog:
    """A device's status flag (set by a program that timed out) and its non-blocking report to the host."""

    def __init__(self, device: torch.device):
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.cuda = device.type == "cuda" and not interpreter_active()
        if self.cuda:
            self.mirror = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            self.copied = torch.cuda.Event()
            self.pending = False

    def raise_if_failed(self, wait: bool = False) -> None:
        """Raise if a launch on this device timed out. Without ``wait`` only what is already known on the host
        (the last launch's flag, if its copy has landed) is looked at: no sync."""
        if self.status.device.type == "meta":  # launches described, not run (the compile report)
            return
        if self.cuda:
            if not self.pending or not (wait or self.copied.query()):
                return
            if wait:
                self.copied.synchronize()
            self.pending = False
            failed = bool(self.mirror.numpy()[0])  # pinned host memory: reading it syncs nothing
        else:
            failed = bool(self.status.numpy()[0])  # CPU memory (interpreter)
        if failed:
            self.status.zero_()
            raise RuntimeError(
                "lstm_triton: a cooperative kernel timed out waiting for another program (after "
                f"{os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MS)} ms; set {TIMEOUT_ENV} to change the bound); "
                "its outputs were set to NaN"
            )

    def after_launch(self) -> None:
        if os.environ.get(SYNC_CHECKS_ENV, "0") == "1" or not self.cuda:
            if self.cuda:
                torch.cuda.current_stream(self.status.device).synchronize()
                self.mirror.copy_(self.status)
                self.pending = True
            self.raise_if_failed(wait=True)
            return
        if torch.cuda.is_current_stream_capturing():
            return  # the flag stays on the device; the next eager call reports it
        self.mirror.copy_(self.status, non_blocking=True)
        self.copied.record()
        self.pending = True


_WATCHDOGS: dict = {}


def _watchdog(device: torch.device) -> _Watchdog:
    key = (device.type, device.index)
    if key not in _WATCHDOGS:
        _WATCHDOGS[key] = _Watchdog(device)
    return _WATCHDOGS[key]


def check_errors(device=None, wait: bool = True) -> None:
    """Raise if a cooperative launch on ``device`` (default: every device used so far) timed out. With
    ``wait`` (default) it waits for the launches already queued; it is the one call here that may sync."""
    for (kind, index), dog in list(_WATCHDOGS.items()):
        if device is None or torch.device(device) == torch.device(kind, index):
            dog.raise_if_failed(wait=wait)


def _step_ranges(T: int):
    """One launch for the whole sequence on a GPU; one launch per step under the interpreter."""
    return [(s, s + 1) for s in range(T)] if interpreter_active() else [(0, T)]


def _bwd_launches(T: int):
    """(s_lo, s_hi, finalize) per launch. Under the interpreter the final dh0 reduction, which waits for every
    program's step 0, gets a launch of its own (inside the step-0 launch it would wait on programs not yet run)."""
    if interpreter_active():
        return [(s, s + 1, False) for s in range(T - 1, -1, -1)] + [(0, 0, True)]
    return [(0, T, True)]


def k_split(block_k: int) -> int:
    """Independent dots the forward splits its reduction over h into: where the dependency chain is long enough
    to matter (HP ≥ 128), as many as keep each ≥ 64 wide, up to 4."""
    return 4 if block_k >= 256 else 2 if block_k >= 128 else 1


def _launch_options(plan: LSTMPlan, device: torch.device, backward: bool = False) -> dict:
    options = dict(num_warps=plan.num_warps_bwd if backward else plan.num_warps, num_stages=1)
    if device.type != "cpu" and not interpreter_active():  # a GPU (or meta tensors describing a GPU launch)
        options["launch_cooperative_grid"] = True  # the driver starts every program at once or refuses
    return options


def forward(plan: LSTMPlan, gx, w_hh: PerDirection, w_hr, h0, c0, lengths, resets, mask, save: bool):
    """The cooperative forward; arguments and results as :func:`lstm_triton.kernels.lstm_fwd` (no projection)."""
    D, T, B, G = gx.shape
    H = G // 4
    dtype, dev = gx.dtype, gx.device
    acc = accumulation_dtype(dtype)
    dog = _watchdog(dev)
    dog.raise_if_failed()
    y = new_output(D, T, B, H, device=dev, dtype=dtype)
    h_n = new_output(D, B, H, device=dev, dtype=dtype)
    c_n = new_output(D, B, H, device=dev, dtype=dtype)
    gates = new_output(D, T, B, G, device=dev, dtype=saved_gates_dtype(dtype)) if save else None
    cs = new_output(D, T + 1, B, H, device=dev, dtype=acc) if save else None
    h0 = h0.to(dtype).contiguous()
    c0 = c0.to(acc).contiguous()
    if save:
        cs[:, 0].copy_(c0)
    h_x = new_output(2, D, B, H, device=dev, dtype=dtype)
    h_x[0].copy_(h0 if mask is None else h0 * mask)
    h_st, c_st = h0.clone(), c0.clone()
    sync = torch.zeros(D, triton.cdiv(B, plan.block_b), device=dev, dtype=torch.int32)
    timeout, clock = _timeout(dev)
    gates_arg, cs_arg = or_absent(gates, dev, acc), or_absent(cs, dev, acc)
    args = (gx, w_hh.base, h0, c0, or_absent(lengths, dev), or_absent(resets, dev), or_absent(mask, dev, dtype),
            y, h_n, c_n, gates_arg, cs_arg, h_x, h_st, c_st, sync, dog.status,
            T, B, H, gx.stride(0), gx.stride(1), y.stride(0), y.stride(1), cs_arg.stride(0),
            cs_arg.stride(1) if save else 0, 0 if resets is None else resets.stride(0), w_hh.stride)
    options = dict(BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_K=plan.block_p, HAS_LENGTHS=lengths is not None,
                   HAS_RESETS=resets is not None, HAS_MASK=mask is not None, SAVE=save,
                   DOT_PRECISION=plan.dot_precision, DOT_FORM=plan.dot_form, GLOBALTIMER=clock,
                   K_SPLIT=k_split(plan.block_p), **_launch_options(plan, dev))
    for s_begin, s_end in _step_ranges(T):
        _cooperative_fwd_kernel[plan.grid(B, H, D)](*args, s_begin, s_end, timeout, **options)
    dog.after_launch()
    return y, h_n, c_n, gates, cs


def backward(plan: LSTMPlan, dy, dh_n, dc_n, dcs, gates, cs, w_hh: PerDirection, w_hr, lengths, resets, mask):
    """The cooperative backward; arguments and results as :func:`lstm_triton.kernels.lstm_bwd` (no projection)."""
    D, T, B, G = gates.shape
    H = G // 4
    dtype, dev = w_hh.dtype, gates.device
    acc = cs.dtype
    dog = _watchdog(dev)
    dog.raise_if_failed()
    dgates = new_output(D, T, B, G, device=dev, dtype=dtype)
    dh0 = new_output(D, B, H, device=dev, dtype=acc)
    dc0 = new_output(D, B, H, device=dev, dtype=acc)
    dh_st = dh_n.to(acc, copy=True).contiguous()
    dc_st = dc_n.to(acc, copy=True).contiguous()
    dh0_st = torch.zeros(D, B, H, device=dev, dtype=acc) if resets is not None else absent(dev, acc)
    dc0_st = torch.zeros(D, B, H, device=dev, dtype=acc) if resets is not None else absent(dev, acc)
    sync = torch.zeros(D, triton.cdiv(B, plan.block_b), device=dev, dtype=torch.int32)
    timeout, clock = _timeout(dev)
    args = (dy, or_absent(dcs, dev, dtype), gates, cs, w_hh.base, or_absent(lengths, dev), or_absent(resets, dev),
            or_absent(mask, dev, dtype), dgates, dh0, dc0, dh_st, dc_st, dh0_st, dc0_st, sync, dog.status,
            T, B, H, gates.stride(0), gates.stride(1), dy.stride(0), dy.stride(1), cs.stride(0), cs.stride(1),
            0 if dcs is None else dcs.stride(0), 0 if dcs is None else dcs.stride(1),
            0 if resets is None else resets.stride(0), w_hh.stride)
    options = dict(BLOCK_B=plan.block_b, BLOCK_H=plan.block_h_bwd, BLOCK_K=plan.block_p,
                   HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None, HAS_MASK=mask is not None,
                   HAS_DCS=dcs is not None, DOT_PRECISION=plan.dot_precision, DOT_FORM=plan.dot_form,
                   GLOBALTIMER=clock, **_launch_options(plan, dev, backward=True))
    for s_lo, s_hi, finalize in _bwd_launches(T):
        _cooperative_bwd_kernel[plan.grid(B, H, D, backward=True)](*args, s_hi, s_lo, int(finalize), timeout, **options)
    dog.after_launch()
    return dgates, None, dh0, dc0


@functools.lru_cache(maxsize=None)
def programs_per_sm(plan: LSTMPlan, dtype: torch.dtype, device_index: int,
                    B: int = 16, H: Optional[int] = None) -> int:
    """How many programs of this plan's kernels (the lesser of forward and backward) one SM of the device holds
    at once, from their compiled registers, shared memory and warps."""
    dev = torch.device("cuda", device_index)
    props = torch.cuda.get_device_properties(dev)
    H = H or plan.block_p
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    least = None
    with torch.cuda.device(dev):
        for kernel in _compiled_kernels(plan, dtype, dev, B, H):
            try:
                kernel._init_handles()  # loads the binary: n_regs, and the device's own resource checks
            except triton.runtime.errors.OutOfResources:
                return 0
            warps = kernel.metadata.num_warps
            regs = -(-kernel.n_regs * 32 // 256) * 256 * warps  # allocated per warp in units of 256
            fits = min(regs_per_sm // max(regs, 1), smem_per_sm // max(kernel.metadata.shared, 1),
                       threads_per_sm // (32 * warps))
            least = fits if least is None else min(least, fits)
    return least or 0


def _compiled_kernels(plan: LSTMPlan, dtype: torch.dtype, dev: torch.device, B: int, H: int):
    """The forward and backward kernels of ``plan``, compiled (not run) for a B × H problem on ``dev``."""
    acc = accumulation_dtype(dtype)
    T, G = 2, 4 * H
    t = lambda *shape, dt=dtype: torch.zeros(*shape, device=dev, dtype=dt)  # noqa: E731
    i32 = absent(dev)
    timeout, clock = _timeout(dev)
    common = dict(BLOCK_B=plan.block_b, BLOCK_K=plan.block_p, HAS_LENGTHS=False, HAS_RESETS=False,
                  HAS_MASK=False, DOT_PRECISION=plan.dot_precision, DOT_FORM=plan.dot_form,
                  GLOBALTIMER=clock, grid=(1,))
    gx, hb, cb, cs = t(1, T, B, G), t(1, B, H), t(1, B, H, dt=acc), t(1, T + 1, B, H, dt=acc)
    fwd = _cooperative_fwd_kernel.warmup(
        gx, gx, hb, cb, i32, i32, hb, t(1, T, B, H), hb, hb, gx, cs, t(2, 1, B, H), hb, cb, i32, i32,
        T, B, H, gx.stride(0), gx.stride(1), T * B * H, B * H, cs.stride(0), cs.stride(1), 0, 0, 0, T, timeout,
        BLOCK_H=plan.block_h, SAVE=True, K_SPLIT=k_split(plan.block_p), **_launch_options(plan, dev), **common)
    bwd = _cooperative_bwd_kernel.warmup(
        t(1, T, B, H), hb, gx, cs, gx, i32, i32, hb, gx, cb, cb, cb, cb, cb, cb, i32, i32,
        T, B, H, gx.stride(0), gx.stride(1), T * B * H, B * H, cs.stride(0), cs.stride(1), 0, 0, 0, 0, T, 0, 1,
        timeout, BLOCK_H=plan.block_h_bwd, HAS_DCS=False, **_launch_options(plan, dev, backward=True), **common)
    return fwd, bwd
