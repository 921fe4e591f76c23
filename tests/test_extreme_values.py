"""Non-finite and extreme values: NaN / ±Inf propagate exactly like ``torch.nn.LSTM``; huge values saturate.

A NaN / ±Inf in the input or hx makes outputs and gradients non-finite exactly where torch's are, leaving every
other sequence of the batch bitwise untouched; pre-activations of ±1e4 saturate the gates on both kernel paths in
every dtype with finite results and no floating-point overflow inside the kernels (numpy raises on one under the
interpreter); the kernels' σ and tanh never overflow for any finite input and give the exact limits at ±max and
±inf; random inputs carrying entries up to float64's max stay finite and equal torch's.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (CUDA, DEVICE, F32, F64, SLOW, forward_backward, lstm_config, module_pair, random_cotangents,
                     rel_err, source_seed, valid_shapes)
from lstm_triton import lstm_layer, lstm_layer_reference
from lstm_triton.kernels import common as kernel_common


NONFINITE_CONFIGS = {
    "1-layer-float32": (dict(), F32),
    "2-layer-bidirectional-proj-float64": (dict(num_layers=2, bidirectional=True, proj_size=3), F64),
}
NONFINITE_CASES = [
    ("1-layer-float32", where, value)
    for where, value in [("x", math.nan), ("x", math.inf), ("x", -math.inf), ("h0", math.nan), ("h0", math.inf),
                         ("c0", math.nan), ("c0", math.inf), ("c0", -math.inf)]
] + [
    ("2-layer-bidirectional-proj-float64", where, value)
    for where, value in [("x", math.nan), ("x", math.inf), ("h0", math.nan), ("h0", -math.inf), ("c0", math.inf)]
]


@pytest.mark.parametrize("config,where,value", NONFINITE_CASES, ids=lambda v: str(v))
def test_non_finite_values_propagate_like_torch(config, where, value):
    """A NaN/±Inf in sequence b of the input (at step t) or of h0/c0 (layer l): the outputs and the gradients
    are non-finite exactly where torch's are (NaN where NaN, ±Inf where ±Inf), the finite entries match torch,
    and every other sequence of the batch is bitwise what it is without the bad value."""
    kwargs, dtype = NONFINITE_CONFIGS[config]
    ours, ref = module_pair(3, 5, dtype=dtype, **kwargs)
    T, B, b, t = 5, 4, 1, 2
    LD = ref.num_layers * (2 if ref.bidirectional else 1)
    P = ref.proj_size or ref.hidden_size
    g = torch.Generator().manual_seed(3)
    clean = [torch.randn(*s, generator=g, dtype=F64).to(device=DEVICE, dtype=dtype) for s in
             ((T, B, 3), (LD, B, P), (LD, B, 5))]
    bad = [t_.clone() for t_ in clean]
    if where == "x":
        bad[0][t, b, 1] = value
    else:
        bad[1 if where == "h0" else 2][LD - 1, b, 0] = value

    def build(ls):
        return ls[0], (ls[1], ls[2])

    def run(m, inputs):
        return forward_backward(m, [i.clone().requires_grad_() for i in inputs], build)

    outs, grads = run(ours, bad)
    outs_ref, grads_ref = run(ref, bad)
    names = ["output", "h_n", "c_n", "d_input", "d_h0", "d_c0"] + [f"d_{n}" for n, _ in ref.named_parameters()]
    tol = 1e-12 if dtype == F64 else 5e-6
    for name, a, r in zip(names, outs + grads, outs_ref + grads_ref):
        assert torch.equal(a.isnan(), r.isnan()), f"{name}: NaN positions differ from torch"
        assert torch.equal(a == math.inf, r == math.inf) and torch.equal(a == -math.inf, r == -math.inf), name
        fin = torch.isfinite(r)
        assert rel_err(a[fin], r[fin]) <= tol, (name, rel_err(a[fin], r[fin]))
    # Every other sequence is untouched: bitwise what the clean run gives (outputs and input/hx gradients).
    outs_clean, grads_clean = run(ours, clean)
    assert not all(torch.equal(a, c) for a, c in zip(outs, outs_clean)), "the bad value had no effect at all"
    others = [i for i in range(B) if i != b]
    for name, a, c in zip(names[:6], outs + grads[:3], outs_clean + grads_clean[:3]):
        assert torch.equal(a[:, others], c[:, others]), f"{name}: another sequence of the batch changed"


def _saturating_problem(dtype, magnitude, T=4, B=3, H=5, seed=0):
    """x @ W_ihᵀ puts ±magnitude straight onto every gate pre-activation (W_ih = identity, no bias), plus a
    small recurrent term: every gate saturates."""
    g = torch.Generator().manual_seed(seed)
    k = H ** -0.5
    x = torch.sign(torch.randn(T, B, 4 * H, generator=g, dtype=F64)) * magnitude
    w_ih = torch.eye(4 * H, dtype=F64)
    w_hh = (torch.rand(4 * H, H, generator=g, dtype=F64) * 2 - 1) * k
    h0 = torch.randn(B, H, generator=g, dtype=F64)
    c0 = torch.randn(B, H, generator=g, dtype=F64)
    b = torch.zeros(4 * H, dtype=F64)
    return [t.to(dtype) for t in (x, h0, c0, w_ih, w_hh, b, b.clone())]


SATURATION_TOL = {F64: 1e-12, F32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("path", ["persistent", "stepwise"])
@pytest.mark.parametrize("dtype", list(SATURATION_TOL), ids=lambda d: str(d).replace("torch.", ""))
def test_huge_pre_activations_saturate_without_overflow(dtype, path):
    """Pre-activations of ±1e4 saturate every gate (σ → 0/1, tanh → ±1): outputs and gradients are finite and
    match the float64 reference, and no floating-point overflow or invalid operation happens anywhere inside
    the kernels (numpy raises on one under the interpreter)."""
    problem = _saturating_problem(dtype, 1e4)
    leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in problem]
    errstate = np.errstate(over="raise", invalid="raise", divide="raise") if not CUDA else contextlib.nullcontext()
    with errstate:
        y, h, c = lstm_layer(*leaves, path=path)
        outs = [y, h, c]
        cot = random_cotangents(outs, seed=7)
        grads = torch.autograd.grad(sum((o.double() * w.double()).sum() for o, w in zip(outs, cot)), leaves)
    ref_leaves = [t.detach().double().clone().requires_grad_() for t in problem]
    ref_outs = lstm_layer_reference(*ref_leaves)
    ref_grads = torch.autograd.grad(sum((o * w.double().cpu()).sum() for o, w in zip(ref_outs, cot)), ref_leaves)
    for name, a, r in zip(["y", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"],
                          outs + list(grads), list(ref_outs) + list(ref_grads)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a.cpu(), r) <= SATURATION_TOL[dtype], (name, rel_err(a.cpu(), r))


@triton.jit
def _activations_kernel(x_ptr, sig_ptr, tanh_ptr, gates_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r)
    tl.store(sig_ptr + r, kernel_common.sigmoid(x))
    tl.store(tanh_ptr + r, kernel_common.tanh(x))
    # The same values as a [2, N/2] gate tile (N/2 a multiple of 4: column j is gate j % 4 in both rows).
    rows = tl.arange(0, 2)
    cols = tl.arange(0, N // 2)
    offs = rows[:, None] * (N // 2) + cols[None, :]
    tl.store(gates_ptr + offs, kernel_common.gate_activations(tl.load(x_ptr + offs), N // 2))


def _run_activations(x):
    sig, tanh, gates = (torch.empty_like(x) for _ in range(3))
    _activations_kernel[(1,)](x, sig, tanh, gates, N=x.numel())
    return sig, tanh, gates


def _extreme_values(dtype):
    fi = torch.finfo(dtype)
    mags = [0.0, fi.tiny, 1e-8, 0.5, 1.0, 3.0, 20.0, 44.0, 88.0, 89.0, 710.0, 1e4, 1e30]
    if dtype == F64:
        mags += [1e300]
    vals = [s * m for m in mags for s in (1.0, -1.0)]
    n = triton.next_power_of_2(len(vals))
    vals += [0.0] * (n - len(vals))
    return torch.tensor(vals, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_activation_functions_never_overflow(dtype):
    """The kernels' σ and tanh (and the fused gate activation, tanh(x) = 2σ(2x) − 1) against torch's for the
    whole range: no intermediate overflows for any finite input up to 1e30 (1e300) (numpy raises on one under
    the interpreter), and ±max / ±inf give the exact limits, never NaN."""
    x = _extreme_values(dtype)
    errstate = np.errstate(over="raise", invalid="raise", divide="raise") if not CUDA else contextlib.nullcontext()
    with errstate:
        sig, tanh, gates = _run_activations(x)
    is_g = (torch.arange(x.numel(), device=DEVICE) % 4 == 2)
    eps = torch.finfo(dtype).eps
    assert (sig - torch.sigmoid(x)).abs().max() <= 4 * eps
    assert (tanh - torch.tanh(x)).abs().max() <= 4 * eps
    assert (gates - torch.where(is_g, torch.tanh(x), torch.sigmoid(x))).abs().max() <= 8 * eps
    fi = torch.finfo(dtype)
    limits = torch.tensor([fi.max, -fi.max, math.inf, -math.inf], dtype=dtype, device=DEVICE)
    sig, tanh, gates = _run_activations(limits.repeat(4))
    assert torch.equal(sig, torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype, device=DEVICE).repeat(4))
    assert torch.equal(tanh, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype, device=DEVICE).repeat(4))
    assert torch.equal(gates, torch.where(torch.arange(16, device=DEVICE) % 4 == 2, tanh, sig))


@source_seed("48c4a582894f4f1eb6c88ae38eb736aed802a7b9ecbbdefe903a16fc120d5d3c876c68bdb6e39772882da7bf814316b8")
@settings(SLOW, max_examples=12)
@given(
    config=lstm_config(max_t=3, stepwise=False),
    magnitude=st.sampled_from([1e4, 1e8, 1e30, 1e300, torch.finfo(F64).max]),
    frac=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_extreme_inputs_stay_finite_and_match_torch(config, magnitude, frac, seed):
    """Random valid configurations whose inputs carry one entry of huge magnitude in a random subset of
    (step, sequence) rows: outputs and gradients finite and equal to torch.nn.LSTM's."""
    I, H, kwargs, T, B = config
    xs, _, _ = valid_shapes(I, H, kwargs, T, B)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=F64)
    rows = x.view(-1, I)
    pick = torch.rand(rows.shape[0], generator=g) < frac
    cols = torch.randint(0, I, (rows.shape[0],), generator=g)
    signs = torch.where(torch.rand(rows.shape[0], generator=g) < 0.5, -1.0, 1.0).to(F64)
    rows[pick, cols[pick]] = signs[pick] * magnitude
    ours, ref = module_pair(I, H, seed=seed, **kwargs)
    build = lambda ls: (ls[0], None)  # noqa: E731
    outs, grads = forward_backward(ours, [x.clone().to(DEVICE).requires_grad_()], build)
    outs_ref, grads_ref = forward_backward(ref, [x.clone().to(DEVICE).requires_grad_()], build)
    names = ["output", "h_n", "c_n", "d_input"] + [n for n, _ in ref.named_parameters()]
    for name, a, r in zip(names, outs + grads, outs_ref + grads_ref):
        assert torch.isfinite(r).all(), f"{name}: torch itself is not finite (the strategy is wrong)"
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= 1e-9, (name, rel_err(a, r))
