"""Shared test utilities: constants, random LSTM problems, random cotangents and gradients through every output,
module pairs (ours and torch's with the same state_dict), error measures and comparisons, observed kernel launches
and the Hypothesis settings and strategies of the property tests.

Nothing here imports triton or lstm_triton at import time (conftest.py sets TRITON_INTERPRET before either is
first imported); the helpers that need them import them when called.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence

F64 = torch.float64
F32 = torch.float32
# The kernels are tested on the GPU when there is one, else on the CPU through Triton's interpreter.
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# The repository's root (benchmarks/, tools/, examples/ and the package are found from it).
REPO = Path(__file__).resolve().parents[1]
# Every kernel path a caller can force with ``path=``.
KERNEL_PATHS = ["persistent", "cooperative", "stepwise"]

# Finite-difference-free checks compare with the float64 reference. The error measure is
# max|a - b| / max(1, max|ref|): relative for large tensors, absolute near zero.


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max(1, max|ref|), computed in float64; 0 for empty tensors."""
    a, ref = a.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((a - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def make_layer_problem(T, B, I, H, dtype=torch.float64, device=DEVICE, with_state=True, bias=True, seed=0):
    """Inputs and weights of one layer in torch.nn.LSTM's layout, drawn with torch.nn.LSTM's init scale."""
    g = torch.Generator().manual_seed(seed)
    k = H ** -0.5

    def u(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k).to(device)

    x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(device)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64).to(device) * 0.5 if with_state else None
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64).to(device) * 0.5 if with_state else None
    w_ih, w_hh = u(4 * H, I), u(4 * H, H)
    b_ih, b_hh = (u(4 * H), u(4 * H)) if bias else (None, None)
    tensors = dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    return {name: None if t is None else t.to(dtype) for name, t in tensors.items()}


def random_cotangents(outs, seed, cast=True):
    """One random cotangent per output: drawn in float64 from a single generator seeded ``seed`` (one draw per
    output, in order), on the output's device, and cast to the output's dtype (``cast=False``: kept float64)."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]
    return [d.to(device=o.device, dtype=o.dtype) if cast else d.to(o.device) for d, o in zip(draws, outs)]


def projection_loss(outs, seed=7):
    """A fixed random projection of every output, sum((o * w).sum()) with ``random_cotangents(outs, seed)``: each
    output gets a gradient of its own."""
    return sum((o * w).sum() for o, w in zip(outs, random_cotangents(outs, seed)))


def run_with_grads(fn, problem, cotangents=None):
    """Run ``fn(**problem)`` -> (y, h_n, c_n) and differentiate a random projection of all three outputs
    with respect to every tensor input. Returns (outputs, {name: grad}, cotangents); the cotangents, unless
    given, are ``random_cotangents(outputs, seed=1, cast=False)`` and the projection is taken in float64."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in problem.items() if t is not None}
    args = {n: leaves.get(n) for n in problem}
    outs = fn(**args)
    if cotangents is None:
        cotangents = random_cotangents(outs, seed=1, cast=False)
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves.keys(), grads)), cotangents


class WeightDrop(torch.nn.Module):
    """The AWD-LSTM weight-drop pattern: the RNN's ``name`` parameter is removed from its parameters and kept as
    ``<name>_raw``; before every forward the RNN gets a dropped-out copy of it as a plain tensor attribute."""

    def __init__(self, rnn: torch.nn.Module, name: str = "weight_hh_l0", p: float = 0.5):
        super().__init__()
        self.rnn, self.name, self.p = rnn, name, p
        weight = rnn._parameters.pop(name)
        rnn.register_parameter(name + "_raw", torch.nn.Parameter(weight.data))

    def forward(self, *args):
        raw = getattr(self.rnn, self.name + "_raw")
        setattr(self.rnn, self.name, torch.nn.functional.dropout(raw, self.p, self.training))
        return self.rnn(*args)


def module_pair(*args, cell=False, dtype=torch.float64, device=DEVICE, seed=0, **kwargs):
    """(lstm_triton module, torch.nn module) built with the same arguments and carrying the same state_dict:
    ``LSTM`` / ``torch.nn.LSTM``, or with ``cell=True`` ``LSTMCell`` / ``torch.nn.LSTMCell``. torch's module is
    initialised right after ``torch.manual_seed(seed)``; both are cast to ``dtype`` and moved to ``device``."""
    import lstm_triton

    ours_cls, ref_cls = (lstm_triton.LSTMCell, torch.nn.LSTMCell) if cell else (lstm_triton.LSTM, torch.nn.LSTM)
    torch.manual_seed(seed)
    ref = ref_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ours = ours_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def kwargs_id(kwargs, empty):
    """A test id for constructor keywords: "k1=v1-k2=v2", or ``empty`` for none."""
    return "-".join(f"{k}={v}" for k, v in kwargs.items()) or empty


def forward_backward(module, leaves, build, seed=7):
    """``build(leaves) -> (input, hx)``; returns (outputs [y, h_n, c_n], grads of ``projection_loss`` (with
    ``seed``) of all three w.r.t. the leaves and then the module's parameters). A packed output counts with its
    ``.data``."""
    x, hx = build(leaves)
    out, (h, c) = module(x, hx)
    outs = [out.data if isinstance(out, PackedSequence) else out, h, c]
    grads = torch.autograd.grad(projection_loss(outs, seed), list(leaves) + list(module.parameters()))
    return [o.detach() for o in outs], list(grads)


def assert_parity(ours, ref, x, hx=None, tol=1e-12):
    """Outputs (shape, dtype, values) and the gradients w.r.t. input, hx and every parameter of ``ours`` equal
    ``ref``'s within ``tol`` (``rel_err``), each module run on its own copies of ``x`` (a tensor or a
    PackedSequence) and ``hx``. On a GPU both modules, the input and hx move there (ours on the kernels, torch on
    cuDNN / its CUDA LSTM)."""
    ours.to(DEVICE), ref.to(DEVICE)
    x = x.to(DEVICE)
    hx = None if hx is None else tuple(t.to(DEVICE) for t in hx)
    packed = isinstance(x, PackedSequence)

    def run(module):
        leaves = [(x.data if packed else x).detach().clone().requires_grad_()]
        if hx is not None:
            leaves += [t.detach().clone().requires_grad_() for t in hx]

        def build(ls):
            inp = PackedSequence(ls[0], x.batch_sizes, x.sorted_indices, x.unsorted_indices) if packed else ls[0]
            return inp, None if hx is None else (ls[1], ls[2])

        return forward_backward(module, leaves, build)

    outs, grads = run(ours)
    outs_r, grads_r = run(ref)
    for name, a, b in zip(("output", "h_n", "c_n"), outs, outs_r):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    names = ["input"] + (["h0", "c0"] if hx is not None else []) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, grads_r):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


def bitwise_equal(a, b):
    """Same dtype, shape and bits, NaN matching NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b)) and torch.equal(a.isnan(), b.isnan())


def seeded_loss_and_grads(fn, args, params, seed):
    """``fn(*args)`` -> a scalar loss, run right after ``torch.manual_seed(seed)`` (dropout draws from the global
    generator); returns [the loss, detached, then its gradient w.r.t. each of ``params``]."""
    torch.manual_seed(seed)
    loss = fn(*args)
    return [loss.detach(), *torch.autograd.grad(loss, list(params))]


# Kernel launches, observed. Every Triton kernel, whichever module launches it, goes through
# JITFunction.run (GPU) or InterpretedFunction.run (interpreter).


class KernelLaunched(Exception):
    """Raised at a kernel launch inside ``intercepted_launches(fail=True)``."""


@contextlib.contextmanager
def intercepted_launches(fail=False):
    """Intercept every Triton kernel launch inside the block, whichever module launches it (JITFunction.run on a
    GPU, InterpretedFunction.run under the interpreter): nothing runs. Yields the list of launches as
    (kernel name, {argument name: value}); with ``fail=True`` a launch raises KernelLaunched instead."""
    from triton.runtime import interpreter, jit

    launches = []

    def fake(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        name = getattr(self.fn, "__name__", str(self.fn))
        if fail:
            raise KernelLaunched(name)
        launches.append((name, {**dict(zip(self.arg_names, args)), **kwargs}))
        return None

    with mock.patch.object(jit.JITFunction, "run", fake), \
            mock.patch.object(interpreter.InterpretedFunction, "run", fake):
        yield launches


# Errors: ours must raise what torch raises, type and message, before any kernel runs.

# Where torch leaks a backend error instead of a message about the call, ours must say what is wrong
# (same exception type, a message naming the offending thing).
TORCH_BACKEND_LEAKS = {
    "get_mkldnn_dtype: unsupported data type": r"dtype",
    "is not on the expected device": r"device",
}


def assert_same_error(call_ours, call_ref, ours_own=None, before_any_kernel=True, backend_leaks=TORCH_BACKEND_LEAKS):
    """Both calls raise: the same type and message. ``ours_own`` (a regex): where torch's error depends on the
    backend, ours raises a RuntimeError whose message matches it instead. ``before_any_kernel``: no kernel ran for
    ours (a launch fails the test). ``backend_leaks`` ({fragment of torch's message: regex}): where torch's
    message holds the fragment, ours need only match the regex; ``{}`` asks for torch's message verbatim always."""
    with pytest.raises(Exception) as ref_err:
        call_ref()
    with intercepted_launches(fail=True) if before_any_kernel else contextlib.nullcontext():
        with pytest.raises(Exception) as ours_err:
            call_ours()
    ours_e, ref_e = ours_err.value, ref_err.value
    assert not isinstance(ours_e, KernelLaunched), f"a kernel ran before the error ({ours_e}); torch raises {ref_e!r}"
    if ours_own is not None:
        assert isinstance(ours_e, RuntimeError) and re.search(ours_own, str(ours_e)), repr(ours_e)
        return
    assert type(ours_e) is type(ref_e), f"ours: {ours_e!r}\ntorch: {ref_e!r}"
    for leak, must_name in backend_leaks.items():
        if leak in str(ref_e):
            assert re.search(must_name, str(ours_e)), f"ours: {ours_e!r} does not name the {must_name}"
            return
    assert str(ours_e) == str(ref_e), f"ours: {ours_e!r}\ntorch: {ref_e!r}"


def assert_raises_before_any_kernel(call, error, match):
    """``call()`` raises an ``error`` whose message matches the regex ``match``, and no kernel ran before it."""
    with intercepted_launches(fail=True):
        with pytest.raises(Exception) as info:
            call()
    assert not isinstance(info.value, KernelLaunched), f"a kernel ran before the error: {info.value}"
    assert isinstance(info.value, error), repr(info.value)
    assert info.match(match)


def _hypothesis_settings():
    """The settings of the property tests, FAST, SLOW and MANY.

    Hypothesis: derandomized (the same examples on every run, no example database written to the checkout);
    the interpreter is slow, so no deadline, few examples, and no shrinking (a failure reports the first failing
    example as drawn: shrinking one through the interpreter would take minutes)."""
    fast = settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=40,
        phases=[Phase.explicit, Phase.generate],
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )
    return dict(
        FAST=fast,
        SLOW=settings(fast, max_examples=20),  # examples that run kernels
        MANY=settings(fast, max_examples=150),  # examples that must not get as far as a kernel
    )


def __getattr__(name):
    """FAST, SLOW and MANY (see ``_hypothesis_settings``), made when a test module first imports them rather than
    when conftest.py imports this module: by then the hypothesis pytest plugin has loaded its profile (e.g.
    ``--hypothesis-verbosity``), which settings inherit when they are made."""
    if name in ("FAST", "SLOW", "MANY"):
        globals().update(_hypothesis_settings())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def source_seed(digest_hex):
    """``hypothesis.seed`` for a derandomized property test whose source has changed: it draws the examples that
    its earlier source drew. Derandomized examples come from a hash of the test's source (hypothesis'
    ``function_digest``), so any edit draws others; the property tests moved out of test_reliability.py call the
    shared helpers under other names and are pinned, with this, to the hash (hex) of their source there."""
    return seed(int(digest_hex, 16))


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


def valid_shapes(I, H, kwargs, T, B):
    """Valid (input shape, h0 shape, c0 shape) for an ``lstm_config``."""
    LD = kwargs["num_layers"] * (2 if kwargs["bidirectional"] else 1)
    P = kwargs["proj_size"] or H
    if B is None:
        return (T, I), (LD, P), (LD, H)
    x = (B, T, I) if kwargs["batch_first"] else (T, B, I)
    return x, (LD, B, P), (LD, B, H)
