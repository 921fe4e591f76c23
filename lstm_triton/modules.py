"""``LSTM`` and ``LSTMCell``: drop-in replacements for ``torch.nn.LSTM`` / ``torch.nn.LSTMCell``.

Same constructor, parameters (names, order, shapes, init), ``state_dict``, shapes and error messages as
the torch modules; the recurrence runs on the fused Triton kernels (:mod:`lstm_triton.ops`) wherever they
can run (CUDA, or CPU under ``TRITON_INTERPRET=1``), and on PyTorch's own CPU LSTM (``torch._VF``) elsewhere.

``LSTM`` derives from ``nn.RNNBase`` with mode "LSTM" — not from ``nn.LSTM``, which TorchDynamo refuses to
trace — so it inherits the parameter registration, ``all_weights``, ``_flat_weights``, pickling and
DataParallel support of the torch module, and compiles with ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import functorch_active, lstm_layer, lstm_layer_directions, triton_enabled
from .torch_lstm import aten_lstm, exporting, vf_lstm
from .reference import lstm_layer_directions_reference

__all__ = ["LSTM", "LSTMCell", "init_forget_bias_"]


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
    bidirectional=False, proj_size=0, device=None, dtype=None, *, recurrent_dropout=0.0)``

    Shapes (L = sequence length, N = batch, D = 2 if bidirectional else 1, P = proj_size or hidden_size):
        input [L, N, input_size] ([N, L, input_size] with batch_first, [L, input_size] unbatched, or a
        PackedSequence); hx = (h_0 [D·num_layers, N, P], c_0 [D·num_layers, N, hidden_size]) or None.
        Returns (output [L, N, D·P], (h_n, c_n)) shaped like hx.

    Beyond ``torch.nn.LSTM`` (all inside the kernels; the defaults leave the module exactly torch's):
        ``recurrent_dropout``: in train mode, per call, one Bernoulli(1 − p) mask per layer, direction and
            sequence over h's units, scaled by 1/(1 − p), multiplies h_{t-1} where it enters W_hh at every
            step (Gal & Ghahramani, 2016); the outputs are not masked by it.
        ``forward(..., resets=...)``: bool, the input's shape without its feature dimension — (L, N), (N, L)
            with batch_first, (L,) unbatched; for a PackedSequence (L_max, N) in the original batch order.
            Where ``resets[t, n]``, step t starts a new segment of sequence n: every segment runs as its own
            sequence from (h_0, c_0), in every layer and direction.
        ``forward(..., return_cell_states=True)``: also return every step's cell state c_t of the last layer,
            in the output's layout ([L, N, D·hidden_size], ...), differentiable.
    """

    #: Set ``module.recompute = True`` to keep no activations between forward and backward: the backward
    #: re-runs the forward recurrence instead (one more forward's time for the gates and cell states, 20·T·B·H
    #: bytes per layer and direction in float32), for sequences too long to keep them.
    recompute: bool = False
    #: See the class docstring; a class default so that modules pickled without it load unchanged.
    recurrent_dropout: float = 0.0

    def __init__(self, *args, recurrent_dropout: float = 0.0, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        if (not isinstance(recurrent_dropout, numbers.Number) or isinstance(recurrent_dropout, bool)
                or not 0 <= recurrent_dropout <= 1):
            raise ValueError("recurrent_dropout should be a number in range [0, 1] representing the probability "
                             "of an element being zeroed")
        self.recurrent_dropout = float(recurrent_dropout)

    # The hidden-state checks and permutations are torch.nn.LSTM's own, so messages stay identical.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + f", recurrent_dropout={self.recurrent_dropout}" if self.recurrent_dropout else s

    def flatten_parameters(self) -> None:
        """No-op: the fused kernels read the parameters where they are (cuDNN's flat buffer is not used)."""

    def _uses_triton(self, input: Tensor) -> bool:
        # Under a torch.func transform the custom op cannot run (ops.functorch_active): PyTorch's own LSTM does,
        # as torch.nn.LSTM would (the reference for what it cannot do).
        return (triton_enabled(input) and not torch.jit.is_scripting() and not torch.jit.is_tracing()
                and not functorch_active())

    def forward(self, input, hx=None, *, resets: Optional[Tensor] = None, return_cell_states: bool = False):
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
        if resets is not None:
            resets = self._seq_first_resets(resets, orig_input, input, batch_sizes, sorted_indices, is_batched)
        beyond_torch = resets is not None or return_cell_states or (self.training and self.recurrent_dropout > 0)

        cells = None
        if self._uses_triton(input) or beyond_torch:
            # The fused kernels; or, where they cannot run (CPU without the interpreter, TorchScript), the
            # reference implementation for what torch's own LSTM cannot do.
            layers = lstm_layer_directions if self._uses_triton(input) else lstm_layer_directions_reference
            if packed:
                output, hidden, cells = self._forward_packed(input, batch_sizes, hx, resets, return_cell_states,
                                                             layers)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
                output, hidden, cells = self._forward_layers(x, hx, None, resets, return_cell_states, layers)
                if self.batch_first:
                    output = output.transpose(0, 1)
                    cells = None if cells is None else cells.transpose(0, 1)
        elif input.device.type == "cpu" and torch.compiler.is_compiling() and not exporting():
            # torch.compile: PyTorch's CPU LSTM as one opaque op (see torch_lstm.py); autocast cannot see into it, so
            # cast here. torch.export keeps aten::lstm, as for torch.nn.LSTM: a portable op, no backward traced.
            flat_weights, input, hx = _autocast(self._flat_weights, input, hx)
            # Dropout applies between layers only; reading the float attribute makes Dynamo trace twice.
            dropout = self.dropout if self.num_layers > 1 else 0.0
            output, h_n, c_n, _ = aten_lstm(input, batch_sizes, list(hx), list(flat_weights), self.bias,
                                             self.num_layers, dropout, self.training, bool(self.bidirectional),
                                             self.batch_first, torch.is_grad_enabled())
            hidden = (h_n, c_n)
        else:
            result = vf_lstm(input, batch_sizes, hx, self._flat_weights, self.bias, self.num_layers,
                              self.dropout, self.training, self.bidirectional, self.batch_first)
            output, hidden = result[0], result[1:]

        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            cells = None if cells is None else PackedSequence(cells, batch_sizes, sorted_indices, unsorted_indices)
        elif not is_batched:
            output = output.squeeze(batch_dim)
            cells = None if cells is None else cells.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        hidden = self.permute_hidden(hidden, unsorted_indices)
        return (output, hidden, cells) if return_cell_states else (output, hidden)

    def _seq_first_resets(self, resets, orig_input, input: Tensor, batch_sizes, sorted_indices, is_batched) -> Tensor:
        """Check ``resets`` against the input and return it as [L, N] bool, seq-first, in the order the layers
        see the batch (the packed, length-sorted order for a PackedSequence)."""
        if isinstance(orig_input, PackedSequence):
            expected, layout = (len(batch_sizes), int(batch_sizes[0])), "(max sequence length, batch)"
        elif not is_batched:
            expected, layout = (input.size(0) if not self.batch_first else input.size(1),), "(sequence length,)"
        elif self.batch_first:
            expected, layout = (input.size(0), input.size(1)), "(batch, sequence length) with batch_first"
        else:
            expected, layout = (input.size(0), input.size(1)), "(sequence length, batch)"
        if not isinstance(resets, Tensor):
            raise TypeError(f"LSTM: resets must be a bool tensor of shape {layout}, got {type(resets).__name__}")
        if resets.dtype != torch.bool:
            raise TypeError(f"LSTM: resets must be a bool tensor, got dtype {resets.dtype}")
        if tuple(resets.shape) != expected:
            raise ValueError(
                f"LSTM: resets must have the input's shape without its feature dimension, {layout} = "
                f"{tuple(expected)}, got {tuple(resets.shape)}"
            )
        if resets.device != input.device:
            raise RuntimeError(
                f"LSTM: resets must be on the input's device ({input.device}), got a tensor on {resets.device}"
            )
        if isinstance(orig_input, PackedSequence):
            return resets if sorted_indices is None else resets.index_select(1, sorted_indices)
        if not is_batched:
            return resets.unsqueeze(1)
        return resets.transpose(0, 1) if self.batch_first else resets

    def _recurrent_dropout_masks(self, batch: int, dtype: torch.dtype, device: torch.device):
        """Per layer, [D, batch, P]: this call's recurrent-dropout masks (train mode), or None."""
        p = self.recurrent_dropout
        if not self.training or p == 0:
            return None
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        if p == 1:
            return [torch.zeros(D, batch, P, dtype=dtype, device=device) for _ in range(self.num_layers)]
        keep = torch.full((self.num_layers, D, batch, P), 1 - p, dtype=dtype, device=device)
        return list(torch.bernoulli(keep).div_(1 - p))

    def _forward_layers(self, x: Tensor, hx: tuple[Tensor, Tensor], lengths: Optional[Tensor],
                        resets: Optional[Tensor], return_cell_states: bool, layers):
        """Stacked layers on ``layers`` (:func:`lstm_layer_directions`: both directions of a layer in one launch,
        or its reference twin).

        x: [L, N, input_size] seq-first; lengths: [N] per-sequence lengths (packed input) or None;
        resets: [L, N] bool or None. Returns (output [L, N, D·P], (h_n, c_n), cell states [L, N, D·H] or None).
        """
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        flat_weights, x, hx = _autocast(self._flat_weights, x, hx)
        D = 2 if self.bidirectional else 1
        masks = self._recurrent_dropout_masks(x.size(1), x.dtype, x.device)
        per_layer = len(flat_weights) // (self.num_layers * D)
        h_n, c_n, cells = [], [], None
        for layer in range(self.num_layers):
            weights = []
            for direction in range(D):
                w = flat_weights[(layer * D + direction) * per_layer:(layer * D + direction + 1) * per_layer]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                weights.append((w[0], w[1], b_ih, b_hh, w[-1] if self.proj_size > 0 else None))
            layer_slice = slice(layer * D, (layer + 1) * D)
            last = layer == self.num_layers - 1
            outs = layers(x, hx[0][layer_slice], hx[1][layer_slice], weights, lengths=lengths, resets=resets,
                          dropout_mask=None if masks is None else masks[layer],
                          return_cell_states=last and return_cell_states, recompute=self.recompute)
            x, h, c = outs[:3]
            if last and return_cell_states:
                cells = outs[3]
            h_n.append(h)
            c_n.append(c)
            if not last and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x, (torch.cat(h_n), torch.cat(c_n)), cells

    def _forward_packed(self, data: Tensor, batch_sizes: Tensor, hx: tuple[Tensor, Tensor], resets,
                        return_cell_states: bool, layers):
        """Packed input: padded [L, N, F] in the packed (length-sorted) batch order, lengths inside the kernel."""
        if data.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        lengths_dev = lengths.to(data.device)
        output, hidden, cells = self._forward_layers(padded, hx, lengths_dev, resets, return_cell_states, layers)
        # pack_padded_sequence takes per-step rows in the same order the packed data holds them.
        output = pack_padded_sequence(output, lengths, enforce_sorted=True).data
        if cells is not None:
            cells = pack_padded_sequence(cells, lengths, enforce_sorted=True).data
        return output, hidden, cells


def init_forget_bias_(module: nn.Module, value: float = 1.0) -> nn.Module:
    """Set the forget-gate slice [H, 2H) of every ``bias_ih*`` to ``value`` and of every ``bias_hh*`` to 0, so
    the effective forget bias is ``value`` (Jozefowicz et al., 2015), in every LSTM / LSTMCell of ``module``
    (ours or torch's, the module itself included). Returns ``module``."""
    found = False
    for sub in module.modules():
        lstm_like = (isinstance(sub, nn.RNNBase) and sub.mode == "LSTM") or isinstance(sub, nn.LSTMCell)
        if not lstm_like:
            continue
        found = True
        H = sub.hidden_size
        with torch.no_grad():
            for name, param in sub.named_parameters(recurse=False):
                if name.startswith("bias_ih"):
                    param[H:2 * H].fill_(value)
                elif name.startswith("bias_hh"):
                    param[H:2 * H].zero_()
    if not found:
        raise ValueError(f"init_forget_bias_: {type(module).__name__} holds no LSTM or LSTMCell")
    return module


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
        if not well_formed or not triton_enabled(input) or torch.jit.is_scripting() or functorch_active():
            # torch's own module raises its own errors for malformed calls, and runs CPU tensors and torch.func
            # transforms (which cannot run our custom op: ops.functorch_active).
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
