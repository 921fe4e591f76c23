"""The fused layer op (both kernel paths) against the float64 reference: outputs and every gradient.

Bounds, per dtype:
- float64: 1e-12 — the same arithmetic as the reference up to summation order.
- float32 (exact ``ieee`` dots), bfloat16, float16: ours must be within 2× the error that PyTorch's own LSTM
  makes in that dtype on the same problem, plus one unit roundoff of the dtype (torch's error on a given
  tensor can be small by luck; one rounding of an O(1) value is the least any implementation incurs).
"""
import pytest
import torch

from helpers import make_layer_problem, rel_err, run_with_grads
from lstm_triton import lstm_layer, lstm_layer_reference
from lstm_triton.kernels import select_config

SHAPES = [  # (T, B, I, H)
    (1, 1, 4, 16),  # a single step, a single sequence, H exactly one tile
    (5, 3, 7, 20),  # H not a power of two
    (4, 17, 8, 33),  # B not a multiple of the 16-row batch tile; H one past a power of two
    (3, 2, 5, 64),  # the largest float32 persistent tile
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
PATHS = ["persistent", "stepwise"]


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
    unit = torch.finfo(dtype).eps / 2
    errs = [rel_err(a, b) for a, b in zip(outs, ref_outs)] + [rel_err(grads[k], ref_grads[k]) for k in ref_grads]
    return [2 * e + unit for e in errs]


@pytest.mark.parametrize("path", PATHS)
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
@pytest.mark.parametrize("path", PATHS)
def test_layer_state_and_bias_options(path, bias, with_state):
    problem = make_layer_problem(3, 5, 6, 24, with_state=with_state, bias=bias)
    ref_outs, ref_grads, cot = run_with_grads(lstm_layer_reference, problem)
    outs, grads, _ = run_with_grads(lambda **a: lstm_layer(**a, path=path), problem, cot)
    assert set(grads) == set(ref_grads)
    for a, b in zip(outs, ref_outs):
        assert rel_err(a, b) < 1e-12
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-12, k


def test_paths_agree_float32():
    """The persistent and stepwise paths compute the same recurrence; only summation order differs."""
    problem = make_layer_problem(6, 19, 9, 40, dtype=torch.float32)
    outs_p, grads_p, cot = run_with_grads(lambda **a: lstm_layer(**a, path="persistent"), problem)
    outs_s, grads_s, _ = run_with_grads(lambda **a: lstm_layer(**a, path="stepwise"), problem, cot)
    for a, b in zip(outs_p, outs_s):
        assert rel_err(a, b) < 1e-6
    for k in grads_p:
        assert rel_err(grads_p[k], grads_s[k]) < 1e-6, k


@pytest.mark.parametrize("path", PATHS)
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


def test_dispatcher_choice():
    assert select_config(8, 20, torch.float32).path == "persistent"
    assert select_config(8, 64, torch.float32).path == "persistent"
    assert select_config(8, 65, torch.float32).path == "stepwise"
    # Persistent iff one program's W_hh tile (4·HP² elements) fits the on-chip budget.
    from lstm_triton.kernels.config import PERSISTENT_MAX_TILE_BYTES

    for H in (16, 20, 33, 64, 100, 128, 256, 1024):
        HP = max(16, 1 << (H - 1).bit_length())
        for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)):
            fits = 4 * HP * HP * size <= PERSISTENT_MAX_TILE_BYTES
            assert select_config(8, H, dtype).path == ("persistent" if fits else "stepwise"), (H, dtype)
    assert select_config(8, 20, torch.float32, path="stepwise").path == "stepwise"
    with pytest.raises(ValueError, match="unknown LSTM kernel path"):
        select_config(8, 20, torch.float32, path="fast")


def test_outputs_are_poisoned_before_kernels_run():
    """The guard itself: a fresh kernel output is all NaN, so an element no kernel writes cannot pass."""
    from lstm_triton.kernels._buffers import new_output

    assert torch.isnan(new_output(3, 4, dtype=torch.float32, device=torch.device("cpu"))).all()
