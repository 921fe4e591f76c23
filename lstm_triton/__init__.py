"""lstm_triton: a fused-kernel LSTM for PyTorch, written in Triton; a drop-in for torch.nn.LSTM / LSTMCell."""
from .convert import convert, to_torch
from .modules import LSTM, LSTMCell
from .ops import lstm_layer, lstm_layer_directions, triton_enabled
from .reference import lstm_cell_reference, lstm_layer_reference, lstm_reference

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "LSTMCell",
    "convert",
    "lstm_cell_reference",
    "lstm_layer",
    "lstm_layer_directions",
    "lstm_layer_reference",
    "lstm_reference",
    "to_torch",
    "triton_enabled",
]
