"""lstm_triton.convert / to_torch move a module's whole state across: hooks, parametrizations (both weight-norm
styles), parameters removed on purpose (weight drop), plain attributes, buffers and the training flag; and back.

The reference is the same model built again from the same seed and left on torch's modules.
"""
import gc
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import lstm_triton
from helpers import F64, WeightDrop, rel_err


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


class Net(nn.Module):
    """An LSTM of each kind of state a training script may put on one."""

    def __init__(self):
        super().__init__()
        self.drop = WeightDrop(nn.LSTM(3, 4), "weight_hh_l0", p=0.25)  # a parameter removed on purpose
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old, hook-based weight norm
            self.old_norm = nn.utils.weight_norm(nn.LSTM(4, 4), "weight_hh_l0")
        self.new_norm = parametrizations.weight_norm(nn.LSTM(4, 4, bidirectional=True), "weight_ih_l0")
        self.cell = parametrize.register_parametrization(nn.LSTMCell(8, 4), "weight_hh", Double())
        self.cell_drop = WeightDrop(nn.LSTMCell(4, 4), "weight_ih", p=0.25)

    def forward(self, x):
        y, _ = self.drop(x)
        y, _ = self.old_norm(y)
        y, _ = self.new_norm(y)
        h, c = self.cell(y[-1])
        h, c = self.cell_drop(h, (h, c))
        return h + c


def count_call(module, args, out):
    module.calls += 1


def build() -> Net:
    torch.manual_seed(0)
    net = Net().to(F64)
    rnn = net.drop.rnn
    rnn.note = "kept"
    rnn.register_buffer("calls", torch.zeros((), dtype=torch.long))
    rnn.register_forward_hook(count_call)
    net.cell.eval()  # the training flag is per module
    return net


def attach_hooks(module: nn.Module, log: list) -> list:
    """One hook of every kind; each logs (event, the module it was called with)."""
    return [
        module.register_forward_pre_hook(lambda m, args, kwargs: log.append(("pre", m)), with_kwargs=True),
        module.register_forward_hook(lambda m, args, out: log.append(("forward", m))),
        module.register_full_backward_hook(lambda m, grad_in, grad_out: log.append(("backward", m))),
        module.register_state_dict_post_hook(lambda m, sd, prefix, meta: log.append(("state_dict", m))),
        module.register_load_state_dict_pre_hook(lambda m, *args: log.append(("load_pre", m))),
        module.register_load_state_dict_post_hook(lambda m, keys: log.append(("load_post", m))),
    ]


def events(log: list, module: nn.Module) -> list:
    return [event for event, m in log if m is module]


def assert_same_as_torch(net: Net, ref: Net, steps: int = 1) -> None:
    """Outputs and parameter gradients of ``net`` equal those of ``ref``, step after step, while the tensors
    underneath the weight norms and parametrizations change between steps."""
    x = torch.randn(3, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    for step in range(steps):
        outs, grads = [], []
        for m in (ref, net):
            torch.manual_seed(step)  # weight drop draws its masks at every forward
            out = m(x)
            outs.append(out)
            grads.append(torch.autograd.grad(out.square().sum(), list(m.parameters())))
        assert rel_err(outs[1], outs[0]) < 1e-12
        for g, g_ref in zip(grads[1], grads[0]):
            assert rel_err(g, g_ref) < 1e-12
        with torch.no_grad():
            for m in (ref, net):
                m.old_norm.weight_hh_l0_g.mul_(1.5)
                m.new_norm.parametrizations.weight_ih_l0.original0.mul_(0.5)
                m.cell.parametrizations.weight_hh.original.add_(0.1)


def assert_ours(net: Net) -> None:
    assert type(net.drop.rnn) is lstm_triton.LSTM and type(net.old_norm) is lstm_triton.LSTM
    assert type(net.cell_drop.rnn) is lstm_triton.LSTMCell
    # A parametrized module's class is the subclass torch.nn.utils.parametrize makes of ours.
    assert isinstance(net.new_norm, lstm_triton.LSTM) and type(net.new_norm).__name__ == "ParametrizedLSTM"
    assert parametrize.type_before_parametrizations(net.new_norm) is lstm_triton.LSTM
    assert parametrize.type_before_parametrizations(net.cell) is lstm_triton.LSTMCell
    assert parametrize.is_parametrized(net.new_norm, "weight_ih_l0") and parametrize.is_parametrized(net.cell)


def test_convert_carries_the_whole_module_state():
    ref, net = build(), build()
    log = []
    handles = attach_hooks(net.new_norm, log) + attach_hooks(net.cell, log)
    params = list(net.named_parameters())
    lstm_triton.convert(net)
    gc.collect()  # the old modules are gone: nothing of the new ones may still need them
    assert_ours(net)
    # The same Parameter objects in the same order, and no placeholder for the removed weights.
    assert [(n, id(p)) for n, p in net.named_parameters()] == [(n, id(p)) for n, p in params]
    assert list(net.state_dict()) == list(ref.state_dict())
    assert "drop.rnn.weight_hh_l0" not in net.state_dict() and "cell_drop.rnn.weight_ih" not in net.state_dict()
    assert net.drop.rnn.note == "kept" and not net.cell.training and net.new_norm.training
    log.clear()
    assert_same_as_torch(net, ref, steps=2)
    assert net.drop.rnn.calls.item() == 2  # the buffer, through the forward hook
    for module in (net.new_norm, net.cell):
        assert events(log, module) == ["pre", "forward", "backward"] * 2
    assert all(m in (net.new_norm, net.cell) for _, m in log)
    # A plain tensor may be assigned where a parameter was removed, as on torch's module.
    net.drop.rnn.weight_hh_l0 = torch.zeros(16, 4, dtype=F64)
    assert net.drop.rnn._flat_weights[1] is net.drop.rnn.weight_hh_l0
    # state_dict hooks and load_state_dict hooks; the state dict loads strictly into the torch original.
    log.clear()
    state = net.state_dict()
    ref.load_state_dict(state, strict=True)
    net.load_state_dict(state, strict=True)
    for module in (net.new_norm, net.cell):
        assert events(log, module) == ["state_dict", "load_pre", "load_post"]
    # Handles returned before the conversion still remove their hooks.
    for handle in handles:
        handle.remove()
    log.clear()
    net(torch.randn(3, 2, 3, dtype=F64)).sum().backward()
    net.load_state_dict(net.state_dict())
    assert log == []


def test_round_trip_keeps_everything():
    ref, net = build(), build()
    log = []
    attach_hooks(net.new_norm, log)
    params = [(n, id(p)) for n, p in net.named_parameters()]
    keys = list(net.state_dict())
    lstm_triton.convert(net)
    lstm_triton.to_torch(net)
    assert type(net.drop.rnn) is nn.LSTM and type(net.cell_drop.rnn) is nn.LSTMCell
    assert parametrize.type_before_parametrizations(net.new_norm) is nn.LSTM
    assert parametrize.type_before_parametrizations(net.cell) is nn.LSTMCell
    log.clear()
    assert_same_as_torch(net, ref)  # torch's modules run it: the state made it there
    assert events(log, net.new_norm) == ["pre", "forward", "backward"]
    lstm_triton.convert(net)
    gc.collect()
    assert_ours(net)
    assert [(n, id(p)) for n, p in net.named_parameters()] == params and list(net.state_dict()) == keys
    assert net.drop.rnn.note == "kept" and not net.cell.training
    log.clear()
    assert_same_as_torch(net, ref)
    assert net.drop.rnn.calls.item() == 2 and events(log, net.new_norm) == ["pre", "forward", "backward"]
    ref.load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("removed", ["weight_drop", "weight_norm"])
def test_parameter_order_and_flat_weights(removed):
    """named_parameters() and _flat_weights as on torch's module after convert, load_state_dict and .to()."""

    def make():
        torch.manual_seed(0)
        lstm = nn.LSTM(3, 4, num_layers=2)
        if removed == "weight_drop":
            return lstm, WeightDrop(lstm, "weight_hh_l1", p=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return nn.utils.weight_norm(lstm, "weight_hh_l1"), lstm

    def flat(m):
        # Per flat weight: whether it is the attribute's current value (a removed one is not, until the next
        # forward sets it), and its dtype.
        return [(name, None if w is None else (w is getattr(m, name, None), w.dtype))
                for name, w in zip(m._flat_weights_names, m._flat_weights)]

    (ref, ref_model), (lstm, model) = make(), make()
    names = [n for n, _ in ref.named_parameters()]
    old_flat = list(lstm._flat_weights)
    ours = lstm_triton.convert(lstm)
    if removed == "weight_drop":
        model.rnn = ours
    else:
        model = ours
    assert [n for n, _ in ours.named_parameters()] == names
    assert all(a is b for a, b in zip(ours._flat_weights, old_flat)) and flat(ours) == flat(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert flat(ours) == flat(ref)
    for m in (ref, ours):
        m.to(F64)
    assert flat(ours) == flat(ref) and [n for n, _ in ours.named_parameters()] == names
    x = torch.randn(3, 2, 3, dtype=F64)
    assert rel_err(model(x)[0], ref_model(x)[0]) < 1e-12
    assert flat(ours) == flat(ref) and all(w is not None for w in ours._flat_weights)


def test_a_module_registered_twice_stays_one_module():
    for cls, ours in ((nn.LSTM, lstm_triton.LSTM), (nn.LSTMCell, lstm_triton.LSTMCell)):
        shared = cls(3, 4)
        model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
        lstm_triton.convert(model)
        assert type(model["a"]) is ours and model["b"][0] is model["a"]
        lstm_triton.to_torch(model)
        assert type(model["a"]) is cls and model["b"][0] is model["a"]


def test_state_that_cannot_follow_is_refused():
    patched = nn.LSTM(3, 4)
    patched.forward = lambda *args: None
    with pytest.raises(TypeError, match="own `forward` set on the instance"):
        lstm_triton.convert(nn.Sequential(patched))
    compiled = nn.LSTMCell(3, 4)
    compiled.compile(backend="eager")
    with pytest.raises(TypeError, match=r"Module\.compile\(\)"):
        lstm_triton.convert(compiled)
    extended = parametrizations.weight_norm(nn.LSTM(3, 4), "weight_hh_l0")
    type(extended).extra = 1
    with pytest.raises(TypeError, match="extra"):
        lstm_triton.convert(extended)

    class OwnForward(nn.LSTM):  # a subclass may do more in forward: left alone, as before
        def forward(self, *args):
            return super().forward(*args)

    model = nn.Sequential(OwnForward(3, 4))
    assert type(lstm_triton.convert(model)[0]) is OwnForward
