"""What a run leaves behind: derived metrics, the console table, JSON, CSV and the PNG plot, a progress bar.

JSON schema (read by tools; extra fields may be added, these stay): top level ``device`` (GPU name as torch
reports it, or "cpu"), ``torch``, ``triton``, ``cuda``, ``cudnn``, ``git_sha``, ``date`` (ISO 8601, UTC),
``rows``; each row has ``provider``, ``mode`` ("forward" | "train"), ``dtype`` ("float16" | "bfloat16" |
"float32" | "tf32" | "float64"), ``T``, ``B``, ``I``, ``H``, ``num_layers``, ``median_ms``, ``p10_ms``,
``p90_ms``, ``max_rel_err``, ``peak_mem_mb`` (null where not measured). See benchmarks/README.md for the rest.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .providers import FLASHRNN_BACKENDS
from .shapes import INTERPRETER, Shape

PEAK_SOURCE = ("NVIDIA datasheet dense peaks (H100 SXM / H200: bf16 and fp16 989.4, tf32 494.7, fp32 and fp64 "
               "66.9 TFLOP/s); the measured bf16 matmul ceiling on an H100 is about 790")
# Matched in order against torch.cuda.get_device_name(); dense (no sparsity) TFLOP/s.
_PEAKS = (
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9, "float64": 66.9}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.2, "float64": 51.2}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "tf32": 417.5, "float32": 60.0, "float64": 60.0}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9, "float64": 66.9}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5, "float64": 19.5}),
)
FLOPS_MODEL = "forward = 8*T*B*H*(I+H) (input and recurrent GEMMs); train = 3 x forward (shapes.Shape.flops)"
ERROR_DEFINITION = ("max over y, h_n, c_n (and in train mode dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh) of "
                    "max|a - ref| / max|ref|, ref = lstm_triton.lstm_layer_reference in float64")
BASELINES = ("cudnn", "naive", "torch_cpu")
MODE_ORDER = {"forward": 0, "train": 1}

# CSV column order: the schema, then what a reader looks at next; any other field follows.
FIELDS = [
    "provider", "mode", "dtype", "shape_id", "T", "B", "I", "H", "num_layers", "status", "reason",
    "median_ms", "p10_ms", "p90_ms", "reps", "us_per_step", "tokens_per_s", "tflops", "pct_peak", "peak_tflops",
    "speedup_vs_cudnn", "speedup_vs_cudnn_fp16", "speedup_vs_naive", "speedup_vs_torch_cpu", "speedup_vs_flashrnn",
    "max_rel_err", "err_tensor", "err_bound", "gate_passed", "gate_T", "peak_mem_mb", "first_call_s",
    "kernel_path", "cudnn_algo", "device_ops_per_call", "note",
]


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    for key, peaks in _PEAKS:
        if key in device_name:
            return peaks[dtype]
    return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str, settings: dict) -> dict:
    import triton

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.platform(),
        "argv": sys.argv[1:],
        "settings": settings,
        "flops_model": FLOPS_MODEL,
        "peak_source": PEAK_SOURCE,
        "max_rel_err_definition": ERROR_DEFINITION,
        "timing": "CUDA events around each rep, L2 flushed before each; median, p10, p90 over reps after warm-up"
                  if device == "cuda" else "time.perf_counter around each rep; median, p10, p90 after warm-up",
        "complete": False,
    }


def _key(row: dict, dtype: Optional[str] = None, provider: Optional[str] = None) -> tuple:
    return (provider or row["provider"], row["T"], row["B"], row["I"], row["H"], row["num_layers"], row["mode"],
            dtype or row["dtype"])


def finalize(rows: list[dict], device_name: str) -> list[dict]:
    """Rows with derived fields (µs/step, tokens/s, TFLOP/s, % of peak, speedups), in display order.

    Speedups are baseline median ÷ row median at the same shape and mode: vs each baseline in the same
    dtype, vs cuDNN in float16 (its persistent kernel, the fastest cuDNN there is), and vs the fastest
    FlashRNN backend in the same dtype.
    """
    medians = {_key(r): r["median_ms"] for r in rows if r.get("status") == "ok"}
    out = []
    for row in rows:
        row = dict(row)
        ms = row["median_ms"] if row.get("status") == "ok" else None
        flops = Shape(row["shape_id"], row["T"], row["B"], row["I"], row["H"]).flops(row["mode"])
        peak = peak_tflops(device_name, row["dtype"])
        row["us_per_step"] = ms * 1e3 / row["T"] if ms else None
        row["tokens_per_s"] = row["T"] * row["B"] / (ms * 1e-3) if ms else None
        row["tflops"] = flops / (ms * 1e-3) / 1e12 if ms else None
        row["peak_tflops"] = peak
        row["pct_peak"] = 100 * row["tflops"] / peak if ms and peak else None
        for base in BASELINES:
            b = medians.get(_key(row, provider=base))
            row[f"speedup_vs_{base}"] = b / ms if ms and b else None
        b16 = medians.get(_key(row, dtype="float16", provider="cudnn"))
        row["speedup_vs_cudnn_fp16"] = b16 / ms if ms and b16 else None
        flash = [medians[k] for k in (_key(row, provider=p) for p in FLASHRNN_BACKENDS) if k in medians]
        row["speedup_vs_flashrnn"] = min(flash) / ms if ms and flash else None
        out.append(row)
    first_seen = {}
    for name in ("shape_id", "dtype", "provider"):
        first_seen[name] = {v: i for i, v in enumerate(dict.fromkeys(r[name] for r in out))}
    return sorted(out, key=lambda r: (first_seen["shape_id"][r["shape_id"]], MODE_ORDER[r["mode"]],
                                      first_seen["dtype"][r["dtype"]], first_seen["provider"][r["provider"]]))


def file_stem(meta: dict) -> str:
    """``<device>-<date>``, e.g. ``h100-80gb-hbm3-2025-06-01``: the name results are committed under."""
    device = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    device = device.removeprefix("nvidia-")
    return f"{device}-{meta['date'][:10]}"


def write_data(out_dir: Path, meta: dict, rows: list[dict]) -> dict[str, Path]:
    """JSON and CSV (rewritten after every row, so a run cut short still leaves its rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(meta)
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv"}
    # Strict JSON has no Infinity or NaN: a non-finite number (an error from a NaN output) is written as null.
    finite_rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                   for r in rows]
    paths["json"].write_text(json.dumps({**meta, "rows": finite_rows}, indent=1, allow_nan=False) + "\n")
    columns = FIELDS + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in FIELDS]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(finite_rows)
    return paths


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row_summary(row: dict) -> str:
    """One line per row, for the progress log."""
    head = f"{row['shape_id']} {row['mode']} {row['dtype']} {row['provider']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}: {row['reason']}"
    gate = "" if row["gate_passed"] is not False else "  GATE FAILED"
    return (f"{head}: {row['median_ms']:.3f} ms (p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f}, "
            f"{row['reps']} reps), err {_fmt(row['max_rel_err'], '.1e')}{gate}")


def format_table(rows: list[dict]) -> str:
    """The console table: one line per row, speedups against the baseline of the device."""
    base = "cudnn" if any(r["provider"] == "cudnn" for r in rows) else "torch_cpu"
    headers = ["shape", "T,B,I,H", "mode", "dtype", "provider", "median ms", "p10-p90 ms", "us/step",
               "TFLOP/s", "%peak", f"x {base}", "x cudnn16", "max err", "gate", "mem MB", "info"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        gate = {True: "ok", False: "FAIL", None: "-"}[r["gate_passed"]]
        info = [r.get("kernel_path"), r.get("cudnn_algo"), r.get("note")] if ok else [f"{r['status']}: {r['reason']}"]
        lines.append([
            r["shape_id"], f"{r['T']},{r['B']},{r['I']},{r['H']}", r["mode"], r["dtype"], r["provider"],
            _fmt(r["median_ms"], ".3f"),
            f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}" if ok else "-",
            _fmt(r["us_per_step"], ".2f"), _fmt(r["tflops"], ".2f"), _fmt(r["pct_peak"], ".1f"),
            _fmt(r[f"speedup_vs_{base}"], ".2f"), _fmt(r["speedup_vs_cudnn_fp16"], ".2f"),
            _fmt(r["max_rel_err"], ".1e"), gate, _fmt(r["peak_mem_mb"], ".0f"),
            "; ".join(str(i) for i in info if i)[:110],
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def plot(rows: list[dict], path: Path) -> Optional[str]:
    """PNG: speedup vs the device's baseline per shape (left), µs/step vs batch (right).

    Returns None when written, or why not (matplotlib missing, nothing to plot).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    interpreted = {s.id for s in INTERPRETER}  # correctness rows: their times would only squash the axes
    ok = [r for r in rows if r["status"] == "ok" and r["shape_id"] not in interpreted]
    if not ok:
        return "no timed rows: no plot"
    base = "cudnn" if any(r["provider"] == "cudnn" for r in ok) else "torch_cpu"
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6))

    ours = [r for r in ok if r["provider"] == "lstm_triton" and r[f"speedup_vs_{base}"]]
    labels = list(dict.fromkeys(f"{r['shape_id']}\n{r['mode']}" for r in ours))
    dtypes = list(dict.fromkeys(r["dtype"] for r in ours))
    width = 0.8 / max(len(dtypes), 1)
    for i, dtype in enumerate(dtypes):
        points = {f"{r['shape_id']}\n{r['mode']}": r[f"speedup_vs_{base}"] for r in ours if r["dtype"] == dtype}
        xs = [j + i * width for j, label in enumerate(labels) if label in points]
        left.bar(xs, [points[label] for label in labels if label in points], width, label=dtype)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(labels))], labels, fontsize=7)
    left.set_ylabel(f"speedup of lstm_triton vs {base} (same dtype)")
    left.set_title(f"lstm_triton vs {base}, per shape")
    if dtypes:
        left.legend(fontsize=8)

    present = {r["dtype"] for r in ok}
    primary = next(d for d in ("bfloat16", "float16", "tf32", "float32", "float64") if d in present)
    mode = "forward" if any(r["mode"] == "forward" for r in ok) else "train"
    lines: dict[tuple, list] = {}
    for r in ok:
        if r["dtype"] == primary and r["mode"] == mode:
            lines.setdefault((r["provider"], r["T"], r["H"]), []).append((r["B"], r["us_per_step"]))
    for (provider, T, H), points in sorted(lines.items()):
        points.sort()
        right.plot([b for b, _ in points], [u for _, u in points], marker="o", label=f"{provider} T={T} H={H}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch B")
    right.set_ylabel("µs per step")
    right.set_title(f"µs per step vs batch ({mode}, {primary})")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


class Progress:
    """A tqdm bar on a terminal when tqdm is installed; else (no tqdm, or a log file) one line per row."""

    def __init__(self, total: int):
        self.total, self.count = total, 0
        self._bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr)

    def start(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description(label)
        else:  # a log: a row that hangs must show which row it is
            print(f"[{self.count + 1}/{self.total}] start {label}", file=sys.stderr, flush=True)

    def done(self, row: dict) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.write(row_summary(row), file=sys.stderr)
        else:
            print(f"[{self.count}/{self.total}] {row_summary(row)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
