"""The dispatcher: which kernel path and tiles run a problem. Every decision is made here, once per call, and
returned as an :class:`LSTMPlan` that the forward hands to its backward.

Dimension legend: B batch, T steps, H hidden units, P projected size (P = H without projection), D directions;
HP, PP = H, P rounded up to a power of two (≥ 16: the smallest ``tl.dot`` tile).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton

PATHS = ("persistent", "cooperative", "stepwise")

# The persistent path keeps one program's whole weight tile — W_hh (4·HP·PP elements) and, with a
# projection, W_hr (PP·HP) — on chip for all T steps, beside the live fp32 gate tile [16, 4·HP]. The caps
# are the largest tiles that compile without register spills for sm_80 and sm_90 with every supported triton
# (the compile report, ``python -m tools.compile_report``, records registers, spills and shared memory).
PERSISTENT_MAX_HP_16BIT = 32  # float16 / bfloat16 without projection
PERSISTENT_MAX_HP = 16  # float32 / float64, and any dtype with a projection
PERSISTENT_FORCED_MAX = 64  # a caller may force larger tiles than the caps (they spill), up to this padded H / P
# ... except where the compiled dots are not on tensor cores (exact float32, float64): there the caps hold for
# forced tiles too. Beyond them exact float32 spills kilobytes and its backward aborts LLVM on sm_90 with
# triton 3.9 (an SLP-vectorizer assertion kills the process, HP = 32 and 64); float64's FMA products would not
# compile in reasonable time and memory. The interpreter runs any forced tile.

# The cooperative path keeps, per program, the 4·BLOCK_H rows of W_hh it multiplies h by (forward) and the
# BLOCK_H columns it multiplies dgates by (backward), over all of h, on chip for the whole sequence. The
# budgets are the largest slices that compile without spills for sm_80 and sm_90 with triton 3.6 and 3.9 (the
# compile report: bf16 H = 1024 forward slices of 16 units spill ~3 KB, of 8 units none; backward slices of
# 16 units none) — for H a multiple of 16; with other H the masked, unvectorized loads spill at HP = 1024.
COOPERATIVE_MAX_TILE_BYTES = 64 * 1024
COOPERATIVE_MAX_TILE_BYTES_BWD = 128 * 1024
COOPERATIVE_UNALIGNED_MAX_HP = 512
COOPERATIVE_MIN_BLOCK_H = 4  # forward: one dot of 4·BLOCK_H ≥ 16 gate columns
COOPERATIVE_MIN_BLOCK_H_BWD = 16  # backward: one dot of BLOCK_H ≥ 16 output columns
COOPERATIVE_BATCH_TILES = (16,)  # 32 rows spill kilobytes at every tile the dispatcher would pick (report)
COOPERATIVE_MAX_OPERAND_BYTES = 32 * 1024

INT32_MAX = 2**31 - 1


class PathUnavailable(ValueError):
    """A forced path cannot run this problem here (its tile, projection or residency): raised before any launch."""


def interpreter_active() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): the one place that reads the variable."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate dots and keep the cell state in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saved_gates_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward saves the activated gates in for the backward: the accumulation dtype. (Gates
    rounded to bfloat16 put the bfloat16 gradients of c0, W_ih and W_hh beyond twice torch's own bfloat16
    error — measured by tests/test_lstm_layer.py — so they stay float32. The gate *gradients* are stored in
    the input dtype, which is what every GEMM and dot that reads them consumes.)"""
    return accumulation_dtype(dtype)


def padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class LSTMPlan:
    """How one layer call runs: path, tiles, launch options. ``encode()`` / ``decode()`` carry it through the
    custom op's string argument, so the backward runs exactly what the forward ran."""

    path: str  # "persistent" | "cooperative" | "stepwise"
    block_b: int  # batch rows per program
    block_h: int  # hidden units per program in the forward (persistent: HP, every unit)
    block_h_bwd: int  # hidden units per program in the backward
    block_p: int  # persistent: PP; cooperative: HP (one dot over all of h); stepwise: unused
    block_k: int  # stepwise: the reduction tile over h (and x for a fused step)
    num_warps: int
    num_warps_bwd: int
    dot_precision: str  # "ieee" | "tf32"
    dot_form: str  # "dot" | "upcast" | "fma": see dot_form() and common.mma
    fused_step: bool = False  # one step whose stepwise kernel also computes x·W_ihᵀ + b (LSTMCell)

    def encode(self) -> str:
        return ";".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @classmethod
    def decode(cls, text: str) -> "LSTMPlan":
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values = dict(item.split("=", 1) for item in text.split(";"))
        conv = {"str": str, "int": int, "bool": lambda v: v == "True"}
        return cls(**{k: conv[kinds[k]](v) for k, v in values.items()})

    def grid(self, B: int, H: int, D: int, backward: bool = False) -> tuple[int, int, int]:
        """Programs per (batch tile, hidden-unit tile, direction)."""
        if self.path == "persistent":
            return (triton.cdiv(B, self.block_b), 1, D)
        block_h = self.block_h_bwd if backward else self.block_h
        return (triton.cdiv(B, self.block_b), triton.cdiv(H, block_h), D)

    def programs(self, B: int, H: int, D: int) -> int:
        """The most programs of one launch (the cooperative path needs them all resident at once)."""
        return max(g[0] * g[1] * g[2] for g in (self.grid(B, H, D), self.grid(B, H, D, backward=True)))


def persistent_fits(H: int, dtype: torch.dtype, proj_size: int = 0) -> bool:
    """Whether one program can hold its whole weight tile on chip for the whole sequence without spilling."""
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    cap = PERSISTENT_MAX_HP_16BIT if sixteen_bit and not proj_size else PERSISTENT_MAX_HP
    return padded(H) <= cap and padded(proj_size or H) <= cap


def cooperative_tile_fits(H: int, block_h: int, dtype: torch.dtype, backward: bool = False,
                          shared_limit: Optional[int] = None, block_b: int = 16) -> bool:
    """A program's on-chip W_hh slice (4·block_h × HP elements) within the budget and, with ``shared_limit``
    (the device's shared memory per program; LDS on ROCm), within what the compiled kernel takes: the slice
    beside the per-step operands staged there. Backward, two [block_b, HP] tiles, as compiled (the compile
    report: bf16 HP = 1024 128 + 2 × 32 KB = 192 KB, more than an A100's 163 KB; HP = 512 96 KB); forward one,
    an upper estimate (compiled: 72 KB at bf16 HP = 1024 where this counts 96)."""
    budget = COOPERATIVE_MAX_TILE_BYTES_BWD if backward else COOPERATIVE_MAX_TILE_BYTES
    if element_size(dtype) > 2:
        # float32 (tf32) and float64: a quarter, which keeps float32's cooperative tiles to HP ≤ 128. Beyond,
        # they spill: a few dozen bytes at HP = 512 on sm_80 (triton 3.6); at HP = 256 8-unit forward tiles 8 B
        # on sm_80, 4-unit forward and 16-unit backward tiles 28-32 B on sm_90 (triton 3.9).
        budget //= 4
    slice_bytes = 4 * block_h * padded(H) * element_size(dtype)
    staged = (2 if backward else 1) * block_b * padded(H) * element_size(dtype)
    return slice_bytes <= budget and (shared_limit is None or slice_bytes + staged <= shared_limit)


def cooperative_operand_fits(block_b: int, H: int, dtype: torch.dtype) -> bool:
    """The per-step operand every program reads from L2 (h, or one gate of dgates: block_b × HP elements) within
    the budget that compiles without spills (the compile report: 16 × 1024 bf16 holds; 32 × 1024 bf16 and
    32 × 512 fp32 spill kilobytes and need more shared memory than sm_90 has)."""
    return block_b * padded(H) * element_size(dtype) <= COOPERATIVE_MAX_OPERAND_BYTES


def _cooperative_tiles(B: int, H: int, D: int, dtype: torch.dtype, capacity: Optional[Callable[[LSTMPlan], int]],
                       base: dict, shared_limit: Optional[int] = None) -> Optional[LSTMPlan]:
    """The cooperative plan: the smallest batch tile and then the smallest unit tiles within the on-chip budget
    whose grids fit the capacity (programs that can be resident at once, per plan) — the most programs, so
    the most SMs share W_hh. Without a capacity (the interpreter, which runs one step per launch) simply the
    smallest tiles: the most programs exchanging, the most of the exchange exercised."""
    HP = padded(H)
    units = [u for u in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if u <= HP]

    def tiles(block_b: int) -> tuple[list[int], list[int]]:
        return ([u for u in units if u >= COOPERATIVE_MIN_BLOCK_H
                 and cooperative_tile_fits(H, u, dtype, False, shared_limit, block_b)],
                [u for u in units if u >= COOPERATIVE_MIN_BLOCK_H_BWD
                 and cooperative_tile_fits(H, u, dtype, True, shared_limit, block_b)])

    if capacity is not None and H % 16 and HP > COOPERATIVE_UNALIGNED_MAX_HP:
        return None  # see COOPERATIVE_MAX_TILE_BYTES (a forced plan under the interpreter still runs)
    if capacity is None:
        fwd_tiles, bwd_tiles = tiles(16)
        return _cooperative_plan(16, fwd_tiles[0], bwd_tiles[0], HP, base) if fwd_tiles and bwd_tiles else None
    for block_b in (b for b in COOPERATIVE_BATCH_TILES if cooperative_operand_fits(b, H, dtype)):
        fwd_tiles, bwd_tiles = tiles(block_b)
        for block_h in fwd_tiles:
            for block_h_bwd in bwd_tiles:
                plan = _cooperative_plan(block_b, block_h, block_h_bwd, HP, base)
                if plan.programs(B, H, D) <= capacity(plan):
                    return plan
    return None


def _mma_warps(rows: int, cols: int) -> int:
    """Warps that share an [rows, cols] dot tile without two computing the same part: the tensor-core tile is
    16 rows by 8 columns per warp (up to one warpgroup of 4)."""
    return max(1, min(4, (rows // 16) * (cols // 8)))


def _cooperative_plan(block_b: int, block_h: int, block_h_bwd: int, HP: int, base: dict) -> LSTMPlan:
    # Forward: one dot [BLOCK_B, 4·BLOCK_H] over HP, as many warps as share it without duplicating work. Backward:
    # four gate dots [BLOCK_B, BLOCK_H_BWD] whose operands [BLOCK_B, HP] arrive from L2 every step; staging them
    # takes 8 warps' registers (bf16 H = 1024: 184 registers, no spill, where 2 or 4 warps spill 284-604 bytes
    # on sm_90 — the compile report), although 8 warps duplicate the small dots.
    return LSTMPlan(path="cooperative", block_b=block_b, block_h=block_h, block_h_bwd=block_h_bwd, block_p=HP,
                    block_k=HP, num_warps=_mma_warps(block_b, 4 * block_h), num_warps_bwd=8, **base)


def check_offset_limits(B: int, H: int, P: int, I: int = 0) -> None:
    """The kernels address elements *within one step* (a batch row's gate column, a weight row's column) with
    32-bit offsets; steps and directions are 64-bit. Refuse, before any launch, what would not fit."""
    extents = {"B·4H": B * 4 * H, "B·P": B * P, "4H·P": 4 * H * P, "4H·I": 4 * H * I, "B·I": B * I}
    for name, n in extents.items():
        if n > INT32_MAX:
            raise ValueError(
                f"lstm_triton: {name} = {n} exceeds the kernels' 32-bit in-step offset limit of 2³¹ − 1 = {INT32_MAX}; "
                "split the batch (or the layer) into smaller calls"
            )


def dot_form(dtype: torch.dtype) -> str:
    """How the kernels multiply tiles (``common.mma``): "upcast" for bfloat16 under the interpreter, "fma" for
    compiled float64, else "dot"."""
    if interpreter_active():
        return "upcast" if dtype == torch.bfloat16 else "dot"
    return "fma" if dtype == torch.float64 else "dot"


def tf32_supported(backend: str, arch) -> bool:
    """Whether ``tl.dot`` has TF32 on the target: NVIDIA from sm_80; AMD on CDNA3 (gfx94x, as xf32), not CDNA2."""
    if backend == "cuda":
        return int(arch) >= 80
    return str(arch).startswith(("gfx94", "gfx95"))


def _device_tf32(device: Optional[torch.device]) -> bool:
    if device is None or torch.device(device).type != "cuda" or interpreter_active():
        return True  # the interpreter computes "tf32" dots exactly; unknown devices are taken at their word
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:
        return tf32_supported("hip", getattr(props, "gcnArchName", "").split(":")[0])
    return tf32_supported("cuda", props.major * 10 + props.minor)


def dot_precision(dtype: torch.dtype, allow_tf32: bool, device: Optional[torch.device] = None) -> str:
    """"tf32" for float32 when allowed and the device has TF32 dots, else "ieee" (exact float32)."""
    return "tf32" if dtype == torch.float32 and allow_tf32 and _device_tf32(device) else "ieee"


def _no_capacity(plan: LSTMPlan) -> int:
    return 0


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _shared_memory_per_program(device_index: int) -> Optional[int]:
    """The most shared memory (ROCm: LDS) one program may use; None where the device does not say."""
    return getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 0) or None


def plan_lstm(
    B: int,
    H: int,
    dtype: torch.dtype,
    *,
    proj_size: int = 0,
    T: int = 2,
    directions: int = 1,
    allow_tf32: bool = False,
    path: str = "auto",
    device: Optional[torch.device] = None,
    resident_programs: Optional[int] = None,
    shared_memory_per_program: Optional[int] = None,
) -> LSTMPlan:
    """The plan for one layer call: B sequences of T steps, H hidden units (projected to ``proj_size``), in
    ``directions`` directions, in ``dtype``.

    ``path="auto"``, in this order:
    1. a single step (T = 1) without projection: one stepwise kernel that also computes the input projection;
    2. the persistent path whenever one program's weight tile fits on chip (:func:`persistent_fits`);
    3. the cooperative path when its dots run on tensor cores (bf16, fp16, tf32 — exact float32 and float64
       FMA dots spill on its tile), there is no projection, and its grid can be resident at once: on a CUDA
       ``device`` that is decided from the compiled kernels' registers and shared memory and the SM count
       (``resident_programs`` > 0 overrides it with a program count and ``shared_memory_per_program`` with
       the device's shared memory per program, e.g. for the compile report; the interpreter has none, so it
       never picks this path);
    4. else the stepwise path.
    ``"persistent"``, ``"cooperative"`` or ``"stepwise"`` force one (tests compare them); a forced path that
    cannot run the problem raises ValueError.
    """
    if path not in ("auto", *PATHS):
        raise ValueError(f"unknown LSTM kernel path {path!r}; expected 'auto' or one of {PATHS}")
    base = dict(dot_precision=dot_precision(dtype, allow_tf32, device), dot_form=dot_form(dtype))
    shared_limit = shared_memory_per_program
    if resident_programs:
        capacity = lambda plan: resident_programs  # noqa: E731
    elif device is not None and torch.device(device).type == "cuda" and not interpreter_active():
        from . import cooperative

        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        capacity = lambda plan: _sm_count(index) * cooperative.programs_per_sm(plan, dtype, index)  # noqa: E731
        shared_limit = shared_limit or _shared_memory_per_program(index)
    else:
        capacity = _no_capacity
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or base["dot_precision"] == "tf32"

    if path == "auto":
        if T == 1 and not proj_size:
            path = "stepwise"
        elif persistent_fits(H, dtype, proj_size):
            path = "persistent"
        elif not proj_size and tensor_cores and _cooperative_tiles(B, H, directions, dtype, capacity, base,
                                                                  shared_limit):
            path = "cooperative"
        else:
            path = "stepwise"
    if path == "persistent":
        HP, PP = padded(H), padded(proj_size or H)
        forced_max = PERSISTENT_FORCED_MAX
        if not tensor_cores and not interpreter_active():  # see PERSISTENT_FORCED_MAX
            forced_max = PERSISTENT_MAX_HP
        if max(HP, PP) > forced_max:
            raise PathUnavailable(f"the persistent LSTM path holds every unit's weights in one program: it takes H and "
                             f"proj_size up to {forced_max} here, got H={H}, proj_size={proj_size}")
        warps = 4 if HP <= 32 else 8
        return LSTMPlan("persistent", 16, HP, HP, PP, PP, warps, warps, **base)
    if path == "cooperative":
        # Where residency is unknowable (the interpreter runs one step per launch), a forced plan takes the
        # smallest tiles within the on-chip budget; on a GPU its grid must fit what can be resident.
        known = capacity is not _no_capacity
        plan = None if proj_size else _cooperative_tiles(B, H, directions, dtype, capacity if known else None, base,
                                                         shared_limit if known else None)
        if plan is None:
            raise PathUnavailable(
                "the cooperative LSTM path cannot run this problem: it takes no projection, and needs a W_hh slice "
                "within its on-chip budget (COOPERATIVE_MAX_TILE_BYTES*, a quarter of it for 4- and 8-byte dtypes)"
                + (", within the device's shared memory, and all of its programs resident at once on the device"
                   if known else "")
            )
        return plan
    # Stepwise tiles: the largest that compile without spills for sm_80 and sm_90 with triton 3.6 and 3.9 (the
    # compile report): 32 units by 8 warps over 16-wide reduction tiles in 16-bit dtypes above H = 256, else
    # 16 units by 4 warps over 32-wide ones (4-wide in float64, whose products are formed on the FMA units).
    wide = dtype in (torch.float16, torch.bfloat16) and H > 256
    block_h, block_k, warps = (32, 16, 8) if wide else (16, 4 if dtype == torch.float64 else 32, 4)
    return LSTMPlan("stepwise", 16, block_h, block_h, block_h, block_k, warps, warps,
                    fused_step=T == 1 and not proj_size, **base)
