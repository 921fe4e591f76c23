"""The reference implementation against torch.nn.LSTM in float64: it is the ground truth for everything else."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_triton.reference import lstm_cell_reference, lstm_reference

CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=3),
    dict(num_layers=1, bias=False, bidirectional=True, proj_size=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_matches_torch_lstm(cfg):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 6, **cfg).double()
    D = 2 if lstm.bidirectional else 1
    P = lstm.proj_size or lstm.hidden_size
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    hx = (torch.randn(D * lstm.num_layers, 3, P, dtype=torch.float64),
          torch.randn(D * lstm.num_layers, 3, 6, dtype=torch.float64))
    y, (h, c) = lstm(x, hx)
    y_ref, (h_ref, c_ref) = lstm_reference(x, hx, lstm.all_weights, bias=lstm.bias,
                                           bidirectional=lstm.bidirectional, proj_size=lstm.proj_size)
    torch.testing.assert_close(y_ref, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_ref, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_ref, c, rtol=1e-12, atol=1e-12)


def test_reference_lengths_match_packed_sequences():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 5, bidirectional=True).double()
    lengths = [4, 1, 3]
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    y_packed, (h, c) = lstm(packed)
    y, _ = pad_packed_sequence(y_packed, total_length=4)
    y_ref, (h_ref, c_ref) = lstm_reference(x, None, lstm.all_weights, bidirectional=True, lengths=lengths)
    torch.testing.assert_close(y_ref, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_ref, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_ref, c, rtol=1e-12, atol=1e-12)


def test_cell_reference_matches_torch_lstm_cell():
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(4, 7).double()
    x, h, c = torch.randn(2, 4).double(), torch.randn(2, 7).double(), torch.randn(2, 7).double()
    h_ref, c_ref = lstm_cell_reference(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    h1, c1 = cell(x, (h, c))
    torch.testing.assert_close(h_ref, h1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_ref, c1, rtol=1e-12, atol=1e-12)
