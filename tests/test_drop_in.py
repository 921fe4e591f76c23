"""lstm_triton.LSTM / LSTMCell as exact drop-ins for torch.nn.LSTM / LSTMCell (shared/docs contract).

Every option runs on the Triton path (the interpreter on CPU) and is compared with torch.nn.LSTM carrying the
same state_dict: outputs and every gradient. Errors are compared with torch's by type and exact message.
"""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import lstm_triton
from helpers import DEVICE, rel_err

F64 = torch.float64


def pair(*args, cls=(lstm_triton.LSTM, nn.LSTM), dtype=F64, **kwargs):
    torch.manual_seed(0)
    ref = cls[1](*args, **kwargs).to(dtype)
    ours = cls[0](*args, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def run(module, x, hx=None):
    """Forward, then gradients of a fixed random projection of every output w.r.t. input, hx and parameters."""
    data = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
    data.requires_grad_(True)
    if hx is not None:
        for t in hx:
            t.requires_grad_(True)
    out, (h, c) = module(x, hx)
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    g = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=F64).to(t.device, t.dtype)).sum() for t in (out, h, c))
    leaves = [data] + ([] if hx is None else list(hx)) + [p for p in module.parameters()]
    return [out, h, c], torch.autograd.grad(loss, leaves)


def fresh(t):
    return None if t is None else tuple(x.detach().clone() for x in t) if isinstance(t, tuple) else t.detach().clone()


def assert_parity(ours, ref, x, hx=None, tol=1e-12):
    """On a GPU both modules, the input and hx move there (ours on the kernels, torch on cuDNN / its CUDA LSTM)."""
    ours.to(DEVICE), ref.to(DEVICE)
    x = x.to(DEVICE)
    hx = None if hx is None else tuple(t.to(DEVICE) for t in hx)
    if isinstance(x, nn.utils.rnn.PackedSequence):
        x2 = nn.utils.rnn.PackedSequence(x.data.detach().clone(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        x1 = nn.utils.rnn.PackedSequence(x.data.detach().clone(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x1, x2 = fresh(x), fresh(x)
    outs, grads = run(ours, x1, fresh(hx))
    outs_r, grads_r = run(ref, x2, fresh(hx))
    for name, a, b in zip(("output", "h_n", "c_n"), outs, outs_r):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    names = ["input"] + (["h0", "c0"] if hx is not None else []) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, grads_r):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


OPTIONS = [
    dict(),
    dict(batch_first=True),
    dict(num_layers=3),
    dict(bidirectional=True),
    dict(proj_size=3),
    dict(bias=False),
    dict(num_layers=2, dropout=1.0),
    dict(num_layers=2, bidirectional=True, proj_size=4, batch_first=True),
    dict(num_layers=2, bidirectional=True, bias=False, dropout=1.0),
]


def opt_id(o):
    return "-".join(f"{k}={v}" for k, v in o.items()) or "defaults"


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("opts", OPTIONS, ids=opt_id)
def test_parity_matrix(opts, with_hx, dtype):
    ours, ref = pair(4, 6, dtype=dtype, **opts)
    D = 2 if ref.bidirectional else 1
    P = ref.proj_size or ref.hidden_size
    x = torch.randn(5, 3, 4, dtype=dtype) if ref.batch_first else torch.randn(3, 5, 4, dtype=dtype)
    hx = None
    if with_hx:
        hx = (torch.randn(D * ref.num_layers, 5, P, dtype=dtype), torch.randn(D * ref.num_layers, 5, 6, dtype=dtype))
    assert_parity(ours, ref, x, hx, tol=1e-12 if dtype == F64 else 2e-6)


@pytest.mark.parametrize("opts", [dict(), dict(bidirectional=True, num_layers=2), dict(proj_size=2)], ids=opt_id)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
def test_packed_sequences(opts, with_hx):
    ours, ref = pair(3, 5, **opts)
    D = 2 if ref.bidirectional else 1
    P = ref.proj_size or 5
    seqs = [torch.randn(n, 3, dtype=F64) for n in (2, 5, 1, 4)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    hx = None
    if with_hx:  # in the caller's (unsorted) batch order
        hx = (torch.randn(D * ref.num_layers, 4, P, dtype=F64), torch.randn(D * ref.num_layers, 4, 5, dtype=F64))
    assert_parity(ours, ref, packed, hx)
    out, _ = ours(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes) and torch.equal(out.unsorted_indices, packed.unsorted_indices)


def test_unbatched_and_batch_first_shapes():
    ours, ref = pair(4, 6, num_layers=2, bidirectional=True, batch_first=True)
    assert_parity(ours, ref, torch.randn(3, 4, dtype=F64))  # unbatched ignores batch_first
    assert_parity(ours, ref, torch.randn(3, 4, dtype=F64), (torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)))
    assert_parity(ours, ref, torch.randn(2, 3, 4, dtype=F64))


def test_non_contiguous_input_and_hx():
    ours, ref = pair(4, 6)
    x = torch.randn(5, 3, 8, dtype=F64)[:, :, ::2]
    hx = (torch.randn(1, 6, 3, dtype=F64).transpose(1, 2), torch.randn(6, 3, 1, dtype=F64).permute(2, 1, 0))
    assert not x.is_contiguous() and not hx[0].is_contiguous()
    assert_parity(ours, ref, x, hx)


def test_batch_of_size_zero():
    ours, ref = pair(4, 6)
    x = torch.randn(3, 0, 4, dtype=F64, requires_grad=True)
    y, (h, c) = ours(x)
    assert y.shape == (3, 0, 6) and h.shape == (1, 0, 6) and c.shape == (1, 0, 6)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape


# ----------------------------------------------------------------------------------------------------------------
# Errors: ours must raise what torch raises, type and message.


def same_error(make_ours, make_ref):
    with pytest.raises(Exception) as ref_err:
        make_ref()
    with pytest.raises(Exception) as ours_err:
        make_ours()
    assert type(ours_err.value) is type(ref_err.value)
    assert str(ours_err.value).replace("RNNBase", "RNNBase") == str(ref_err.value)


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((10, 20), dict(dropout=1.5)),
        ((10, 20), dict(dropout=True)),
        ((10, 20), dict(bias=1)),
        ((10, 20), dict(batch_first=1)),
        ((10.0, 20), dict()),
        ((0, 20), dict()),
        ((10, "20"), dict()),
        ((10, 0), dict()),
        ((10, 20), dict(num_layers=0)),
        ((10, 20), dict(num_layers=1.5)),
        ((10, 20), dict(proj_size=-1)),
        ((10, 20), dict(proj_size=20)),
        ((10, 20), dict(foo=1)),
    ],
    ids=lambda v: str(v),
)
def test_constructor_errors(args, kwargs):
    same_error(lambda: lstm_triton.LSTM(*args, **kwargs), lambda: nn.LSTM(*args, **kwargs))


def test_constructor_dropout_warning_and_positional_args():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        lstm_triton.LSTM(10, 20, 1, True, False, 0.5)
    m = lstm_triton.LSTM(10, 20, 2, False, True, 0.1, True, 5)
    assert repr(m) == repr(nn.LSTM(10, 20, 2, False, True, 0.1, True, 5))
    assert repr(m) == "LSTM(10, 20, proj_size=5, num_layers=2, bias=False, batch_first=True, dropout=0.1, bidirectional=True)"


FORWARD_ERRORS = {
    "4d-input": (dict(), lambda: (torch.randn(2, 3, 4, 10), None)),
    "1d-input": (dict(), lambda: (torch.randn(10), None)),
    "feature-size": (dict(), lambda: (torch.randn(5, 3, 11), None)),
    "3d-input-2d-hx": (dict(num_layers=2), lambda: (torch.randn(5, 3, 10), (torch.randn(2, 20), torch.randn(2, 20)))),
    "2d-input-3d-hx": (dict(num_layers=2), lambda: (torch.randn(5, 10), (torch.randn(2, 1, 20), torch.randn(2, 1, 20)))),
    "h0-shape": (dict(num_layers=2), lambda: (torch.randn(5, 3, 10), (torch.randn(2, 4, 20), torch.randn(2, 3, 20)))),
    "c0-shape": (dict(num_layers=2), lambda: (torch.randn(5, 3, 10), (torch.randn(2, 3, 20), torch.randn(2, 3, 21)))),
    "proj-h0": (dict(num_layers=2, proj_size=5, bidirectional=True),
                lambda: (torch.randn(5, 3, 10), (torch.randn(4, 3, 20), torch.randn(4, 3, 20)))),
    "batch-first-hx": (dict(num_layers=2, batch_first=True),
                       lambda: (torch.randn(3, 5, 10), (torch.randn(3, 2, 20), torch.randn(3, 2, 20)))),
    "input-dtype": (dict(), lambda: (torch.randn(5, 3, 10, dtype=F64), None)),
    "int-input": (dict(), lambda: (torch.ones(5, 3, 10, dtype=torch.int64), None)),
    "seq-len-0": (dict(), lambda: (torch.randn(0, 3, 10), None)),
    "device": (dict(), lambda: (torch.randn(5, 3, 10, device="meta"), None)),
}


@pytest.mark.parametrize("case", FORWARD_ERRORS, ids=str)
def test_forward_errors(case):
    kwargs, make = FORWARD_ERRORS[case]
    ours, ref = pair(10, 20, dtype=torch.float32, **kwargs)
    same_error(lambda: ours(*make()), lambda: ref(*make()))


def test_hx_dtype_mismatch_gets_a_clear_error():
    ours = lstm_triton.LSTM(10, 20)
    with pytest.raises(RuntimeError, match=r"hx\[0\] dtype \(torch.float64\) does not match input dtype"):
        ours(torch.randn(5, 3, 10), (torch.randn(1, 3, 20, dtype=F64), torch.randn(1, 3, 20, dtype=F64)))


def test_packed_input_with_wrong_hx_batch_is_rejected():
    """torch silently index_selects such an hx; we say what is wrong (a documented deviation)."""
    ours = lstm_triton.LSTM(3, 5)
    packed = pack_sequence([torch.randn(2, 3), torch.randn(1, 3)])
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 5\), got \[1, 4, 5\]"):
        ours(packed, (torch.randn(1, 4, 5), torch.randn(1, 4, 5)))


CELL_ERRORS = {
    "3d-input": lambda: (torch.randn(2, 3, 10), None),
    "3d-hx": lambda: (torch.randn(3, 10), (torch.randn(1, 3, 20), torch.randn(1, 3, 20))),
    "feature-size": lambda: (torch.randn(3, 11), None),
    "batch": lambda: (torch.randn(3, 10), (torch.randn(4, 20), torch.randn(4, 20))),
    "hidden-size": lambda: (torch.randn(3, 10), (torch.randn(3, 21), torch.randn(3, 20))),
    "no-broadcast": lambda: (torch.randn(3, 10), (torch.randn(20), torch.randn(20))),
    "dtype": lambda: (torch.randn(3, 10, dtype=F64), None),
}


@pytest.mark.parametrize("case", CELL_ERRORS, ids=str)
def test_cell_errors(case):
    ours, ref = pair(10, 20, cls=(lstm_triton.LSTMCell, nn.LSTMCell), dtype=torch.float32)
    same_error(lambda: ours(*CELL_ERRORS[case]()), lambda: ref(*CELL_ERRORS[case]()))


# ----------------------------------------------------------------------------------------------------------------
# Module behaviours


def test_cell_parity_with_gradients_and_only_one_output_used():
    ours, ref = pair(4, 6, cls=(lstm_triton.LSTMCell, nn.LSTMCell))
    x = torch.randn(3, 4, dtype=F64)
    hx = (torch.randn(3, 6, dtype=F64), torch.randn(3, 6, dtype=F64))
    grads = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        h, c = m(xi, hx)
        grads.append(torch.autograd.grad(h.sum(), [xi, *m.parameters()]))  # c unused
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12


def test_cell_without_bias():
    ours, ref = pair(4, 6, bias=False, cls=(lstm_triton.LSTMCell, nn.LSTMCell))
    assert [n for n, _ in ours.named_parameters()] == ["weight_ih", "weight_hh"]
    x = torch.randn(2, 4, dtype=F64)
    for a, b in zip(ours(x), ref(x)):
        assert rel_err(a, b) < 1e-12


def test_dropout_semantics():
    ours, ref = pair(4, 6, num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 4, dtype=F64)
    ours.eval(), ref.eval()
    assert rel_err(ours(x)[0], ref(x)[0]) < 1e-12  # eval mode: no dropout
    ours.train()
    torch.manual_seed(3)
    y1 = ours(x)[0]
    torch.manual_seed(3)
    y2 = ours(x)[0]
    assert torch.equal(y1, y2)  # reproducible under manual_seed
    assert rel_err(y1, ref.eval()(x)[0]) > 1e-3  # and it did drop something
    ours.dropout = 0.0  # read at forward time
    assert rel_err(ours(x)[0], ref(x)[0]) < 1e-12


def test_backward_in_eval_mode():
    ours, ref = pair(4, 6, num_layers=2)
    ours.eval(), ref.eval()
    assert_parity(ours, ref, torch.randn(3, 2, 4, dtype=F64))


def test_gradgradcheck_module():
    torch.manual_seed(0)
    m = lstm_triton.LSTM(2, 3, bidirectional=True).double()
    x = torch.randn(2, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: m(x)[0], (x,), eps=1e-6, atol=1e-6)


def test_only_input_requires_grad_and_frozen_parameters():
    ours, ref = pair(4, 6, num_layers=2)
    for m in (ours, ref):
        m.requires_grad_(False)
    x = torch.randn(3, 2, 4, dtype=F64)
    grads = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(m(xi)[0].sum(), [xi])[0])
    assert rel_err(*grads) < 1e-12


def test_tied_weights_accumulate_gradients():
    ours, ref = pair(4, 6, bidirectional=True)
    for m in (ours, ref):
        m.bias_ih_l0_reverse = m.bias_ih_l0
        m._init_flat_weights()
    x = torch.randn(3, 2, 4, dtype=F64)
    grads = [torch.autograd.grad(m(x)[0].square().sum(), [m.bias_ih_l0])[0] for m in (ours, ref)]
    assert rel_err(*grads) < 1e-12


def test_replaced_and_reparametrized_weights_are_reread():
    ours, ref = pair(4, 6)
    x = torch.randn(3, 2, 4, dtype=F64)
    params = {k: v * 0.5 for k, v in ref.state_dict().items()}
    y_ours = torch.func.functional_call(ours, params, (x,))[0]
    y_ref = torch.func.functional_call(ref, params, (x,))[0]
    assert rel_err(y_ours, y_ref) < 1e-12
    for m in (ours, ref):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    assert rel_err(ours(x)[0], ref(x)[0]) < 1e-12
    with torch.no_grad():
        for m in (ours, ref):
            m.parametrizations.weight_hh_l0.original0.mul_(2.0)
    assert rel_err(ours(x)[0], ref(x)[0]) < 1e-12


def test_state_dict_pickle_deepcopy_save_and_dtype_conversion():
    ours, ref = pair(4, 6, num_layers=2, proj_size=3)
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


def test_flatten_parameters_is_harmless():
    ours, ref = pair(4, 6)
    ours.flatten_parameters()
    x = torch.randn(3, 2, 4, dtype=F64)
    assert rel_err(ours(x)[0], ref(x)[0]) < 1e-12


def test_autocast_keeps_the_autocast_dtype():
    ours, _ = pair(4, 6, dtype=torch.float32)
    x = torch.randn(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = ours(x)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    y32 = ours(x)[0]
    assert rel_err(y, y32) < 2e-2  # a bf16 recurrence of the same model
    y.float().sum().backward()
    assert ours.weight_hh_l0.grad is not None and ours.weight_hh_l0.grad.dtype == torch.float32


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm_triton.LSTM(4, 6, num_layers=2, bidirectional=True)
            self.head = nn.Linear(12, 1)

        def forward(self, x):
            y, (h, c) = self.lstm(x)
            return self.head(y).sum() + h.sum()

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(3, 2, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    g_compiled = model.lstm.weight_hh_l0.grad.clone()
    model.zero_grad()
    eager = model(x)
    eager.backward()
    assert torch.allclose(loss, eager) and torch.allclose(g_compiled, model.lstm.weight_hh_l0.grad)


def test_torch_export_sees_one_op():
    torch.manual_seed(0)
    m = lstm_triton.LSTM(4, 6)
    ep = torch.export.export(m, (torch.randn(3, 2, 4),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("lstm_triton.lstm_layer_fwd" in t for t in targets)
    assert not any("lstm" in t and "lstm_triton" not in t for t in targets)


def test_convert_and_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 5, batch_first=True))
    cell_model = nn.ModuleDict({"cell": nn.LSTMCell(3, 4)})
    x = torch.randn(2, 6, 3, dtype=torch.float32)
    expected = model(x)[0]
    w = model[1].weight_hh_l0
    converted = lstm_triton.convert(model)
    assert converted is model and type(model[1]) is lstm_triton.LSTM and model[1].weight_hh_l0 is w
    assert rel_err(model(x)[0], expected) < 2e-6
    lstm_triton.convert(cell_model)
    assert type(cell_model["cell"]) is lstm_triton.LSTMCell
    lstm_triton.to_torch(model)
    assert type(model[1]) is nn.LSTM and model[1].weight_hh_l0 is w
    assert type(lstm_triton.convert(nn.LSTM(2, 3))) is lstm_triton.LSTM


def test_cell_step_is_one_fused_kernel(monkeypatch):
    """An LSTMCell step is a single kernel launch that also computes the input projection."""
    import importlib

    fwd_module = importlib.import_module("lstm_triton.kernels.stepwise")
    launches = []
    real = fwd_module._stepwise_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["FUSE_INPUT"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(fwd_module, "_stepwise_fwd_kernel", Spy())
    for gemm in ("mm", "addmm", "bmm", "baddbmm"):
        monkeypatch.setattr(torch, gemm, lambda *a, **k: pytest.fail("no separate input GEMM expected"))
    ours, ref = pair(4, 6, cls=(lstm_triton.LSTMCell, nn.LSTMCell))
    x = torch.randn(3, 4, dtype=F64)
    with torch.no_grad():
        out = ours(x)
    assert launches == [True]
    for a, b in zip(out, ref(x)):
        assert rel_err(a, b) < 1e-12
