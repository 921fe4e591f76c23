"""Every kernel specialization the dispatcher can choose compiles for sm_90 and sm_80, on a machine without a GPU.

The specializations come from ``select_config`` and the launchers themselves (see tests/compile_targets.py); the
compile runs in a separate Python without TRITON_INTERPRET (this suite's conftest sets it on CPU-only machines).
The table of registers / spills / shared memory / dot lowering is printed (``pytest -s``) and written as JSON to
``$LSTM_TRITON_COMPILE_REPORT`` when that is set.
"""
from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

import compile_targets as ct
from lstm_triton.kernels.config import persistent_fits


@pytest.fixture(scope="module")
def report():
    try:
        rep = ct.collect_in_subprocess()
    except ct.CompileAPIMissing as e:
        pytest.skip(f"the installed triton cannot compile for a GPU target here: {e}")
    print("\n" + ct.format_table(rep))
    path = os.environ.get(ct.REPORT_ENV)
    if path:
        ct.write_report(rep, path)
    return rep


def _describe(r) -> str:
    return (f"{r['name']} sm_{r['arch']}: {r['n_regs']} regs, spill stores/loads {r['spill_stores']}/"
            f"{r['spill_loads']} B, stack {r['stack_bytes']} B, smem {r['shared']} B, dot {r['dot']}")


def test_every_specialization_compiles(report):
    failed = [r for r in report["results"] if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(report['results'])} compiles failed:\n" + "\n\n".join(
        f"{r['name']} sm_{r['arch']}:\n{r['error']}" for r in failed)


def _persistent_tiles_admitted(dtype) -> tuple[set, set]:
    """(HP without projection, (HP, PP) with one) the persistence rule admits, from persistent_fits itself."""
    plain, proj, hp = set(), set(), 16
    takes_proj = "proj_size" in inspect.signature(persistent_fits).parameters
    while hp <= 1 << 16:
        if persistent_fits(hp, dtype):
            plain.add(hp)
        pp = 16
        while takes_proj and pp <= hp:
            # a projection is smaller than H: P = pp, or pp - 1 when it pads to H's own tile
            if persistent_fits(hp, dtype, proj_size=pp if pp < hp else pp - 1):
                proj.add((hp, pp))
            pp *= 2
        hp *= 2
    return plain, proj


def test_every_launcher_option_is_exercised(report):
    """A launcher option the enumeration never passes hides the kernel specializations it selects."""
    missing = report.get("unexercised_launcher_options", [])
    assert not missing, ("launcher options tests/compile_targets.py never passes — teach _launch_all() to pass "
                         "them so the specializations they select get compiled: " + ", ".join(missing))


def test_covers_every_dispatcher_config(report):
    """The sweep found every persistent tile the rule admits, and every recorded configuration and switch value
    was compiled for every target."""
    recorded = report["recorded"]
    for mode, dtype_name, _ in ct.DTYPE_MODES:
        plain, proj = _persistent_tiles_admitted(getattr(torch, dtype_name))
        mine = [s for s in recorded if s["mode"] == mode and s["config"]["path"] == "persistent"]
        got_plain = {s["config"]["block_h"] for s in mine if any(not f["proj"] for f in s["features"])}
        got_proj = {(s["config"]["block_h"], s["config"].get("block_p")) for s in mine
                    if any(f["proj"] for f in s["features"])}
        assert got_plain == plain, f"{mode}: persistent tiles found {sorted(got_plain)}, rule admits {sorted(plain)}"
        if proj:
            assert got_proj == proj, f"{mode}: projected persistent tiles {sorted(got_proj)}, rule admits {sorted(proj)}"
        assert any(s["mode"] == mode and s["config"]["path"] == "stepwise" for s in recorded), \
            f"{mode}: no stepwise configuration found"

    def configs(specs):
        return {json.dumps([s["mode"], s["config"], s["kernel"]], sort_keys=True) for s in specs}

    for arch in report["archs"]:
        compiled = [r["spec"] for r in report["results"] if r["arch"] == arch]
        missing_configs = sorted(configs(recorded) - configs(compiled))
        assert not missing_configs, f"sm_{arch}: configurations never compiled: {missing_configs[:10]}"
        # every value of every constexpr, per dtype mode and path (the covering subset's promise)
        by_path = lambda spec: {(spec["mode"], spec["config"]["path"], spec["kernel"], k, json.dumps(v))  # noqa: E731
                                for k, v in spec["constexprs"].items()}
        missing = sorted(set().union(*map(by_path, recorded)) - set().union(*map(by_path, compiled)))
        assert not missing, f"sm_{arch}: constexpr values recorded but never compiled: {missing[:20]}"


_ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def _weight_tile_bytes(spec) -> int:
    """Bytes of one program's on-chip weight tile: persistent W_hh [4·HP, PP] (+ W_hr [PP, HP] with a projection);
    cooperative the 4·BLOCK_H rows of W_hh over all HP (= BLOCK_K) columns."""
    c = spec["constexprs"]
    if spec["config"]["path"] == "cooperative":
        elements = 4 * c["BLOCK_H"] * c["BLOCK_K"]
    else:
        hp, pp = c["BLOCK_H"], c.get("BLOCK_P", c["BLOCK_H"])
        elements = 4 * hp * pp + (pp * hp if c.get("HAS_PROJ") else 0)
    return elements * _ELEMENT_BYTES[spec["mode"].split("-")[0]]


def test_persistent_path_does_not_spill(report):
    """The persistent kernels hold W_hh in registers for all T steps: a spill there is paid every step, so the
    caps in config.py (persistent_fits) must admit only tiles they hold without spilling. (Spills of the other
    paths are recorded in the report, not asserted.)"""
    on_chip = [r for r in report["results"] if r["ok"] and r["spec"]["config"]["path"] in ct.ON_CHIP_PATHS]
    spilling = [r for r in on_chip if r["n_spills"]]
    if not spilling:
        return
    summary = []
    for path, mode in dict.fromkeys((r["spec"]["config"]["path"], r["spec"]["mode"]) for r in on_chip):
        mine = [r for r in on_chip if (r["spec"]["config"]["path"], r["spec"]["mode"]) == (path, mode)]
        ok = [_weight_tile_bytes(r["spec"]) for r in mine if not r["n_spills"]]
        bad = [_weight_tile_bytes(r["spec"]) for r in mine if r["n_spills"]]
        if bad:
            summary.append(f"  {path} {mode}: spills from a {min(bad)} B weight tile; largest spill-free tile "
                           f"{max(ok, default=0)} B")
    pytest.fail(
        f"the persistent path spills registers (caps in lstm_triton/kernels/config.py:persistent_fits) in "
        f"{len(spilling)} of {len(on_chip)} compiles; lower the caps or "
        "shrink the kernels' live state.\n" + "\n".join(summary) + "\n"
        + "\n".join(f"{_describe(r)}, weight tile {_weight_tile_bytes(r['spec'])} B" for r in spilling),
        pytrace=False)


def test_shared_memory_within_target_limit(report):
    over = [r for r in report["results"] if r["ok"] and r["shared"] > ct.SMEM_LIMIT[r["arch"]]]
    assert not over, "shared memory over the per-block limit (sm_90: 227 KiB, sm_80: 163 KiB):\n" + "\n".join(
        f"{_describe(r)} > {ct.SMEM_LIMIT[r['arch']]} B" for r in over)


def test_register_counts_are_those_of_the_built_cubin(report):
    """The register count read from the ptxas -v log must be the one in the cubin triton built."""
    differ = [r for r in report["results"]
              if r["ok"] and r["extra"].get("cubin_regs") is not None and r["extra"]["cubin_regs"] != r["n_regs"]]
    assert not differ, "\n".join(f"{r['name']} sm_{r['arch']}: ptxas -v {r['n_regs']} regs, "
                                 f"cubin {r['extra']['cubin_regs']}" for r in differ)
