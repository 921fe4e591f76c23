"""torch.compile of a model holding lstm_triton.LSTM on the CPU path (no Triton: PyTorch's own CPU LSTM).

The LSTM reads the model's input directly, which does not require grad while the weights do: traced as
torch's aten::lstm, that case took oneDNN's inference-only kernel and broke backward (inductor:
"expected Tensor() for op: torch.ops.aten.mkldnn_rnn_layer.default"; aot_eager: "expected all
tensors_saved_with_vc_check to be Tensors"). Compiled and eager must agree in forward and backward, in float32
(the dtype oneDNN's kernel takes). Shapes are tiny: each compiled variant costs seconds on two cores.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lstm_triton
from helpers import rel_err, seeded_loss_and_grads


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # lstm_triton.triton_enabled reads it at call time
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Model(nn.Module):
    def __init__(self, **lstm_kwargs):
        super().__init__()
        self.lstm = lstm_triton.LSTM(3, 4, batch_first=True, **lstm_kwargs)
        self.head = nn.Linear(self.lstm.hidden_size * (2 if self.lstm.bidirectional else 1), 1)

    def forward(self, x):
        y, (h, c) = self.lstm(x)  # straight from the input: no embedding before it
        return self.head(y).sum() + h.square().sum() + c.sum()


def assert_matches_eager(model, compiled, x, tol):
    # seed 0 before each: dropout between layers draws from the global generator
    eager = seeded_loss_and_grads(model, (x,), model.parameters(), seed=0)
    result = seeded_loss_and_grads(compiled, (x,), model.parameters(), seed=0)
    for a, b in zip(result, eager):
        assert (torch.equal(a, b) if tol == 0 else rel_err(a, b) < tol), (a, b)


@pytest.mark.parametrize(
    "backend, fullgraph, dynamic",
    [("inductor", True, True), ("inductor", False, None), ("aot_eager", True, True), ("aot_eager", False, False)],
)
def test_compiled_training_step_matches_eager(backend, fullgraph, dynamic):
    torch.manual_seed(0)
    model = Model(num_layers=2, bidirectional=True)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=fullgraph, dynamic=dynamic)
    # aot_eager runs the traced ATen ops as they are: bit for bit. Inductor fuses the head and the sums.
    tol = 0 if backend == "aot_eager" else 1e-5
    assert_matches_eager(model, compiled, torch.randn(2, 5, 3), tol)
    if dynamic:  # the sequence length stays symbolic: no new graph for another length
        compiled_frames = counter.frame_count
        assert_matches_eager(model, compiled, torch.randn(2, 7, 3), tol)
        assert counter.frame_count == compiled_frames


def test_compiled_dropout_between_layers_matches_eager():
    """The compiled forward draws the same dropout masks as eager, and its backward replays them."""
    torch.manual_seed(0)
    model = Model(num_layers=3, dropout=0.5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    assert_matches_eager(model, compiled, torch.randn(2, 5, 3), tol=0)


def test_compiled_inference_matches_eager():
    torch.manual_seed(0)
    model = Model(num_layers=2).eval()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
