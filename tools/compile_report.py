"""The compile report: every kernel specialization a GPU will build, compiled (not run) on a machine without one.

``triton.compile`` runs the whole GPU pipeline (TTIR → TTGIR → LLVM → PTX → cubin with the wheel's ptxas, or
→ AMDGCN → hsaco) on a CPU. This tool

1. **records the launches** the kernels' own launchers make — ``lstm_triton.kernels.lstm_fwd`` / ``lstm_bwd``
   called with meta tensors (shapes and strides, no memory) while every ``@triton.jit`` kernel is swapped for a
   recorder — for two sets of problems:
   - every plan the dispatcher (``plan_lstm``) can return, "auto" and forced paths, over a sweep of H, P, B,
     directions and resident-program counts, each launched with every switch on and off (lengths, resets,
     recurrent-dropout mask, cell-state gradient, save, projection, fused input): every path a caller or a
     test can force;
   - the tier-1 benchmark shapes (``benchmarks/shapes.py``) as the benchmark runs them on an H100/H200 (132
     resident programs) and an A100 (108);
2. **specializes each launch the way triton's launcher does** — triton's own binder: integer arguments equal
   to 1 become constants, integers and pointers divisible by 16 get ``tt.divisibility = 16`` (meta tensors
   stand at address 0: 16-byte aligned, as the caching allocators' blocks are) — per target, so the report
   compiles the code the GPU would run for exactly those values (B = 1, H = 768, ``finalize = 1`` …);
3. **compiles** each distinct specialization for NVIDIA ``sm_90`` (H100/H200) and ``sm_80`` (A100) and AMD
   ``gfx942`` (MI300) and ``gfx90a`` (MI250) — the tier-1 specializations always, the sweep's through a
   covering subset (every configuration with all switches on and with all off, then every value of every
   constexpr; ``--full`` compiles all) — and records registers, spills, shared memory and how ``tl.dot`` was
   lowered (wgmma / mma.sync / mfma / FMA).

One constexpr is set per target rather than recorded: ``GLOBALTIMER`` (the cooperative kernels' wait clock),
True on CUDA targets and False on AMD, exactly as the launcher decides on each kind of device.

Usage::

    python -m tools.compile_report [--scope report|smoke|tier1|all] [--targets sm_90,sm_80,gfx942,gfx90a]
                                   [--json report.json] [--full] [--jobs N]

prints a table and writes the JSON report (fields per compile: kernel, path, target, triton version, dtype,
tiles, num_warps, registers, spill bytes, shared memory, dot lowering, and the problem and switches that
produced it). It must run without ``TRITON_INTERPRET`` (it removes the variable before importing triton).
The committed reports live in ``tools/reports/``; ``tests/test_compile_report.py`` runs the tool.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_PACKAGE = "lstm_triton.kernels"

# (label, torch dtype name, allow_tf32): every input dtype / dot precision the dispatcher distinguishes.
DTYPE_MODES = (
    ("fp16", "float16", False),
    ("bf16", "bfloat16", False),
    ("fp32", "float32", False),
    ("fp32-tf32", "float32", True),
    ("fp64", "float64", False),
)

# name → (backend, arch, warp size, the largest shared memory / LDS one program may use, in bytes)
TARGETS = {
    "sm_90": ("cuda", 90, 32, 227 * 1024),
    "sm_80": ("cuda", 80, 32, 163 * 1024),
    "gfx942": ("hip", "gfx942", 64, 64 * 1024),
    "gfx90a": ("hip", "gfx90a", 64, 64 * 1024),
}
DEFAULT_TARGETS = tuple(TARGETS)

# The dispatcher sweep: H over every size to SWEEP_H_FINE and the thresholds above, B, directions, and the
# devices the dispatcher plans for: name → (programs resident at once, shared memory per program in bytes).
SWEEP_H_FINE = 64
SWEEP_B = (1, 16, 17, 256)
TARGET_DEVICE = {"sm_90": "H100/H200", "sm_80": "A100"}
RESIDENT_PROGRAMS = {"sm_90": 132, "sm_80": 108}  # one program per SM
DEVICES = {device: (RESIDENT_PROGRAMS[target], TARGETS[target][3]) for target, device in TARGET_DEVICE.items()}
# AMD targets: the report models no AMD device (nothing has run on ROCm), so every plan compiles for them.
SWEEP_T = 2  # two steps: a single step is the fused path; more steps add nothing to a specialization
ON_CHIP_PATHS = ("persistent", "cooperative")  # paths that keep weights on chip for the whole sequence
FULL_ENV = "LSTM_TRITON_COMPILE_FULL"

_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


# --------------------------------------------------------------------------------------------- recording


def _ensure_repo_on_path():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def _kernel_modules():
    import importlib
    import pkgutil

    package = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def _is_kernel_of(obj, module) -> bool:
    fn = getattr(obj, "fn", None)
    return hasattr(obj, "arg_names") and callable(fn) and getattr(fn, "__module__", None) == module.__name__


class _Recorder:
    """Stands in for a @triton.jit kernel inside a launcher: ``kernel[grid](*args, **kw)`` is recorded."""

    def __init__(self, module, name, calls):
        self.module, self.name, self.calls = module, name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.module.__name__, self.name, args, kwargs))


@contextlib.contextmanager
def _recording_launches():
    calls: list = []
    saved = []
    try:
        for mod in _kernel_modules():
            for name, obj in list(vars(mod).items()):
                if _is_kernel_of(obj, mod):
                    saved.append((mod, name, obj))
                    setattr(mod, name, _Recorder(mod, name, calls))
        yield calls
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _describe_arg(value):
    """A launch argument as plain data (meta tensors become (dtype, shape, stride))."""
    import torch

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch."), list(value.shape), list(value.stride())]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"launch argument of unexpected type {type(value).__name__}")


def _rebuild_arg(desc):
    import torch

    if isinstance(desc, list) and desc and desc[0] == "tensor":
        _, dtype, shape, stride = desc
        return torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device="meta")
    return desc


@dataclass
class Launch:
    """One recorded kernel launch: enough to rebuild its arguments and say where it came from."""

    module: str
    kernel: str
    args: list
    kwargs: dict
    mode: str  # dtype label (DTYPE_MODES)
    plan: dict  # the LSTMPlan, as a dict
    problem: dict  # T, B, H, P, D, and for tier-1 launches the shape's name and device
    features: dict  # the launcher's switches
    tier1: bool = False


def _launch_problem(plan, mode, dtype, problem: dict, features: dict, tier1: bool) -> list[Launch]:
    """Call the forward or backward launcher once with meta tensors; return its recorded launches."""
    import torch

    from lstm_triton.kernels import lstm_bwd, lstm_fwd, per_direction
    from lstm_triton.kernels.dispatch import accumulation_dtype, saved_gates_dtype

    T, B, H, P, D, I = (problem[k] for k in ("T", "B", "H", "P", "D", "I"))
    G, acc = 4 * H, accumulation_dtype(dtype)
    meta = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    proj = features.get("proj", False)
    w_hh = per_direction([meta(G, P) for _ in range(D)])
    w_hr = per_direction([meta(P, H) for _ in range(D)]) if proj else None
    lengths = meta(B, dt=torch.int32) if features.get("lengths") else None
    resets = meta(D, T, B, dt=torch.int8) if features.get("resets") else None
    mask = meta(D, B, P) if features.get("mask") else None
    with _recording_launches() as calls:
        if features["launcher"] == "lstm_fwd":
            fused = None
            if features.get("fused_input"):
                fused = (meta(D, B, I), per_direction([meta(G, I) for _ in range(D)]),
                         meta(D, G) if features.get("bias") else None)
            lstm_fwd(plan, None if fused else meta(D, T, B, G), w_hh, w_hr, meta(D, B, P), meta(D, B, H, dt=acc),
                     lengths, resets, mask, save=features.get("save", False), fused_input=fused)
        else:
            lstm_bwd(plan, meta(D, T, B, P), meta(D, B, P), meta(D, B, H), meta(D, T, B, H) if features.get("dcs")
                     else None, meta(D, T, B, G, dt=saved_gates_dtype(dtype)), meta(D, T + 1, B, H, dt=acc),
                     w_hh, w_hr, lengths, resets, mask)
    return [Launch(module, name, [_describe_arg(a) for a in args], {k: _describe_arg(v) for k, v in kwargs.items()},
                   mode, asdict(plan), dict(problem), dict(features), tier1) for module, name, args, kwargs in calls]


def _feature_sets(plan, proj: bool) -> list[dict]:
    """The launcher calls that compile every switch of this plan's kernels both ways: every switch on; every
    switch torch.nn.LSTM can ask for on (lengths, projection, saving) and the options beyond it off; every switch
    off — per launcher (and per saved / not saved forward, with / without bias of a fused step)."""
    out = []
    for on, beyond in ((True, True), (True, False), (False, False)):  # all on; torch's contract only; all off
        options = dict(proj=proj, lengths=on, resets=beyond, mask=beyond)
        if plan.fused_step:
            out += [dict(options, launcher="lstm_fwd", fused_input=True, bias=on, save=save) for save in (True, False)]
        else:
            out += [dict(options, launcher="lstm_fwd", save=save) for save in (True, False)]
        out.append(dict(options, launcher="lstm_bwd", dcs=beyond))
    return out


def _sweep_sizes(fine_up_to: int = SWEEP_H_FINE) -> list[int]:
    """Every size up to ``fine_up_to``, multiples of 64 to 1024, and each power of two (±1) up to 4096."""
    sizes = set(range(1, fine_up_to + 1)) | set(range(64, 1025, 64))
    for k in range(4, 13):
        sizes |= {2 ** k - 1, 2 ** k, 2 ** k + 1}
    return sorted(sizes)


def sweep_plans(dtype, allow_tf32: bool) -> dict:
    """Every distinct plan a GPU can run for this dtype / precision, with the first problem that produced it:
    {plan: problem}. That is ``plan_lstm``'s own choice ("auto") over the whole sweep on an A100 and an H100
    (DEVICES), and each path a caller may force — the test suite forces them at H ≤ 64 — over the sizes up to
    SWEEP_H_FINE. (Plans for an unknown residency are the interpreter's; no GPU runs them.)"""
    from lstm_triton.kernels import plan_lstm

    found: dict = {}
    for B, H, D, (device, (resident, shared)) in itertools.product(SWEEP_B, _sweep_sizes(), (1, 2),
                                                                    DEVICES.items()):
        paths = ("auto", "persistent", "cooperative", "stepwise") if H <= SWEEP_H_FINE else ("auto",)
        for P in [0] + [p for p in (1, 7, 16, 17) if p < H]:
            for T, path in itertools.product((1, SWEEP_T), paths):
                try:
                    plan = plan_lstm(B, H, dtype, proj_size=P, T=T, directions=D, allow_tf32=allow_tf32,
                                     path=path, resident_programs=resident, shared_memory_per_program=shared)
                except ValueError:
                    continue  # a forced path that cannot run this problem (it raises for callers too)
                problem = dict(T=T, B=B, H=H, P=P or H, D=D, I=24, proj=bool(P), auto=path == "auto")
                seen = found.get(plan)
                if seen is None or (problem["auto"] and not seen["auto"]):
                    # a plan the dispatcher picks by itself is marked as such, with the problem that made it
                    found[plan] = dict(problem, devices=seen["devices"] if seen else [],
                                       auto_on=seen["auto_on"] if seen else [])
                entry = found[plan]
                entry["devices"] = sorted({*entry["devices"], device})  # where it can run
                if problem["auto"]:
                    entry["auto_on"] = sorted({*entry["auto_on"], device})  # where it is picked by itself
    return found


def tier1_problems() -> list[tuple[str, dict]]:
    _ensure_repo_on_path()
    from benchmarks.shapes import TIER1

    return [(s.id, dict(T=s.T, B=s.B, H=s.H, P=s.H, D=1, I=s.I, proj=False, auto=True)) for s in TIER1]


def record_launches(scope: str = "all") -> list[Launch]:
    """Every launch of the sweep (scope "all") and of the tier-1 shapes (see the module docstring)."""
    import torch

    from lstm_triton.kernels import plan_lstm

    launches: list[Launch] = []
    for mode, dtype_name, allow_tf32 in DTYPE_MODES:
        dtype = getattr(torch, dtype_name)
        if scope == "all":
            for plan, problem in sweep_plans(dtype, allow_tf32).items():
                for features in _feature_sets(plan, problem["proj"]):
                    launches += _launch_problem(plan, mode, dtype, problem, features, tier1=False)
        if mode == "fp64":
            continue  # the benchmark runs no float64 rows
        for (name, problem), (device, (resident, shared)) in itertools.product(tier1_problems(), DEVICES.items()):
            plan = plan_lstm(problem["B"], problem["H"], dtype, T=problem["T"], allow_tf32=allow_tf32,
                             resident_programs=resident, shared_memory_per_program=shared)
            tagged = dict(problem, shape=name, device=device, devices=[device], auto_on=[device])
            inference_only = name.startswith("L1")
            for features in (dict(launcher="lstm_fwd", save=False), dict(launcher="lstm_fwd", save=True),
                             dict(launcher="lstm_bwd"))[:1 if inference_only else 3]:
                launches += _launch_problem(plan, mode, dtype, tagged, dict(features, proj=False), tier1=True)
    return launches


# --------------------------------------------------------------------------------------------- specialization


def _target(name: str):
    from triton.backends.compiler import GPUTarget

    backend, arch, warp, _ = TARGETS[name]
    return GPUTarget(backend, arch, warp)


@functools.lru_cache(maxsize=None)
def _backend(target_name: str):
    from triton.compiler import make_backend

    return make_backend(_target(target_name))


def _kernel(module: str, name: str):
    import importlib

    fn = getattr(importlib.import_module(module), name)
    if not hasattr(fn, "params"):
        raise RuntimeError(f"{name} is not a compilable JITFunction (TRITON_INTERPRET set?)")
    return fn


def target_overrides(target_name: str, kwargs: dict) -> dict:
    """Constexprs the launcher decides from the device rather than from the problem, as it decides them on that
    device: the cooperative waits' clock (the global timer on CUDA, poll counts on ROCm) and, on an MI250
    (gfx90a, no TF32 dots), IEEE float32 dots where TF32 was allowed (``dispatch.dot_precision``)."""
    backend, arch = TARGETS[target_name][:2]
    out = {"GLOBALTIMER": backend == "cuda"}
    if kwargs.get("DOT_PRECISION") == "tf32" and not tf32_dots(backend, arch):
        out["DOT_PRECISION"] = "ieee"
    return out


def tf32_dots(backend: str, arch) -> bool:
    from lstm_triton.kernels.dispatch import tf32_supported

    return tf32_supported(backend, arch)


def specialize(launch: Launch, target_name: str):
    """(signature, constexprs, attrs, options) exactly as triton's launcher computes them for this launch's
    argument values on ``target_name`` (triton's own binder; see the module docstring)."""
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch.module, launch.kernel)
    backend = _backend(target_name)
    args = [_rebuild_arg(a) for a in launch.args]
    kwargs = {k: _rebuild_arg(v) for k, v in launch.kwargs.items()}
    for name, value in target_overrides(target_name, kwargs).items():
        if name in fn.arg_names:
            kwargs[name] = value
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _key(launch: Launch, target_name: str) -> str:
    signature, constexprs, attrs, options = specialize(launch, target_name)
    return json.dumps([launch.module, launch.kernel, signature, sorted((str(k), repr(v)) for k, v in constexprs.items()),
                       sorted((str(k), repr(v)) for k, v in attrs.items()),
                       sorted((k, repr(v)) for k, v in vars(options).items())], default=str)


def _switches(launch: Launch, target_name: str) -> dict:
    """The kernel's constexpr values for this launch (tiles and switches)."""
    fn = _kernel(launch.module, launch.kernel)
    _, constexprs, _, _ = specialize(launch, target_name)
    names = fn.arg_names
    return {names[path[0]]: value for path, value in constexprs.items() if fn.params[path[0]].is_constexpr}


def _tile_size(plan: dict) -> int:
    return plan["block_b"] * plan["block_h"] * plan["block_h_bwd"] * plan["block_p"] * plan["block_k"]


def select(groups: dict[str, list[Launch]], target_name: str, scope: str) -> list[str]:
    """Which specializations (keys of ``groups``) to compile.

    "smoke": per dtype mode, path and kernel, the largest tile the dispatcher picks by itself and the largest
    one a caller can force, each with every switch on, with torch's switches on and the options beyond torch
    off, and with every switch off. "report": those and every
    tier-1 specialization (what the committed reports hold). "all": those; of the sweep's, per dtype mode, plan
    and kernel the one with the most switches on (the largest live state: the register and spill worst case
    of that tile); then greedily until every value of every constexpr (per mode, path and kernel) is
    compiled."""
    n_on = lambda launch: sum(v is True for k, v in launch.features.items() if k != "launcher")  # noqa: E731
    members: dict[str, list[tuple[str, Launch]]] = {}
    for key, ls in groups.items():
        for launch in ls:
            if not launch.tier1:
                members.setdefault(json.dumps([launch.mode, launch.plan, launch.kernel], sort_keys=True), []).append(
                    (key, launch))
    by_path: dict[str, list[tuple[str, Launch]]] = {}
    for group in members.values():
        launch = group[0][1]
        by_path.setdefault(json.dumps([launch.mode, launch.plan["path"], launch.kernel]), []).extend(group)
    chosen: set[str] = set()
    for group in by_path.values():
        for auto in (True, False):  # the largest tile the dispatcher picks itself, and the largest a caller forces
            mine = [(k, launch) for k, launch in group if launch.problem.get("auto", False) == auto]
            if not mine:
                continue
            largest = max(_tile_size(launch.plan) for _, launch in mine)
            biggest = [(k, launch) for k, launch in mine if _tile_size(launch.plan) == largest]
            chosen.add(max(biggest, key=lambda m: n_on(m[1]))[0])
            chosen.add(min(biggest, key=lambda m: n_on(m[1]))[0])
            torch_only = [m for m in biggest if not any(m[1].features.get(k) for k in ("resets", "mask", "dcs"))]
            chosen.add(max(torch_only, key=lambda m: n_on(m[1]))[0])
    chosen |= {k for k, ls in groups.items() if any(launch.tier1 for launch in ls) and scope != "smoke"}
    if scope in ("smoke", "report"):
        return sorted(chosen)
    for group in members.values():
        chosen.add(max(group, key=lambda m: n_on(m[1]))[0])
    pairs: dict[str, set] = {}
    for key, ls in groups.items():
        launch = ls[0]
        scope_key = (launch.mode, launch.plan["path"], launch.kernel)
        pairs[key] = {scope_key + (k, json.dumps(v, default=str)) for k, v in _switches(launch, target_name).items()}
    todo = set().union(*pairs.values()) - set().union(set(), *(pairs[k] for k in chosen))
    while todo:
        best = max(pairs, key=lambda k: len(pairs[k] & todo))
        chosen.add(best)
        todo -= pairs[best]
    return sorted(chosen)


# --------------------------------------------------------------------------------------------- compilation


@dataclass
class CompileResult:
    kernel: str
    path: str
    target: str
    triton_version: str
    dtype: str
    tiles: str
    switches: dict
    num_warps: int
    ok: bool
    error: Optional[str] = None
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None  # NVIDIA: bytes of spill stores + loads (ptxas -v); AMD: spilled VGPRs+SGPRs × 4
    stack_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    shared_limit: Optional[int] = None
    dot: Optional[str] = None  # "wgmma" | "mma" | "mfma" | "fma" (a dot on the FMA units) | "-" (no dot)
    compile_s: Optional[float] = None
    tier1: list = field(default_factory=list)  # "F1 bf16 lstm_fwd on H100/H200", ...
    problem: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _ptxas(arch: int) -> str:
    """The ptxas binary triton's nvidia backend uses for ``arch``."""
    import inspect

    from triton.backends.nvidia import compiler as nv

    get = getattr(nv, "get_ptxas", None)
    if get is not None:
        tool = get(arch) if inspect.signature(get).parameters else get()
        path = getattr(tool, "path", tool)
        if path and os.path.isfile(path):
            return path
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if os.path.isfile(path):
        return path
    raise FileNotFoundError("ptxas")


def _parse_ptxas_log(log: str, arch: int) -> Optional[dict[str, Any]]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(regs) != 1 or len(spills) != 1:  # one entry function, nothing else
        return None
    stack, stores, loads = (int(x) for x in spills[0])
    return dict(registers=int(regs[0]), spill_bytes=stores + loads, stack_bytes=stack,
                extra=dict(spill_stores=stores, spill_loads=loads, ptxas=_ptxas_version(arch)))


def _ptxas_usage(ptx: str, arch: int) -> dict[str, Any]:
    """Registers / spills / stack from ``ptxas -v`` on the generated PTX, with the flags triton passes (for a
    kernel triton took from its cache, which prints no log)."""
    import inspect

    from triton.backends.nvidia import compiler as nv

    flags = ["-lineinfo", "-v"]
    if "--regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")  # triton 3.9 passes it (a ptxas 13 workaround): counts must agree
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        sm = f"sm_{arch}{'a' if arch >= 90 else ''}"
        proc = subprocess.run([_ptxas(arch), *flags, f"--gpu-name={sm}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    usage = _parse_ptxas_log(proc.stdout + proc.stderr, arch)
    if proc.returncode != 0 or usage is None:
        raise RuntimeError(f"ptxas -v failed or could not be read ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return usage


@functools.lru_cache(maxsize=None)
def _ptxas_version(arch: int) -> str:
    out = subprocess.run([_ptxas(arch), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"release (\d+\.\d+)", out)
    return f"ptxas {version.group(1) if version else '?'}"


def _amdgcn_usage(asm: str) -> dict[str, Any]:
    field_of = lambda name: int(m.group(1)) if (m := re.search(rf"\.{name}:\s+(\d+)", asm)) else 0  # noqa: E731
    spilled = field_of("vgpr_spill_count") + field_of("sgpr_spill_count")
    return dict(registers=field_of("vgpr_count"), spill_bytes=4 * spilled, stack_bytes=field_of("private_segment_fixed_size"),
                extra=dict(sgpr_count=field_of("sgpr_count"), agpr_count=field_of("agpr_count")))


def _dot_lowering(code: str, has_dot: bool) -> str:
    if "wgmma.mma_async" in code:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", code):
        return "mma"
    if "v_mfma" in code:
        return "mfma"
    return "fma" if has_dot else "-"


def _tiles_and_flags(switches: dict) -> tuple[str, dict]:
    """A specialization's tile sizes as "B16/H8/K1024" and its boolean switches."""
    tiles = "/".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in switches.items() if k.startswith("BLOCK_"))
    return tiles, {k: v for k, v in switches.items() if isinstance(v, bool)}


def compile_one(job) -> dict:
    """Compile one specialization (job = (launch as dict, target name, tier-1 labels)); errors go in the result."""
    launch_dict, target_name, tier1 = job
    launch = Launch(**launch_dict)
    _ensure_repo_on_path()
    import triton
    from triton.compiler import ASTSource

    tiles, flags = _tiles_and_flags(_switches(launch, target_name))
    res = CompileResult(kernel=launch.kernel.strip("_").removesuffix("_kernel"), path=launch.plan["path"],
                        target=target_name, triton_version=triton.__version__, dtype=launch.mode, tiles=tiles,
                        switches=flags, num_warps=launch.kwargs.get("num_warps", 4), ok=False,
                        shared_limit=TARGETS[target_name][3], tier1=list(tier1), problem=launch.problem,
                        features=launch.features)
    t0 = time.perf_counter()
    try:
        signature, constexprs, attrs, options = specialize(launch, target_name)
        fn = _kernel(launch.module, launch.kernel)
        src = ASTSource(fn, signature, constexprs, attrs)
        captured = io.StringIO()  # triton prints its own ptxas -v log here (TRITON_DUMP_PTXAS_LOG, set in main)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            k = triton.compile(src, target=_target(target_name), options=vars(options))
        res.shared_bytes = int(k.metadata.shared)
        has_dot = "tt.dot" in k.asm.get("ttir", "")
        if TARGETS[target_name][0] == "cuda":
            arch = TARGETS[target_name][1]
            usage = _parse_ptxas_log(captured.getvalue(), arch) or _ptxas_usage(k.asm["ptx"], arch)  # cached: rerun
            res.dot = _dot_lowering(k.asm["ptx"], has_dot)
        else:
            usage = _amdgcn_usage(k.asm["amdgcn"])
            res.dot = _dot_lowering(k.asm["amdgcn"], has_dot)
        res.extra.update(usage.pop("extra"))
        for key, value in usage.items():
            setattr(res, key, value)
        res.extra["integer_specialization"] = {
            fn.arg_names[path[0]]: value for path, value in constexprs.items() if not fn.params[path[0]].is_constexpr}
        # Integers only: pointers are always 16-byte aligned here (meta tensors stand at address 0).
        res.extra["divisible_by_16"] = sorted(
            name for name in (fn.arg_names[path[0]] for path, value in attrs.items() if value)
            if not str(signature.get(name, "")).startswith("*"))
        res.ok = True
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        res.error = msg if len(msg) < 6000 else msg[:3000] + "\n...\n" + msg[-3000:]
    res.compile_s = round(time.perf_counter() - t0, 2)
    return asdict(res)


def _compile_marked(compile_fn, index: int, job, marks: str) -> dict:
    """``compile_fn(job)`` in a pool worker, leaving a trace of it in ``marks``: "<index>.started" before,
    "<index>.done" after, the worker's stderr (where LLVM prints a failed assertion before it aborts the
    process) in "<index>.err"."""
    Path(marks, f"{index}.started").touch()
    err = os.open(os.path.join(marks, f"{index}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(2)
    os.dup2(err, 2)
    try:
        result = compile_fn(job)
        Path(marks, f"{index}.done").touch()
        return result
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(err)


def died_result(job, stderr_tail: str) -> dict:
    """The report entry of a compile that killed its process."""
    launch_dict, target_name, tier1 = job
    launch = Launch(**launch_dict)
    try:
        tiles, flags = _tiles_and_flags(_switches(launch, target_name))
    except Exception:  # noqa: BLE001 - the entry must still be written
        tiles, flags = "?", {}
    return asdict(CompileResult(
        kernel=launch.kernel.strip("_").removesuffix("_kernel"), path=launch.plan["path"], target=target_name,
        triton_version=_triton_version(), dtype=launch.mode, tiles=tiles, switches=flags,
        num_warps=launch.kwargs.get("num_warps", 4), ok=False,
        error=f"the compiler aborted the process:\n{stderr_tail}", shared_limit=TARGETS[target_name][3],
        tier1=list(tier1), problem=launch.problem, features=launch.features))


def _triton_version() -> str:
    import triton

    return triton.__version__


def compile_isolated(work: list, jobs: int, progress: bool = False, compile_fn=compile_one,
                     died_fn=died_result) -> list[dict]:
    """``compile_fn`` over ``work`` in ``jobs`` worker processes. A job that kills its process (an assertion
    inside LLVM aborts, it raises nothing) gets ``died_fn(job, its stderr's last lines)`` as its result, and the
    other jobs go on in a new pool. Both functions must be importable by name (the workers are spawned)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    results: list[Optional[dict]] = [None] * len(work)
    rounds = [(list(range(len(work))), jobs)]  # (job indices, workers)
    done = 0

    def report(i):
        if progress:
            r = results[i]
            print(f"[{done}/{len(work)}] {r['kernel']} {r['dtype']} {r['tiles']} {r['target']}: "
                  f"{'ok' if r['ok'] else 'FAILED'} ({r.get('compile_s')} s)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as marks:
        mark = lambda i, kind: Path(marks, f"{i}.{kind}")  # noqa: E731
        while rounds:
            batch, workers = rounds.pop(0)
            # spawn: the workers start clean (no forked torch thread pools); they inherit this environment. One
            # at a time, each job gets a fresh process, so nothing a previous job left behind is blamed on it.
            isolate = dict(max_tasks_per_child=1) if workers == 1 else {}
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), **isolate) as pool:
                futures = {pool.submit(_compile_marked, compile_fn, i, work[i], marks): i for i in batch}
                for future, i in futures.items():
                    try:
                        results[i] = future.result()
                    except BrokenProcessPool:
                        continue
                    done += 1
                    report(i)
            unfinished = [i for i in batch if results[i] is None]
            if not unfinished:
                continue
            # The job that killed the pool started and did not finish; so did any job running beside it.
            started = [i for i in unfinished if mark(i, "started").exists() and not mark(i, "done").exists()]
            if len(started) == 1:
                i = started[0]
                err = mark(i, "err").read_text(errors="replace").strip().splitlines()
                tail = "\n".join(line for line in err if "UserWarning" not in line and "warn_once" not in line)
                results[i] = died_fn(work[i], tail[-3000:])
                done += 1
                report(i)
            elif len(started) > 1:
                rounds.insert(0, (started, 1))  # one at a time tells which of them it was
            elif len(unfinished) == len(batch):
                raise RuntimeError("the compile pool broke before any job finished, and no job was running")
            else:
                print("compile_report: a worker died outside any job (killed?); rerunning what was left",
                      file=sys.stderr, flush=True)
            for i in unfinished:  # a rerun starts from clean marks
                for kind in ("started", "done", "err"):
                    mark(i, kind).unlink(missing_ok=True)
            rest = [i for i in unfinished if results[i] is None and i not in started]
            if rest:
                rounds.append((rest, workers))
    return results


def _as_planned_for(launch: Launch, target_name: str) -> Optional[Launch]:
    """The launch as the dispatcher plans it on the target's device (``auto``: picked there by itself), or None
    where that device never runs its plan (e.g. a tile planned for an H100's shared memory, on an A100)."""
    device = TARGET_DEVICE.get(target_name)
    if device is None:
        return launch
    if device not in launch.problem["devices"]:
        return None
    return Launch(**dict(asdict(launch), problem=dict(launch.problem, auto=device in launch.problem["auto_on"])))


def collect(targets=DEFAULT_TARGETS, full: bool = False, jobs: Optional[int] = None, progress: bool = False,
            scope: str = "report") -> dict:
    """Record, specialize and compile (see the module docstring and :func:`select`); ``scope="tier1"``: only the
    tier-1 shapes. Needs TRITON_INTERPRET unset."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run without TRITON_INTERPRET: kernels must be compiled, not interpreted")
    _ensure_repo_on_path()
    import triton

    t0 = time.time()
    launches = record_launches("tier1" if scope == "tier1" else "all")
    work = []
    counts = {}
    for target_name in targets:
        groups: dict[str, list[Launch]] = {}
        for launch in launches:
            launch = _as_planned_for(launch, target_name)
            if launch is not None:
                groups.setdefault(_key(launch, target_name), []).append(launch)
        keys = sorted(groups) if full else select(groups, target_name, scope)
        counts[target_name] = dict(recorded=len(groups), compiled=len(keys))
        for key in keys:
            ls = groups[key]
            rep = max(ls, key=lambda launch: (launch.tier1, sum(v is True for v in launch.features.values())))
            labels = sorted({f"{l.problem['shape']} {l.mode} {l.features['launcher']}"
                             f"{' save' if l.features.get('save') else ''} on {l.problem['device']}"
                             for l in ls if l.tier1})
            work.append((asdict(rep), target_name, labels))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    results = compile_isolated(work, jobs, progress)
    return dict(
        triton_version=triton.__version__,
        targets=list(targets),
        scope=scope,
        selection="full" if full else "covering",
        specializations=counts,
        n_launches=len(launches),
        results=results,
        elapsed_s=round(time.time() - t0, 1),
        jobs=jobs,
    )


# --------------------------------------------------------------------------------------------- report


def format_table(report: dict) -> str:
    rows = [["kernel", "path", "dtype", "tiles", "switches on", "warps", "target", "regs", "spill", "smem", "dot",
             "tier-1"]]
    for r in sorted(report["results"], key=lambda r: (r["kernel"], r["dtype"], r["tiles"], r["target"])):
        on = " ".join(k for k, v in r["switches"].items() if v) or "-"
        if r["ok"]:
            cells = [str(r["registers"]), str(r["spill_bytes"]), f"{r['shared_bytes'] / 1024:.1f}K", r["dot"]]
        else:
            cells = ["FAIL", "", "", ""]
        rows.append([r["kernel"], r["path"], r["dtype"], r["tiles"], on, str(r["num_warps"]), r["target"], *cells,
                     str(len(r["tier1"])) if r["tier1"] else ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    failed = [r for r in report["results"] if not r["ok"]]
    lines.append("")
    lines.append(f"triton {report['triton_version']}: {len(report['results'])} compiles "
                 f"({report['selection']}: {report['specializations']}), {len(failed)} failed, "
                 f"{report['elapsed_s']} s wall, {report['jobs']} workers")
    lines.append("spill: bytes (NVIDIA: ptxas spill stores + loads; AMD: 4 × spilled registers); smem: shared "
                 "memory / LDS; dot: wgmma, mma.sync, mfma, fma (FMA units), - (no dot)")
    for r in failed:
        lines.append(f"\nFAILED {r['kernel']} {r['dtype']} {r['tiles']} {r['target']}:\n{r['error']}")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    """The report as JSON with one result per line (compact, and a diff shows which compiles changed)."""
    head = json.dumps({k: v for k, v in report.items() if k != "results"}, separators=(",", ":"), default=str)
    lines = [json.dumps(r, separators=(",", ":"), default=str) for r in report["results"]]
    return head[:-1] + ',"results":[\n' + ",\n".join(lines) + "\n]}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated, from {', '.join(TARGETS)} (default: all)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--full", action="store_true", default=os.environ.get(FULL_ENV, "0") == "1",
                   help=f"compile every recorded specialization, not the covering subset (or {FULL_ENV}=1)")
    p.add_argument("--scope", choices=("all", "report", "tier1", "smoke"), default="report",
                   help="smoke: per dtype, path and kernel the largest tile the dispatcher picks and the largest a "
                        "caller can force, every switch on and off; tier1: the tier-1 shapes only; report "
                        "(default): smoke and tier1; all: the whole dispatcher sweep and the tier-1 shapes")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no table, no progress (the JSON is still written)")
    args = p.parse_args(argv)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown targets {unknown}; expected some of {', '.join(TARGETS)}")
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, don't interpret
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # registers and spills from the ptxas run triton makes itself
    report = collect(targets, full=args.full, jobs=args.jobs, progress=not args.quiet, scope=args.scope)
    if args.json:
        Path(args.json).write_text(to_json(report))
    if not args.quiet:
        print(format_table(report))
    return 0 if all(r["ok"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
