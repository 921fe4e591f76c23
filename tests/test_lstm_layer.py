"""The fused layer op (both kernel paths) against the float64 reference: outputs and every gradient.

Bounds, per dtype:
- float64: 1e-12 — the same arithmetic as the reference up to summation order.
- float32 (exact ``ieee`` dots), bfloat16, float16: ours must be within 2× the error that PyTorch's own LSTM
  makes in that dtype on the same problem, plus one unit roundoff of the dtype (torch's error on a given
  tensor can be small by luck; one rounding of an O(1) value is the least any implementation incurs).
"""
import pytest
import torch

from helpers import DEVICE, KERNEL_PATHS, make_layer_problem, rel_err, run_with_grads
from lstm_triton import lstm_layer, lstm_layer_reference
from lstm_triton.kernels import cooperative, per_direction, plan_lstm
from lstm_triton.kernels.dispatch import PathUnavailable

SHAPES = [  # (T, B, I, H)
    (1, 1, 4, 16),  # a single step, a single sequence, H exactly one tile
    (5, 3, 7, 20),  # H not a power of two
    (4, 17, 8, 33),  # B not a multiple of the 16-row batch tile; H one past a power of two
    (3, 2, 5, 64),  # a 64-unit tile: persistent only when forced
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def shape_id(s):
    return "T{}-B{}-I{}-H{}".format(*s)


def torch_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """PyTorch's own LSTM (CPU: torch._VF.lstm), the yardstick for low-precision error."""
    y, h, c = torch._VF.lstm(x, (h0[None], c0[None]), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, False)
    return y, h[0], c[0]


def _bounds(problem_lp, ref_outs, ref_grads, cotangents, dtype):
    if dtype == torch.float64:
        n = 3 + len(ref_grads)
        return [1e-12] * n
    outs, grads, _ = run_with_grads(torch_lstm_layer, problem_lp, cotangents)
    # Twice torch's own error plus a rounding; two roundings for the weight and bias gradients, GEMMs over the
    # gate gradients after the recurrence: at T = B = 1 they hold single products whose error torch can
    # undercut by luck (float32, twelve seeds: every path's dW_ih within 0.62-1.06 of 2·torch + one rounding,
    # torch's dW_ih error below its own gate-gradient error).
    rounding = torch.finfo(dtype).eps / 2
    errs = [rel_err(a, b) for a, b in zip(outs, ref_outs)] + [rel_err(grads[k], ref_grads[k]) for k in ref_grads]
    units = [rounding] * len(outs) + [2 * rounding if k.startswith(("w_", "b_")) else rounding for k in ref_grads]
    return [2 * e + unit for e, unit in zip(errs, units)]


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_layer_matches_reference(shape, dtype, path):
    problem64 = make_layer_problem(*shape)
    ref_outs, ref_grads, cot = run_with_grads(lstm_layer_reference, problem64)
    problem = make_layer_problem(*shape, dtype=dtype)
    outs, grads, _ = run_with_grads(lambda **a: lstm_layer(**a, path=path), problem, cot)

    for o, r in zip(outs, ref_outs):
        assert o.dtype == dtype and o.shape == r.shape
    names = ["y", "h_n", "c_n"] + [f"d{k}" for k in ref_grads]
    errs = [rel_err(a, b) for a, b in zip(outs, ref_outs)] + [rel_err(grads[k], ref_grads[k]) for k in ref_grads]
    bounds = _bounds(problem if dtype != torch.float64 else None, ref_outs, ref_grads, cot, dtype)
    failures = [f"{n}: {e:.2e} > {b:.2e}" for n, e, b in zip(names, errs, bounds) if not e <= b]
    assert not failures, failures


@pytest.mark.parametrize("with_state", [True, False], ids=["h0c0", "no-state"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_layer_state_and_bias_options(path, bias, with_state):
    problem = make_layer_problem(3, 5, 6, 24, with_state=with_state, bias=bias)
    ref_outs, ref_grads, cot = run_with_grads(lstm_layer_reference, problem)
    outs, grads, _ = run_with_grads(lambda **a: lstm_layer(**a, path=path), problem, cot)
    assert set(grads) == set(ref_grads)
    for a, b in zip(outs, ref_outs):
        assert rel_err(a, b) < 1e-12
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-12, k


@pytest.mark.parametrize("path", ["cooperative", "stepwise"])
def test_paths_agree_float32(path):
    """Every path computes the same recurrence; only summation order differs."""
    problem = make_layer_problem(6, 19, 9, 40, dtype=torch.float32)
    outs_p, grads_p, cot = run_with_grads(lambda **a: lstm_layer(**a, path="persistent"), problem)
    outs_s, grads_s, _ = run_with_grads(lambda **a: lstm_layer(**a, path=path), problem, cot)
    for a, b in zip(outs_p, outs_s):
        assert rel_err(a, b) < 1e-6
    for k in grads_p:
        assert rel_err(grads_p[k], grads_s[k]) < 1e-6, k


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck_float64(path, bias):
    p = make_layer_problem(3, 2, 2, 3, bias=bias)
    names = [n for n, t in p.items() if t is not None]
    inputs = tuple(p[n].clone().requires_grad_() for n in names)

    def fn(*args):
        return lstm_layer(**dict(zip(names, args)), path=path)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_only_input_requires_grad():
    p = make_layer_problem(3, 2, 4, 8)
    x = p["x"].clone().requires_grad_()
    y, h, c = lstm_layer(x, p["h0"], p["c0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    (dx,) = torch.autograd.grad(y.sum() + c.sum(), [x])
    x_ref = p["x"].clone().requires_grad_()
    y_r, h_r, c_r = lstm_layer_reference(x_ref, p["h0"], p["c0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    (dx_ref,) = torch.autograd.grad(y_r.sum() + c_r.sum(), [x_ref])
    assert rel_err(dx, dx_ref) < 1e-12


def test_no_grad_forward_saves_nothing_and_matches():
    p = make_layer_problem(4, 3, 5, 20)
    with torch.no_grad():
        outs = lstm_layer(**p)
    ref = lstm_layer_reference(**p)
    for a, b in zip(outs, ref):
        assert rel_err(a, b) < 1e-12


def test_cooperative_split_is_real():
    """Under the interpreter the cooperative plan takes the smallest tiles, so the test sizes really split the
    hidden units over several programs (the exchange, the step counters and the waits all run): H = 33 gives
    9 forward programs of 4 units and 3 backward programs of 16 per batch tile."""
    plan = plan_lstm(17, 33, torch.float64, path="cooperative")
    assert (plan.block_h, plan.block_h_bwd) == (4, 16)
    assert plan.grid(17, 33, 1) == (2, 9, 1) and plan.grid(17, 33, 1, backward=True) == (2, 3, 1)


def test_cooperative_split_reduction_matches_reference(monkeypatch):
    """At HP ≥ 128 the cooperative forward splits its reduction over h into independent dots (K_SPLIT 2 or 4);
    H = 130 (HP = 256: four dots of 64) against the float64 reference, outputs and every gradient. (Float64
    W_hh slices over HP = 256 are larger than the GPU budgets, which the test widens: the budget is about
    compiled registers, not about what this checks.)"""
    from lstm_triton.kernels import dispatch
    from lstm_triton.kernels.cooperative import k_split

    monkeypatch.setattr(dispatch, "COOPERATIVE_MAX_TILE_BYTES", 128 * 1024)
    monkeypatch.setattr(dispatch, "COOPERATIVE_MAX_TILE_BYTES_BWD", 512 * 1024)
    assert k_split(plan_lstm(2, 130, torch.float64, path="cooperative").block_p) == 4
    p = make_layer_problem(2, 2, 3, 130)
    ref_outs, ref_grads, cot = run_with_grads(lstm_layer_reference, p)
    outs, grads, _ = run_with_grads(lambda **a: lstm_layer(**a, path="cooperative"), p, cot)
    for a, b in zip(outs, ref_outs):
        assert rel_err(a, b) < 1e-12
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-12, k


def test_cooperative_wait_is_bounded(monkeypatch):
    """A program that never sees the step it waits for turns the wait into an error instead of hanging: run
    step 1 without step 0 ever having published h. The outputs of the failed launch are NaN."""
    monkeypatch.setenv(cooperative.TIMEOUT_ENV, "0.02")  # 20 polls under the interpreter
    p = make_layer_problem(2, 3, 4, 33, dtype=torch.float32)
    plan = plan_lstm(3, 33, torch.float32, path="cooperative")
    gx = torch.randn(1, 2, 3, 4 * 33, device=DEVICE)
    w = per_direction([torch.randn(4 * 33, 33, device=DEVICE)])
    monkeypatch.setattr(cooperative, "_step_ranges", lambda T: [(1, 2)])
    with pytest.raises(RuntimeError, match="timed out waiting for another program"):
        cooperative.forward(plan, gx, w, None, p["h0"][None], p["c0"][None], None, None, None, save=False)


def test_dispatcher_choice():
    # A single step without projection: the one fused stepwise kernel.
    assert plan_lstm(8, 16, torch.float32, T=1).fused_step
    assert not plan_lstm(8, 16, torch.float32, T=1, proj_size=8).fused_step
    # Persistent up to the spill-free caps: HP ≤ 32 in 16-bit without projection, else HP (and PP) ≤ 16.
    assert plan_lstm(8, 16, torch.float32).path == "persistent"
    assert plan_lstm(8, 17, torch.float32).path == "stepwise"
    assert plan_lstm(8, 32, torch.bfloat16).path == "persistent"
    assert plan_lstm(8, 33, torch.float16).path == "stepwise"
    assert plan_lstm(8, 32, torch.bfloat16, proj_size=8).path == "stepwise"
    assert plan_lstm(8, 16, torch.bfloat16, proj_size=8).path == "persistent"
    assert plan_lstm(8, 20, torch.float32, path="stepwise").path == "stepwise"
    # Cooperative only when the whole grid can be resident (and never with a projection); the smallest tiles
    # whose grid fits, so the most SMs share W_hh.
    plan = plan_lstm(16, 1024, torch.bfloat16, resident_programs=132)
    assert (plan.path, plan.block_h, plan.block_h_bwd, plan.num_warps) == ("cooperative", 8, 16, 4)
    assert plan.programs(16, 1024, 1) == 128
    assert plan_lstm(16, 768, torch.bfloat16, resident_programs=132).grid(16, 768, 1) == (1, 96, 1)
    assert plan_lstm(16, 1024, torch.bfloat16, resident_programs=0).path == "stepwise"
    assert plan_lstm(256, 1024, torch.bfloat16, resident_programs=132).path == "stepwise"
    assert plan_lstm(16, 1024, torch.bfloat16, proj_size=256, resident_programs=132).path == "stepwise"
    assert plan_lstm(16, 1024, torch.float32, resident_programs=132).path == "stepwise"  # W slices too big
    # Exact float32 dots are FMA, not tensor-core, and spill on the cooperative tile: never chosen for it.
    assert plan_lstm(16, 256, torch.float32, resident_programs=132).path == "stepwise"
    assert plan_lstm(16, 128, torch.float32, allow_tf32=True, resident_programs=132).path == "cooperative"
    assert plan_lstm(16, 129, torch.float32, allow_tf32=True, resident_programs=132).path == "stepwise"
    with pytest.raises(ValueError, match="unknown LSTM kernel path"):
        plan_lstm(8, 20, torch.float32, path="fast")
    with pytest.raises(ValueError, match="cooperative LSTM path cannot run"):
        plan_lstm(8, 20, torch.float32, path="cooperative", proj_size=4)
    with pytest.raises(ValueError, match="resident"):
        plan_lstm(256, 1024, torch.bfloat16, path="cooperative", resident_programs=132)
    # The device's shared memory per program bounds the slice with its staged operands: bf16 HP = 1024
    # backward takes 192 KB, within an H100's 227 KB, beyond an A100's 163 KB (HP = 512 takes 96 KB).
    for H, shared, path in ((576, 227 * 1024, "cooperative"), (576, 163 * 1024, "stepwise"),
                            (512, 163 * 1024, "cooperative")):
        assert plan_lstm(16, H, torch.bfloat16, resident_programs=108, shared_memory_per_program=shared).path == path


def test_forced_persistent_tiles_are_capped_where_the_compiler_fails(monkeypatch):
    """Compiled, a forced persistent tile is capped at HP = 64 for tensor-core dots and at the dispatcher's own
    cap, 16, for exact float32 and float64 (see PERSISTENT_FORCED_MAX); the interpreter runs any of them."""
    from lstm_triton.kernels import dispatch

    monkeypatch.setattr(dispatch, "interpreter_active", lambda: True)
    assert plan_lstm(8, 64, torch.float32, path="persistent").block_h == 64
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: False)
    assert plan_lstm(8, 64, torch.bfloat16, path="persistent").block_h == 64
    assert plan_lstm(8, 64, torch.float32, allow_tf32=True, path="persistent").block_h == 64
    assert plan_lstm(8, 16, torch.float32, path="persistent").block_h == 16
    assert plan_lstm(8, 16, torch.float64, path="persistent").block_h == 16
    for H, dtype in ((17, torch.float32), (17, torch.float64)):
        with pytest.raises(PathUnavailable, match="persistent LSTM path"):
            plan_lstm(8, H, dtype, path="persistent")


def test_plan_round_trips_and_the_backward_runs_the_forwards_plan(monkeypatch):
    """The plan travels through the custom op as a string; a one-step call with a small H runs the fused
    stepwise kernel forward, and its backward runs the stepwise kernel too (never re-planned)."""
    from lstm_triton.kernels import LSTMPlan, persistent, stepwise

    plan = plan_lstm(5, 12, torch.float32, T=1)
    assert LSTMPlan.decode(plan.encode()) == plan
    ran = []
    for module, name in ((stepwise, "_stepwise_bwd_kernel"), (persistent, "_persistent_bwd_kernel")):
        real = getattr(module, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                return lambda *a, **k: ran.append(name) or real[grid](*a, **k)

        monkeypatch.setattr(module, name, Spy())
    p = make_layer_problem(1, 5, 3, 12)
    run_with_grads(lstm_layer, p)
    assert ran and set(ran) == {"_stepwise_bwd_kernel"}


def test_outputs_are_poisoned_before_kernels_run():
    """The guard itself: a fresh kernel output is all NaN, so an element no kernel writes cannot pass."""
    from lstm_triton.kernels.buffers import new_output

    assert torch.isnan(new_output(3, 4, dtype=torch.float32, device=torch.device(DEVICE))).all()


FEATURES = [
    dict(proj=0, lengths=None, reverse=False),
    dict(proj=5, lengths=None, reverse=False),
    dict(proj=0, lengths=[4, 1, 3, 4, 2], reverse=False),
    dict(proj=0, lengths=[4, 1, 3, 4, 2], reverse=True),
    dict(proj=5, lengths=[2, 4, 1, 3, 4], reverse=True),
    dict(proj=17, lengths=None, reverse=True),  # P > 16: more than one P tile in the stepwise reduction
]


def feature_id(f):
    return f"proj{f['proj']}-{'lengths' if f['lengths'] else 'full'}-{'rev' if f['reverse'] else 'fwd'}"


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("feat", FEATURES, ids=feature_id)
def test_layer_projection_lengths_reverse(feat, path):
    if path == "cooperative" and feat["proj"]:
        pytest.skip("the cooperative path takes no projection (the dispatcher never sends one there)")
    T, B, I, H = 4, 5, 3, 20
    p = make_layer_problem(T, B, I, H)
    g = torch.Generator().manual_seed(3)
    P = feat["proj"] or H
    if feat["proj"]:
        p["w_hr"] = ((torch.rand(P, H, generator=g, dtype=torch.float64) * 2 - 1) * H ** -0.5).to(DEVICE)
        p["h0"] = torch.randn(B, P, generator=g, dtype=torch.float64).to(DEVICE)
        p["w_hh"] = ((torch.rand(4 * H, P, generator=g, dtype=torch.float64) * 2 - 1) * H ** -0.5).to(DEVICE)
    lengths = feat["lengths"]

    def ours(**a):
        lens = None if lengths is None else torch.tensor(lengths, device=DEVICE)
        return lstm_layer(**a, lengths=lens, reverse=feat["reverse"], path=path)

    def ref(**a):
        return lstm_layer_reference(**a, lengths=lengths, reverse=feat["reverse"])

    ref_outs, ref_grads, cot = run_with_grads(ref, p)
    outs, grads, _ = run_with_grads(ours, p, cot)
    for name, a, b in zip(("y", "h_n", "c_n"), outs, ref_outs):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12, name
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-12, k


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_two_directions_in_one_launch_match_separate_runs(path):
    from lstm_triton import lstm_layer_directions

    fwd, rev = make_layer_problem(3, 4, 5, 12, seed=1), make_layer_problem(3, 4, 5, 12, seed=2)
    x = fwd["x"]
    weights = [tuple(q[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")) + (None,) for q in (fwd, rev)]
    h0, c0 = torch.stack([fwd["h0"], rev["h0"]]), torch.stack([fwd["c0"], rev["c0"]])
    y, h_n, c_n = lstm_layer_directions(x, h0, c0, weights, path=path)
    y_f, h_f, c_f = lstm_layer_reference(x, fwd["h0"], fwd["c0"], *weights[0][:4])
    y_r, h_r, c_r = lstm_layer_reference(x, rev["h0"], rev["c0"], *weights[1][:4], reverse=True)
    assert rel_err(y, torch.cat([y_f, y_r], -1)) < 1e-12
    assert rel_err(h_n, torch.stack([h_f, h_r])) < 1e-12 and rel_err(c_n, torch.stack([c_f, c_r])) < 1e-12


def test_double_backward_through_the_op():
    p = make_layer_problem(2, 2, 2, 3)
    names = [n for n, t in p.items() if t is not None]
    inputs = tuple(p[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradgradcheck(lambda *a: lstm_layer(**dict(zip(names, a))), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_recompute_option_gives_the_same_gradients(path):
    p = make_layer_problem(4, 3, 5, 20, dtype=torch.float32)
    outs, grads, cot = run_with_grads(lambda **a: lstm_layer(**a, path=path), p)
    outs_r, grads_r, _ = run_with_grads(lambda **a: lstm_layer(**a, path=path, recompute=True), p, cot)
    for a, b in zip(outs, outs_r):
        assert torch.equal(a, b)
    for k in grads:
        assert torch.equal(grads[k], grads_r[k]), k


def test_tf32_only_when_asked_or_allowed(monkeypatch):
    """float32 is exact ('ieee') by default; TF32 follows torch.backends.cuda.matmul.allow_tf32 or the argument."""
    import lstm_triton.ops as ops

    assert plan_lstm(8, 20, torch.float32).dot_precision == "ieee"
    assert plan_lstm(8, 20, torch.float32, allow_tf32=True).dot_precision == "tf32"
    assert plan_lstm(8, 20, torch.bfloat16, allow_tf32=True).dot_precision == "ieee"
    seen = []
    real = ops.plan_lstm
    monkeypatch.setattr(ops, "plan_lstm", lambda *a, **k: seen.append(k["allow_tf32"]) or real(*a, **k))
    p = make_layer_problem(2, 2, 3, 16, dtype=torch.float32)
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        with torch.no_grad():
            torch.backends.cuda.matmul.allow_tf32 = False
            lstm_layer(**p)
            torch.backends.cuda.matmul.allow_tf32 = True
            lstm_layer(**p)
            lstm_layer(**p, allow_tf32=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag
    assert seen == [False, True, False]
