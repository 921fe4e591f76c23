"""The problems the suite times: shapes (tier 1, tier 2, CPU and interpreter sets), modes, dtypes, FLOPs.

Every shape is one unidirectional layer, seq-first, with both biases (what ``torch.nn.LSTM`` runs by
default). Tier 1 is the list in shared/docs/performance.md: the shapes the project's targets are stated on.
Tier 2 is the sweep that looks for cliffs (batch sizes and widths off cuDNN's fast path included).

Dimension legend: T steps, B batch, I input features, H hidden units.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("forward", "train")

# "tf32" is float32 storage with TF32 tensor-core matmuls allowed; "float32" is float32 with IEEE matmuls.
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "tf32": torch.float32,
    "float32": torch.float32,
    "float64": torch.float64,
}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "fp64": "float64"}

# Gate bounds: max relative error vs the float64 reference (see correctness.py for the definition).
# bf16, tf32 and fp32 are performance.md's bounds at T=1024; fp16 has 3 more mantissa bits than bf16.
ERROR_BOUNDS = {"bfloat16": 1e-2, "float16": 5e-3, "tf32": 2e-3, "float32": 1e-5, "float64": 1e-10}


@dataclass(frozen=True)
class Shape:
    id: str
    T: int
    B: int
    I: int
    H: int
    modes: tuple[str, ...] = MODES  # L1 is an inference shape: forward only

    def flops(self, mode: str) -> int:
        """Matmul FLOPs of one call: input GEMM + recurrent GEMM, 8·T·B·H·(I+H); training ≈ 3× forward."""
        forward = 8 * self.T * self.B * self.H * (self.I + self.H)
        return 3 * forward if mode == "train" else forward


def custom(T: int, B: int, I: int, H: int) -> Shape:
    return Shape(f"T{T}-B{B}-I{I}-H{H}", T, B, I, H)


TIER1 = (
    Shape("L1-b1", 1024, 1, 1024, 1024, ("forward",)),
    Shape("L1-b4", 1024, 4, 1024, 1024, ("forward",)),
    Shape("L2", 1024, 16, 256, 256),
    Shape("L3-b16", 1024, 16, 1024, 1024),
    Shape("L3-b32", 1024, 32, 1024, 1024),
    Shape("F1", 1024, 16, 768, 768),  # the public cuDNN / FlashRNN anchor
    Shape("M1", 100, 64, 512, 512),  # PyTorch fastrnns' default
    Shape("M2", 256, 128, 1024, 1024),
    Shape("X1", 256, 256, 1024, 1024),
)


def _tier2() -> tuple[Shape, ...]:
    grid = [custom(T, B, H, H) for H in (128, 256, 512, 1024, 2048) for B in (1, 4, 16, 64, 256, 512)
            for T in (64, 256, 1024)]
    # Cliff probes: batch sizes that are not multiples of 8 / past cuDNN's persistent limit, and widths
    # that are not multiples of 128 (both leave cuDNN's persistent kernel; ours must not fall off a cliff).
    cliffs = [custom(256, B, H, H) for B in (12, 100) for H in (256, 1024)]
    cliffs += [custom(256, B, H, H) for H in (320, 1000) for B in (16, 64)]
    return tuple(grid + cliffs)


TIER2 = _tier2()

# Without a GPU: small enough that the naive loop and PyTorch's CPU LSTM finish in seconds.
CPU = (Shape("C1", 64, 8, 64, 64), Shape("C2", 64, 16, 128, 128))

# Under the Triton interpreter (programs run one after another in Python): tiny, one shape per kernel path
# (float32 H=16 keeps the whole W_hh tile in one program; H=96 does not and takes the stepwise path).
INTERPRETER = (Shape("I-persistent", 16, 4, 32, 16), Shape("I-stepwise", 8, 4, 32, 96))

NAMED_SETS = {"tier1": TIER1, "tier2": TIER2, "cpu": CPU, "interp": INTERPRETER}
_BY_ID = {s.id: s for group in (TIER1, CPU, INTERPRETER) for s in group}


def parse_shapes(tokens: list[str]) -> list[Shape]:
    """``--shapes`` items: a set name (tier1, tier2, cpu, interp), a shape id (F1, M1, C1…) or ``T,B,I,H``.

    Items may also be joined by ';'. Duplicates are dropped, order is kept.
    """
    shapes: list[Shape] = []
    for token in (t.strip() for item in tokens for t in item.split(";")):
        if not token:
            continue
        if token in NAMED_SETS:
            shapes.extend(NAMED_SETS[token])
        elif token in _BY_ID:
            shapes.append(_BY_ID[token])
        else:
            parts = token.split(",")
            if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise ValueError(
                    f"bad shape {token!r}: expected a set ({', '.join(NAMED_SETS)}), a shape id "
                    f"({', '.join(_BY_ID)}) or four positive integers T,B,I,H"
                )
            shapes.append(custom(*(int(p) for p in parts)))
    return list(dict.fromkeys(shapes))


def parse_dtypes(text: str) -> list[str]:
    names = [DTYPE_ALIASES.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; expected some of {', '.join(DTYPES)}")
    return list(dict.fromkeys(names))


def parse_modes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; expected some of {', '.join(MODES)}")
    return list(dict.fromkeys(names))
