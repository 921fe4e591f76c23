"""The benchmark command's contract: its CLI runs, and the JSON it writes has the schema tools read.

The end-to-end test runs ``python -m benchmarks --quick --device cpu`` (the CPU comparison plus one Triton
interpreter row) in a child process; the rest check the pieces a wrong number would come from.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import report, shapes, suite
from benchmarks.__main__ import main
from benchmarks.correctness import representable
from benchmarks.timing import percentile
from helpers import REPO

TOP_LEVEL = {"device": str, "torch": str, "triton": str, "git_sha": (str, type(None)), "date": str, "rows": list}
ROW_FIELDS = ("provider", "mode", "dtype", "T", "B", "I", "H", "num_layers", "median_ms", "p10_ms", "p90_ms",
              "max_rel_err", "peak_mem_mb")


def _bench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # The command decides for itself whether to use the interpreter: don't inherit the test process's setting.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--shapes", "--dtypes", "--modes", "--providers", "--out"):
        assert option in out


def test_bad_shape_is_a_usage_error(tmp_path, capsys):
    assert main(["--device", "cpu", "--shapes", "1,2,3", "--out", str(tmp_path)]) == 2
    assert "bad shape" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_quick_cpu_run_writes_json_csv_png(tmp_path):
    proc = _bench("--quick", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "CPU" in proc.stdout  # it says plainly that this is not a GPU run

    (json_path,) = tmp_path.glob("*.json")
    doc = json.loads(json_path.read_text())
    for key, kind in TOP_LEVEL.items():
        assert isinstance(doc[key], kind), key
    assert "cuda" in doc and "cudnn" in doc
    assert doc["device"] == "cpu" and doc["complete"] is True
    assert json_path.name.startswith("cpu-" + doc["date"][:10])

    rows = doc["rows"]
    assert {r["provider"] for r in rows} == {"lstm_triton", "torch_cpu", "naive"}
    assert {r["mode"] for r in rows} == {"forward", "train"}
    for row in rows:
        for field in ROW_FIELDS:
            assert field in row, field
        assert row["dtype"] in ("float16", "bfloat16", "float32", "tf32", "float64")
        assert row["status"] == "ok", row
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["gate_passed"] is True and row["max_rel_err"] < row["err_bound"]
        assert row["peak_mem_mb"] is None  # measured on CUDA only
    interpreted = [r for r in rows if r["shape_id"] == "I-persistent"]
    assert {r["mode"] for r in interpreted} == {"forward", "train"}
    assert all(r["kernel_path"] == "persistent (interpreter)" for r in interpreted)

    (csv_path,) = tmp_path.glob("*.csv")
    with csv_path.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert set(ROW_FIELDS) <= set(csv_rows[0])
    if importlib.util.find_spec("matplotlib"):
        (png,) = tmp_path.glob("*.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shape_parsing():
    assert [s.id for s in shapes.parse_shapes(["tier1"])][:3] == ["L1-b1", "L1-b4", "L2"]
    assert shapes.parse_shapes(["F1"])[0] == shapes.Shape("F1", 1024, 16, 768, 768)
    (custom,) = shapes.parse_shapes(["64,4,32,16"])
    assert (custom.T, custom.B, custom.I, custom.H) == (64, 4, 32, 16)
    assert len(shapes.parse_shapes(["F1;F1", "F1"])) == 1
    assert len(shapes.TIER2) == 5 * 6 * 3 + 8
    with pytest.raises(ValueError):
        shapes.parse_shapes(["64,4,0,16"])
    assert shapes.parse_dtypes("bf16,tf32") == ["bfloat16", "tf32"]
    assert shapes.TIER1[0].modes == ("forward",)  # L1 is inference only
    assert shapes.Shape("x", 2, 3, 5, 7).flops("train") == 3 * 8 * 2 * 3 * 7 * (5 + 7)


def test_plan_puts_slow_providers_last_and_limits_them():
    f1, m1 = shapes.parse_shapes(["F1", "M1"])
    cases = suite.plan([f1, m1], ["forward"], ["bfloat16"], ["naive", "lstm_triton"], slow_shapes={"F1"})
    assert [(c.provider, c.shape.id) for c in cases] == [("lstm_triton", "F1"), ("lstm_triton", "M1"),
                                                         ("naive", "F1")]


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 10) == pytest.approx(1.4)
    assert percentile(xs, 90) == pytest.approx(4.6)


def test_representable_values_survive_every_dtype():
    t = representable(torch.randn(1000, dtype=torch.float64) * 10 ** torch.empty(1000).uniform_(-8, 3).double())
    assert bool((t != 0).all())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(t.to(dtype).double(), t), dtype


def test_finalize_derives_speedups_and_rates():
    base = dict(T=100, B=4, I=8, H=8, num_layers=1, mode="forward", status="ok", shape_id="s")
    rows = [dict(base, provider="lstm_triton", dtype="bfloat16", median_ms=1.0),
            dict(base, provider="cudnn", dtype="bfloat16", median_ms=3.0),
            dict(base, provider="cudnn", dtype="float16", median_ms=2.0)]
    ours = report.finalize(rows, "NVIDIA H100 80GB HBM3")[0]
    assert ours["provider"] == "lstm_triton"
    assert ours["speedup_vs_cudnn"] == pytest.approx(3.0)
    assert ours["speedup_vs_cudnn_fp16"] == pytest.approx(2.0)
    assert ours["us_per_step"] == pytest.approx(10.0)
    assert ours["tokens_per_s"] == pytest.approx(400 / 1e-3)
    assert ours["pct_peak"] == pytest.approx(100 * 8 * 100 * 4 * 8 * 16 / 1e-3 / 1e12 / 989.4)
    assert report.file_stem({"device": "NVIDIA H100 80GB HBM3", "date": "2025-01-02T03:04:05+00:00"}) == \
        "h100-80gb-hbm3-2025-01-02"
