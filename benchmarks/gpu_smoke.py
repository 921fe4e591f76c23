"""``python -m benchmarks.gpu_smoke --out DIR``: every kernel path once, forward and backward against float64.

Stage b of ``benchmarks/run_gpu.sh``: before anything long runs on a GPU, each path the dispatcher can take —
persistent, cooperative (one multi-step launch on a GPU), stepwise and the fused single step — runs a small
problem with every option it takes (lengths, two directions, segment resets, recurrent-dropout mask, cell
states), and its outputs and every gradient are compared with the float64 reference. The path is forced and
then checked against what the op reports it ran (``lstm_triton.recorded_plans``), and on a GPU the forward's
kernel launches are counted (one per call on the persistent and cooperative paths). Waits are bounded short
(``LSTM_TRITON_WAIT_TIMEOUT_MS``, checked after every launch), so a cooperative grid that cannot make progress
fails its case in well under a second instead of hanging the stage.

Each case prints a line when it starts and when it ends, and the results go to ``DIR/smoke.json`` after every
case. ``--rehearse`` runs the same cases, shrunk, through Triton's CPU interpreter. Exit status 1 if any case
failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("LSTM_TRITON_WAIT_TIMEOUT_MS", "200")
os.environ.setdefault("LSTM_TRITON_SYNC_CHECKS", "1")

# Bounds on max |ours − ref64| / max(1, max |ref64|) over outputs and gradients: the benchmark's gate bounds.
BOUNDS = {"bfloat16": 1e-2, "float16": 5e-3, "tf32": 2e-3, "float32": 1e-5, "float64": 1e-10}


@dataclass
class Case:
    name: str
    path: str
    T: int
    B: int
    I: int
    H: int
    D: int
    dtype: str
    options: dict = field(default_factory=dict)  # lengths, resets, mask, cells, proj


CASES = [
    Case("persistent bf16 two directions", "persistent", 32, 5, 24, 32, 2, "bfloat16"),
    Case("persistent fp32 every option", "persistent", 12, 5, 7, 16, 2, "float32",
         dict(lengths=True, resets=True, mask=True, cells=True)),
    Case("persistent fp64 projection", "persistent", 6, 3, 5, 16, 1, "float64", dict(proj=8, lengths=True)),
    Case("cooperative bf16", "cooperative", 64, 16, 64, 256, 1, "bfloat16"),
    Case("cooperative fp16 every option", "cooperative", 16, 17, 40, 200, 2, "float16",
         dict(lengths=True, resets=True, mask=True, cells=True)),
    Case("cooperative tf32", "cooperative", 32, 8, 48, 96, 1, "tf32"),
    Case("stepwise bf16 two directions", "stepwise", 16, 5, 24, 300, 2, "bfloat16", dict(lengths=True)),
    Case("stepwise fp32 projection, every option", "stepwise", 8, 4, 9, 40, 2, "float32",
         dict(proj=12, lengths=True, resets=True, mask=True, cells=True)),
    Case("fused single step fp32", "stepwise", 1, 6, 11, 48, 1, "float32"),
]


def shrunk(case: Case) -> Case:
    """The same case at interpreter size (programs run one after another in Python there)."""
    H = min(case.H, 40 if case.path != "persistent" else case.H)
    return Case(case.name, case.path, min(case.T, 4), min(case.B, 5), min(case.I, 8), H, case.D, case.dtype,
                case.options)


def run_case(case: Case, device: str) -> dict:
    import torch

    import lstm_triton
    from lstm_triton.profiling import call_work

    tf32 = case.dtype == "tf32"
    dtype = torch.float32 if tf32 else getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    H, D, T, B, I = case.H, case.D, case.T, case.B, case.I
    P = case.options.get("proj") or H
    k = H ** -0.5
    u = lambda *s: (torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1) * k  # noqa: E731
    weights64 = [[u(4 * H, I), u(4 * H, P), u(4 * H), u(4 * H)] + ([u(P, H)] if case.options.get("proj") else [])
                 for _ in range(D)]
    x64 = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h064 = torch.randn(D, B, P, generator=g, dtype=torch.float64) * 0.5
    c064 = torch.randn(D, B, H, generator=g, dtype=torch.float64) * 0.5
    lengths = torch.randint(1, T + 1, (B,), generator=g) if case.options.get("lengths") else None
    if lengths is not None:
        lengths[0] = T
    resets = (torch.rand(T, B, generator=g) < 0.25) if case.options.get("resets") else None
    mask64 = ((torch.rand(D, B, P, generator=g) < 0.8).double() / 0.8) if case.options.get("mask") else None
    cells = bool(case.options.get("cells"))

    def run(x, h0, c0, ws, mask, dev, reference):
        lens = None if lengths is None else lengths.to(dev)
        r = None if resets is None else resets.to(dev)
        wd = [(w[0], w[1], w[2], w[3], w[4] if len(w) > 4 else None) for w in ws]
        if reference:
            return lstm_triton.lstm_layer_directions_reference(x, h0, c0, wd, lengths=lens, resets=r,
                                                               dropout_mask=mask, return_cell_states=cells)
        return lstm_triton.lstm_layer_directions(x, h0, c0, wd, lengths=lens, resets=r, dropout_mask=mask,
                                                 return_cell_states=cells, path=case.path, allow_tf32=tf32)

    def with_grads(dev, dt, reference):
        leaves = [t.to(dev, dt).requires_grad_() for t in (x64, h064, c064, *[w for ws in weights64 for w in ws])]
        x, h0, c0, *flat = leaves
        n = len(weights64[0])
        ws = [flat[d * n:(d + 1) * n] for d in range(D)]
        mask = None if mask64 is None else mask64.to(dev, dt)
        outs = run(x, h0, c0, ws, mask, dev, reference)
        cot = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=cot, dtype=torch.float64).to(dev)).sum()
                   for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves)), (x, h0, c0, ws, mask)

    ref, _ = with_grads("cpu", torch.float64, reference=True)
    with lstm_triton.recorded_plans() as plans:
        ours, inputs = with_grads(device, dtype, reference=False)
    ran = sorted({p.path for p in plans})
    errors = [((a.double().cpu() - b).abs().max() / b.abs().max().clamp(min=1.0)).item() if b.numel() else 0.0
              for a, b in zip(ours, ref)]
    result = dict(case=case.name, path=case.path, ran=ran, dtype=case.dtype, T=T, B=B, I=I, H=H, D=D,
                  options=case.options, max_rel_err=max(errors), bound=BOUNDS[case.dtype],
                  plan=plans[0].encode() if plans else None)
    if device == "cuda":
        x, h0, c0, ws, mask = inputs
        with torch.no_grad():
            work = call_work(lambda: run(x, h0, c0, ws, mask, device, reference=False))
        result["forward_launches"] = work.kernel_launches
    problems = []
    if ran != [case.path]:
        problems.append(f"ran {ran}, forced {case.path}")
    if not max(errors) <= BOUNDS[case.dtype]:
        problems.append(f"max relative error {max(errors):.2e} > {BOUNDS[case.dtype]:.0e}")
    if device == "cuda" and case.path in ("persistent", "cooperative") and result["forward_launches"] != 1:
        problems.append(f"{result['forward_launches']} forward launches, expected one")
    result.update(ok=not problems, problems=problems)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rehearse", action="store_true", help="shrunk cases through Triton's CPU interpreter")
    args = p.parse_args(argv)
    if args.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.rehearse else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("no GPU and no --rehearse: nothing to smoke-test", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, case in enumerate(CASES):
        case = shrunk(case) if args.rehearse else case
        label = f"[{i + 1}/{len(CASES)}] {case.name} (T={case.T} B={case.B} H={case.H} D={case.D})"
        print(f"{label}: start", flush=True)
        t0 = time.perf_counter()
        try:
            result = run_case(case, device)
        except Exception as e:  # noqa: BLE001 (one failing path must not hide the others)
            traceback.print_exc()
            result = dict(case=case.name, path=case.path, ok=False, problems=[f"{type(e).__name__}: {e}"[:800]])
        result["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(result)
        (args.out / "smoke.json").write_text(json.dumps(dict(device=device, results=results), indent=1))
        status = "ok" if result["ok"] else "FAILED: " + "; ".join(result["problems"])
        err = f" max err {result['max_rel_err']:.1e}" if "max_rel_err" in result else ""
        print(f"{label}: {status}{err} ({result['seconds']} s)", flush=True)
    failed = [r for r in results if not r["ok"]]
    print(f"smoke: {len(results) - len(failed)} of {len(results)} cases passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
