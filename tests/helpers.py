"""Shared test utilities: random LSTM problems, gradients through every output, error measures, observed kernel
launches."""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

# The kernels are tested on the GPU when there is one, else on the CPU through Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Finite-difference-free checks compare with the float64 reference. The error measure is
# max|a - b| / max(1, max|ref|): relative for large tensors, absolute near zero.


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
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


def output_cotangents(y, h_n, c_n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device) for t in (y, h_n, c_n)]


def run_with_grads(fn, problem, cotangents=None):
    """Run ``fn(**problem)`` -> (y, h_n, c_n) and differentiate a random projection of all three outputs
    with respect to every tensor input. Returns (outputs, {name: grad}, cotangents)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in problem.items() if t is not None}
    args = {n: leaves.get(n) for n in problem}
    outs = fn(**args)
    if cotangents is None:
        cotangents = output_cotangents(*outs)
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
    ``LSTM`` / ``torch.nn.LSTM``, or with ``cell=True`` ``LSTMCell`` / ``torch.nn.LSTMCell``."""
    import lstm_triton

    ours_cls, ref_cls = (lstm_triton.LSTMCell, torch.nn.LSTMCell) if cell else (lstm_triton.LSTM, torch.nn.LSTM)
    torch.manual_seed(seed)
    ref = ref_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ours = ours_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# Kernel launches, observed. Every Triton kernel, whichever module launches it, goes through
# JITFunction.run (GPU) or InterpretedFunction.run (interpreter).


class KernelLaunched(Exception):
    pass


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
