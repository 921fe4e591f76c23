"""The implementations the suite compares, each wrapped as one function ``(x, h0, c0) -> (y, h_n, c_n)``.

Every provider computes the same thing — one layer, seq-first, both biases, ``torch.nn.LSTM``'s gate order
and weights — so rows compare like with like:

- ``lstm_triton``: ``lstm_triton.LSTM`` (Triton kernels on CUDA; on CPU its fallback, or the interpreter).
- ``cudnn``: ``torch.nn.LSTM`` on CUDA after ``flatten_parameters()``; which cuDNN algorithm PyTorch picks
  depends on the dtype (only float16 can get the persistent kernel), see :func:`cudnn_algorithm_rule`.
- ``torch_cpu``: ``torch.nn.LSTM`` on CPU, the baseline where there is no GPU.
- ``naive``: ``lstm_triton.lstm_layer_reference`` run eagerly in the row's dtype: a plain PyTorch loop.
- ``torch_compile``: the same reference's step (``lstm_cell_reference``) under ``torch.compile``, driven by a
  Python loop over time. Compiling the whole loop unrolls all T steps into one graph (minutes of compile
  time at T=1024: measured 50 s at T=16 on CPU), so the step is what users end up compiling.
- ``flashrnn_<backend>``: FlashRNN (PyPI ``flashrnn``) where it is installed. It compiles CUDA at first use;
  a backend that fails to build or run becomes a skipped row.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

import lstm_triton
from lstm_triton import lstm_cell_reference, lstm_layer_reference, recorded_plans

from .shapes import DTYPES, Shape

FLASHRNN_BACKENDS = {
    "flashrnn_cuda_fused": "cuda_fused",
    "flashrnn_cuda": "cuda",
    "flashrnn_triton_fused": "triton_fused",  # its README calls it "triton"; the code says "triton_fused"
}
FAST = ("lstm_triton", "cudnn", "torch_cpu")
# Slow to run (a Python loop over T: 0.1–0.5 s per call at T=1024) or to build (nvcc, inductor): few reps.
SLOW = ("naive", "torch_compile", *FLASHRNN_BACKENDS)
ALL = FAST + SLOW

Call = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class Skip(Exception):
    """The provider does not apply to this case; the message says why and goes into the row."""


@dataclass
class Runner:
    call: Call  # (x [T, B, I], h0 [B, H], c0 [B, H]) -> (y [T, B, H], h_n [B, H], c_n [B, H])
    params: list[Tensor]  # w_ih, w_hh, b_ih, b_hh: the weights whose gradients train mode computes
    info: dict = field(default_factory=dict)  # extra row fields


def flashrnn_available() -> bool:
    return importlib.util.find_spec("flashrnn") is not None


def default_providers(device: str) -> list[str]:
    if device != "cuda":
        return ["lstm_triton", "torch_cpu", "naive"]
    return ["lstm_triton", "cudnn", "naive", "torch_compile", *(FLASHRNN_BACKENDS if flashrnn_available() else ())]


def parse_providers(text: str) -> list[str]:
    """Comma-separated names from :data:`ALL`; ``flashrnn`` stands for all of its backends."""
    names: list[str] = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        names.extend(FLASHRNN_BACKENDS if name == "flashrnn" else [name])
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; expected some of {', '.join(ALL)} (or flashrnn)")
    return list(dict.fromkeys(names))


def build(provider: str, shape: Shape, dtype_name: str, mode: str, weights, device: str) -> Runner:
    """The provider set up for one case: weights copied from ``weights`` (float64) into the row's dtype."""
    return _BUILDERS[provider](shape, dtype_name, mode, weights, device)


def cudnn_algorithm_rule(shape: Shape, dtype_name: str, forward: bool) -> str:
    """The cuDNN algorithm PyTorch asks for (aten/src/ATen/native/cudnn/RNN.cpp, ``get_algo``).

    For one unidirectional layer on an sm_80+ GPU with ≥ 98 SMs other than sm_86 (A100, H100, H200).
    Used only where the profiler cannot tell what actually ran.
    """
    if dtype_name != "float64" and shape.H <= (192 if forward else 128):
        return "persistent-small-h"
    fp16_persistent = (shape.H <= 1024 and shape.H % 128 == 0 and shape.I % 128 == 0
                       and shape.B % 8 == 0 and shape.B <= 128)
    return "persistent" if dtype_name == "float16" and fp16_persistent else "standard"


def _cast_params(weights, dtype: torch.dtype, mode: str) -> list[Tensor]:
    return [w.to(dtype).requires_grad_(mode == "train") for w in weights]


def _module(cls, shape: Shape, dtype_name: str, mode: str, weights, device: str):
    module = cls(shape.I, shape.H, device=device, dtype=DTYPES[dtype_name])
    with torch.no_grad():
        for p, w in zip(module.parameters(), weights):
            p.copy_(w)
    module.train(mode == "train")  # eval: cuDNN's inference path, no reserve space

    def call(x, h0, c0):
        y, (h, c) = module(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
        return y, h[0], c[0]

    return module, call


def _lstm_triton(shape, dtype_name, mode, weights, device):
    module, call = _module(lstm_triton.LSTM, shape, dtype_name, mode, weights, device)
    info: dict = {}

    def first_call_records_the_path(x, h0, c0):
        # The path is what the op reports it ran (lstm_triton.recorded_plans), never recomputed here.
        if "kernel_path" in info:
            return call(x, h0, c0)
        with recorded_plans() as plans:
            out = call(x, h0, c0)
        if not plans:
            info["kernel_path"] = "cpu-fallback"  # torch._VF.lstm: the kernels need CUDA or TRITON_INTERPRET=1
        else:
            path = "+".join(dict.fromkeys(p.path for p in plans))
            info["kernel_path"] = path if device == "cuda" else f"{path} (interpreter)"
        return out

    return Runner(first_call_records_the_path, list(module.parameters()), info)


def _cudnn(shape, dtype_name, mode, weights, device):
    if device != "cuda":
        raise Skip("cuDNN needs a CUDA device")
    module, call = _module(torch.nn.LSTM, shape, dtype_name, mode, weights, device)
    module.flatten_parameters()
    return Runner(call, list(module.parameters()))


def _torch_cpu(shape, dtype_name, mode, weights, device):
    if device != "cpu":
        raise Skip("torch_cpu is the CPU baseline; on CUDA the baseline is cudnn")
    module, call = _module(torch.nn.LSTM, shape, dtype_name, mode, weights, device)
    return Runner(call, list(module.parameters()))


def _naive(shape, dtype_name, mode, weights, device):
    params = _cast_params(weights, DTYPES[dtype_name], mode)
    return Runner(lambda x, h0, c0: lstm_layer_reference(x, h0, c0, *params), params)


def _torch_compile(shape, dtype_name, mode, weights, device):
    params = _cast_params(weights, DTYPES[dtype_name], mode)
    torch._dynamo.reset()  # a fresh compile per row: dtypes and TF32 settings must not share a cache entry
    cell = torch.compile(lstm_cell_reference, dynamic=False, fullgraph=True)

    def call(x, h0, c0):
        h, c, ys = h0, c0, []
        for x_t in x.unbind(0):
            h, c = cell(x_t, h, c, *params)
            ys.append(h)
        return torch.stack(ys), h, c

    return Runner(call, params)


def _flashrnn_function():
    """FlashRNN's ``flashrnn`` function; the package and its subpackage share the name."""
    fn = importlib.import_module("flashrnn").flashrnn
    return fn if callable(fn) else fn.flashrnn


def _flashrnn(backend: str):
    def build_flashrnn(shape, dtype_name, mode, weights, device):
        if device != "cuda":
            raise Skip("FlashRNN needs a CUDA device")
        if dtype_name not in ("bfloat16", "float16", "float32"):
            raise Skip(f"FlashRNN has no {dtype_name} mode")
        if backend == "triton_fused" and shape.H > 64:
            raise Skip("FlashRNN's triton_fused backend needs head dim <= 64; a dense LSTM is one head of H")
        try:
            flashrnn = _flashrnn_function()
        except (ImportError, AttributeError) as e:
            raise Skip(f"flashrnn not importable: {e}") from e
        params = _cast_params(weights, DTYPES[dtype_name], mode)
        w_ih, w_hh, b_ih, b_hh = params
        H = shape.H

        def call(x, h0, c0):
            # FlashRNN takes the input projection precomputed, [B, T, gates, heads, head dim], one head of H.
            T, B, I = x.shape
            wx = (x.reshape(T * B, I) @ w_ih.t()).view(T, B, 4, 1, H).transpose(0, 1)
            states = torch.stack((h0, c0)).view(2, B, 1, 1, H)
            seq, last = flashrnn(wx, w_hh.view(4, 1, H, H), (b_ih + b_hh).view(4, 1, H), states=states,
                                 function="lstm", backend=backend, dtype=dtype_name)
            return seq[0].reshape(B, T, H).transpose(0, 1), last[0].reshape(B, H), last[1].reshape(B, H)

        # Build (nvcc) now, on one step, so a failure is a skipped row rather than a failed one.
        dtype = DTYPES[dtype_name]
        sizes = ((1, shape.B, shape.I), (shape.B, H), (shape.B, H))
        probe = [torch.randn(*size, device=device, dtype=dtype) for size in sizes]
        try:
            with torch.no_grad():
                call(*probe)
        except Exception as e:  # noqa: BLE001 (any build or launch failure of a third-party backend)
            raise Skip(f"FlashRNN {backend} failed to build or run: {type(e).__name__}: {str(e)[:200]}") from e
        return Runner(call, params)

    return build_flashrnn


_BUILDERS = {
    "lstm_triton": _lstm_triton,
    "cudnn": _cudnn,
    "torch_cpu": _torch_cpu,
    "naive": _naive,
    "torch_compile": _torch_compile,
    **{name: _flashrnn(backend) for name, backend in FLASHRNN_BACKENDS.items()},
}
