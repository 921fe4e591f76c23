"""Migration: swap ``torch.nn.LSTM`` / ``LSTMCell`` modules of a model for ours in place, and back.

The parameters themselves move over (the same ``Parameter`` objects), so device, dtype, values, optimizer
state keyed by parameter, and ties between modules all carry across.
"""
from __future__ import annotations

from torch import nn

from .modules import LSTM, LSTMCell

__all__ = ["convert", "to_torch"]


def _swap(model: nn.Module, pairs) -> nn.Module:
    def make(old: nn.Module):
        for src, dst in pairs:
            if type(old) is src:
                return _rebuild(old, dst)
        return None

    root = make(model)
    if root is not None:
        return root
    for name, child in list(model.named_children()):
        new = make(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _swap(child, pairs)
    return model


def _rebuild(old: nn.Module, cls):
    if isinstance(old, nn.RNNBase):
        new = cls(old.input_size, old.hidden_size, num_layers=old.num_layers, bias=old.bias,
                  batch_first=old.batch_first, dropout=old.dropout, bidirectional=old.bidirectional,
                  proj_size=old.proj_size, device="meta")
    else:
        new = cls(old.input_size, old.hidden_size, bias=old.bias, device="meta")
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
    new.train(old.training)
    return new


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` in ``model`` (or ``model`` itself) by
    :class:`lstm_triton.LSTM` / :class:`lstm_triton.LSTMCell`, keeping the parameters. Returns the model
    (a new object only when ``model`` itself was an LSTM). Subclasses of the torch modules are left alone:
    their forward may do more than the torch module's."""
    return _swap(model, ((nn.LSTM, LSTM), (nn.LSTMCell, LSTMCell)))


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: back to ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` (e.g. for
    ``torch.ao.quantization.quantize_dynamic``, which matches the exact torch types)."""
    return _swap(model, ((LSTM, nn.LSTM), (LSTMCell, nn.LSTMCell)))
