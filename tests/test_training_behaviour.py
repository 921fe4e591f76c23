"""Training code sees lstm_triton.LSTM / LSTMCell exactly as it sees torch.nn.LSTM / LSTMCell: not only the values
but the identity, memory and state of what it touches.

Every test runs the same training code on our module and on torch's, built with the same state_dict (float64
unless the case needs float32), and compares what that code observes: each parameter's ``.grad`` is a tensor of
its own with torch's layout (two gradients sharing memory get scaled twice by ``clip_grad_norm_`` and accumulate
wrongly), accumulation over backward passes, repeated backward on a retained graph, module and tensor hooks,
gradient clipping, ``GradScaler``, in-place ``zero_grad`` under SGD and Adam, ``torch.func``, parameter identity
through ``convert`` / ``load_state_dict`` / ``.to``, frozen parameters, activation checkpointing, in-place ops on
the outputs, and a small word-level language model trained side by side with the same model on ``torch.nn.LSTM``.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import lstm_triton
from helpers import DEVICE, F64, module_pair, projection_loss, rel_err

I, H, T, B = 4, 6, 3, 2

# name: (LSTMCell?, constructor keywords). A cell runs over the input's steps, each call from the last one's state:
# one step (each parameter's gradient comes from one call, as for an LSTM layer), or T steps (many uses summed).
CASES = {
    "lstm-2layers-bidirectional": (False, dict(num_layers=2, bidirectional=True)),
    "lstm-2layers-bidirectional-proj-batch_first": (False, dict(num_layers=2, bidirectional=True, proj_size=3,
                                                                batch_first=True)),
    "lstm-2layers-no_bias": (False, dict(num_layers=2, bias=False)),
    "lstmcell-one-step": (True, dict()),
    "lstmcell-unrolled": (True, dict()),
}
ALL = list(CASES)
STEPS = {"lstmcell-one-step": 1}


def steps_of(case):
    return STEPS.get(case, T)


def build(case, dtype=F64):
    cell, kwargs = CASES[case]
    return module_pair(I, H, cell=cell, dtype=dtype, **kwargs)


def is_cell(module):
    return isinstance(module, nn.LSTMCell)


def make_inputs(module, seed, requires_grad=False, steps=T):
    """(x, hx) for ``module``, the same for both modules of a pair; x has ``steps`` steps."""
    dtype = next(module.parameters()).dtype
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(DEVICE, dtype).requires_grad_(requires_grad)

    if is_cell(module):
        return rand(steps, B, I), (rand(B, H), rand(B, H))
    D, L = 2 if module.bidirectional else 1, module.num_layers
    x = rand(B, steps, I) if module.batch_first else rand(steps, B, I)
    return x, (rand(D * L, B, module.proj_size or H), rand(D * L, B, H))


def forward(module, x, hx, call=None):
    """[output, h_n, c_n] of an LSTM; a cell runs over x's steps (each step from the last one's state) and gives
    [every step's h, h_T, c_T]. ``call`` replaces ``module(...)`` (e.g. a functional_call)."""
    call = call or module
    if is_cell(module):
        h, c = hx
        hs = []
        for t in range(x.shape[0]):
            h, c = call(x[t], (h, c))
            hs.append(h)
        return [torch.stack(hs), h, c]
    out, (h, c) = call(x, hx)
    return [out, h, c]


def step_loss(module, seed, requires_grad=False, steps=T):
    x, hx = make_inputs(module, seed, requires_grad, steps)
    return projection_loss(forward(module, x, hx), seed + 100), x, hx


def layout(t):
    return t.shape, t.stride(), t.dtype, t.device


def assert_same_grads(ours, ref, tol=1e-12):
    """Same parameter names in the same order; each .grad None where torch's is, else torch's layout and values."""
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert layout(p.grad) == layout(q.grad), name
            assert rel_err(p.grad, q.grad) <= tol, (name, rel_err(p.grad, q.grad))


def assert_same_params(ours, ref, tol=1e-12):
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p, q) <= tol, (name, rel_err(p, q))


def storage(t):
    return t.untyped_storage().data_ptr()


# 1. Memory and layout of gradients and outputs.

@pytest.mark.parametrize("case", ALL)
def test_every_grad_is_its_own_tensor_with_torch_layout(case):
    ours, ref = build(case)
    leaf_grads = {}
    for m in (ours, ref):
        loss, x, hx = step_loss(m, 0, requires_grad=True, steps=steps_of(case))
        loss.backward()
        leaf_grads[m] = [x.grad, hx[0].grad, hx[1].grad]
    assert_same_grads(ours, ref)
    for g, gr in zip(leaf_grads[ours], leaf_grads[ref]):
        assert layout(g) == layout(gr) and rel_err(g, gr) <= 1e-12
    params = list(ours.parameters())
    grads = [p.grad for p in params] + leaf_grads[ours]
    # No two gradients share memory (e.g. bias_ih's and bias_hh's), none shares a parameter's, and none keeps a
    # larger buffer alive than torch's gradient does.
    assert len({storage(g) for g in grads}) == len(grads)
    assert not {storage(g) for g in grads} & {storage(p) for p in params}
    for p, q in zip(params, ref.parameters()):
        assert p.grad.untyped_storage().nbytes() == q.grad.untyped_storage().nbytes()


@pytest.mark.parametrize("case", ALL)
def test_outputs_are_their_own_tensors_with_torch_layout(case):
    ours, ref = build(case)
    outs = {}
    for m in (ours, ref):
        x, hx = make_inputs(m, 0, requires_grad=True, steps=steps_of(case))
        result = m(x[0], hx) if is_cell(m) else m(x, hx)
        flat = list(result) if is_cell(m) else [result[0], *result[1]]
        outs[m] = flat
        inputs = [x, *hx, *m.parameters()]
        assert len({storage(o) for o in flat}) == len(flat)
        assert not {storage(o) for o in flat} & {storage(t) for t in inputs}
    for a, b in zip(outs[ours], outs[ref]):
        assert layout(a) == layout(b) and a.requires_grad == b.requires_grad
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes()
        assert rel_err(a, b) <= 1e-12


# 2-3. Accumulation over backward passes; repeated backward on a retained graph.

@pytest.mark.parametrize("case", ALL)
def test_grads_accumulate_over_backward_passes(case):
    ours, ref = build(case)
    first = {}
    for call in range(3):
        for m in (ours, ref):
            step_loss(m, call, steps=steps_of(case))[0].backward()
            if call == 0:
                first[m] = [p.grad for p in m.parameters()]
        assert_same_grads(ours, ref)
        # Accumulated in place as torch does: the .grad tensors of the first pass keep summing.
        assert ([p.grad is g for p, g in zip(ours.parameters(), first[ours])]
                == [q.grad is g for q, g in zip(ref.parameters(), first[ref])])


RETAIN = [(c, False) for c in ALL] + [("lstm-2layers-bidirectional-proj-batch_first", True)]


@pytest.mark.parametrize("case,recompute", RETAIN,
                         ids=[f"{c}-{'recompute' if r else 'saved'}" for c, r in RETAIN])
def test_retain_graph_and_repeated_backward(case, recompute):
    ours, ref = build(case)
    if recompute:
        ours.recompute = True  # the backward re-runs the forward recurrence instead of reading saved activations
    grads = {}
    for m in (ours, ref):
        loss, x, hx = step_loss(m, 0, requires_grad=True, steps=steps_of(case))
        wrt = [x, *hx, *m.parameters()]
        first = torch.autograd.grad(loss, wrt, retain_graph=True)
        loss.backward(retain_graph=True)
        # The backward leaves what it saved untouched: the same graph gives the same gradients again...
        assert all(torch.equal(t.grad, g) for t, g in zip(wrt, first))
        loss.backward()
        # ... and once more, accumulated.
        assert all(torch.equal(t.grad, 2 * g) for t, g in zip(wrt, first))
        grads[m] = first
    for a, b in zip(grads[ours], grads[ref]):
        assert rel_err(a, b) <= 1e-12
    assert_same_grads(ours, ref)


# 4. Hooks.

def snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return tuple(snapshot(o) for o in obj)
    return obj


def assert_same_structure(a, b, where):
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and layout(a) == layout(b), where
        assert rel_err(a, b) <= 1e-12, (where, rel_err(a, b))
    elif isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("case", ALL)
def test_module_hooks_see_what_torch_hooks_see(case):
    ours, ref = build(case)
    logs, leaf_grads = {}, {}
    for m in (ours, ref):
        log = logs[m] = []

        def pre(mod, args, log=log):
            log.append(("forward_pre", snapshot(args)))
            return (args[0] * 0.5,) + args[1:]  # a hook that changes the input

        def fwd(mod, args, out, log=log):
            log.append(("forward", snapshot(args), snapshot(out)))

        def bwd_pre(mod, grad_output, log=log):
            log.append(("backward_pre", snapshot(grad_output)))

        def bwd(mod, grad_input, grad_output, log=log):
            log.append(("backward", snapshot(grad_input), snapshot(grad_output)))
            return tuple(None if g is None else 2 * g for g in grad_input)  # and one that changes grad_input

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(fwd)
        m.register_full_backward_pre_hook(bwd_pre)
        m.register_full_backward_hook(bwd)
        loss, x, hx = step_loss(m, 0, requires_grad=True, steps=steps_of(case))
        loss.backward()
        leaf_grads[m] = (x.grad, hx[0].grad, hx[1].grad)
    assert [e[0] for e in logs[ours]] == [e[0] for e in logs[ref]]
    assert sum(e[0] == "backward" for e in logs[ours]) == (steps_of(case) if is_cell(ours) else 1)
    for k, (a, b) in enumerate(zip(logs[ours], logs[ref])):
        assert_same_structure(a, b, f"event {k} ({b[0]})")
    assert_same_structure(leaf_grads[ours], leaf_grads[ref], "input grads")
    assert_same_grads(ours, ref)


@pytest.mark.parametrize("case", ALL)
def test_parameter_tensor_hooks_fire_once_per_backward(case):
    ours, ref = build(case)
    names = [n for n, _ in ref.named_parameters()]
    scaled = [n for n in names if "hh" in n][0]  # its hook returns a changed gradient
    seen, accumulated = {}, {}
    for m in (ours, ref):
        seen[m] = {n: [] for n in names}
        accumulated[m] = {n: [] for n in names}
        for name, p in m.named_parameters():
            p.register_hook(lambda g, name=name, log=seen[m]: log[name].append(g.clone()))
            p.register_post_accumulate_grad_hook(
                lambda p, name=name, log=accumulated[m]: log[name].append(p.grad.clone()))
        getattr(m, scaled).register_hook(lambda g: 3 * g)
        for call in range(2):
            step_loss(m, call, steps=steps_of(case))[0].backward()
    for name in names:
        for m in (ours, ref):  # once per backward, each
            assert len(seen[m][name]) == len(accumulated[m][name]) == 2, name
        for log in (seen, accumulated):
            for a, b in zip(log[ours][name], log[ref][name]):
                assert rel_err(a, b) <= 1e-12, name
    assert_same_grads(ours, ref)


# 5. Gradient clipping.

CLIP = [(c, 2.0) for c in ALL] + [("lstm-2layers-bidirectional", math.inf), ("lstmcell-one-step", math.inf)]


@pytest.mark.parametrize("case,norm_type", CLIP, ids=[f"{c}-norm{'inf' if math.isinf(n) else int(n)}" for c, n in CLIP])
def test_clip_grad_norm_and_value(case, norm_type):
    ours, ref = build(case)
    totals = {}
    for m in (ours, ref):
        step_loss(m, 0, steps=steps_of(case))[0].backward()
        totals[m] = nn.utils.clip_grad_norm_(m.parameters(), 0.05, norm_type=norm_type)
    assert totals[ref] > 0.05  # the clip is active
    assert rel_err(totals[ours], totals[ref]) <= 1e-12
    assert_same_grads(ours, ref)
    new_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, norm_type)
                                                     for p in ours.parameters()]), norm_type)
    assert abs(new_norm.item() - 0.05) <= 1e-6  # each gradient scaled once, not twice
    for m in (ours, ref):
        m.zero_grad()
        step_loss(m, 1, steps=steps_of(case))[0].backward()
        nn.utils.clip_grad_value_(m.parameters(), 0.01)
        assert max(p.grad.abs().max().item() for p in m.parameters()) == 0.01
    assert_same_grads(ours, ref)


# 6. Mixed-precision loss scaling.

@pytest.mark.parametrize("case", ["lstm-2layers-bidirectional-proj-batch_first", "lstmcell-one-step"])
def test_grad_scaler_flow_float32(case):
    try:
        scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10, growth_interval=2) for _ in range(2)]
    except Exception as exc:  # pragma: no cover - depends on the torch version
        pytest.skip(f"torch.amp.GradScaler({DEVICE!r}) is not available in torch {torch.__version__}: {exc}")
    ours, ref = build(case, dtype=torch.float32)
    models = (ours, ref)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for step in range(4):
        before = [p.detach().clone() for p in ours.parameters()]
        for m, scaler, opt in zip(models, scalers, opts):
            loss = step_loss(m, step, steps=steps_of(case))[0]
            if step == 1:
                loss = loss * math.inf  # an overflowing step: skipped and the scale backs off, in both
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        if step == 1:
            assert all(torch.equal(p, b) for p, b in zip(ours.parameters(), before))
        assert_same_params(ours, ref, tol=1e-5)
    assert scalers[0].get_scale() == 2.0 ** 10  # halved once, doubled once


# 7. In-place zero_grad with optimizers that keep state.

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", ["lstm-2layers-bidirectional-proj-batch_first", "lstm-2layers-no_bias",
                                  "lstmcell-one-step"])
def test_zero_grad_in_place_then_steps(case, optimizer):
    ours, ref = build(case)
    opts = {m: OPTIMIZERS[optimizer](m.parameters()) for m in (ours, ref)}
    grads = {}
    for step in range(3):
        for m in (ours, ref):
            opts[m].zero_grad(set_to_none=False)
            if step:  # zeroed in place: the same tensors, all zero
                assert all(p.grad is g and not g.any() for p, g in zip(m.parameters(), grads[m]))
            step_loss(m, step, steps=steps_of(case))[0].backward()
            if step:
                assert all(p.grad is g for p, g in zip(m.parameters(), grads[m]))
            grads[m] = [p.grad for p in m.parameters()]
            opts[m].step()
        assert_same_grads(ours, ref)
        assert_same_params(ours, ref, tol=1e-12)


# 8. torch.func.

@pytest.mark.parametrize("case", ALL)
def test_torch_func_grad_over_functional_call(case):
    ours, ref = build(case)
    results = {}
    for m in (ours, ref):
        x, hx = make_inputs(m, 0, steps=steps_of(case))
        params = {n: p.detach().clone() for n, p in m.named_parameters()}

        def loss(params, x, m=m, hx=hx):
            call = lambda *args: torch.func.functional_call(m, params, args)  # noqa: E731
            return projection_loss(forward(m, x, hx, call), 100)

        results[m] = torch.func.grad(loss, argnums=(0, 1))(params, x)
        assert all(p.grad is None for p in m.parameters())
    (g_params, g_x), (r_params, r_x) = results[ours], results[ref]
    assert list(g_params) == list(r_params)
    for name in r_params:
        assert layout(g_params[name]) == layout(r_params[name]), name
        assert rel_err(g_params[name], r_params[name]) <= 1e-12, name
    assert rel_err(g_x, r_x) <= 1e-12


@pytest.mark.parametrize("case", ALL)
def test_functional_call_under_autograd_leaves_the_module_as_it_was(case):
    ours, ref = build(case)
    grads, flat = {}, {}
    for m in (ours, ref):
        x, hx = make_inputs(m, 0, steps=steps_of(case))
        params = {n: (p.detach().clone() * 1.5).requires_grad_() for n, p in m.named_parameters()}
        call = lambda *args, m=m, params=params: torch.func.functional_call(m, params, args)  # noqa: E731
        projection_loss(forward(m, x, hx, call), 100).backward()
        grads[m] = [params[n].grad for n, _ in m.named_parameters()]
        assert all(p.grad is None for p in m.parameters())
        if not is_cell(m):
            # torch's RNNBase keeps the substituted tensors in _flat_weights until its next forward re-reads them.
            flat[m] = [(w is getattr(m, n), w is params[n]) for w, n in zip(m._flat_weights, m._flat_weights_names)]
    assert flat.get(ours) == flat.get(ref)
    for a, b in zip(grads[ours], grads[ref]):
        assert layout(a) == layout(b) and rel_err(a, b) <= 1e-12
    for m in (ours, ref):  # the next forward runs with the module's own parameters and trains them
        step_loss(m, 1, steps=steps_of(case))[0].backward()
        if not is_cell(m):
            assert all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names))
    assert_same_grads(ours, ref)


# 9. Parameter identity through convert, load_state_dict, .to and back.

def assert_flat_weights_are_the_parameters(lstm, torch_names):
    assert [n for n, _ in lstm.named_parameters()] == torch_names == list(lstm._flat_weights_names)
    assert all(w is getattr(lstm, n) for w, n in zip(lstm._flat_weights, lstm._flat_weights_names))


def test_parameter_identity_through_convert_load_and_to():
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=3)
    torch.manual_seed(0)
    model = nn.ModuleDict({"lstm": nn.LSTM(I, H, **kwargs), "cell": nn.LSTMCell(I, H)})
    lstm_names = [n for n, _ in model["lstm"].named_parameters()]
    params = list(model.parameters())

    def check(expected_params):
        assert type(model["lstm"]) is lstm_triton.LSTM and type(model["cell"]) is lstm_triton.LSTMCell
        assert all(a is b for a, b in zip(model.parameters(), expected_params))
        assert_flat_weights_are_the_parameters(model["lstm"], lstm_names)

    assert lstm_triton.convert(model) is model
    check(params)
    model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})
    check(params)
    model.to(device=DEVICE, dtype=F64)
    check(params)
    assert all(p.dtype == F64 for p in model["lstm"]._flat_weights)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    params = list(model.parameters())
    check(params)
    assert lstm_triton.convert(lstm_triton.to_torch(model)) is model
    check(params)
    # The module trains with those very parameters: its gradients land on them, as torch's module's would.
    ref = nn.LSTM(I, H, **kwargs).to(device=DEVICE, dtype=F64)
    ref.load_state_dict(model["lstm"].state_dict())
    for m in (model["lstm"], ref):
        step_loss(m, 0)[0].backward()
    assert all(p.grad is not None for p in params[:len(lstm_names)])
    assert_same_grads(model["lstm"], ref)


# 10. Frozen parameters.

FROZEN = {
    "lstm-2layers-bidirectional": ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "bias_hh_l1_reverse"],
    "lstm-2layers-bidirectional-proj-batch_first": ["weight_hr_l0", "weight_ih_l1_reverse", "bias_ih_l1"],
    "lstm-2layers-no_bias": ["weight_ih_l1", "weight_hh_l1"],
    "lstmcell-one-step": ["weight_hh", "bias_ih"],
    "lstmcell-unrolled": ["weight_ih", "bias_hh"],
}


@pytest.mark.parametrize("case", ALL)
def test_frozen_parameters_get_no_grad(case):
    ours, ref = build(case)
    leaf_grads = {}
    for m in (ours, ref):
        for name in FROZEN[case]:
            getattr(m, name).requires_grad_(False)
        loss, x, hx = step_loss(m, 0, requires_grad=True, steps=steps_of(case))
        loss.backward()
        leaf_grads[m] = [x.grad, *(t.grad for t in hx)]
        assert all((p.grad is None) == (n in FROZEN[case]) for n, p in m.named_parameters())
    assert_same_grads(ours, ref)
    for a, b in zip(leaf_grads[ours], leaf_grads[ref]):
        assert rel_err(a, b) <= 1e-12
    # Everything frozen: only the input's gradient.
    for m in (ours, ref):
        m.requires_grad_(False).zero_grad()
        loss, x, hx = step_loss(m, 2, requires_grad=True, steps=steps_of(case))
        loss.backward()
        leaf_grads[m] = [x.grad, *(t.grad for t in hx)]
        assert all(p.grad is None for p in m.parameters())
    for a, b in zip(leaf_grads[ours], leaf_grads[ref]):
        assert rel_err(a, b) <= 1e-12


# Activation checkpointing: the forward runs again in the backward, with the RNG state of the first run.

@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_with_dropout(use_reentrant):
    ours, ref = module_pair(I, H, num_layers=2, bidirectional=True, dropout=0.5)
    leaf_grads = {}
    for m in (ours, ref):
        x, hx = make_inputs(m, 0, requires_grad=True)
        torch.manual_seed(5)
        outs = torch.utils.checkpoint.checkpoint(lambda x, h, c: tuple(forward(m, x, (h, c))), x, *hx,
                                                 use_reentrant=use_reentrant)
        projection_loss(outs, 100).backward()
        leaf_grads[m] = [x.grad, hx[0].grad, hx[1].grad]
    assert_same_grads(ours, ref)
    for a, b in zip(leaf_grads[ours], leaf_grads[ref]):
        assert layout(a) == layout(b) and rel_err(a, b) <= 1e-12


# In-place ops on the outputs (nn.ReLU(inplace=True), out += residual) before backward.

INPLACE = {
    "lstm-unidirectional": (False, dict()),
    "lstm-2layers-bidirectional": CASES["lstm-2layers-bidirectional"],
    "lstmcell": (True, dict()),
}


@pytest.mark.parametrize("case", INPLACE)
def test_in_place_op_on_the_output_never_gives_wrong_grads(case):
    """torch's CPU LSTM keeps no reference to its output; cuDNN's backward reads it, so on CUDA torch.nn.LSTM
    refuses an in-place change of the output. Ours reads the output of a unidirectional layer in its backward (the
    previous steps' h): the documented deviation is autograd's in-place error there, never a silently wrong
    gradient; everywhere else the in-place op works as with torch."""
    cell, kwargs = INPLACE[case]
    ours, ref = module_pair(I, H, cell=cell, **kwargs)
    errors = {}
    for m in (ours, ref):
        x, hx = make_inputs(m, 0, requires_grad=True)
        result = m(x[0], hx) if cell else m(x, hx)
        outs = list(result) if cell else [result[0], *result[1]]
        try:
            for o in outs:
                o.relu_()
            projection_loss(outs, 100).backward()
        except RuntimeError as exc:
            assert "modified by an inplace operation" in str(exc), exc
            errors[m] = exc
    if ours in errors:
        assert case == "lstm-unidirectional", errors[ours]
    if ref in errors:
        assert DEVICE == "cuda" and not cell, errors[ref]  # cuDNN
    if not errors:
        assert_same_grads(ours, ref)


# 11. End to end: a word-level language model trained side by side with the same model on torch.nn.LSTM.

class WordLM(nn.Module):
    """Embedding → two LSTM layers with dropout between them → decoder tied to the embedding (the decoder's weight
    is the embedding's, so the LSTM's hidden size is the embedding size); dropout on the embeddings and the LSTM's
    output, as in PyTorch's word_language_model example. ``split``: the two layers as two single-layer LSTMs with
    an ``nn.Dropout`` between them, instead of one ``LSTM(num_layers=2, dropout=...)``."""

    def __init__(self, lstm_cls, vocab, size, dropout, split=False):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        if split:
            self.rnns = nn.ModuleList([lstm_cls(size, size), lstm_cls(size, size)])
        else:
            self.rnns = nn.ModuleList([lstm_cls(size, size, num_layers=2, dropout=dropout)])
        self.decoder = nn.Linear(size, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens, hidden):
        x = self.drop(self.encoder(tokens))
        hidden = hidden or [None] * len(self.rnns)
        new_hidden = []
        for k, (rnn, h) in enumerate(zip(self.rnns, hidden)):
            x = self.drop(x) if k else x
            x, h = rnn(x, h)
            new_hidden.append(h)
        return self.decoder(self.drop(x)).flatten(0, 1), new_hidden


def relative_error(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("split", [False, True], ids=["lstm-2layers-dropout", "two-lstms-nn.Dropout-between"])
def test_word_language_model_trains_like_torch(split):
    """Truncated BPTT (the state carried across chunks, detached), two micro-batches accumulated per step,
    clip_grad_norm_(0.25), SGD; dropout drawn from the same seed before each forward of each model. Our module
    draws its between-layer dropout with F.dropout on the layer's output, exactly as torch's CPU LSTM does, so the
    masks are the same with the dropout inside the LSTM (the RNG states after each forward are compared too);
    cuDNN draws its own, so on a GPU only the layout with the dropout outside the LSTMs can be compared."""
    if DEVICE == "cuda" and not split:
        pytest.skip("cuDNN draws the dropout between its layers from its own generator state")
    vocab, size, bptt, batch, steps, micro = 24, 8, 5, 3, 4, 2
    models = {}
    for name, cls in (("ours", lstm_triton.LSTM), ("torch", nn.LSTM)):
        torch.manual_seed(1234)  # the same construction from the same seed: the same initial weights
        models[name] = WordLM(cls, vocab, size, 0.3, split).to(device=DEVICE, dtype=F64).train()
    ours, ref = models["ours"], models["torch"]
    assert ours.decoder.weight is ours.encoder.weight
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(vocab, (steps * micro * bptt + 1, batch), generator=g).to(DEVICE)
    opts = {name: torch.optim.SGD(m.parameters(), lr=1.0) for name, m in models.items()}
    hidden = {name: None for name in models}
    for step in range(steps):
        for opt in opts.values():
            opt.zero_grad()
        for k in range(micro):
            i = (step * micro + k) * bptt
            src, tgt = data[i:i + bptt], data[i + 1:i + 1 + bptt]
            losses, rng = {}, {}
            for name, m in models.items():
                h = None if hidden[name] is None else [tuple(t.detach() for t in hc) for hc in hidden[name]]
                torch.manual_seed(100 + step * micro + k)
                logits, hidden[name] = m(src, h)
                rng[name] = torch.get_rng_state()
                loss = F.cross_entropy(logits, tgt.flatten()) / micro
                loss.backward()
                losses[name] = loss.detach()
            assert torch.equal(rng["ours"], rng["torch"])
            assert relative_error(losses["ours"], losses["torch"]) <= 1e-9, (step, k)
            for hc, hc_ref in zip(hidden["ours"], hidden["torch"]):
                for a, b in zip(hc, hc_ref):
                    assert relative_error(a, b) <= 1e-9, (step, k)
        norms = {name: nn.utils.clip_grad_norm_(m.parameters(), 0.25) for name, m in models.items()}
        assert norms["torch"] > 0.25  # the clip is active
        assert relative_error(norms["ours"], norms["torch"]) <= 1e-9
        assert_same_grads(ours, ref, tol=1e-9)
        for opt in opts.values():
            opt.step()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert relative_error(p, q) <= 1e-9, (step, name)
    assert [type(r) for r in ours.rnns] == [lstm_triton.LSTM] * len(ours.rnns)
