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
        elif packed:
            result = _VF.lstm(input, batch_sizes, hx, self._flat_weights, self.bias, self.num_layers,
                              self.dropout, self.training, self.bidirectional)
            output, hidden = result[0], result[1:]
        else:
            result = _VF.lstm(input, hx, self._flat_weights, self.bias, self.num_layers,
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
