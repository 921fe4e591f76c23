"""``python -m benchmarks``: time lstm_triton against cuDNN, the naive loop, torch.compile and FlashRNN.

Defaults on a GPU: the tier-1 shapes, forward and train, bfloat16/float16/tf32/float32, every provider (the
slow ones — naive, torch_compile, FlashRNN — on F1 and M1 only). Without a GPU: a small CPU comparison plus
lstm_triton's kernels under the Triton interpreter, as a correctness check. Either way the run writes
``<device>-<date>.json``, ``.csv`` and ``.png`` into ``--out`` and prints a table.

Exit status: 0; 1 when an lstm_triton row failed its correctness gate or raised; 2 for a bad argument.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import providers, report, shapes, suite

GPU_SLOW_SHAPES = {"F1", "M1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark lstm_triton against cuDNN (torch.nn.LSTM), the naive PyTorch loop, torch.compile "
                    "and FlashRNN; every row is gated on a float64 reference first.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m benchmarks                               # tier 1 on the GPU (or the CPU set)\n"
               "  python -m benchmarks --quick                       # a minute: F1 and M1, bf16/fp16\n"
               "  python -m benchmarks --shapes tier2 --providers lstm_triton,cudnn --dtypes bf16\n"
               "  python -m benchmarks --shapes 512,8,256,256 F1 --modes train --out results/\n"
               f"\nshape sets: {', '.join(shapes.NAMED_SETS)}; tier-1 ids: "
               f"{', '.join(s.id for s in shapes.TIER1)}\nproviders: {', '.join(providers.ALL)} (flashrnn = all "
               "FlashRNN backends)",
    )
    p.add_argument("--quick", action="store_true",
                   help="a short run: GPU F1 and M1 in bfloat16/float16, lstm_triton vs cudnn, 20 reps; CPU: shape C1")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help="set names (tier1, tier2, cpu, interp), shape ids (F1, M1, ...) or T,B,I,H; default tier1 "
                        "(GPU) or cpu")
    p.add_argument("--dtypes", help="comma-separated: bfloat16, float16, tf32, float32, float64; "
                                    "default bfloat16,float16,tf32,float32 (GPU) or float32 (CPU)")
    p.add_argument("--modes", default="forward,train", help="forward (no grad) and/or train (forward + backward "
                                                           "for every input and weight); default both")
    p.add_argument("--providers", help=f"comma-separated, from {', '.join(providers.ALL)}, flashrnn; default "
                                       "all that apply to the device")
    p.add_argument("--slow-shapes", metavar="IDS",
                   help="shape ids on which the slow providers (naive, torch_compile, flashrnn) run, or 'all'; "
                        "default F1,M1 on a GPU with the default providers, else all")
    p.add_argument("--reps", type=int, help="timed reps per row (default 100; 20 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default 10; 2 with --quick)")
    p.add_argument("--slow-reps", type=int, help="timed reps for the slow providers (default 10; 3 with --quick)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop starting new rows after this long (they are recorded as skipped)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default 1 on CPU: stable timings on a small or shared machine, where "
                        "oversubscribed threads cost 5-30x; the GPU run leaves torch's default)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default bench-out)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    args = p.parse_args(argv)
    for name in ("reps", "warmup", "slow_reps", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else '>= 1'}")
    return args


@dataclass
class Run:
    device: str
    cases: list
    settings: suite.Settings
    defaults: bool  # no shapes or providers given: the device's standard comparison
    with_interpreter: bool  # add the Triton-interpreter rows (the default CPU comparison)
    threads: Optional[int]  # torch CPU threads to set, or None to leave torch's default


def resolve(args: argparse.Namespace) -> Run:
    """What to run, from the arguments and the device's defaults; ValueError for a bad argument."""
    gpu = torch.cuda.is_available()
    device = args.device or ("cuda" if gpu else "cpu")
    if device == "cuda" and not gpu:
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    on_gpu, quick = device == "cuda", args.quick
    if args.shapes:
        shape_list = shapes.parse_shapes(args.shapes)
    elif on_gpu:
        shape_list = shapes.parse_shapes(["F1", "M1"] if quick else ["tier1"])
    else:
        shape_list = shapes.parse_shapes(["C1"] if quick else ["cpu"])
    default_dtypes = ("bfloat16,float16" if quick else "bfloat16,float16,tf32,float32") if on_gpu else "float32"
    dtypes = shapes.parse_dtypes(args.dtypes or default_dtypes)
    modes = shapes.parse_modes(args.modes)
    if args.providers:
        names = providers.parse_providers(args.providers)
    elif on_gpu and quick:
        names = ["lstm_triton", "cudnn"]
    else:
        names = providers.default_providers(device)
    if args.slow_shapes:
        slow_shapes = None if args.slow_shapes == "all" else {s.strip() for s in args.slow_shapes.split(",")}
    else:
        slow_shapes = GPU_SLOW_SHAPES if on_gpu and not args.providers else None
    cases = suite.plan(shape_list, modes, dtypes, names, slow_shapes)
    if not cases:
        raise ValueError("nothing to run: no shape takes the requested modes (L1 is forward-only), or "
                         "--slow-shapes excludes every shape of the requested providers")
    settings = suite.Settings(
        device=device,
        reps=args.reps or (20 if quick else 100),
        warmup=args.warmup if args.warmup is not None else (2 if quick else 10),
        slow_reps=args.slow_reps or (3 if quick else 10),
        time_budget=args.time_budget,
    )
    defaults = not args.shapes and not args.providers
    # Unless this whole run is already under the interpreter, where lstm_triton's rows are interpreted anyway.
    with_interpreter = defaults and not on_gpu and os.environ.get("TRITON_INTERPRET", "0") != "1"
    return Run(device, cases, settings, defaults, with_interpreter, args.threads or (None if on_gpu else 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = resolve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.device == "cpu":
        why = "--device cpu" if torch.cuda.is_available() else "No CUDA GPU found"
        what = "the requested rows on CPU"
        if run.defaults:
            what = ("the small CPU comparison (lstm_triton's CPU path, torch.nn.LSTM on CPU, the naive reference"
                    + (", and lstm_triton's Triton kernels under the interpreter as a correctness check"
                       if run.with_interpreter else "") + ")")
        print(f"{why}: running {what}. CPU timings say nothing about GPU speed.", flush=True)
    settings = run.settings
    meta = report.environment(run.device, {
        "reps": settings.reps, "warmup": settings.warmup, "slow_reps": settings.slow_reps,
        "time_budget_s": settings.time_budget, "cpu_threads": torch.get_num_threads(),
    })
    stem = report.file_stem(meta)
    print(f"{len(run.cases)} rows on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}); "
          f"writing {args.out / stem}.*", flush=True)

    progress = report.Progress(len(run.cases))

    def save(rows, row):
        progress.done(row)
        report.write_data(args.out, meta, report.finalize(rows, meta["device"]))

    rows = suite.run(run.cases, settings, on_start=lambda case: progress.start(case.label()), on_row=save)
    progress.close()
    if run.with_interpreter:
        print("Triton interpreter rows (a child process with TRITON_INTERPRET=1)...", flush=True)
        rows += suite.interpreter_rows(args.quick)
    final = report.finalize(rows, meta["device"])
    meta["complete"] = True
    paths = report.write_data(args.out, meta, final)
    print()
    print(report.format_table(final))
    print()
    if not args.no_plot:
        paths["png"] = args.out / f"{stem}.png"
        why_not = report.plot(final, paths["png"])
        if why_not:
            print(why_not)
            del paths["png"]
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    failed = [r for r in final
              if r["provider"] == "lstm_triton" and (r["status"] == "error" or r["gate_passed"] is False)]
    for r in failed:
        print(f"lstm_triton FAILED: {report.row_summary(r)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
