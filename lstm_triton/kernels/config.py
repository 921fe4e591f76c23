"""Which kernel path and tile sizes run a given problem.

Dimension legend: B batch, H hidden units, P projected size (P = H without projection);
HP, PP = H, P rounded up to a power of two (≥ 16: the smallest ``tl.dot`` tile).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

PATHS = ("persistent", "cooperative", "stepwise")

# The persistent path keeps one program's whole weight tile — W_hh (4·HP·PP elements) and, with a
# projection, W_hr (PP·HP) — in registers for all T steps, beside the live fp32 gate tile [16, 4·HP]. The caps
# are the largest tiles that compile without register spills for sm_80 and sm_90
# (tests/test_compile_targets.py records registers, spills and shared memory for every specialization).
PERSISTENT_MAX_HP_16BIT = 32  # float16 / bfloat16 without projection
PERSISTENT_MAX_HP = 16  # float32 / float64, and any dtype with a projection

# The cooperative path keeps 4·BLOCK_H rows of W_hh (all HP columns) per program on chip.
COOPERATIVE_MAX_TILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class LSTMKernelConfig:
    path: str  # "persistent" | "cooperative" | "stepwise"
    block_b: int
    block_h: int
    block_p: int  # persistent: padded P; otherwise unused (= block_h)
    block_k: int  # stepwise: reduction tile; cooperative: padded H (one dot over all of h)
    num_warps: int
    num_stages: int
    dot_precision: str  # "ieee" | "tf32"
    upcast_dot: bool  # bfloat16 under the interpreter: see kernels/_gates.py:mma


def padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def persistent_fits(H: int, dtype: torch.dtype, proj_size: int = 0) -> bool:
    """Whether one program can hold its whole weight tile on chip for the whole sequence without spilling."""
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    cap = PERSISTENT_MAX_HP_16BIT if sixteen_bit and not proj_size else PERSISTENT_MAX_HP
    return padded(H) <= cap and padded(proj_size or H) <= cap


def cooperative_block_h(H: int, dtype: torch.dtype) -> int:
    """Hidden units per program on the cooperative path: the most whose 4·BLOCK_H rows of W_hh (over all
    HP columns) fit the on-chip budget; 0 if not even 4 units (the smallest 16-column dot) fit."""
    size = torch.tensor([], dtype=dtype).element_size()
    HP, block_h = padded(H), 4
    if 4 * block_h * HP * size > COOPERATIVE_MAX_TILE_BYTES:
        return 0
    while block_h * 2 <= HP and 4 * block_h * 2 * HP * size <= COOPERATIVE_MAX_TILE_BYTES:
        block_h *= 2
    return block_h


def cooperative_programs(B: int, H: int, dtype: torch.dtype, directions: int = 1) -> int:
    """Programs the cooperative path launches (all of which must be resident at once)."""
    block_h = cooperative_block_h(H, dtype)
    return triton.cdiv(B, 16) * triton.cdiv(H, block_h) * directions if block_h else 0


INT32_MAX = 2**31 - 1


def check_offset_limits(B: int, H: int, P: int, I: int = 0) -> None:
    """The kernels address elements *within one step* (a batch row's gate column, a weight row's column) with
    32-bit offsets; steps and directions advance 64-bit pointers. Refuse, before any launch, what would not fit."""
    extents = {"B·4H": B * 4 * H, "B·P": B * P, "4H·P": 4 * H * P, "4H·I": 4 * H * I, "B·I": B * I}
    for name, n in extents.items():
        if n > INT32_MAX:
            raise ValueError(
                f"lstm_triton: {name} = {n} exceeds the kernels' 32-bit in-step offset limit of 2³¹ − 1 = {INT32_MAX}; "
                "split the batch (or the layer) into smaller calls"
            )


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def select_config(
    B: int,
    H: int,
    dtype: torch.dtype,
    allow_tf32: bool = False,
    path: str = "auto",
    proj_size: int = 0,
    directions: int = 1,
    resident_programs: int = 0,
) -> LSTMKernelConfig:
    """The configuration the dispatcher runs for batch B, hidden size H, projection, directions and dtype.

    ``path="auto"``: the persistent path whenever one program's weight tile fits (:func:`persistent_fits`);
    else the cooperative path when its dots run on tensor cores (not exact float32 or float64, whose FMA dots
    spill there), there is no projection and its grid fits ``resident_programs`` (the GPU's SM count; 0 =
    unknown, as on the interpreter, which never picks it); else the stepwise path.
    ``"persistent"``, ``"cooperative"`` or ``"stepwise"`` force one (tests compare them).
    """
    if path == "auto":
        if persistent_fits(H, dtype, proj_size):
            path = "persistent"
        elif (
            not proj_size
            and (dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and allow_tf32))
            and 0 < cooperative_programs(B, H, dtype, directions) <= resident_programs
        ):
            path = "cooperative"
        else:
            path = "stepwise"
    if path not in PATHS:
        raise ValueError(f"unknown LSTM kernel path {path!r}; expected 'auto' or one of {PATHS}")
    precision = dot_precision(dtype, allow_tf32)
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if path == "persistent":
        HP, PP = padded(H), padded(proj_size or H)
        return LSTMKernelConfig("persistent", 16, HP, PP, PP, 4 if HP <= 32 else 8, 1, precision, upcast)
    if path == "cooperative":
        block_h = cooperative_block_h(H, dtype)
        if proj_size or not block_h:
            raise ValueError("the cooperative LSTM path takes no projection and needs 4 units' W_hh rows on chip")
        return LSTMKernelConfig("cooperative", 16, block_h, block_h, padded(H), 8, 1, precision, upcast)
    block_h = 16 if H <= 256 else 32
    block_k = 32 if dtype == torch.float64 else 64
    return LSTMKernelConfig("stepwise", 16, block_h, block_h, block_k, 4, 2, precision, upcast)
