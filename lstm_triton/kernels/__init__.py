"""Triton kernels and their thin launchers. Nothing here knows about autograd or nn."""
from .config import LSTMKernelConfig, persistent_fits, select_config
from .lstm_bwd import lstm_bwd
from .lstm_fwd import lstm_fwd

__all__ = ["LSTMKernelConfig", "lstm_bwd", "lstm_fwd", "persistent_fits", "select_config"]
