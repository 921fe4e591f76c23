"""lstm_triton.LSTM / LSTMCell as exact drop-ins for torch.nn.LSTM / LSTMCell (shared/docs contract).

Every option runs on the Triton path (the interpreter on CPU) and is compared with torch.nn.LSTM carrying the
same state_dict: outputs and every gradient. The modules are built on the CPU; ``assert_parity`` moves them to
the test device. Errors (torch's type and exact message) are checked in test_bad_input.py, strided inputs in
test_layouts.py, copies and saved modules in test_persistence.py.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_triton
from helpers import F64, assert_parity, kwargs_id, module_pair, rel_err


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
    return kwargs_id(o, "defaults")


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("opts", OPTIONS, ids=opt_id)
def test_parity_matrix(opts, with_hx, dtype):
    ours, ref = module_pair(4, 6, dtype=dtype, device="cpu", **opts)
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
    ours, ref = module_pair(3, 5, device="cpu", **opts)
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
    ours, ref = module_pair(4, 6, num_layers=2, bidirectional=True, batch_first=True, device="cpu")
    assert_parity(ours, ref, torch.randn(3, 4, dtype=F64))  # unbatched ignores batch_first
    assert_parity(ours, ref, torch.randn(3, 4, dtype=F64), (torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)))
    assert_parity(ours, ref, torch.randn(2, 3, 4, dtype=F64))


def test_batch_of_size_zero():
    ours, ref = module_pair(4, 6, device="cpu")
    x = torch.randn(3, 0, 4, dtype=F64, requires_grad=True)
    y, (h, c) = ours(x)
    assert y.shape == (3, 0, 6) and h.shape == (1, 0, 6) and c.shape == (1, 0, 6)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape


# ----------------------------------------------------------------------------------------------------------------
# Module behaviours


def test_cell_parity_with_gradients_and_only_one_output_used():
    ours, ref = module_pair(4, 6, cell=True, device="cpu")
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
    ours, ref = module_pair(4, 6, bias=False, cell=True, device="cpu")
    assert [n for n, _ in ours.named_parameters()] == ["weight_ih", "weight_hh"]
    x = torch.randn(2, 4, dtype=F64)
    for a, b in zip(ours(x), ref(x)):
        assert rel_err(a, b) < 1e-12


def test_dropout_semantics():
    ours, ref = module_pair(4, 6, num_layers=3, dropout=0.5, device="cpu")
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
    ours, ref = module_pair(4, 6, num_layers=2, device="cpu")
    ours.eval(), ref.eval()
    assert_parity(ours, ref, torch.randn(3, 2, 4, dtype=F64))


def test_gradgradcheck_module():
    torch.manual_seed(0)
    m = lstm_triton.LSTM(2, 3, bidirectional=True).double()
    x = torch.randn(2, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: m(x)[0], (x,), eps=1e-6, atol=1e-6)


def test_only_input_requires_grad_and_frozen_parameters():
    ours, ref = module_pair(4, 6, num_layers=2, device="cpu")
    for m in (ours, ref):
        m.requires_grad_(False)
    x = torch.randn(3, 2, 4, dtype=F64)
    grads = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(m(xi)[0].sum(), [xi])[0])
    assert rel_err(*grads) < 1e-12


def test_tied_weights_accumulate_gradients():
    ours, ref = module_pair(4, 6, bidirectional=True, device="cpu")
    for m in (ours, ref):
        m.bias_ih_l0_reverse = m.bias_ih_l0
        m._init_flat_weights()
    x = torch.randn(3, 2, 4, dtype=F64)
    grads = [torch.autograd.grad(m(x)[0].square().sum(), [m.bias_ih_l0])[0] for m in (ours, ref)]
    assert rel_err(*grads) < 1e-12


def test_replaced_and_reparametrized_weights_are_reread():
    ours, ref = module_pair(4, 6, device="cpu")
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


def test_flatten_parameters_is_harmless():
    ours, ref = module_pair(4, 6, device="cpu")
    ours.flatten_parameters()
    x = torch.randn(3, 2, 4, dtype=F64)
    assert rel_err(ours(x)[0], ref(x)[0]) < 1e-12


def test_autocast_keeps_the_autocast_dtype():
    ours, _ = module_pair(4, 6, dtype=torch.float32, device="cpu")
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
    ours, ref = module_pair(4, 6, cell=True, device="cpu")
    x = torch.randn(3, 4, dtype=F64)
    with torch.no_grad():
        out = ours(x)
    assert launches == [True]
    for a, b in zip(out, ref(x)):
        assert rel_err(a, b) < 1e-12
