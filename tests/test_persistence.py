"""Persistence: a module and its state survive saving, loading, copying and pickling, and interoperate with
``torch.nn.LSTM``.

state_dicts go both ways between ``lstm_triton.LSTM`` and ``torch.nn.LSTM`` through files loaded with
``weights_only=True``; ``torch.save`` / ``torch.load`` of the module, ``copy.deepcopy`` and ``pickle`` give a module
that computes the same and keeps training like the original; dtype conversion after a copy.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import lstm_triton
from helpers import DEVICE, F64, kwargs_id, module_pair, rel_err


PERSIST_CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
    dict(num_layers=2, bias=False, dropout=0.2),
]


@pytest.mark.parametrize("kwargs", PERSIST_CONFIGS, ids=lambda k: kwargs_id(k, "plain"))
def test_state_dict_round_trips_with_torch_lstm_through_files(kwargs, tmp_path):
    """state_dicts saved to disk and loaded with weights_only=True go both ways between lstm_triton.LSTM and
    torch.nn.LSTM (strict), and the loaded modules compute the same thing."""
    ours, ref = module_pair(4, 6, **kwargs)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 4, dtype=F64, device=DEVICE)
    expected = ref(x)[0]
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    torch.save(ref.state_dict(), tmp_path / "torch.pt")
    into_torch = nn.LSTM(4, 6, **kwargs).to(device=DEVICE, dtype=F64).eval()
    into_torch.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True), strict=True)
    into_ours = lstm_triton.LSTM(4, 6, **kwargs).to(device=DEVICE, dtype=F64).eval()
    into_ours.load_state_dict(torch.load(tmp_path / "torch.pt", weights_only=True), strict=True)
    assert rel_err(into_torch(x)[0], expected) <= 1e-12
    assert rel_err(into_ours(x)[0], expected) <= 1e-12
    assert list(torch.load(tmp_path / "ours.pt", weights_only=True)) == list(ref.state_dict())


def test_saved_and_loaded_module_keeps_training(tmp_path):
    """torch.save(module) / torch.load: the same class and hyperparameters, and a loaded module trains like the
    original (its flat weights are its parameters, so optimizer steps take effect) — step for step like a
    torch.nn.LSTM loaded from the same state_dict."""
    ours, ref = module_pair(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    torch.save(ours, tmp_path / "module.pt")
    buf = io.BytesIO()
    torch.save(nn.Sequential(ours, nn.Identity()), buf)
    buf.seek(0)
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    in_seq = torch.load(buf, weights_only=False)[0]
    for m in (loaded, in_seq):
        assert type(m) is lstm_triton.LSTM and repr(m) == repr(ours)
        assert all(a is b for a, b in zip(m._flat_weights, m.parameters()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (loaded, ref)]
    x = torch.randn(3, 2, 4, dtype=F64, device=DEVICE)
    for _ in range(2):
        for m, opt in zip((loaded, ref), opts):
            opt.zero_grad()
            m(x)[0].square().sum().backward()
            opt.step()
    assert rel_err(loaded(x)[0], ref(x)[0]) <= 1e-12
    assert not torch.equal(loaded.weight_hh_l0, ours.weight_hh_l0)  # the load is a copy, not an alias


def test_state_dict_pickle_deepcopy_save_and_dtype_conversion():
    ours, ref = module_pair(4, 6, num_layers=2, proj_size=3, device="cpu")
    x = torch.randn(3, 2, 4, dtype=F64)
    expected = ref(x)[0]
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert rel_err(clone(x)[0], expected) < 1e-12
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is lstm_triton.LSTM and rel_err(loaded(x)[0], expected) < 1e-12
    back = nn.LSTM(4, 6, num_layers=2, proj_size=3).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    assert rel_err(back(x)[0], expected) < 1e-12
    half = copy.deepcopy(ours).float()
    assert half(x.float())[0].dtype == torch.float32 and all(p.dtype == torch.float32 for p in half.parameters())
    assert ours.all_weights[0][0] is ours.weight_ih_l0 and ours._flat_weights_names == ref._flat_weights_names
