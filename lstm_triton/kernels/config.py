"""Which kernel path and tile sizes run a given problem.

Dimension legend: B batch, H hidden units, P projected size (P = H without projection);
HP, PP = H, P rounded up to a power of two (≥ 16: the smallest ``tl.dot`` tile).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

PATHS = ("persistent", "stepwise")

# The persistent path keeps one program's whole weight tile — W_hh (4·HP·PP elements) and, with a
# projection, W_hr (PP·HP) — on chip for all T steps. 64 KiB is what a program of 8 warps holds in
# registers without spilling on sm_80/sm_90 (tests/test_compile_targets.py records registers and spills
# for the largest tile of each dtype).
PERSISTENT_MAX_TILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class LSTMKernelConfig:
    path: str  # "persistent" | "stepwise"
    block_b: int
    block_h: int
    block_p: int  # persistent: padded P; stepwise: unused (= block_h)
    block_k: int  # stepwise: reduction tile
    num_warps: int
    num_stages: int
    dot_precision: str  # "ieee" | "tf32"
    upcast_dot: bool  # bfloat16 under the interpreter: see kernels/_gates.py:mma


def padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def persistent_tile_bytes(H: int, dtype: torch.dtype, proj_size: int = 0) -> int:
    HP, PP = padded(H), padded(proj_size or H)
    elements = 4 * HP * PP + (PP * HP if proj_size else 0)
    return elements * torch.tensor([], dtype=dtype).element_size()


def persistent_fits(H: int, dtype: torch.dtype, proj_size: int = 0) -> bool:
    """Whether one program can hold its whole weight tile on chip for the whole sequence."""
    return persistent_tile_bytes(H, dtype, proj_size) <= PERSISTENT_MAX_TILE_BYTES


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def select_config(
    B: int, H: int, dtype: torch.dtype, allow_tf32: bool = False, path: str = "auto", proj_size: int = 0
) -> LSTMKernelConfig:
    """The configuration the dispatcher runs for batch B, hidden size H, projection and input dtype.

    ``path="auto"`` takes the persistent path whenever the weight tile fits (:func:`persistent_fits`),
    else the stepwise path; ``"persistent"`` or ``"stepwise"`` force one (tests compare them).
    """
    if path == "auto":
        path = "persistent" if persistent_fits(H, dtype, proj_size) else "stepwise"
    if path not in PATHS:
        raise ValueError(f"unknown LSTM kernel path {path!r}; expected 'auto' or one of {PATHS}")
    precision = dot_precision(dtype, allow_tf32)
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if path == "persistent":
        HP, PP = padded(H), padded(proj_size or H)
        return LSTMKernelConfig("persistent", 16, HP, PP, PP, 4 if HP <= 32 else 8, 1, precision, upcast)
    block_h = 16 if H <= 256 else 32
    block_k = 32 if dtype == torch.float64 else 64
    return LSTMKernelConfig("stepwise", 16, block_h, block_h, block_k, 4, 2, precision, upcast)
