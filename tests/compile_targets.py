"""Compile every kernel specialization the dispatcher can choose for sm_90 and sm_80, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole GPU pipeline (TTIR → TTGIR →
LLVM → PTX → cubin with the wheel's ptxas) on a CPU-only machine. This module

1. enumerates the specializations from the code that picks them, not from a list kept by hand:
   ``select_config`` is swept over H (and a few B) for every input dtype / dot precision, giving each distinct
   configuration it can return (the persistent path only where ``path="auto"`` takes it, i.e. every padded H
   the persistence rule admits; the stepwise path for every tile choice). For each configuration the real
   launchers ``lstm_fwd`` / ``lstm_bwd`` are run on tiny CPU tensors with the ``@triton.jit`` kernels swapped
   for recorders, so the pointer dtypes, constexprs (tiles, SAVE / SAVE_GATES / STORE_FINAL / LAST_STEP, dot
   precision, ...) and ``num_warps`` / ``num_stages`` are exactly what the launchers pass;
2. compiles each distinct specialization for every target and records registers and spills (``ptxas -v``
   on the generated PTX, the same ptxas binary triton uses for that target), shared memory
   (``metadata.shared``) and how ``tl.dot`` was lowered (``wgmma`` / ``mma`` / ``fma``, read from the PTX).

Specializations are compiled with every pointer 16-byte aligned (``tt.divisibility = 16``, what triton's launcher
records for ordinary torch allocations) and integer scalars unspecialized: the variant any B, H, T may hit.

Kernels must be compiled by triton's compiler, not its interpreter, and ``select_config`` itself looks at
``TRITON_INTERPRET``; so the collection runs in a process without ``TRITON_INTERPRET``
(:func:`collect_in_subprocess` starts one; the test suite's conftest sets the variable for everything else).

Usage::

    python tests/compile_targets.py [--arch 90 80] [--jobs N] [--json report.json]

prints the table (and writes the JSON report with ``--json`` or ``LSTM_TRITON_COMPILE_REPORT=path``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
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
REPORT_ENV = "LSTM_TRITON_COMPILE_REPORT"

KERNEL_MODULES = ("lstm_triton.kernels.lstm_fwd", "lstm_triton.kernels.lstm_bwd")

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

# select_config is swept over these problem sizes (every H up to H_SWEEP_MAX, then powers of two).
H_SWEEP_MAX = 4096
H_SWEEP_EXTRA = (8192, 16384, 32768, 65536)
B_SWEEP = (1, 16, 256)
T_LAUNCH = 2  # two steps: the stepwise launchers pass both values of STORE_FINAL / LAST_STEP

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
    problem: tuple[int, int]  # (B, H) the configuration was selected for

    @property
    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.options], sort_keys=True,
                          default=str)

    @property
    def name(self) -> str:
        short = self.kernel.strip("_").removesuffix("_kernel").removeprefix("lstm_")
        flags = " ".join(f"{k}={int(v)}" for k, v in self.constexprs.items() if isinstance(v, bool))
        tiles = "x".join(str(self.constexprs[k]) for k in ("BLOCK_B", "BLOCK_H", "BLOCK_K") if k in self.constexprs)
        return f"{short} {self.mode} {tiles} {flags}".strip()


def _import_kernel_modules():
    import importlib

    _ensure_repo_on_path()
    return [importlib.import_module(m) for m in KERNEL_MODULES]


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
    return Specialization(module, name, signature, constexprs, options, mode, asdict(config), problem)


def dispatcher_configs(dtype, allow_tf32: bool):
    """Every distinct configuration ``select_config`` returns for this dtype / precision.

    ``path="auto"`` (the dispatcher's own choice: persistent wherever the W_hh tile fits) and ``path="stepwise"``
    (tests and callers may force it for any H) over B ∈ B_SWEEP and H ∈ 1..H_SWEEP_MAX plus a few larger powers
    of two. A persistent configuration for an H the persistence rule rejects is not a dispatcher choice and is
    not listed. Returns {config: (B, H)} with the first problem that selects it.
    """
    from lstm_triton.kernels.config import select_config

    found = {}
    hs = list(range(1, H_SWEEP_MAX + 1)) + list(H_SWEEP_EXTRA)
    for path in ("auto", "stepwise"):
        for B in B_SWEEP:
            for H in hs:
                found.setdefault(select_config(B, H, dtype, allow_tf32=allow_tf32, path=path), (B, H))
    return found


def enumerate_specializations() -> list[Specialization]:
    """All distinct kernel specializations the launchers request for every configuration the dispatcher picks."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("enumerate without TRITON_INTERPRET (select_config depends on it); "
                           "use collect_in_subprocess()")
    _ensure_repo_on_path()
    import torch

    modules = _import_kernel_modules()
    from lstm_triton.kernels import lstm_bwd, lstm_fwd

    specs: dict[str, Specialization] = {}
    for mode, dtype_name, allow_tf32 in DTYPE_MODES:
        dtype = getattr(torch, dtype_name)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for config, (B, H) in dispatcher_configs(dtype, allow_tf32).items():
            T, G = T_LAUNCH, 4 * H
            with _recording_launches(modules) as calls:
                # Tensors as the autograd op (lstm_triton/ops.py) passes them.
                gx = torch.zeros(T, B, G, dtype=dtype)
                w = torch.zeros(G, H, dtype=dtype)
                h0 = torch.zeros(B, H, dtype=dtype)
                c0 = torch.zeros(B, H, dtype=dtype)
                for save in (True, False):
                    lstm_fwd(gx, w, h0, c0, config, save=save)
                dy = torch.zeros(T, B, H, dtype=dtype)
                dh_n = torch.zeros(B, H, dtype=dtype)
                dc_n = torch.zeros(B, H, dtype=dtype)
                gates = torch.zeros(T, B, G, dtype=acc)
                cs = torch.zeros(T + 1, B, H, dtype=acc)
                lstm_bwd(dy, dh_n, dc_n, gates, cs, w, config)
            if not calls:
                raise RuntimeError(f"no kernel launch recorded for {config}")
            for call in calls:
                spec = _specialization_from_call(call, mode, config, (B, H))
                specs.setdefault(spec.key, spec)
    return list(specs.values())


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
    dot: Optional[str] = None  # "wgmma" | "mma" | "fma" | "none"
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
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log[-4000:]}")
    stack, st, ld = (int(x) for x in spills[-1])
    version = re.search(r"release (\d+\.\d+)", subprocess.run([ptxas, "--version"], capture_output=True,
                                                              text=True).stdout)
    return dict(n_regs=int(regs[-1]), spill_stores=st, spill_loads=ld, n_spills=st + ld, stack_bytes=stack,
                ptxas=f"{os.path.basename(ptxas)} {version.group(1) if version else '?'}")


def _dot_lowering(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    if re.search(r"\bfma\.rn\.f(32|64)\b", ptx):
        return "fma"
    return "none"


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
        captured = io.StringIO()  # triton prints the whole PTX when ptxas fails; keep it out of the table
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
        ptx = k.asm["ptx"]
        res.shared = int(k.metadata.shared)
        res.dot = _dot_lowering(ptx)
        for key, value in _ptxas_usage(ptx, arch).items():
            setattr(res, key, value)
        res.ok = True
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        res.error = msg if len(msg) < 6000 else msg[:3000] + "\n...\n" + msg[-3000:]
    res.compile_s = round(time.perf_counter() - t0, 2)
    return res


def _compile_job(job):
    spec, arch = job
    return asdict(compile_specialization(spec, arch))


def collect(archs=DEFAULT_ARCHS, jobs: Optional[int] = None, progress: bool = False) -> dict[str, Any]:
    """Enumerate and compile in this process (and a small process pool). Needs TRITON_INTERPRET unset."""
    check_api()
    import triton

    t0 = time.time()
    specs = enumerate_specializations()
    work = [(asdict(s), arch) for s in specs for arch in archs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    results = []
    if jobs == 1:
        for w in work:
            results.append(_compile_job(w))
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
        n_specializations=len(specs),
        results=results,
        elapsed_s=round(time.time() - t0, 1),
        jobs=jobs,
    )


def collect_in_subprocess(archs=DEFAULT_ARCHS, jobs: Optional[int] = None, timeout: float = 1800) -> dict[str, Any]:
    """:func:`collect` in a fresh Python without TRITON_INTERPRET. Raises CompileAPIMissing if triton can't."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--json", out, "--quiet", "--arch",
               *map(str, archs)]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
        if not os.path.exists(out):
            raise RuntimeError(f"compile check did not produce a report (exit {proc.returncode}):\n"
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
    """One row per specialization, one column group (regs, spills st/ld bytes, smem, dot) per target."""
    archs = report["archs"]
    rows: dict[str, dict[int, dict]] = {}
    for r in report["results"]:
        rows.setdefault(r["name"], {})[r["arch"]] = r
    head = ["kernel", "dtype", "tile BxHxK", "flags", "warps/stages"]
    for a in archs:
        head += [f"regs{a}", f"spill{a}", f"smem{a}", f"dot{a}"]
    lines = []
    for name, by_arch in rows.items():
        any_r = next(iter(by_arch.values()))
        spec = any_r["spec"]
        kernel, mode, tiles, *flags = name.split(" ")
        opts = spec["options"]
        row = [kernel, mode, tiles, " ".join(flags) or "-", f"{opts.get('num_warps', '?')}/{opts.get('num_stages', '?')}"]
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
               f"{report['elapsed_s']} s with {report['jobs']} workers; {'; '.join(ptxas)}")
    out.append(f"{report['alignment']}; spills: bytes of spill stores/loads; smem: metadata.shared")
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
    p.add_argument("--quiet", action="store_true", help="no table on stdout (the JSON still gets written)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, don't interpret
    try:
        report = collect(archs=tuple(args.arch), jobs=args.jobs, progress=not args.quiet)
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
