"""PyTorch's own LSTM (``torch._VF.lstm``, the module's path where the Triton kernels cannot run) as one opaque
custom op, for ``torch.compile`` on that path.

torch.nn.LSTM is never traced by Dynamo: it graph-breaks and runs eagerly (torch._dynamo.config.allow_rnn is
off). Our module is traced, and so is its ``_VF.lstm`` call, into torch's Python decomposition of aten::lstm
(torch/_decomp/decompositions.py, ``lstm_impl``). That decomposition takes oneDNN's inference-only kernel
(``mkldnn_rnn_layer`` with train=False, which saves no workspace) whenever the *input* does not require grad,
without looking at the weights; when the weights do require grad, backward then needs the workspace the kernel
never wrote (aot_eager: "expected all tensors_saved_with_vc_check to be Tensors"; inductor: "expected Tensor()
for op: torch.ops.aten.mkldnn_rnn_layer.default"). When the input does require grad (an embedding before the
LSTM) the other decomposition unrolls the recurrence step by step, specialising the graph on the sequence length.
torch.nn.LSTM with allow_rnn=True fails in the same way.

So under compile the module calls _VF.lstm through the opaque custom op below instead: compiled code runs exactly
the eager computation (same kernels, same results, dropout drawn from the same generator), the sequence length
stays symbolic, and fullgraph=True holds. Its backward re-runs _VF.lstm under autograd (restoring the generator
state when dropout is active) and differentiates that: one more forward of the recurrence in exchange for a graph
without break. Eager calls (no compile) keep calling _VF.lstm directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, _VF
from torch._C import DispatchKey

__all__ = ["aten_lstm", "exporting", "vf_lstm"]

_RNG_STATE_NUMEL = torch.get_rng_state().numel()


def vf_lstm(input: Tensor, batch_sizes: Optional[Tensor], hx, params, has_biases: bool, num_layers: int,
            dropout: float, train: bool, bidirectional: bool, batch_first: bool):
    """``_VF.lstm`` for padded (batch_sizes None) or packed input."""
    if batch_sizes is not None:
        return _VF.lstm(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)
    return _VF.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


def _fresh(t: Tensor) -> Tensor:
    """A custom op's output must be a new, contiguous tensor (what its fake says), never a view of anything."""
    return t if t.is_contiguous() and not t._is_view() else t.clone(memory_format=torch.contiguous_format)


def _draws_dropout(dropout: float, train: bool, num_layers: int) -> bool:
    return train and dropout > 0 and num_layers > 1


@torch.library.custom_op("lstm_triton::aten_lstm", mutates_args=())
def aten_lstm(
    input: Tensor, batch_sizes: Optional[Tensor], hx: list[Tensor], params: list[Tensor], has_biases: bool,
    num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool, grad_enabled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_VF.lstm`` as one op: (output, h_n, c_n, the CPU generator state before the call, or empty).

    grad_enabled: the caller's grad mode. oneDNN's multi-layer LSTM rounds differently with grad mode on and
    off; the op runs in the caller's mode (autograd records nothing inside an op) to give eager's exact bits."""
    draws = _draws_dropout(dropout, train, num_layers)
    rng_state = torch.get_rng_state() if draws else torch.empty(0, dtype=torch.uint8)
    with torch.set_grad_enabled(grad_enabled):
        output, h_n, c_n = vf_lstm(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
                                    bidirectional, batch_first)
    return _fresh(output), _fresh(h_n), _fresh(c_n), rng_state


@aten_lstm.register_fake
def _(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
      grad_enabled):
    D = 2 if bidirectional else 1
    h0, c0 = hx
    if batch_sizes is not None or not batch_first:
        out_shape = (*input.shape[:-1], D * h0.shape[-1])
    else:
        out_shape = (input.shape[0], input.shape[1], D * h0.shape[-1])
    numel = _RNG_STATE_NUMEL if _draws_dropout(dropout, train, num_layers) else 0
    return (input.new_empty(out_shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            torch.empty(numel, dtype=torch.uint8))


def _autograd_keys_back():
    """A custom op's kernel runs below autograd: the autograd dispatch keys are excluded there. The backward op
    re-runs _VF.lstm under autograd, so it puts them back for that, the way torch's own higher-order ops do."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor,
                DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("lstm_triton::aten_lstm_backward", mutates_args=())
def _aten_lstm_backward(
    grads: list[Tensor], input: Tensor, batch_sizes: Optional[Tensor], hx: list[Tensor], params: list[Tensor],
    rng_state: Tensor, has_biases: bool, num_layers: int, dropout: float, train: bool, bidirectional: bool,
    batch_first: bool, needs: list[bool],
) -> list[Tensor]:
    """Gradients of _VF.lstm w.r.t. (input, h_0, c_0, *params), by re-running it under autograd with the
    generator state of the forward. needs: one flag per tensor; gradients not needed come back empty."""
    inputs = [input, *hx, *params]
    with _autograd_keys_back(), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        if rng_state.numel():
            torch.set_rng_state(rng_state)
        leaves = [t.detach().requires_grad_(True) if need else t for t, need in zip(inputs, needs)]
        outs = vf_lstm(leaves[0], batch_sizes, leaves[1:3], leaves[3:], has_biases, num_layers, dropout, train,
                        bidirectional, batch_first)
        wrt = [t for t, need in zip(leaves, needs) if need]
        result = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
    out, seen = [], set()
    for t, need in zip(inputs, needs):
        g = next(result) if need else t.new_empty(0)
        if g is None:  # allow_unused: a weight the recurrence never reached
            g = torch.zeros_like(t, memory_format=torch.contiguous_format)
        # Outputs must not alias each other: autograd hands out one tensor for both biases.
        out.append(g.clone(memory_format=torch.contiguous_format) if id(g) in seen else _fresh(g))
        seen.add(id(g))
    return out


@_aten_lstm_backward.register_fake
def _(grads, input, batch_sizes, hx, params, rng_state, has_biases, num_layers, dropout, train, bidirectional,
      batch_first, needs):
    return [t.new_empty(t.shape if need else (0,)) for t, need in zip([input, *hx, *params], needs)]


def _aten_lstm_setup_context(ctx, inputs, output):
    input, batch_sizes, hx, params, *flags, _grad_enabled = inputs
    ctx.save_for_backward(input, batch_sizes, *hx, *params, output[3])
    ctx.flags = tuple(flags)
    ctx.num_params = len(params)


def _aten_lstm_backward_formula(ctx, d_output, d_h_n, d_c_n, _d_rng_state):
    input, batch_sizes, h0, c0, *rest = ctx.saved_tensors
    params, rng_state = rest[:ctx.num_params], rest[ctx.num_params]
    n = ctx.needs_input_grad
    needs = [bool(n[0]), *map(bool, n[2]), *map(bool, n[3])]
    result = _aten_lstm_backward([d_output, d_h_n, d_c_n], input, batch_sizes, [h0, c0], params, rng_state,
                                 *ctx.flags, needs)
    result = [g if need else None for g, need in zip(result, needs)]
    return (result[0], None, result[1:3], result[3:]) + (None,) * (len(ctx.flags) + 1)


torch.library.register_autograd("lstm_triton::aten_lstm", _aten_lstm_backward_formula,
                                setup_context=_aten_lstm_setup_context)


def exporting() -> bool:
    # torch.compiler.is_exporting() returns this flag, but Dynamo folds the call to True in any torch.compile
    # trace on torch 2.11 (2.13 folds it to the flag); the flag itself is right on both.
    return torch.compiler._is_exporting_flag
