"""The compile report (``python -m tools.compile_report``) on this machine's triton: every kernel path compiles for
the GPUs it targets, without a GPU.

The tool runs in a separate Python without TRITON_INTERPRET (this suite's conftest sets it on CPU-only
machines). Scope "smoke": per dtype, path and kernel the largest tile the dispatcher picks by itself and the
largest a caller can force, each with every switch on and off, for sm_90 and sm_80; the committed reports in
tools/reports/ cover the whole sweep and the tier-1 shapes for sm_90, sm_80, gfx942 and gfx90a.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from tools.compile_report import compile_isolated

NVIDIA = ("sm_90", "sm_80")
# Shared memory one program may use: H100/H200 227 KiB, A100 163 KiB.
SMEM_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


def _run(tmp_path, *args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "tools.compile_report", "--quiet", "--json", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode in (0, 1), proc.stderr[-6000:]  # 1: some compile failed (the tests say which)
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("compile"), "--scope", "smoke", "--targets", ",".join(NVIDIA))["results"]


def _describe(r) -> str:
    return (f"{r['kernel']} {r['dtype']} {r['tiles']} {r['target']} ({r['problem']}): {r['registers']} registers, "
            f"{r['spill_bytes']} B spilled, {r['shared_bytes']} B shared, dot {r['dot']}")


def test_every_specialization_compiles(report):
    failed = [r for r in report if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(report)} compiles failed:\n" + "\n\n".join(
        f"{r['kernel']} {r['dtype']} {r['tiles']} {r['target']}:\n{r['error']}" for r in failed)


TORCH_CONTRACT_OFF = ("HAS_RESETS", "HAS_MASK", "HAS_DCS")  # the options beyond torch.nn.LSTM


def test_dispatchable_on_chip_tiles_do_not_spill(report):
    """The persistent and cooperative kernels keep weights on chip for the whole sequence: a spill there is paid
    every step. Every tile the dispatcher picks by itself (and every tier-1 specialization: the committed
    reports) compiles without one for what torch.nn.LSTM can ask (lengths, projection, saving for backward:
    any combination). Tiles only a caller can force (larger persistent tiles, the interpreter's cooperative
    splits) may spill, and so may the largest cooperative tiles with the options beyond torch all on at once
    (resets, recurrent dropout, cell-state gradients: a few dozen bytes, listed in benchmarks/NOTES.md)."""
    spilling = [r for r in report if r["ok"] and r["path"] in ("persistent", "cooperative")
                and (r["problem"].get("auto") or r["tier1"]) and r["spill_bytes"]
                and not any(r["switches"].get(k) for k in TORCH_CONTRACT_OFF)]
    assert not spilling, "dispatchable tiles that spill (caps in lstm_triton/kernels/dispatch.py):\n" + "\n".join(
        map(_describe, spilling))


def test_shared_memory_within_the_target_limit(report):
    over = [r for r in report if r["ok"] and r["shared_bytes"] > SMEM_LIMIT[r["target"]]]
    assert not over, "\n".join(map(_describe, over))


def test_tensor_core_dtypes_lower_to_tensor_cores(report):
    """bf16, fp16 and tf32 dots reach the tensor cores (mma.sync or wgmma), never the FMA units."""
    fma = [r for r in report if r["ok"] and r["dtype"] in ("bf16", "fp16", "fp32-tf32") and r["dot"] == "fma"]
    assert not fma, "\n".join(map(_describe, fma))


def test_integer_arguments_are_specialized_like_the_launcher(report):
    """Integers are specialized as triton's launcher specializes them — a single step (T = 1) compiles with T as
    a constant, sizes divisible by 16 with the divisibility hint — so the report holds the code the GPU runs,
    not a generic variant."""
    ok = [r for r in report if r["ok"]]
    assert any(r["extra"]["integer_specialization"].get("T") == 1 for r in ok)
    assert any("H" in r["extra"]["divisible_by_16"] for r in ok)


def _abort_on_odd(job):
    if job % 2:
        print(f"assertion failed in job {job}", file=sys.stderr, flush=True)
        os.abort()  # as LLVM does on a failed assertion: no exception, the process is gone
    return dict(job=job, ok=True)


def _died(job, stderr_tail):
    return dict(job=job, ok=False, error=stderr_tail)


def test_a_compile_that_kills_its_process_is_reported_and_the_others_go_on():
    results = compile_isolated(list(range(5)), 2, compile_fn=_abort_on_odd, died_fn=_died)
    assert [(r["job"], r["ok"]) for r in results] == [(0, True), (1, False), (2, True), (3, False), (4, True)]
    assert "assertion failed in job 1" in results[1]["error"] and "job 3" in results[3]["error"]
