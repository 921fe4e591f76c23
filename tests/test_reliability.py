"""Reliability of ``lstm_triton.LSTM`` / ``LSTMCell`` beyond the happy path.

Malformed calls, strided layouts, non-finite and extreme values, size limits, determinism, memory over a long
training run, concurrent callers, DistributedDataParallel and persistence. Everything runs on the Triton path
(the interpreter on a machine without a GPU, see conftest.py) with tiny shapes; the checks that only mean
something on a GPU (bitwise determinism of the CUDA kernels, T = 10⁵, two CUDA streams, a batch beyond 32-bit
row offsets) are skipped without one.

References: ``torch.nn.LSTM`` carrying the same state_dict (type and message of every error, NaN positions,
strided layouts) and the float64 ``lstm_triton.lstm_reference`` (values).
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import lstm_triton
from helpers import KernelLaunched, intercepted_launches, rel_err
from lstm_triton import lstm_layer, lstm_layer_directions, lstm_layer_reference, lstm_reference
from lstm_triton.kernels import common as kernel_common
from lstm_triton.kernels import lstm_bwd, lstm_fwd, per_direction, plan_lstm

F64 = torch.float64
F32 = torch.float32
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Hypothesis: derandomized (the same examples on every run, no example database written to the checkout);
# the interpreter is slow, so no deadline, few examples, and no shrinking (a failure reports the first failing
# example as drawn: shrinking one through the interpreter would take minutes).
FAST = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=20)  # examples that run kernels
MANY = settings(FAST, max_examples=150)  # examples that must not get as far as a kernel


def pair(*args, cls=(lstm_triton.LSTM, nn.LSTM), dtype=F64, device=DEVICE, seed=0, **kwargs):
    """(ours, torch's) with the same state_dict."""
    torch.manual_seed(seed)
    ref = cls[1](*args, **kwargs).to(device=device, dtype=dtype)
    ours = cls[0](*args, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def cotangents(outs, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=F64).to(device=o.device, dtype=o.dtype) for o in outs]


def bitwise_equal(a, b):
    """Same dtype, shape and bits, NaN matching NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b)) and torch.equal(a.isnan(), b.isnan())


def forward_backward(module, leaves, build):
    """``build(leaves) -> (input, hx)``; returns (outputs [y, h_n, c_n], grads of a fixed random projection of
    all three w.r.t. the leaves and then the module's parameters)."""
    x, hx = build(leaves)
    out, (h, c) = module(x, hx)
    outs = [out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out, h, c]
    loss = sum((o * w).sum() for o, w in zip(outs, cotangents(outs)))
    grads = torch.autograd.grad(loss, list(leaves) + list(module.parameters()))
    return [o.detach() for o in outs], list(grads)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: malformed calls raise what torch raises, before any kernel runs. On CPU, like test_drop_in.py's
# error tests: torch's messages are those of its CPU backend (and on a GPU machine, where the interpreter is
# off, these exercise the module's own checks in front of torch's CPU LSTM).

# Where torch leaks a backend error instead of a message about the call, ours must say what is wrong
# (same exception type, a message naming the offending thing).
TORCH_BACKEND_LEAKS = {
    "get_mkldnn_dtype: unsupported data type": r"dtype",
    "is not on the expected device": r"device",
}


def assert_same_error(call_ours, call_ref, ours_own=None):
    """Both calls raise: the same type and message, and no kernel ran for ours. ``ours_own`` (a regex): where
    torch's error depends on the backend, ours raises a RuntimeError whose message matches it instead."""
    with pytest.raises(Exception) as ref_err:
        call_ref()
    with intercepted_launches(fail=True):
        with pytest.raises(Exception) as ours_err:
            call_ours()
    ours_e, ref_e = ours_err.value, ref_err.value
    assert not isinstance(ours_e, KernelLaunched), f"a kernel ran before the error ({ours_e}); torch raises {ref_e!r}"
    if ours_own is not None:
        assert isinstance(ours_e, RuntimeError) and re.search(ours_own, str(ours_e)), repr(ours_e)
        return
    assert type(ours_e) is type(ref_e), f"ours: {ours_e!r}\ntorch: {ref_e!r}"
    for leak, must_name in TORCH_BACKEND_LEAKS.items():
        if leak in str(ref_e):
            assert re.search(must_name, str(ours_e)), f"ours: {ours_e!r} does not name the {must_name}"
            return
    assert str(ours_e) == str(ref_e), f"ours: {ours_e!r}\ntorch: {ref_e!r}"


def _lstm_inputs():
    return torch.randn(5, 2, 3), torch.randn(2, 2, 4), torch.randn(2, 2, 4)


# (input, hx, ...) of malformed calls to an LSTM(3, 4, num_layers=2); each builds fresh tensors.
LSTM_MALFORMED = {
    "input-None": lambda x, h, c: (None,),
    "input-list": lambda x, h, c: (x.tolist(),),
    "input-ndarray": lambda x, h, c: (x.numpy(),),
    "input-int": lambda x, h, c: (3,),
    "hx-a-tensor": lambda x, h, c: (x, h),
    "hx-one-tensor-tuple": lambda x, h, c: (x, (h,)),
    "hx-three-tensor-tuple": lambda x, h, c: (x, (h, c, c)),
    "hx-None-h": lambda x, h, c: (x, (None, c)),
    "hx-None-c": lambda x, h, c: (x, (h, None)),
    "hx-ndarray": lambda x, h, c: (x, (h.numpy(), c.numpy())),
    "hx-on-meta": lambda x, h, c: (x, (h.to("meta"), c.to("meta"))),
    "c0-on-meta": lambda x, h, c: (x, (h, c.to("meta"))),
    "input-on-meta-with-hx": lambda x, h, c: (x.to("meta"), (h, c)),
    "empty-sequence-with-hx": lambda x, h, c: (x[:0], (h, c)),
    "empty-unbatched-sequence": lambda x, h, c: (x[:0, 0],),
    "feature-size-0": lambda x, h, c: (x[..., :0],),
    "bool-input": lambda x, h, c: (x > 0,),
    "complex-input": lambda x, h, c: (x.to(torch.complex64),),
    "int-hx": lambda x, h, c: (x, (h.long(), c.long())),
    "too-many-positional": lambda x, h, c: (x, (h, c), 1),
}


@pytest.mark.parametrize("case", LSTM_MALFORMED)
def test_malformed_lstm_call_raises_like_torch(case):
    ours, ref = pair(3, 4, num_layers=2, dtype=F32, device="cpu")
    make = LSTM_MALFORMED[case]
    assert_same_error(lambda: ours(*make(*_lstm_inputs())), lambda: ref(*make(*_lstm_inputs())))


# The same for an LSTMCell(3, 4).
CELL_MALFORMED = {
    "input-None": lambda x, h, c: (None,),
    "input-list": lambda x, h, c: (x.tolist(),),
    "hx-a-tensor": lambda x, h, c: (x, h),
    "hx-one-tensor-tuple": lambda x, h, c: (x, (h,)),
    "hx-three-tensor-tuple": lambda x, h, c: (x, (h, c, c)),
    "hx-None-c": lambda x, h, c: (x, (h, None)),
    "hx-on-meta": lambda x, h, c: (x, (h.to("meta"), c.to("meta"))),
    "input-on-meta": lambda x, h, c: (x.to("meta"),),
    "int-hx": lambda x, h, c: (x, (h.long(), c.long())),
    "float64-hx": lambda x, h, c: (x, (h.double(), c.double())),
    "0d-input": lambda x, h, c: (x[0, 0],),
    "bool-input": lambda x, h, c: (x > 0,),
}


@pytest.mark.parametrize("case", CELL_MALFORMED)
def test_malformed_cell_call_raises_like_torch(case):
    ours, ref = pair(3, 4, cls=(lstm_triton.LSTMCell, nn.LSTMCell), dtype=F32, device="cpu")
    make = CELL_MALFORMED[case]
    inputs = lambda: (torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4))  # noqa: E731
    assert_same_error(lambda: ours(*make(*inputs())), lambda: ref(*make(*inputs())))


@st.composite
def lstm_config(draw, max_t=4, stepwise=True):
    """(I, H, constructor kwargs, T, B or None for an unbatched input). H = 36 (float64: W_hh too large for one
    program) takes the stepwise path, smaller ones the persistent path."""
    I = draw(st.integers(1, 4))
    H = draw(st.sampled_from([1, 2, 3, 4, 5, 6] + ([36] if stepwise else [])))
    proj = draw(st.integers(1, H - 1)) if H > 1 and draw(st.booleans()) else 0
    kwargs = dict(
        num_layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        proj_size=proj,
    )
    T = draw(st.integers(1, max_t))
    B = draw(st.sampled_from([1, 1, 2, 3, 3, 17]))  # 17: a second 16-row batch tile
    unbatched = draw(st.integers(0, 5)) == 0
    return I, H, kwargs, T, (None if unbatched else B)


def _shapes(I, H, kwargs, T, B):
    """Valid (input shape, h0 shape, c0 shape)."""
    LD = kwargs["num_layers"] * (2 if kwargs["bidirectional"] else 1)
    P = kwargs["proj_size"] or H
    if B is None:
        return (T, I), (LD, P), (LD, H)
    x = (B, T, I) if kwargs["batch_first"] else (T, B, I)
    return x, (LD, B, P), (LD, B, H)


CORRUPTIONS = [
    "input-rank", "feature-size", "hx-rank", "h0-dim", "c0-dim", "input-dtype", "input-int",
    "empty-sequence", "input-device", "hx-device", "hx-dtype", "h0-c0-swapped",
]


@MANY
@given(config=lstm_config(), corruption=st.sampled_from(CORRUPTIONS), data=st.data())
def test_random_invalid_lstm_calls_raise_like_torch(config, corruption, data):
    """Random valid configurations, one thing made wrong: ours raises torch's exception (type and message), or
    a clear one where torch leaks a backend error, and no kernel runs."""
    I, H, kwargs, T, B = config
    xs, hs, cs = _shapes(I, H, kwargs, T, B)
    with_hx = data.draw(st.booleans(), "with_hx")
    x_dtype, hx_dtype, x_dev, hx_dev = F32, F32, "cpu", "cpu"
    if corruption == "input-rank":
        xs = data.draw(st.sampled_from([(), (I,), (1, 2, *xs) if B is None else (2, *xs)]), "rank")
    elif corruption == "feature-size":
        xs = (*xs[:-1], data.draw(st.integers(0, 6).filter(lambda n: n != I), "features"))
    elif corruption in ("hx-rank", "h0-dim", "c0-dim", "hx-dtype", "hx-device", "h0-c0-swapped"):
        with_hx = True
        if corruption == "hx-rank":
            hs, cs = ((hs[0], 1, *hs[1:]), (cs[0], 1, *cs[1:])) if B is None else (hs[:1] + hs[2:], cs[:1] + cs[2:])
        elif corruption in ("h0-dim", "c0-dim"):
            shape = list(hs if corruption == "h0-dim" else cs)
            dim = data.draw(st.integers(0, len(shape) - 1), "dim")
            shape[dim] = data.draw(st.integers(0, 20).filter(lambda n, old=shape[dim]: n != old), "size")
            hs, cs = (tuple(shape), cs) if corruption == "h0-dim" else (hs, tuple(shape))
        elif corruption == "h0-c0-swapped":
            if hs == cs:
                hs = cs = (*hs[:-1], hs[-1] + 1)  # both wrong in the same way
            else:
                hs, cs = cs, hs
        elif corruption == "hx-dtype":
            hx_dtype = data.draw(st.sampled_from([F64, torch.float16, torch.int64]), "hx_dtype")
        else:
            hx_dev = "meta"
    elif corruption == "input-dtype":
        x_dtype = data.draw(st.sampled_from([F64, torch.float16, torch.bfloat16]), "x_dtype")
    elif corruption == "input-int":
        x_dtype = data.draw(st.sampled_from([torch.int32, torch.int64, torch.bool]), "x_dtype")
    elif corruption == "empty-sequence":
        xs = (xs[0], 0, xs[2]) if kwargs["batch_first"] and B is not None else (0, *xs[1:])
    elif corruption == "input-device":
        x_dev = "meta"

    def make():
        x = torch.zeros(xs, device=x_dev).to(x_dtype)
        hx = None
        if with_hx:
            hx = tuple(torch.zeros(s, device=hx_dev).to(hx_dtype) for s in (hs, cs))
        return x, hx

    ours, ref = pair(I, H, dtype=F32, device="cpu", **kwargs)
    ref_raised = True
    try:
        ref(*make())
        ref_raised = False
    except Exception:
        pass
    assert ref_raised, "the corruption left a valid call (the strategy is wrong)"
    # An hx dtype other than the input's: torch's error comes from whichever backend runs (oneDNN, mkldnn,
    # cuDNN); ours is a documented, backend-independent message.
    own = r"hx\[[01]\] dtype \(.*\) does not match input dtype" if corruption == "hx-dtype" else None
    assert_same_error(lambda: ours(*make()), lambda: ref(*make()), ours_own=own)


CELL_CORRUPTIONS = ["input-rank", "feature-size", "hx-rank", "h-dim", "c-dim", "input-dtype", "input-device"]


@MANY
@given(
    I=st.integers(1, 5), H=st.integers(1, 6), B=st.one_of(st.none(), st.integers(1, 4)),
    corruption=st.sampled_from(CELL_CORRUPTIONS), data=st.data(),
)
def test_random_invalid_cell_calls_raise_like_torch(I, H, B, corruption, data):
    xs, hs = ((I,), (H,)) if B is None else ((B, I), (B, H))
    cs = hs
    with_hx = data.draw(st.booleans(), "with_hx")
    x_dtype, x_dev = F32, "cpu"
    if corruption == "input-rank":
        xs = data.draw(st.sampled_from([(), (1, 2, *xs)] + ([(2, *xs)] if B is not None else [])), "rank")
    elif corruption == "feature-size":
        xs = (*xs[:-1], data.draw(st.integers(0, 7).filter(lambda n: n != I), "features"))
    elif corruption == "hx-rank":
        with_hx = True
        hs = cs = (1, *hs)
    elif corruption in ("h-dim", "c-dim"):
        with_hx = True
        shape = list(hs)
        dim = data.draw(st.integers(0, len(shape) - 1), "dim")
        shape[dim] = data.draw(st.integers(0, 9).filter(lambda n, old=shape[dim]: n != old), "size")
        hs, cs = (tuple(shape), cs) if corruption == "h-dim" else (hs, tuple(shape))
    elif corruption == "input-dtype":
        x_dtype = data.draw(st.sampled_from([F64, torch.float16, torch.int64]), "x_dtype")
    else:
        x_dev = "meta"

    def make():
        x = torch.zeros(xs, device=x_dev).to(x_dtype)
        return (x, tuple(torch.zeros(s) for s in (hs, cs))) if with_hx else (x,)

    ours, ref = pair(I, H, cls=(lstm_triton.LSTMCell, nn.LSTMCell), dtype=F32, device="cpu")
    with pytest.raises(Exception):
        ref(*make())
    assert_same_error(lambda: ours(*make()), lambda: ref(*make()))


# ----------------------------------------------------------------------------------------------------------------
# Strided layouts: random valid configurations with random layouts of input, hx and weights, against torch.


def _strided_input(shape, layout, batch_dim, g):
    """A leaf tensor and a view of it with the given ``shape`` and layout."""
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    n = len(shape)
    if layout == "transposed" and n >= 2:  # storage in the other (seq-first ↔ batch-first) order
        base = rand(shape[1], shape[0], *shape[2:])
        return base, lambda b: b.transpose(0, 1)
    if layout == "strided-last-dim":
        base = rand(*shape[:-1], 2 * shape[-1] + 1)
        return base, lambda b: b[..., 1::2]
    if layout == "expanded" and n >= 2:  # stride 0 along the batch (or, unbatched, the time) dimension
        d = batch_dim if n == 3 else 0
        small = list(shape)
        small[d] = 1
        base = rand(*small)
        return base, lambda b: b.expand(*shape)
    if layout == "slice-of-bigger":  # non-zero storage offset and padded strides in every dimension
        base = rand(*[s + 2 for s in shape])
        return base, lambda b: b[tuple(slice(1, 1 + s) for s in shape)]
    base = rand(*shape)
    return base, lambda b: b


LAYOUTS = ["contiguous", "transposed", "strided-last-dim", "expanded", "slice-of-bigger"]


def _strided_params(module, g, layout):
    """Leaf tensors and non-contiguous views of them carrying the module's parameter values."""
    leaves, views = {}, {}
    for name, p in module.named_parameters():
        p = p.detach().cpu()
        if layout == "transposed" and p.dim() == 2:
            leaves[name] = p.t().contiguous().requires_grad_()
            views[name] = lambda b: b.t()
        elif layout == "strided":
            leaves[name] = torch.stack([p, torch.randn(p.shape, generator=g, dtype=F64)], -1).requires_grad_()
            views[name] = lambda b: b[..., 0]
        else:
            leaves[name] = p.clone().requires_grad_()
            views[name] = lambda b: b
    return leaves, views


@SLOW
@given(
    config=lstm_config(),
    x_layout=st.sampled_from(LAYOUTS),
    hx_layout=st.sampled_from(["none"] + LAYOUTS),
    w_layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    seed=st.integers(0, 2**16),
)
def test_random_valid_configs_and_layouts_match_torch(config, x_layout, hx_layout, w_layout, seed):
    """Outputs and every gradient (input, hx, weights) of random valid configurations, with the input, hx and
    weights given as transposed views, strided slices, stride-0 expansions or slices of a bigger tensor."""
    I, H, kwargs, T, B = config
    xs, hs, cs = _shapes(I, H, kwargs, T, B)
    g = torch.Generator().manual_seed(seed)
    batch_dim = 0 if kwargs["batch_first"] else 1
    x_base, x_view = _strided_input(xs, x_layout, batch_dim, g)
    bases, views = [x_base], [x_view]
    if hx_layout != "none":
        for s in (hs, cs):
            b, v = _strided_input(s, hx_layout, 1, g)
            bases.append(b * 0.5)
            views.append(v)
    ours, ref = pair(I, H, device="cpu", seed=seed, **kwargs)
    results = []
    for m in (ours, ref):
        leaves = [b.clone().to(DEVICE).requires_grad_() for b in bases]
        w_leaves, w_views = _strided_params(m, torch.Generator().manual_seed(seed), w_layout)
        w_leaves = {n: t.to(DEVICE).detach().requires_grad_() for n, t in w_leaves.items()}
        params = {n: w_views[n](t) for n, t in w_leaves.items()}
        x = views[0](leaves[0])
        hx = None if len(leaves) == 1 else (views[1](leaves[1]), views[2](leaves[2]))
        assert x.shape == xs and (hx is None or (hx[0].shape == hs and hx[1].shape == cs))
        out, (h, c) = torch.func.functional_call(m.to(DEVICE), params, (x, hx))
        outs = [out, h, c]
        loss = sum((o * w).sum() for o, w in zip(outs, cotangents(outs)))
        grads = torch.autograd.grad(loss, leaves + list(w_leaves.values()))
        results.append(([o.detach() for o in outs], grads))
    (outs, grads), (outs_ref, grads_ref) = results
    for name, a, b in zip(["output", "h_n", "c_n"], outs, outs_ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-12, (name, rel_err(a, b))
    names = ["input"] + ["h0", "c0"][: len(bases) - 1] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        assert rel_err(a, b) <= 1e-12, (name, rel_err(a, b))


KERNEL_PATHS = ["persistent", "stepwise", "cooperative"]


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_each_kernel_path_runs_two_directions_in_training_like_the_reference(path):
    """Both directions in one launch, with saved state for backward (parameters requiring grad), per-sequence
    lengths and h0/c0 slices of a bigger buffer, on every kernel path: outputs and every gradient equal the
    float64 reference. (H = 40: two programs per batch tile on the cooperative path, three on the stepwise.)"""
    T, B, I, H = 4, 3, 2, 40
    g = torch.Generator().manual_seed(2)
    k = H ** -0.5
    u = lambda *s: ((torch.rand(*s, generator=g, dtype=F64) * 2 - 1) * k).to(DEVICE)  # noqa: E731
    weights = [[u(4 * H, I), u(4 * H, H), u(4 * H), u(4 * H)] for _ in range(2)]
    x = torch.randn(T, B, I, generator=g, dtype=F64).to(DEVICE)
    state = torch.randn(2, 3, B + 1, H, generator=g, dtype=F64).to(DEVICE)
    lengths = [4, 2, 3]

    def run(fn):
        leaves = [x.clone().requires_grad_(), state.clone().requires_grad_()] + [
            w.clone().requires_grad_() for ws in weights for w in ws]
        ws = [leaves[2:6], leaves[6:10]]
        h0, c0 = leaves[1][0, 1:, 1:], leaves[1][1, :2, 1:]  # [2, B, H] slices at different offsets
        outs = fn(leaves[0], h0, c0, ws)
        loss = sum((o * w).sum() for o, w in zip(outs, cotangents(outs)))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))

    def reference(x, h0, c0, ws):
        outs = [lstm_layer_reference(x, h0[d], c0[d], *ws[d], lengths=lengths, reverse=d == 1) for d in range(2)]
        return torch.cat([o[0] for o in outs], -1), torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])

    def ours(x, h0, c0, ws):
        return lstm_layer_directions(x, h0, c0, [(*w, None) for w in ws], path=path,
                                     lengths=torch.tensor(lengths, device=DEVICE))

    try:
        plan_lstm(B, H, F64, path=path)
    except ValueError as e:
        pytest.skip(str(e))
    names = ["y", "h_n", "c_n", "dx", "dstate"] + [f"d{n}_{d}" for d in range(2)
                                                   for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
    for name, a, r in zip(names, run(ours), run(reference)):
        assert rel_err(a, r) <= 1e-12, (name, rel_err(a, r))


@pytest.mark.parametrize("hidden,steps", [(36, 3), (5, 1)], ids=["H36-T3", "H5-T1"])
def test_bidirectional_module_on_the_stepwise_path_in_training_matches_torch(hidden, steps):
    """The same through the module, on the two ways it reaches the stepwise kernel: float64 with H = 36 (W_hh too
    large for one program), and any single-step sequence (T = 1: one fused kernel with the input projection).
    Parameters require grad, so the forward saves its state for backward."""
    ours, ref = pair(3, hidden, bidirectional=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 2, 3, generator=g, dtype=F64).to(DEVICE)
    build = lambda ls: (ls[0], None)  # noqa: E731
    outs, grads = forward_backward(ours, [x.clone().requires_grad_()], build)
    outs_ref, grads_ref = forward_backward(ref, [x.clone().requires_grad_()], build)
    names = ["output", "h_n", "c_n", "d_input"] + [n for n, _ in ref.named_parameters()]
    for name, a, r in zip(names, outs + grads, outs_ref + grads_ref):
        assert rel_err(a, r) <= 1e-12, (name, rel_err(a, r))


def test_hx_slices_of_one_state_buffer_and_batch_first_views():
    """A common pattern: h0/c0 are slices of one [2, L·D, B, H] buffer that carries the state from call to
    call (truncated BPTT), and a batch-first input is a transposed view of a seq-first one. The call reads
    its views correctly, leaves them unmodified, and returns fresh tensors that can be written back."""
    ours, ref = pair(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    state = torch.randn(2, 4, 3, 5, dtype=F64, device=DEVICE)
    h_r, c_r = state[0].clone(), state[1].clone()
    x = torch.randn(4, 3, 3, dtype=F64, device=DEVICE).transpose(0, 1)
    assert not x.is_contiguous() and state[1].storage_offset() > 0
    with torch.no_grad():
        for _ in range(3):
            before = state.clone()
            y, (h, c) = ours(x, (state[0], state[1]))
            assert torch.equal(state, before), "the call modified its hx"
            state[0], state[1] = h, c
            y_r, (h_r, c_r) = ref(x.contiguous(), (h_r, c_r))
            assert rel_err(y, y_r) <= 1e-12
            assert rel_err(state[0], h_r) <= 1e-12 and rel_err(state[1], c_r) <= 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Odd values: NaN / Inf propagate exactly like torch.nn.LSTM; huge pre-activations saturate without overflow.

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
    ours, ref = pair(3, 5, dtype=dtype, **kwargs)
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
        cot = cotangents(outs)
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
    xs, _, _ = _shapes(I, H, kwargs, T, B)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=F64)
    rows = x.view(-1, I)
    pick = torch.rand(rows.shape[0], generator=g) < frac
    cols = torch.randint(0, I, (rows.shape[0],), generator=g)
    signs = torch.where(torch.rand(rows.shape[0], generator=g) < 0.5, -1.0, 1.0).to(F64)
    rows[pick, cols[pick]] = signs[pick] * magnitude
    ours, ref = pair(I, H, seed=seed, **kwargs)
    build = lambda ls: (ls[0], None)  # noqa: E731
    outs, grads = forward_backward(ours, [x.clone().to(DEVICE).requires_grad_()], build)
    outs_ref, grads_ref = forward_backward(ref, [x.clone().to(DEVICE).requires_grad_()], build)
    names = ["output", "h_n", "c_n", "d_input"] + [n for n, _ in ref.named_parameters()]
    for name, a, r in zip(names, outs + grads, outs_ref + grads_ref):
        assert torch.isfinite(r).all(), f"{name}: torch itself is not finite (the strategy is wrong)"
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= 1e-9, (name, rel_err(a, r))


# ----------------------------------------------------------------------------------------------------------------
# Size limits


@pytest.mark.parametrize("path", ["persistent", "stepwise"])
def test_launchers_pass_direction_strides_as_64_bit_integers(path):
    """Per-direction strides T·B·4H, T·B·P and (T+1)·B·H exceed 2³¹ for long, wide problems. The launchers must
    hand them to Triton as Python ints (which Triton types as i64) with their exact values, so the kernels'
    ``d * stride`` is 64-bit; per-step strides (B·4H, B·P, B·H) are multiplied by a step index the kernels
    widen to 64 bits (``common.at``). Checked on meta tensors (no memory) with the launches recorded, not run."""
    D, T, B, H = 2, 2**11, 2**11, 2**9
    G = 4 * H
    expected = {"stride_gd": T * B * G, "stride_yd": T * B * H, "stride_cd": (T + 1) * B * H,
                "stride_gt": B * G, "stride_yt": B * H, "stride_ct": B * H}
    assert min(v for k, v in expected.items() if k.endswith("d")) >= 2**31
    meta = dict(device="meta", dtype=F32)
    plan = plan_lstm(B, H, F32, path=path)
    w_hh = per_direction([torch.empty(G, H, **meta), torch.empty(G, H, **meta)])
    with intercepted_launches() as calls:
        lstm_fwd(plan, torch.empty(D, T, B, G, **meta), w_hh, None, torch.empty(D, B, H, **meta),
                 torch.empty(D, B, H, **meta), save=True)
        lstm_bwd(plan, torch.empty(D, T, B, H, **meta), torch.empty(D, B, H, **meta), torch.empty(D, B, H, **meta),
                 None, torch.empty(D, T, B, G, **meta), torch.empty(D, T + 1, B, H, **meta), w_hh, None)
    assert calls, "no kernel was launched"
    kernels = {name for name, _ in calls}
    assert any("fwd" in k for k in kernels) and any("bwd" in k for k in kernels), kernels
    for name, args in calls:
        strides = {k: v for k, v in args.items() if k in expected}
        assert any(k.endswith("d") for k in strides), f"{name} gets no per-direction stride"
        for k, v in strides.items():
            assert type(v) is int, f"{name}.{k} is a {type(v).__name__}, not a Python int"
            assert v == expected[k], f"{name}.{k} = {v}, expected {expected[k]}"
            if k.endswith("d"):
                assert triton.runtime.jit.mangle_type(v) == "i64", (name, k)


LIMIT_MESSAGE = re.compile(r"2\^31|2\*\*31|2³¹|2147483647|2147483648|int32|32-bit|limit", re.IGNORECASE)


def test_batch_beyond_32_bit_row_offsets_is_refused_with_the_limit_named():
    """Within one step the kernels address batch row b, gate column j as b·4H + j in 32-bit arithmetic
    (``off_g = rb[:, None] * G + rg[None, :]`` and the per-step pointer increments ``B * G``). A problem with
    B·4H ≥ 2³¹ must therefore be refused, before any launch, with an error naming the limit — not launched
    into an illegal memory access. (Should the kernels move to 64-bit row offsets, the limit moves and this
    test follows.) Checked on meta tensors, at the public op and at the launcher."""
    B, H = 2**27 + 16, 4  # B·4H = 2³¹ + 256
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(1, B, 1, **meta)
    w_ih, w_hh = torch.empty(4 * H, 1, **meta), torch.empty(4 * H, H, **meta)
    errors = []
    with intercepted_launches() as calls:
        for attempt in (
            lambda: lstm_layer(x, None, None, w_ih, w_hh),
            lambda: lstm_fwd(plan_lstm(B, H, torch.float16), torch.empty(1, 1, B, 4 * H, **meta),
                             per_direction([torch.empty(4 * H, H, **meta)]), None, torch.empty(1, B, H, **meta),
                             torch.empty(1, B, H, **meta)),
        ):
            try:
                attempt()
            except (RuntimeError, ValueError) as e:
                errors.append(e)
                break
    assert errors, (f"B·4H = {B * 4 * H} ≥ 2³¹ was accepted and launched ({[n for n, _ in calls]}) although the "
                    "kernels' in-step row offsets are 32-bit")
    assert LIMIT_MESSAGE.search(str(errors[0])), f"the error does not name the limit: {errors[0]!r}"
    assert not calls, "a kernel was launched before the error"


def test_long_sequence_stays_finite_and_matches_reference():
    """A long sequence through the persistent kernel (one launch walking T steps forward, then backward) in
    float32, with forget/input gates biased towards 1 so the cell state grows large: everything finite and
    within float32 accuracy of the float64 reference. On a GPU the same code runs T = 10⁵ below."""
    T = 2000 if CUDA else 512
    assert plan_lstm(2, 8, F32).path == "persistent"
    torch.manual_seed(0)
    m = lstm_triton.LSTM(3, 8).to(DEVICE)
    with torch.no_grad():
        m.bias_ih_l0[8:16] += 4.0  # forget gate
        m.bias_ih_l0[0:8] += 2.0  # input gate
        m.bias_ih_l0[16:24] += 1.0  # cell candidate
    x = torch.randn(T, 2, 3, device=DEVICE)
    xl = x.clone().requires_grad_()
    y, (h, c) = m(xl)
    cot = cotangents([y, h, c])
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip((y, h, c), cot)), [xl, *m.parameters()])
    weights = [[w.detach().double().requires_grad_() for w in ws] for ws in m.all_weights]
    x64 = x.double().requires_grad_()
    y_r, (h_r, c_r) = lstm_reference(x64, None, weights)
    grads_r = torch.autograd.grad(sum((o * w.double()).sum() for o, w in zip((y_r, h_r, c_r), cot)),
                                  [x64, *weights[0]])
    assert c_r.abs().max() > 20  # the cell state did grow
    for name, a, r in zip(["y", "h_n", "c_n", "dx", "dw_ih", "dw_hh", "db_ih", "db_hh"],
                          [y, h, c, *grads], [y_r, h_r, c_r, *grads_r]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= 2e-5, (name, rel_err(a, r))


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_sequence_of_100k_steps_on_gpu(dtype):
    """T = 10⁵ forward and backward through the module, against torch.nn.LSTM in float64 on the same GPU."""
    T = 10**5
    ours, ref = pair(4, 32, dtype=F64, device="cuda")
    ours = ours.to(dtype)
    x = torch.randn(T, 4, 4, dtype=F64, device="cuda")
    build = lambda ls: (ls[0], None)  # noqa: E731
    outs, grads = forward_backward(ours, [x.to(dtype).requires_grad_()], build)
    outs_ref, grads_ref = forward_backward(ref, [x.clone().requires_grad_()], build)
    tol = 1e-10 if dtype == F64 else 5e-4  # float32: sums over 4·10⁵ rows in the weight-gradient GEMMs
    for name, a, r in zip(["y", "h_n", "c_n", "dx", "dw_ih", "dw_hh", "db_ih", "db_hh"], outs + grads,
                          outs_ref + grads_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= tol, (name, rel_err(a, r))


BIG_BATCH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import lstm_triton
    from lstm_triton import lstm_reference

    B, H = 2**27 + 16, 4  # B·4H = 2³¹ + 256
    torch.manual_seed(0)
    m = lstm_triton.LSTM(1, H).to(device="cuda", dtype=torch.bfloat16)
    try:
        x = torch.randn(2, B, 1, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y, (h, c) = m(x)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        print(json.dumps({"status": "oom"}))
        sys.exit(0)
    except (RuntimeError, ValueError) as e:
        if "illegal memory access" in str(e) or "CUDA error" in str(e):
            raise
        print(json.dumps({"status": "refused", "message": str(e)}))
        sys.exit(0)
    rows = torch.cat([torch.arange(16), torch.arange(B - 32, B)]).cuda()
    w = [[t.detach().double() for t in ws] for ws in m.all_weights]
    y_r, (h_r, c_r) = lstm_reference(x[:, rows].double(), None, w)
    err = lambda a, r: ((a.double() - r).abs().max() / r.abs().max().clamp(min=1.0)).item()
    print(json.dumps({"status": "ran", "err_y": err(y[:, rows], y_r), "err_c": err(c[0, rows], c_r[0])}))
    """
)


@needs_cuda
def test_batch_beyond_32_bit_row_offsets_on_gpu(tmp_path):
    """B·4H > 2³¹ on a real GPU: either refused with an error naming the limit, or correct results in the rows
    past 2³¹ — never an illegal memory access (which would also poison this process's CUDA context, hence the
    separate process) nor silently wrong rows."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", BIG_BATCH_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"the run crashed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["status"] == "oom":
        pytest.skip("not enough GPU memory for the problem")
    if result["status"] == "refused":
        assert LIMIT_MESSAGE.search(result["message"]), f"the error does not name the limit: {result['message']}"
    else:
        assert result["err_y"] <= 2e-2 and result["err_c"] <= 2e-2, result


# ----------------------------------------------------------------------------------------------------------------
# Determinism


def _determinism_problem(device, big, path):
    # On a GPU: several batch tiles, and H per path within what the path takes (the persistent tile fits
    # on chip; the cooperative grid spans 16 programs per batch tile).
    T, B, I = (20, 40, 16) if big else (3, 3, 2)
    H = {"persistent": 64, "stepwise": 80, "cooperative": 256}[path] if big else 6
    g = torch.Generator().manual_seed(0)
    k = H ** -0.5
    u = lambda *s: ((torch.rand(*s, generator=g) * 2 - 1) * k).to(device)  # noqa: E731
    weights = [(u(4 * H, I), u(4 * H, H), u(4 * H), u(4 * H), None) for _ in range(2)]
    x = torch.randn(T, B, I, generator=g).to(device)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return x, weights, lengths.to(device)


def _run_directions(x, weights, lengths, path):
    leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for ws in weights for w in ws if w is not None]
    it = iter(leaves[1:])
    ws = [tuple(next(it) if w is not None else None for w in wd) for wd in weights]
    y, h, c = lstm_layer_directions(leaves[0], None, None, ws, lengths=lengths, path=path)
    outs = [y, h, c]
    loss = sum((o * w).sum() for o, w in zip(outs, cotangents(outs)))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_two_forward_backward_runs_are_bitwise_identical(path):
    """Same inputs, twice: outputs and every gradient bitwise equal (weight gradients from GEMMs after the
    loop, no atomics). Bidirectional, per-sequence lengths. On a GPU with a problem that spans many programs."""
    x, weights, lengths = _determinism_problem(DEVICE, big=CUDA, path=path)
    B, H = x.shape[1], weights[0][1].shape[1]
    try:
        plan_lstm(B, H, x.dtype, path=path, directions=2, device=x.device)
    except ValueError as e:
        pytest.skip(str(e))
    first = _run_directions(x, weights, lengths, path)
    second = _run_directions(x, weights, lengths, path)
    for i, (a, b) in enumerate(zip(first, second)):
        assert bitwise_equal(a, b), f"result {i} differs between two identical runs"


def test_module_runs_are_bitwise_identical():
    """The module (packed bidirectional input with projection) twice, with gradients, then twice under no_grad."""
    ours, _ = pair(3, 6, num_layers=2, bidirectional=True, proj_size=4, dtype=F32)
    seqs = [torch.randn(n, 3, device=DEVICE) for n in (4, 2, 5, 1)]
    packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)

    def run():
        leaves = [packed.data.clone().requires_grad_()]
        build = lambda ls: (nn.utils.rnn.PackedSequence(ls[0], *packed[1:]), None)  # noqa: E731
        outs, grads = forward_backward(ours, leaves, build)
        return outs + grads

    for a, b in zip(run(), run()):
        assert bitwise_equal(a, b)
    with torch.no_grad():
        first, second = ours(packed), ours(packed)
    assert bitwise_equal(first[0].data, second[0].data)
    assert all(bitwise_equal(a, b) for a, b in zip(first[1], second[1]))


def test_dropout_between_layers_is_reproducible_under_manual_seed():
    """torch.manual_seed(s) fixes the dropout masks: outputs and gradients bitwise equal for the same seed,
    different for another seed; in eval mode the seed no longer matters."""
    ours, _ = pair(3, 5, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64, device=DEVICE)
    build = lambda ls: (ls[0], None)  # noqa: E731

    def run(seed):
        torch.manual_seed(seed)
        outs, grads = forward_backward(ours, [x.clone().requires_grad_()], build)
        return outs + grads

    a, b, other = run(11), run(11), run(12)
    for i, (u, v) in enumerate(zip(a, b)):
        assert bitwise_equal(u, v), f"result {i} differs under the same seed"
    assert not bitwise_equal(a[0], other[0])
    ours.eval()
    e1, e2 = run(1), run(2)
    assert all(bitwise_equal(u, v) for u, v in zip(e1, e2))


def test_dropout_is_inverted_dropout_between_layers_only():
    """The masks drawn under a seed are those of F.dropout on each layer's output but the last (replayed from
    the same seed on the reference): dropout sits between layers, scaled by 1/(1-p), never after the last."""
    p = 0.4
    ours, _ = pair(3, 5, num_layers=3, dropout=p, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64, device=DEVICE)
    torch.manual_seed(5)
    y, (h, c) = ours(x)
    torch.manual_seed(5)
    masks = [F.dropout(torch.ones(4, 2, 10, dtype=F64, device=DEVICE), p) for _ in range(2)]
    weights = [[w.detach() for w in ws] for ws in ours.all_weights]
    y_r, (h_r, c_r) = lstm_reference(x, None, weights, bidirectional=True, dropout_masks=masks)
    assert rel_err(y, y_r) <= 1e-12 and rel_err(h, h_r) <= 1e-12 and rel_err(c, c_r) <= 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Memory


def _rss_bytes():
    """Resident set size (Linux); 0 where /proc is not available (the RSS check then compares zeros)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _live_tensors():
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_memory_growth_over_1000_training_iterations():
    """1,000 optimizer steps of a tiny model (under the interpreter a step costs its kernels' interpretation,
    whatever the sizes). A wide input (2048 features) amplifies any leak: whatever a step left behind — its
    input (16 KiB), saved tensors, a weight gradient (128 KiB) — adds up to megabytes over the run. After
    warm-up: no more live Python objects or tensors, no RSS growth (CPU), no growth of allocated CUDA memory
    (GPU)."""
    iterations, warmup, features = 1000, 100, 2048
    torch.manual_seed(0)
    model = lstm_triton.LSTM(features, 4).to(DEVICE)
    head = nn.Linear(4, 1).to(DEVICE)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=1e-3, momentum=0.9)

    def step():
        x = torch.randn(2, 1, features, device=DEVICE)
        opt.zero_grad(set_to_none=True)
        y, (h, c) = model(x)
        loss = head(y).square().mean() + c.square().mean()
        loss.backward()
        opt.step()

    def snapshot():
        gc.collect()
        if CUDA:
            torch.cuda.synchronize()
        return len(gc.get_objects()), _live_tensors(), _rss_bytes(), torch.cuda.memory_allocated() if CUDA else 0

    for _ in range(warmup):
        step()
    objects0, tensors0, rss0, cuda0 = snapshot()
    peak_rss = rss0
    for i in range(iterations - warmup):
        step()
        if i % 100 == 99:
            peak_rss = max(peak_rss, _rss_bytes())
    objects1, tensors1, rss1, cuda1 = snapshot()
    assert tensors1 == tensors0, f"live tensors {tensors0} -> {tensors1}"
    assert objects1 - objects0 <= 100, f"live Python objects {objects0} -> {objects1}"
    if CUDA:
        assert cuda1 - cuda0 <= 2**20, f"CUDA memory allocated {cuda0} -> {cuda1}"
    else:
        growth = max(peak_rss, rss1) - rss0
        assert growth <= 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------------------------
# Concurrency


@contextlib.contextmanager
def serialized_interpreter_launches():
    """Triton's interpreter keeps the running program's grid index and its patch of triton.language in module
    globals, so two interpreted launches must not overlap (they do not on a GPU). Serialise each launch and
    nothing else: the library's Python code, its allocations, the stepwise path's per-step loop and the
    autograd engine still interleave between threads. Yields the thread id of every launch, in order."""
    from triton.runtime import interpreter

    lock = threading.Lock()
    order = []
    original = interpreter.GridExecutor.__call__

    def locked(self, *args, **kwargs):
        with lock:
            order.append(threading.get_ident())
            return original(self, *args, **kwargs)

    with mock.patch.object(interpreter.GridExecutor, "__call__", locked):
        yield order


def _thread_work(model, x, stream=None):
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        leaves = [x.clone().requires_grad_()]
        outs, grads = forward_backward(model, leaves, lambda ls: (ls[0], None))
    if stream is not None:
        stream.synchronize()
    return outs + grads


def _run_in_threads(work, n=2, repeats=2):
    results, errors = {}, []
    barrier = threading.Barrier(n)

    def target(i):
        try:
            barrier.wait()
            results[i] = [work(i) for _ in range(repeats)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.mark.skipif(CUDA, reason="the GPU variant runs the threads on two CUDA streams")
@pytest.mark.parametrize("hidden,bidirectional", [(6, True), (40, False)], ids=["persistent", "stepwise"])
def test_two_threads_at_once_on_cpu(hidden, bidirectional):
    """One model, two threads, each running forward + backward on its own input (twice): every result equals
    the single-threaded one bitwise, i.e. the calls share no scratch buffer. H = 40 in float64 takes the
    stepwise path, whose per-step launches interleave between the threads."""
    torch.manual_seed(0)
    model = lstm_triton.LSTM(3, hidden, num_layers=2, bidirectional=bidirectional).double()
    if hidden == 40:
        assert plan_lstm(2, hidden, F64).path == "stepwise"
    xs = [torch.randn(3, 2, 3, dtype=F64) * (i + 1) for i in range(2)]
    expected = [_thread_work(model, x) for x in xs]
    with serialized_interpreter_launches() as order:
        results = _run_in_threads(lambda i: _thread_work(model, xs[i]))
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches >= 2, "the two threads' launches never interleaved; the test proves nothing"
    for i in range(2):
        for got in results[i]:
            for a, b in zip(got, expected[i]):
                assert bitwise_equal(a, b), f"thread {i}: a result differs from the single-threaded run"


@needs_cuda
@pytest.mark.parametrize("hidden,bidirectional,dtype,path", [(16, True, F64, "persistent"),
                                                             (256, False, torch.bfloat16, "cooperative"),
                                                             (300, True, F64, "stepwise")],
                         ids=["persistent", "cooperative", "stepwise"])
def test_two_threads_on_two_cuda_streams(hidden, bidirectional, dtype, path):
    """Two threads, each on its own CUDA stream, running forward + backward at the same time: results equal the
    serial ones bitwise. On the cooperative path (bfloat16 H = 256: a grid of programs that wait for each
    other) two such launches side by side must both complete, correctly, whatever share of the SMs each one
    gets: the cooperative-grid launch starts all of a launch's programs together or not at all."""
    torch.manual_seed(0)
    model = lstm_triton.LSTM(16, hidden, num_layers=2, bidirectional=bidirectional).to("cuda", dtype)
    xs = [torch.randn(50, 8, 16, dtype=dtype, device="cuda") * (i + 1) for i in range(2)]
    with lstm_triton.recorded_plans() as plans:
        expected = [_thread_work(model, x) for x in xs]
    if {p.path for p in plans} != {path}:
        pytest.skip(f"this GPU runs {sorted({p.path for p in plans})}, not the {path} path, for this problem")
    streams = [torch.cuda.Stream() for _ in range(2)]
    results = _run_in_threads(lambda i: _thread_work(model, xs[i], streams[i]), repeats=3)
    torch.cuda.synchronize()
    lstm_triton.check_errors()
    for i in range(2):
        for got in results[i]:
            for a, b in zip(got, expected[i]):
                assert bitwise_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 CPU processes (gloo) against one process on the whole batch.

DDP_WORKER = textwrap.dedent(
    """
    import os, sys
    from datetime import timedelta

    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import lstm_triton

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    spec = torch.load(os.path.join(workdir, "spec.pt"), weights_only=True)
    model = lstm_triton.LSTM(**spec["kwargs"]).double()
    model.load_state_dict(spec["state"])
    assert lstm_triton.triton_enabled(spec["x"]), "the worker is not on the Triton path"
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    B = spec["x"].shape[1] // world
    rows = slice(rank * B, (rank + 1) * B)
    out = {"grads": [], "state": None}
    for step in range(spec["steps"]):
        opt.zero_grad()
        y, (h, c) = ddp(spec["x"][:, rows])
        cy, ch, cc = spec["cot"]
        loss = (y * cy[:, rows]).sum() + (h * ch[:, rows]).sum() + (c * cc[:, rows]).sum()
        loss.backward()
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    dist.barrier()
    # Leave without tearing gloo down: its threads can abort a normal exit ("terminate called without an
    # active exception") after all the work above is done and saved; the barrier says both ranks are done.
    sys.stdout.flush()
    os._exit(0)
    """
)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_matches_one_process(tmp_path):
    """Two gloo processes, each with half the batch, two SGD steps: each step's gradients (averaged by DDP) and
    the final parameters equal one process training on the whole batch with the loss halved."""
    world, steps = 2, 2
    kwargs = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    model = lstm_triton.LSTM(**kwargs).double()
    x = torch.randn(3, 4, 3, dtype=F64)
    cot = tuple(torch.randn(s, dtype=F64) for s in [(3, 4, 10), (4, 4, 5), (4, 4, 5)])
    torch.save({"kwargs": kwargs, "state": model.state_dict(), "x": x, "cot": cot, "steps": steps},
               tmp_path / "spec.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), TRITON_INTERPRET="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the loopback device, whatever the host name resolves to
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(world), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    # Meanwhile, the single-process run on the whole batch.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = []
    for _ in range(steps):
        opt.zero_grad()
        y, (h, c) = model(x)
        loss = ((y * cot[0]).sum() + (h * cot[1]).sum() + (c * cot[2]).sum()) / world
        loss.backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            logs.append(out.decode(errors="replace")[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r] if r < len(logs) else ''}"
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for step in range(steps):
            for name, g in expected[step].items():
                assert rel_err(got["grads"][step][name], g) <= 1e-12, (r, step, name)
        for name, v in model.state_dict().items():
            assert rel_err(got["state"][name], v) <= 1e-12, (r, name)


# ----------------------------------------------------------------------------------------------------------------
# Persistence

PERSIST_CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
    dict(num_layers=2, bias=False, dropout=0.2),
]


@pytest.mark.parametrize("kwargs", PERSIST_CONFIGS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_state_dict_round_trips_with_torch_lstm_through_files(kwargs, tmp_path):
    """state_dicts saved to disk and loaded with weights_only=True go both ways between lstm_triton.LSTM and
    torch.nn.LSTM (strict), and the loaded modules compute the same thing."""
    ours, ref = pair(4, 6, **kwargs)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 4, dtype=F64, device=DEVICE)
    expected = ref(x)[0]
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    torch.save(ref.state_dict(), tmp_path / "torch.pt")
    into_torch = nn.LSTM(4, 6, **kwargs).to(device=DEVICE, dtype=F64).eval()
    into_torch.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True), strict=True)
    into_ours = lstm_triton.LSTM(4, 6, **kwargs).to(device=DEVICE, dtype=F64).eval()
    into_ours.load_state_dict(torch.load(tmp_path / "torch.pt", weights_only=True), strict=True)
    assert rel_err(into_torch(x)[0], expected) <= 1e-12
    assert rel_err(into_ours(x)[0], expected) <= 1e-12
    assert list(torch.load(tmp_path / "ours.pt", weights_only=True)) == list(ref.state_dict())


def test_saved_and_loaded_module_keeps_training(tmp_path):
    """torch.save(module) / torch.load: the same class and hyperparameters, and a loaded module trains like the
    original (its flat weights are its parameters, so optimizer steps take effect) — step for step like a
    torch.nn.LSTM loaded from the same state_dict."""
    ours, ref = pair(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    torch.save(ours, tmp_path / "module.pt")
    buf = io.BytesIO()
    torch.save(nn.Sequential(ours, nn.Identity()), buf)
    buf.seek(0)
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    in_seq = torch.load(buf, weights_only=False)[0]
    for m in (loaded, in_seq):
        assert type(m) is lstm_triton.LSTM and repr(m) == repr(ours)
        assert all(a is b for a, b in zip(m._flat_weights, m.parameters()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (loaded, ref)]
    x = torch.randn(3, 2, 4, dtype=F64, device=DEVICE)
    for _ in range(2):
        for m, opt in zip((loaded, ref), opts):
            opt.zero_grad()
            m(x)[0].square().sum().backward()
            opt.step()
    assert rel_err(loaded(x)[0], ref(x)[0]) <= 1e-12
    assert not torch.equal(loaded.weight_hh_l0, ours.weight_hh_l0)  # the load is a copy, not an alias
