"""lstm_triton: a fused-kernel LSTM for PyTorch, written in Triton; a drop-in for torch.nn.LSTM / LSTMCell."""
from .convert import convert, to_torch
from .kernels.cooperative import check_errors
from .kernels.dispatch import PathUnavailable
from .modules import LSTM, LSTMCell, init_forget_bias_
from .ops import lstm_layer, lstm_layer_directions, recorded_plans, triton_enabled
from .reference import lstm_cell_reference, lstm_layer_directions_reference, lstm_layer_reference, lstm_reference

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "LSTMCell",
    "PathUnavailable",
    "check_errors",
    "convert",
    "init_forget_bias_",
    "lstm_cell_reference",
    "lstm_layer",
    "lstm_layer_directions",
    "lstm_layer_directions_reference",
    "lstm_layer_reference",
    "lstm_reference",
    "recorded_plans",
    "to_torch",
    "triton_enabled",
]
