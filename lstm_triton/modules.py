"""``LSTM`` and ``LSTMCell``: drop-in replacements for ``torch.nn.LSTM`` / ``torch.nn.LSTMCell``.

Same constructor, parameters (names, order, shapes, init), ``state_dict``, shapes and error messages as
the torch modules; the recurrence runs on the fused Triton kernels (:mod:`lstm_triton.ops`) wherever they
can run (CUDA, or CPU under ``TRITON_INTERPRET=1``), and on PyTorch's own CPU LSTM (``torch._VF``) elsewhere.

``LSTM`` derives from ``nn.RNNBase`` with mode "LSTM" — not from ``nn.LSTM``, which TorchDynamo refuses to
trace — so it inherits the parameter registration, ``all_weights``, ``_flat_weights``, pickling and
DataParallel support of the torch module, and compiles with ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn
from torch._C import DispatchKey
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import lstm_layer, lstm_layer_directions, triton_enabled

__all__ = ["LSTM", "LSTMCell"]


def _check_same_device(input: Tensor, params, hidden) -> None:
    # ATen's messages and order (RNN.cpp check_attributes: hidden first, then parameters), before any kernel.
    for h in hidden:
        if h.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {h.device}"
            )
    for p in params:
        if p is not None and p.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {p.device}"
            )


def _autocast(weights, x: Tensor, hx):
    """Under ``torch.autocast`` the recurrence runs in the autocast dtype (bfloat16 stays bfloat16; cuDNN
    would force float16). Custom ops are invisible to autocast, so the module casts, differentiably."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return weights, x, hx
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    return [cast(w) for w in weights], cast(x), tuple(cast(h) for h in hx)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch's own LSTM (the CPU path) under torch.compile.
#
# torch.nn.LSTM is never traced by Dynamo: it graph-breaks and runs eagerly (torch._dynamo.config.allow_rnn is
# off). Our module is traced, and so is its ``_VF.lstm`` call, into torch's Python decomposition of aten::lstm
# (torch/_decomp/decompositions.py, ``lstm_impl``). That decomposition takes oneDNN's inference-only kernel
# (``mkldnn_rnn_layer`` with train=False, which saves no workspace) whenever the *input* does not require grad,
# without looking at the weights; when the weights do require grad, backward then needs the workspace the kernel
# never wrote (aot_eager: "expected all tensors_saved_with_vc_check to be Tensors"; inductor: "expected Tensor()
# for op: torch.ops.aten.mkldnn_rnn_layer.default"). When the input does require grad (an embedding before the
# LSTM) the other decomposition unrolls the recurrence step by step, specialising the graph on the sequence length.
# torch.nn.LSTM with allow_rnn=True fails in the same way.
#
# So under compile the module calls _VF.lstm through the opaque custom op below instead: compiled code runs exactly
# the eager computation (same kernels, same results, dropout drawn from the same generator), the sequence length
# stays symbolic, and fullgraph=True holds. Its backward re-runs _VF.lstm under autograd (restoring the generator
# state when dropout is active) and differentiates that: one more forward of the recurrence in exchange for a graph
# without break. Eager calls (no compile) keep calling _VF.lstm directly.
# ---------------------------------------------------------------------------------------------------------------

_RNG_STATE_NUMEL = torch.get_rng_state().numel()


def _vf_lstm(input: Tensor, batch_sizes: Optional[Tensor], hx, params, has_biases: bool, num_layers: int,
             dropout: float, train: bool, bidirectional: bool, batch_first: bool):
    if batch_sizes is not None:
        return _VF.lstm(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)
    return _VF.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


def _fresh(t: Tensor) -> Tensor:
    """A custom op's output must be a new, contiguous tensor (what its fake says), never a view of anything."""
    return t if t.is_contiguous() and not t._is_view() else t.clone(memory_format=torch.contiguous_format)


def _draws_dropout(dropout: float, train: bool, num_layers: int) -> bool:
    return train and dropout > 0 and num_layers > 1


@torch.library.custom_op("lstm_triton::aten_lstm", mutates_args=())
def _aten_lstm(
    input: Tensor, batch_sizes: Optional[Tensor], hx: list[Tensor], params: list[Tensor], has_biases: bool,
    num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool, grad_enabled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_VF.lstm`` as one op: (output, h_n, c_n, the CPU generator state before the call, or empty).

    grad_enabled: the caller's grad mode. oneDNN's multi-layer LSTM rounds differently with grad mode on and
    off; the op runs in the caller's mode (autograd records nothing inside an op) to give eager's exact bits."""
    draws = _draws_dropout(dropout, train, num_layers)
    rng_state = torch.get_rng_state() if draws else torch.empty(0, dtype=torch.uint8)
    with torch.set_grad_enabled(grad_enabled):
        output, h_n, c_n = _vf_lstm(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
                                    bidirectional, batch_first)
    return _fresh(output), _fresh(h_n), _fresh(c_n), rng_state


@_aten_lstm.register_fake
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
        outs = _vf_lstm(leaves[0], batch_sizes, leaves[1:3], leaves[3:], has_biases, num_layers, dropout, train,
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


def _exporting() -> bool:
    # torch.compiler.is_exporting() returns this flag, but Dynamo folds the call to True in any torch.compile
    # trace on torch 2.11 (2.13 folds it to the flag); the flag itself is right on both.
    return torch.compiler._is_exporting_flag


def _check_hidden_dtype(input: Tensor, hidden) -> None:
    # torch leaks a backend error here (e.g. "get_mkldnn_dtype: unsupported data type"); we say what is wrong.
    for idx, h in enumerate(hidden):
        if h.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(
                f"LSTM: hx[{idx}] dtype ({h.dtype}) does not match input dtype ({input.dtype})"
            )


class LSTM(nn.RNNBase):
    r"""Multi-layer LSTM on fused Triton kernels; a drop-in for :class:`torch.nn.LSTM`.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None)``

    Shapes (L = sequence length, N = batch, D = 2 if bidirectional else 1, P = proj_size or hidden_size):
        input [L, N, input_size] ([N, L, input_size] with batch_first, [L, input_size] unbatched, or a
        PackedSequence); hx = (h_0 [D·num_layers, N, P], c_0 [D·num_layers, N, hidden_size]) or None.
        Returns (output [L, N, D·P], (h_n, c_n)) shaped like hx.
    """

    #: Set ``module.recompute = True`` to keep no activations between forward and backward: the backward
    #: re-runs the forward recurrence instead (one more forward's time for 20·T·B·H bytes per layer and
    #: direction), for sequences too long to keep them.
    recompute: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # The hidden-state checks and permutations are torch.nn.LSTM's own, so messages stay identical.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def flatten_parameters(self) -> None:
        """No-op: the fused kernels read the parameters where they are (cuDNN's flat buffer is not used)."""

    def _uses_triton(self, input: Tensor) -> bool:
        return triton_enabled(input) and not torch.jit.is_scripting() and not torch.jit.is_tracing()

    def forward(self, input, hx=None):
        self._update_flat_weights()
        orig_input = input
        batch_sizes = None
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(orig_input, PackedSequence)
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None

        if hx is None:
            shape = (self.num_layers * num_directions, max_batch_size)
            hx = (
                torch.zeros(*shape, real_hidden_size, dtype=input.dtype, device=input.device),
                torch.zeros(*shape, self.hidden_size, dtype=input.dtype, device=input.device),
            )
            if not packed:
                self.check_forward_args(input, hx, batch_sizes)
        elif packed:
            # torch skips these checks for packed input and then index_selects an hx of any batch size;
            # we reject a mismatched hx with the message an unpacked input would get.
            self.check_forward_args(input, hx, batch_sizes)
            hx = self.permute_hidden(hx, sorted_indices)
        else:
            if is_batched:
                if hx[0].dim() != 3 or hx[1].dim() != 3:
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
            else:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError(
                        "For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, batch_sizes)
        if len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        _check_same_device(input, self._flat_weights, hx)
        _check_hidden_dtype(input, hx)

        if self._uses_triton(input):
            if packed:
                output, hidden = self._forward_triton_packed(input, batch_sizes, hx)
            else:
                output, hidden = self._forward_triton(input.transpose(0, 1) if self.batch_first else input, hx)
                if self.batch_first:
                    output = output.transpose(0, 1)
        elif input.device.type == "cpu" and torch.compiler.is_compiling() and not _exporting():
            # torch.compile: PyTorch's CPU LSTM as one opaque op (see _aten_lstm); autocast cannot see into it, so
            # cast here. torch.export keeps aten::lstm, as for torch.nn.LSTM: a portable op, no backward traced.
            flat_weights, input, hx = _autocast(self._flat_weights, input, hx)
            # Dropout applies between layers only; reading the float attribute makes Dynamo trace twice.
            dropout = self.dropout if self.num_layers > 1 else 0.0
            output, h_n, c_n, _ = _aten_lstm(input, batch_sizes, list(hx), list(flat_weights), self.bias,
                                             self.num_layers, dropout, self.training, bool(self.bidirectional),
                                             self.batch_first, torch.is_grad_enabled())
            hidden = (h_n, c_n)
        else:
            result = _vf_lstm(input, batch_sizes, hx, self._flat_weights, self.bias, self.num_layers,
                              self.dropout, self.training, self.bidirectional, self.batch_first)
            output, hidden = result[0], result[1:]

        if packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _forward_triton(self, x: Tensor, hx: tuple[Tensor, Tensor], lengths: Optional[Tensor] = None):
        """Stacked layers on :func:`lstm_layer_directions`, both directions of a layer in one launch.

        x: [L, N, input_size] seq-first; lengths: [N] per-sequence lengths (packed input) or None.
        Returns (output [L, N, D·P], (h_n, c_n)).
        """
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        flat_weights, x, hx = _autocast(self._flat_weights, x, hx)
        D = 2 if self.bidirectional else 1
        per_layer = len(flat_weights) // (self.num_layers * D)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            weights = []
            for direction in range(D):
                w = flat_weights[(layer * D + direction) * per_layer:(layer * D + direction + 1) * per_layer]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                weights.append((w[0], w[1], b_ih, b_hh, w[-1] if self.proj_size > 0 else None))
            layer_slice = slice(layer * D, (layer + 1) * D)
            x, h, c = lstm_layer_directions(
                x, hx[0][layer_slice], hx[1][layer_slice], weights, lengths=lengths, recompute=self.recompute
            )
            h_n.append(h)
            c_n.append(c)
            if layer < self.num_layers - 1 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x, (torch.cat(h_n), torch.cat(c_n))

    def _forward_triton_packed(self, data: Tensor, batch_sizes: Tensor, hx: tuple[Tensor, Tensor]):
        """Packed input: padded [L, N, F] in the packed (length-sorted) batch order, lengths inside the kernel."""
        if data.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        lengths = lengths.to(data.device)
        output, hidden = self._forward_triton(padded, hx, lengths)
        # pack_padded_sequence takes per-step rows in the same order the packed data holds them.
        packed = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True)
        return packed.data, hidden


def _dtype_name(dtype: torch.dtype) -> str:
    return torch.empty(0, dtype=dtype).type().split(".")[-1].replace("Tensor", "")


class LSTMCell(nn.LSTMCell):
    r"""One LSTM step on the fused Triton kernel; a drop-in for :class:`torch.nn.LSTMCell`.

    ``LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None)``

    Shapes: input [N, input_size] or [input_size]; hx = (h [N, H], c [N, H]) (or 1-D for 1-D input) or None.
    Returns (h_1, c_1) shaped like hx.
    """

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        well_formed = isinstance(input, Tensor) and (hx is None or (isinstance(hx, (tuple, list)) and len(hx) == 2))
        if not well_formed or not triton_enabled(input) or torch.jit.is_scripting():
            # torch's own module raises its own errors for malformed calls, and runs CPU tensors.
            return super().forward(input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check_forward(input, hx)
        (w_ih, w_hh, b_ih, b_hh), input, hx = _autocast([self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh], input, hx)
        y, h, c = lstm_layer(input.unsqueeze(0), hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def _check_forward(self, input: Tensor, hx: tuple[Tensor, Tensor]) -> None:
        # ATen's check_rnn_cell_forward_input / _hidden messages, verbatim.
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for idx, h in enumerate(hx):
            if input.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size {h.size(0)}")
            if h.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{idx} has inconsistent hidden_size: got {h.size(1)}, expected {self.hidden_size}"
                )
        _check_same_device(input, (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh), hx)
        if torch._C._is_any_autocast_enabled():
            return
        # In ATen's order: input·W_ihᵀ first, then h·W_hhᵀ.
        for a, w in ((input, self.weight_ih), (hx[0], self.weight_hh), (hx[1], self.weight_hh)):
            if a.dtype != w.dtype:
                raise RuntimeError(
                    f"mat1 and mat2 must have the same dtype, but got {_dtype_name(a.dtype)} and {_dtype_name(w.dtype)}"
                )
