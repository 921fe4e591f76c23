"""The GPU job (benchmarks/run_gpu.sh) rehearsed on the CPU: every stage runs through Triton's interpreter, in
order, writes its files under the output directory and reports each benchmark row as it starts and ends."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is the CPU stand-in for the GPU job")
def test_gpu_job_rehearsal_runs_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--rehearse", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    stages = [line.split()[2] for line in log.splitlines() if line.startswith("== stage")]
    assert stages == ["a", "b", "c", "d", "e"], stages
    env_report = (tmp_path / "env.txt").read_text()
    for item in ("python", "torch", "triton", "numpy", "Python.h", "gcc"):
        assert item in env_report, item
    smoke = json.loads((tmp_path / "smoke" / "smoke.json").read_text())["results"]
    assert {r["path"] for r in smoke} == {"persistent", "cooperative", "stepwise"}
    assert all(r["ok"] and r["ran"] == [r["path"]] for r in smoke), smoke
    for stage in ("bench-core", "bench-rest-1"):
        rows = json.loads(next((tmp_path / stage).glob("*.json")).read_text())["rows"]
        assert rows and all(r["status"] == "ok" for r in rows), rows
        assert all(r.get("gate_passed") is not False for r in rows)
    assert " passed" in (tmp_path / "tests.log").read_text()
    started = [line for line in log.splitlines() if "] start " in line]
    assert len(started) >= 4, "benchmark rows must announce themselves when they start"
