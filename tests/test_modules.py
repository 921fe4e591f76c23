"""LSTM / LSTMCell modules: parameters, state_dict, dispatch, and parity with torch.nn on the Triton path."""
import pytest
import torch
from torch import nn

import lstm_triton
from helpers import kwargs_id, module_pair, rel_err
from lstm_triton import modules


def test_parameters_state_dict_and_init_match_torch():
    torch.manual_seed(0)
    ref = nn.LSTM(10, 20)
    torch.manual_seed(0)
    ours = lstm_triton.LSTM(10, 20)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert a.shape == b.shape and torch.equal(a, b), n  # same init, same RNG draws
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(ours, nn.RNNBase) and ours.mode == "LSTM"


def test_triton_path_is_what_answers_under_the_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 the kernels run; PyTorch's LSTM must not be what produces the numbers."""
    if not lstm_triton.triton_enabled(torch.empty(0)):
        pytest.skip("CPU run without TRITON_INTERPRET")

    class NoVF:
        def __getattr__(self, name):
            raise AssertionError(f"torch._VF.{name} was called")

    monkeypatch.setattr(modules, "_VF", NoVF())
    ours, ref = module_pair(3, 5, device="cpu")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y, (h, c) = ours(x)
    y_ref, (h_ref, c_ref) = ref(x)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(h, h_ref) < 1e-12 and rel_err(c, c_ref) < 1e-12


def test_cpu_without_interpreter_uses_torch_lstm(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not lstm_triton.triton_enabled(torch.empty(0))
    called = []
    monkeypatch.setattr(modules, "lstm_layer", lambda *a, **k: called.append(1))
    ours, ref = module_pair(3, 5, device="cpu")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=0)
    assert not called


CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(bias=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: kwargs_id(c, "default"))
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
def test_lstm_parity_float64(cfg, with_hx):
    ours, ref = module_pair(5, 7, device="cpu", **cfg)
    D = 2 if ref.bidirectional else 1
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    hx = None
    if with_hx:
        B = x.shape[0] if ref.batch_first else x.shape[1]
        hx = tuple(torch.randn(D * ref.num_layers, B, 7, dtype=torch.float64) for _ in range(2))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    hxs = [None if hx is None else tuple(t.clone().requires_grad_() for t in hx) for _ in range(2)]
    results = []
    for m, xi, hi in ((ours, xs[0], hxs[0]), (ref, xs[1], hxs[1])):
        y, (h, c) = m(xi, hi)
        loss = (y * torch.arange(y.numel()).view_as(y).sin()).sum() + h.square().sum() + c.sin().sum()
        leaves = [xi] + ([] if hi is None else list(hi)) + list(m.parameters())
        results.append(([y, h, c], torch.autograd.grad(loss, leaves)))
    for a, b in zip(results[0][0], results[1][0]):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12
    for a, b in zip(results[0][1], results[1][1]):
        assert rel_err(a, b) < 1e-12


def test_lstm_unbatched_input():
    ours, ref = module_pair(4, 6, num_layers=2, device="cpu")
    x = torch.randn(3, 4, dtype=torch.float64)
    hx = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    for a, b in zip((ours(x, hx)[0], *ours(x, hx)[1]), (ref(x, hx)[0], *ref(x, hx)[1])):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_lstm_cell_parity(batched):
    ours, ref = module_pair(4, 6, cell=True, device="cpu")
    x = torch.randn(3, 4, dtype=torch.float64) if batched else torch.randn(4, dtype=torch.float64)
    hx = tuple(torch.randn(*x.shape[:-1], 6, dtype=torch.float64) for _ in range(2))
    for a, b in zip(ours(x, hx), ref(x, hx)):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12
    for a, b in zip(ours(x), ref(x)):
        assert rel_err(a, b) < 1e-12
