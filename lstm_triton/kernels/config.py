"""Which kernel path and tile sizes run a given problem.

Dimension legend: B batch, H hidden units; HP = H rounded up to a power of two (≥ 16).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

PATHS = ("persistent", "stepwise")

# The persistent path keeps one program's whole W_hh tile (4·HP² elements) on chip for all T steps.
# 64 KiB is what a program of 8 warps holds in registers without spilling on sm_80/sm_90 (the compile
# test records registers and spills for the largest tile of each dtype).
PERSISTENT_MAX_TILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class LSTMKernelConfig:
    path: str  # "persistent" | "stepwise"
    block_b: int
    block_h: int
    block_k: int
    num_warps: int
    num_stages: int
    dot_precision: str  # "ieee" | "tf32"
    upcast_dot: bool  # bfloat16 under the interpreter: see kernels/_gates.py:mma


def padded_hidden(H: int) -> int:
    return max(16, triton.next_power_of_2(H))


def persistent_fits(H: int, dtype: torch.dtype) -> bool:
    """Whether one program can hold all 4·HP² weights of W_hh for the whole sequence."""
    HP = padded_hidden(H)
    return 4 * HP * HP * torch.tensor([], dtype=dtype).element_size() <= PERSISTENT_MAX_TILE_BYTES


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def select_config(B: int, H: int, dtype: torch.dtype, allow_tf32: bool = False, path: str = "auto") -> LSTMKernelConfig:
    """The configuration the dispatcher runs for batch B, hidden size H and input dtype.

    ``path="auto"`` takes the persistent path whenever the W_hh tile fits (:func:`persistent_fits`),
    else the stepwise path; ``"persistent"`` or ``"stepwise"`` force one (tests compare them).
    """
    if path == "auto":
        path = "persistent" if persistent_fits(H, dtype) else "stepwise"
    if path not in PATHS:
        raise ValueError(f"unknown LSTM kernel path {path!r}; expected 'auto' or one of {PATHS}")
    precision = dot_precision(dtype, allow_tf32)
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if path == "persistent":
        HP = padded_hidden(H)
        return LSTMKernelConfig("persistent", 16, HP, HP, 4 if HP <= 32 else 8, 1, precision, upcast)
    block_h = 16 if H <= 256 else 32
    return LSTMKernelConfig("stepwise", 16, block_h, 32 if dtype == torch.float64 else 64, 4, 2, precision, upcast)
