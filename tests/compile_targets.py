"""Compile every kernel specialization the dispatcher can choose for sm_90 and sm_80, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole GPU pipeline (TTIR → TTGIR →
LLVM → PTX → cubin with the wheel's ptxas) on a CPU-only machine. This module

1. enumerates the specializations from the code that picks them, not from a list kept by hand:
   ``select_config`` is swept over problem sizes for every input dtype / dot precision (:data:`DTYPE_MODES`),
   giving each distinct configuration it can return (:func:`dispatcher_configs`: persistent and cooperative
   tiles only where ``path="auto"`` takes them, every stepwise tile). For each configuration the real launchers
   ``lstm_fwd`` / ``lstm_bwd`` run on tiny CPU tensors — with and without a projection, ``lengths``, ``save``
   and (one stepwise step) the fused input projection — while every ``@triton.jit`` kernel of
   ``lstm_triton.kernels`` is swapped for a recorder, so the
   pointer dtypes, the constexprs (tiles, boolean switches, dot precision) and ``num_warps`` / ``num_stages``
   are exactly what the launchers pass (:func:`enumerate_specializations`);
2. compiles them for every target — by default the :func:`covering_subset` (every configuration with every
   feature on, plus both sides of every switch), or all of them with ``LSTM_TRITON_COMPILE_FULL=1`` — and
   records registers and spills (triton's own ``ptxas -v`` log, kept beside the kernel in triton's cache; ptxas
   is run again on the PTX, with the binary and flags triton uses for that target, for a kernel cached without
   it), shared memory
   (``metadata.shared``) and how ``tl.dot`` was lowered (``wgmma`` / ``mma`` / neither, read from the PTX).

Specializations are compiled with every pointer 16-byte aligned (``tt.divisibility = 16``, what triton's launcher
records for ordinary torch allocations) and integer scalars unspecialized: the variant any B, H, T may hit.

Kernels must be compiled by triton's compiler, not its interpreter, and ``select_config`` itself looks at
``TRITON_INTERPRET``; so the collection runs in a process without ``TRITON_INTERPRET``
(:func:`collect_in_subprocess` starts one; the test suite's conftest sets the variable for everything else).
The compiles run in a small process pool (one worker per core); triton's on-disk cache makes a second run fast.

Usage::

    python tests/compile_targets.py [--arch 90 80] [--jobs N] [--full] [--json report.json]

prints the table (and writes the JSON report with ``--json`` or ``LSTM_TRITON_COMPILE_REPORT=path``).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
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
REPORT_ENV = "LSTM_TRITON_COMPILE_REPORT"

KERNEL_PACKAGE = "lstm_triton.kernels"  # every @triton.jit kernel defined in its modules is recorded

# (label, torch dtype name, allow_tf32): every input dtype / dot precision the dispatcher distinguishes.
DTYPE_MODES = (
    ("fp16", "float16", False),
    ("bf16", "bfloat16", False),
    ("fp32", "float32", False),
    ("fp32-tf32", "float32", True),
    ("fp64", "float64", False),
)

# Largest shared memory one program may use (opt-in maximum per block): H100 227 KB, A100 163 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DEFAULT_ARCHS = (90, 80)

# select_config is swept over every H up to H_SWEEP_MAX (and the sizes of _sweep_sizes) for each B in B_SWEEP.
H_SWEEP_MAX = 4096
B_SWEEP = (1, 16, 256)
# SM counts select_config may be told (its cooperative path needs every program resident): unknown (0, as on
# the CPU), A100, H100 / H200.
RESIDENT_PROGRAMS = (0, 108, 132)
T_LAUNCH = 2  # two steps: a stepwise launcher passes both values of its first/last-step switch
# Paths whose kernels keep a weight tile on chip for the whole sequence (the tests require them not to spill).
ON_CHIP_PATHS = ("persistent",)
FULL_ENV = "LSTM_TRITON_COMPILE_FULL"  # =1: compile every recorded specialization, not the covering subset

_TORCH_TO_TRITON = {
    "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1",
}


class CompileAPIMissing(RuntimeError):
    """The installed triton lacks an API this check needs (the tests skip)."""


# --------------------------------------------------------------------------------------------- specializations


@dataclass
class Specialization:
    """One compiled variant of one kernel, as a launcher would request it."""

    module: str
    kernel: str
    signature: dict[str, str]  # arg name → "*fp16" | "i32" | "constexpr" | ...
    constexprs: dict[str, Any]
    options: dict[str, Any]  # num_warps, num_stages, ...
    mode: str  # dtype / precision label of the first configuration that produced it
    config: dict[str, Any]  # that LSTMKernelConfig, as a dict
    problem: tuple[int, int, int]  # (B, H, P) the configuration was selected for (P = 0: no projection)
    features: list[dict[str, bool]] = field(default_factory=list)  # launcher inputs that launched it

    @property
    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.options], sort_keys=True,
                          default=str)

    @property
    def name(self) -> str:
        short = self.kernel.strip("_").removesuffix("_kernel").removeprefix("lstm_")
        flags = " ".join(f"{k}={int(v)}" for k, v in self.constexprs.items() if isinstance(v, bool))
        tiles = "/".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in self.constexprs.items() if k.startswith("BLOCK_"))
        return f"{short} {self.mode} {tiles} {flags}".strip()


def _import_kernel_modules():
    import importlib
    import pkgutil

    _ensure_repo_on_path()
    package = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def _ensure_repo_on_path():
    try:
        import lstm_triton  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))


def _is_kernel_of(obj, module) -> bool:
    fn = getattr(obj, "fn", None)
    return hasattr(obj, "arg_names") and callable(fn) and getattr(fn, "__module__", None) == module.__name__


def _param_is_constexpr(kernel, name: str) -> bool:
    params = getattr(kernel, "params", None)
    if params is not None:
        return next(p for p in params if p.name == name).is_constexpr
    import inspect  # the interpreter's kernels have no .params: read the annotation

    return "constexpr" in str(inspect.signature(kernel.fn).parameters[name].annotation)


def _arg_type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        name = str(value.dtype).removeprefix("torch.")
        if name not in _TORCH_TO_TRITON:
            raise TypeError(f"no triton pointer type for tensor dtype {value.dtype}")
        return "*" + _TORCH_TO_TRITON[name]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for launcher argument {value!r}")


class _Recorder:
    """Stands in for a @triton.jit kernel inside a launcher: ``kernel[grid](*args, **kw)`` is recorded."""

    def __init__(self, module, name, kernel, calls):
        self.module, self.name, self.kernel, self.calls = module, name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.module.__name__, self.name, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording_launches(modules):
    calls: list = []
    saved = []
    try:
        for mod in modules:
            for name, obj in list(vars(mod).items()):
                if _is_kernel_of(obj, mod):
                    saved.append((mod, name, obj))
                    setattr(mod, name, _Recorder(mod, name, obj, calls))
        yield calls
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _specialization_from_call(call, mode, config, problem) -> Specialization:
    module, name, kernel, args, kwargs = call
    arg_names = list(kernel.arg_names)
    if len(args) > len(arg_names):
        raise TypeError(f"{name}: launched with {len(args)} positional arguments, kernel takes {len(arg_names)}")
    bound = dict(zip(arg_names, args))
    options = {}
    for k, v in kwargs.items():
        if k in arg_names:
            bound[k] = v
        else:
            options[k] = v
    missing = [a for a in arg_names if a not in bound]
    if missing:
        raise TypeError(f"{name}: launcher does not pass {missing}")
    signature, constexprs = {}, {}
    for a in arg_names:
        if _param_is_constexpr(kernel, a):
            signature[a] = "constexpr"
            constexprs[a] = bound[a]
        else:
            signature[a] = _arg_type(bound[a])
    return Specialization(module, name, signature, constexprs, options, mode, asdict(config), tuple(problem))


def _sweep_sizes(fine_up_to: int = 64) -> list[int]:
    """Sizes probed for H and the projection P: every size up to ``fine_up_to``, multiples of 64 up to 1024, and
    each power of two (±1) up to 65536 — every padded tile and the thresholds between them."""
    sizes = set(range(1, fine_up_to + 1)) | set(range(64, 1025, 64))
    for k in range(4, 17):
        sizes |= {2 ** k - 1, 2 ** k, 2 ** k + 1}
    return sorted(sizes)


def dispatcher_configs(dtype, allow_tf32: bool) -> dict[Any, dict[bool, tuple[int, int, int]]]:
    """Every distinct configuration ``select_config`` returns for this dtype / precision.

    ``path="stepwise"`` (callers may force it for any size) and ``path="auto"`` (the dispatcher's own choice)
    over H ∈ 1..H_SWEEP_MAX for the first B of B_SWEEP (:func:`_sweep_sizes` for the others), and
    ``path="auto"`` with every ``directions`` ∈ {1, 2} and ``resident_programs`` ∈ RESIDENT_PROGRAMS where
    ``select_config`` takes them (H over :func:`_sweep_sizes`); then with every projection P < H
    (``proj_size``), both over ``_sweep_sizes(17)``. A persistent or cooperative
    configuration for a problem the dispatcher would not give it is not listed. Returns
    {config: {has_projection: (B, H, P)}}: the first problem selecting it with / without a projection (P = 0: none).
    """
    import inspect

    from lstm_triton.kernels.config import select_config

    params = inspect.signature(select_config).parameters
    extras = [{}]
    if "directions" in params:
        extras = [dict(e, directions=d) for e in extras for d in (1, 2)]
    if "resident_programs" in params:
        extras = [dict(e, resident_programs=r) for e in extras for r in RESIDENT_PROGRAMS]
    found: dict[Any, dict[bool, tuple[int, int, int]]] = {}
    sizes = _sweep_sizes()
    every_h = sorted(set(range(1, H_SWEEP_MAX + 1)) | set(sizes))

    def add(cfg, has_proj, problem):
        found.setdefault(cfg, {}).setdefault(has_proj, problem)

    for B in B_SWEEP:
        for H in every_h if B == B_SWEEP[0] else sizes:
            for path in ("auto", "stepwise"):
                add(select_config(B, H, dtype, allow_tf32=allow_tf32, path=path), False, (B, H, 0))
        for extra in extras[1:]:
            for H in sizes:
                add(select_config(B, H, dtype, allow_tf32=allow_tf32, path="auto", **extra), False, (B, H, 0))
    if "proj_size" in params:
        B, coarse = B_SWEEP[0], _sweep_sizes(fine_up_to=17)
        for H in coarse:
            for P in coarse:
                if P >= H:
                    break
                for path in ("auto", "stepwise"):
                    add(select_config(B, H, dtype, allow_tf32=allow_tf32, path=path, proj_size=P), True, (B, H, P))
    return found


def _call_launcher(fn, available: dict[str, Any], unexercised: set):
    """Call a launcher by parameter name, so a reordered signature still works and a new one fails clearly.
    Optional parameters this module does not build are added to ``unexercised`` (the tests report them)."""
    import inspect

    kwargs = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in available:
            kwargs[name] = available[name]
        elif param.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}() takes an argument {name!r} that tests/compile_targets.py does not "
                            f"know how to build; teach _launch_all() about it")
        else:
            unexercised.add(f"{fn.__name__}({name}=...)")
    return fn(**kwargs)


def _launch_all(config, problem, has_proj: bool, dtype, launchers, modules, unexercised: set):
    """Run both launchers for one configuration and problem, once per input feature combination they accept:
    ``lengths`` given or not, the forward with and without ``save``, and — on the stepwise path without a
    projection — a single step with the input projection fused in (``fused_input``, with and without bias).
    Returns [(features, recorded launches)]; ``features`` names the launcher and its boolean inputs."""
    import inspect

    import torch

    lstm_fwd, lstm_bwd = launchers
    fwd_params = inspect.signature(lstm_fwd).parameters
    B, H, P = problem
    P = P if has_proj else H
    D, T, G, I = 1, T_LAUNCH, 4 * H, 24
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shape = lambda *s: (D, *s)  # noqa: E731
    # Tensors as the autograd op (lstm_triton/ops.py) passes them; contents do not matter (nothing is computed).
    common = dict(
        config=config,
        w_hh=torch.zeros(D, G, P, dtype=dtype),
        w_hr=torch.zeros(D, P, H, dtype=dtype) if has_proj else None,
        h0=torch.zeros(*shape(B, P), dtype=dtype),
        c0=torch.zeros(*shape(B, H), dtype=dtype),
    )
    fused_variants = [None]
    if "fused_input" in fwd_params and config.path == "stepwise" and not has_proj:
        fused_variants += [(torch.zeros(*shape(1, B, I), dtype=dtype), torch.zeros(D, G, I, dtype=dtype),
                            torch.zeros(D, G, dtype=dtype) if bias else None) for bias in (True, False)]
    out = []
    for with_lengths in ((False, True) if "lengths" in fwd_params else (False,)):
        lengths = torch.full((B,), T, dtype=torch.int32) if with_lengths else None
        for fused in fused_variants:
            for save in (True, False):
                features = dict(launcher="lstm_fwd", proj=has_proj, lengths=with_lengths, save=save)
                available = dict(common, lengths=lengths, save=save,
                                 gx=torch.zeros(*shape(T, B, G), dtype=dtype))
                if fused is not None:
                    available.update(gx=None, fused_input=fused)
                    features.update(fused_input=True, bias=fused[2] is not None)
                elif "fused_input" in fwd_params:
                    available.update(fused_input=None)
                with _recording_launches(modules) as calls:
                    _call_launcher(lstm_fwd, available, unexercised)
                out.append((features, calls))
        with _recording_launches(modules) as calls:
            _call_launcher(lstm_bwd, dict(
                common, dy=torch.zeros(*shape(T, B, P), dtype=dtype), dh_n=torch.zeros(*shape(B, P), dtype=dtype),
                dc_n=torch.zeros(*shape(B, H), dtype=dtype), gates=torch.zeros(*shape(T, B, G), dtype=acc),
                cs=torch.zeros(*shape(T + 1, B, H), dtype=acc), lengths=lengths), unexercised)
        out.append((dict(launcher="lstm_bwd", proj=has_proj, lengths=with_lengths), calls))
    return out


def enumerate_specializations(unexercised: Optional[set] = None) -> list[Specialization]:
    """All distinct kernel specializations the launchers request for every configuration the dispatcher picks.

    For each configuration the launchers run once per input feature combination (:func:`_launch_all`); each
    specialization lists the combinations that launched it. Optional launcher parameters never passed are added
    to ``unexercised``.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("enumerate without TRITON_INTERPRET (select_config depends on it); "
                           "use collect_in_subprocess()")
    _ensure_repo_on_path()
    import torch

    modules = _import_kernel_modules()
    from lstm_triton.kernels import lstm_bwd, lstm_fwd

    unexercised = set() if unexercised is None else unexercised
    specs: dict[str, Specialization] = {}
    for mode, dtype_name, allow_tf32 in DTYPE_MODES:
        dtype = getattr(torch, dtype_name)
        for config, problems in dispatcher_configs(dtype, allow_tf32).items():
            for has_proj, problem in sorted(problems.items()):
                runs = _launch_all(config, problem, has_proj, dtype, (lstm_fwd, lstm_bwd), modules, unexercised)
                if not any(calls for _, calls in runs):
                    raise RuntimeError(f"no kernel launch recorded for {config}")
                for features, calls in runs:
                    for call in calls:
                        spec = _specialization_from_call(call, mode, config, problem)
                        spec = specs.setdefault(spec.key, spec)
                        if features not in spec.features:
                            spec.features.append(features)
    return list(specs.values())


def covering_subset(specs: list[Specialization]) -> list[Specialization]:
    """Fewer specializations that still compile every configuration and both sides of every switch.

    1. Every configuration, per launcher (and on the on-chip paths per projection variant): the launches made
       with the most input features on (lengths, save, ...) — the most ``if FLAG:`` branches at once and the
       largest live state, so the register / spill worst case of that tile.
    2. Per dtype mode and path, the configuration with the largest tiles also with the fewest features on (the
       ``else`` branches, and the common inference launch).
    3. Any (kernel, constexpr, value) recorded for a dtype mode and path but not yet compiled, added greedily.
    All launches of a chosen launcher call are kept, so switches a launcher flips from step to step (first /
    last step) are compiled both ways.
    """
    n_on = lambda f: sum(v is True for v in f.values())  # noqa: E731

    def extreme_calls(group, which):
        """Specializations launched by the feature combination with the most (fewest) features on, per launcher —
        and for "top" on the on-chip paths per projection variant too (the spill check needs both programs)."""
        picked = []
        per_proj = which == "top" and group[0].config.get("path") in ON_CHIP_PATHS
        split = (lambda f: (f.get("launcher"), f.get("proj"))) if per_proj else (lambda f: f.get("launcher"))
        for part in sorted({split(f) for s in group for f in s.features}, key=str):
            combos = [f for s in group for f in s.features if split(f) == part]
            target = (max if which == "top" else min)(n_on(f) for f in combos)
            best = min((f for f in combos if n_on(f) == target), key=lambda f: json.dumps(f, sort_keys=True))
            picked += [s for s in group if best in s.features]
        return picked

    def grouped(key):
        out: dict[str, list[Specialization]] = {}
        for s in specs:
            out.setdefault(json.dumps(key(s), sort_keys=True, default=str), []).append(s)
        return out.values()

    chosen: dict[str, Specialization] = {}
    for group in grouped(lambda s: [s.mode, s.config]):
        chosen.update((s.key, s) for s in extreme_calls(group, "top"))
    for group in grouped(lambda s: [s.mode, s.config["path"]]):
        size = lambda s: (math.prod(v for k, v in s.config.items() if k.startswith("block_")),  # noqa: E731
                          json.dumps(s.config, sort_keys=True, default=str))
        largest = max(size(s) for s in group)
        chosen.update((s.key, s) for s in extreme_calls([s for s in group if size(s) == largest], "bottom"))
        pairs = lambda s: {(s.kernel, k, json.dumps(v, default=str)) for k, v in s.constexprs.items()}  # noqa: E731
        todo = set().union(*(pairs(s) for s in group))
        todo -= set().union(set(), *(pairs(s) for s in chosen.values() if s in group))
        while todo:
            best = max(group, key=lambda s: (len(pairs(s) & todo), n_on(s.constexprs)))
            chosen[best.key] = best
            todo -= pairs(best)
    return list(chosen.values())


# --------------------------------------------------------------------------------------------- compilation


@dataclass
class CompileResult:
    spec: dict[str, Any]
    name: str
    arch: int
    ok: bool
    error: Optional[str] = None
    n_regs: Optional[int] = None
    n_spills: Optional[int] = None  # bytes of spill stores + spill loads (ptxas -v)
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_bytes: Optional[int] = None
    shared: Optional[int] = None  # bytes, compiled metadata
    smem_limit: Optional[int] = None
    dot: Optional[str] = None  # "wgmma" | "mma" | "-"
    ptxas: Optional[str] = None
    compile_s: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_api() -> None:
    """Raise CompileAPIMissing if this triton cannot compile for a GPU target from here."""
    try:
        import inspect

        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except Exception as e:  # noqa: BLE001
        raise CompileAPIMissing(f"triton.compiler.ASTSource / GPUTarget unavailable: {e!r}") from e
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params or "attrs" not in params:
        raise CompileAPIMissing(f"triton {triton.__version__}: ASTSource has no constexprs/attrs arguments")
    try:
        _ptxas(90)
        _ptxas(80)
    except Exception as e:  # noqa: BLE001
        raise CompileAPIMissing(f"no ptxas for the nvidia backend: {e!r}") from e


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
    from triton import knobs

    tool = knobs.nvidia.ptxas
    path = getattr(tool, "path", None)
    if path and os.path.isfile(path):
        return path
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if os.path.isfile(path):
        return path
    raise FileNotFoundError("ptxas")


def _sm_name(arch: int) -> str:
    return f"sm_{arch}{'a' if arch >= 90 else ''}"


def _ptxas_usage(ptx: str, arch: int) -> dict[str, Any]:
    """Registers / spills / stack from ``ptxas -v`` on the generated PTX, with the flags triton passes."""
    ptxas = _ptxas(arch)
    flags = ["-lineinfo", "-v"]
    try:  # triton 3.9 adds --regAllocOptLevel=2 (a ptxas 13 workaround); match it so the counts agree
        import inspect

        from triton.backends.nvidia import compiler as nv

        if "--regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin):
            flags.append("--regAllocOptLevel=2")
    except Exception:  # noqa: BLE001
        pass
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        proc = subprocess.run([ptxas, *flags, f"--gpu-name={_sm_name(arch)}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({proc.returncode}):\n{log[-4000:]}")
    usage = _parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log[-4000:]}")
    return dict(usage, ptxas=_ptxas_name(arch))


def _parse_ptxas_log(log: str) -> Optional[dict[str, int]]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(regs) != 1 or len(spills) != 1:  # one entry function, nothing else
        return None
    stack, st, ld = (int(x) for x in spills[0])
    return dict(n_regs=int(regs[0]), spill_stores=st, spill_loads=ld, n_spills=st + ld, stack_bytes=stack)


@functools.lru_cache(maxsize=None)
def _ptxas_name(arch: int) -> str:
    ptxas = _ptxas(arch)
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"release (\d+\.\d+)", out)
    return f"{os.path.basename(ptxas)} {version.group(1) if version else '?'}"


def _ask_for_ptxas_log() -> None:
    """Have triton print its ptxas -v log (captured by the caller) where the knob exists."""
    try:
        from triton import knobs

        if hasattr(knobs.nvidia, "dump_ptxas_log"):
            knobs.nvidia.dump_ptxas_log = True
    except Exception:  # noqa: BLE001
        pass


_USAGE_FILE = "lstm_triton_ptxas_usage.json"


def _usage_path(kernel) -> Optional[str]:
    files = [p for p in getattr(kernel, "metadata_group", {}).values() if isinstance(p, str)]
    return os.path.join(os.path.dirname(files[0]), _USAGE_FILE) if files else None


def _read_usage(kernel, arch: int) -> Optional[dict[str, Any]]:
    path = _usage_path(kernel)
    try:
        usage = json.loads(Path(path).read_text())
    except (OSError, TypeError, ValueError):
        return None
    return usage if usage.get("ptxas") == _ptxas_name(arch) else None


def _write_usage(kernel, usage: dict[str, Any]) -> None:
    path = _usage_path(kernel)
    if path is None:
        return
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        Path(tmp).write_text(json.dumps(usage))
        os.replace(tmp, path)
    except OSError:
        pass


def _cubin_regs(cubin: bytes) -> Optional[int]:
    """Registers recorded in the cubin triton built (``cuobjdump --dump-resource-usage``); None if unavailable."""
    try:
        from triton.backends.nvidia import compiler as nv

        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            Path(path).write_bytes(cubin)
            out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)", out)
        return int(m.group(1)) if m else None
    except Exception:  # noqa: BLE001
        return None


def _dot_lowering(ptx: str) -> str:
    """How the kernel's matmuls reached the hardware: "wgmma", "mma" (mma.sync), or "-" (neither: an FMA dot,
    e.g. float32 with ieee precision, or no dot at all)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "-"


def compile_specialization(spec: Specialization | dict, arch: int) -> CompileResult:
    """Compile one specialization for ``cuda:arch``; errors are returned in the result, not raised."""
    import importlib

    _ensure_repo_on_path()
    spec = spec if isinstance(spec, Specialization) else Specialization(**spec)
    spec_dict = asdict(spec)
    res = CompileResult(spec=spec_dict, name=spec.name, arch=arch, ok=False, smem_limit=SMEM_LIMIT.get(arch))
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        if not hasattr(fn, "cache_key"):
            raise RuntimeError(f"{spec.kernel} is not a compilable JITFunction (TRITON_INTERPRET set?)")
        names = list(fn.arg_names)
        constexprs = {(names.index(k),): v for k, v in spec.constexprs.items()}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if spec.signature[a].startswith("*")}
        src = ASTSource(fn, dict(spec.signature), constexprs=constexprs, attrs=attrs)
        _ask_for_ptxas_log()
        captured = io.StringIO()  # the ptxas log, or the whole PTX triton prints when ptxas fails
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
        ptx = k.asm["ptx"]
        res.shared = int(k.metadata.shared)
        res.dot = _dot_lowering(ptx)
        # A fresh compile leaves triton's own ptxas log, kept beside the kernel in triton's cache; a cache hit
        # reads it back (or, for a kernel cached by an ordinary run, runs ptxas again on the PTX).
        usage = _parse_ptxas_log(captured.getvalue())
        usage = dict(usage, ptxas=_ptxas_name(arch)) if usage else _read_usage(k, arch) or _ptxas_usage(ptx, arch)
        _write_usage(k, usage)
        for key, value in usage.items():
            setattr(res, key, value)
        res.extra["cubin_regs"] = _cubin_regs(k.asm["cubin"])
        res.ok = True
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        res.error = msg if len(msg) < 6000 else msg[:3000] + "\n...\n" + msg[-3000:]
    res.compile_s = round(time.perf_counter() - t0, 2)
    return res


def _compile_job(job):
    spec, arch = job
    return asdict(compile_specialization(spec, arch))


def collect(archs=DEFAULT_ARCHS, jobs: Optional[int] = None, full: Optional[bool] = None,
            progress: bool = False) -> dict[str, Any]:
    """Enumerate and compile in this process (and a small process pool). Needs TRITON_INTERPRET unset.

    ``full`` (default: ``$LSTM_TRITON_COMPILE_FULL`` = 1) compiles every recorded specialization instead of
    :func:`covering_subset`.
    """
    check_api()
    import triton

    if full is None:
        full = os.environ.get(FULL_ENV, "0") == "1"
    t0 = time.time()
    cpu0 = _cpu_seconds()
    unexercised: set = set()
    recorded = enumerate_specializations(unexercised)
    specs = recorded if full else covering_subset(recorded)
    work = [(asdict(s), arch) for s in specs for arch in archs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    results = []
    if jobs == 1:
        results = [_compile_job(w) for w in work]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the workers start clean (no forked torch thread pools); they inherit this environment.
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            for i, r in enumerate(pool.map(_compile_job, work)):
                results.append(r)
                if progress:
                    print(f"[{i + 1}/{len(work)}] {r['name']} sm_{r['arch']}: "
                          f"{'ok' if r['ok'] else 'FAILED'} ({r['compile_s']} s)", file=sys.stderr, flush=True)
    return dict(
        triton_version=triton.__version__,
        archs=list(archs),
        smem_limit={str(a): SMEM_LIMIT.get(a) for a in archs},
        alignment="pointers 16-byte aligned (tt.divisibility=16); integer scalars unspecialized",
        selection="full" if full else "covering",
        n_recorded=len(recorded),
        n_specializations=len(specs),
        recorded=[asdict(s) for s in recorded],
        unexercised_launcher_options=sorted(unexercised),
        results=results,
        elapsed_s=round(time.time() - t0, 1),
        cpu_s=round(_cpu_seconds() - cpu0, 1),
        jobs=jobs,
    )


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers and their ptxas runs)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def collect_in_subprocess(archs=DEFAULT_ARCHS, jobs: Optional[int] = None, full: Optional[bool] = None,
                          timeout: float = 3600) -> dict[str, Any]:
    """:func:`collect` in a fresh Python without TRITON_INTERPRET. Raises CompileAPIMissing if triton can't."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if full is not None:
        env[FULL_ENV] = "1" if full else "0"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--json", out, "--quiet", "--arch", *map(str, archs)]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
        if not os.path.exists(out):
            raise RuntimeError(f"the compile check wrote no report (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        report = json.loads(Path(out).read_text())
    if report.get("skip"):
        raise CompileAPIMissing(report["skip"])
    return report


# --------------------------------------------------------------------------------------------- report


def _cell(r: Optional[dict]) -> list[str]:
    if r is None:
        return ["-", "-", "-", "-"]
    if not r["ok"]:
        return ["FAIL", "", "", ""]
    spill = "0" if r["n_spills"] == 0 else f"{r['spill_stores']}/{r['spill_loads']}"
    return [str(r["n_regs"]), spill, f"{r['shared'] / 1024:.1f}K", r["dot"]]


def format_table(report: dict[str, Any]) -> str:
    """One row per specialization, one column group (regs, spills st/ld bytes, smem, dot) per target.

    The flags column lists the boolean constexprs; one that is False in every specialization of a kernel
    (e.g. a switch only the interpreter sets) is left out of the column.
    """
    archs = report["archs"]
    rows: dict[str, dict[int, dict]] = {}
    for r in report["results"]:
        rows.setdefault(json.dumps([r["name"], r["spec"]["signature"]]), {})[r["arch"]] = r
    ever_true = {(r["spec"]["kernel"], k) for r in report["results"]
                 for k, v in r["spec"]["constexprs"].items() if v is True}
    head = ["kernel", "dtype", "tiles", "flags", "warps/stg"]
    for a in archs:
        head += [f"regs{a}", f"spill{a}", f"smem{a}", f"dot{a}"]
    lines = []
    for by_arch in rows.values():
        spec = next(iter(by_arch.values()))["spec"]
        kernel, mode, tiles = next(iter(by_arch.values()))["name"].split(" ")[:3]
        flags = " ".join(f"{k}={int(v)}" for k, v in spec["constexprs"].items()
                         if isinstance(v, bool) and (spec["kernel"], k) in ever_true)
        opts = spec["options"]
        row = [kernel, mode, tiles, flags or "-", f"{opts.get('num_warps', '?')}/{opts.get('num_stages', '?')}"]
        for a in archs:
            row += _cell(by_arch.get(a))
        lines.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines]
    failures = [r for r in report["results"] if not r["ok"]]
    ptxas = sorted({f"sm_{r['arch']}: {r['ptxas']}" for r in report["results"] if r.get("ptxas")})
    out.append("")
    out.append(f"triton {report['triton_version']}; {report['n_specializations']} specializations x "
               f"{len(archs)} targets = {len(report['results'])} compiles, {len(failures)} failed; "
               f"{report['elapsed_s']} s wall, {report.get('cpu_s', '?')} s CPU, {report['jobs']} workers; "
               f"{'; '.join(ptxas)}")
    out.append(f"selection: {report.get('selection', '?')} ({report['n_specializations']} of "
               f"{report.get('n_recorded', '?')} recorded specializations; {FULL_ENV}=1 compiles all)")
    out.append(f"{report['alignment']}; spill: bytes of spill stores/loads (ptxas -v); smem: metadata.shared; "
               "dot: wgmma / mma.sync in the PTX, '-' for neither (FMA dot or none)")
    for r in failures:
        out.append(f"\nFAILED {r['name']} sm_{r['arch']}:\n{r['error']}")
    return "\n".join(out)


def write_report(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=1, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", default=os.environ.get(REPORT_ENV))
    p.add_argument("--full", action="store_true", default=None,
                   help=f"compile every recorded specialization, not the covering subset (or {FULL_ENV}=1)")
    p.add_argument("--quiet", action="store_true", help="no table on stdout (the JSON still gets written)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, don't interpret
    try:
        report = collect(archs=tuple(args.arch), jobs=args.jobs, full=args.full, progress=not args.quiet)
    except CompileAPIMissing as e:
        if args.json:
            write_report({"skip": str(e)}, args.json)
        print(f"skipped: {e}", file=sys.stderr)
        return 0
    if args.json:
        write_report(report, args.json)
    if not args.quiet:
        print(format_table(report))
    return 0 if all(r["ok"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
