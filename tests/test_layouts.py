"""Strided layouts: inputs, hx and weights in any layout give the results of contiguous ones.

Random valid configurations (Hypothesis) with the input, hx and weights as transposed views, strided slices,
stride-0 expansions or slices of a bigger tensor, against ``torch.nn.LSTM`` carrying the same state_dict (outputs
and every gradient); h0 / c0 as slices of one state buffer on every kernel path, against the float64 reference;
the stepwise path in training; a carried state buffer with a batch-first view, read without being modified.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import (DEVICE, F64, KERNEL_PATHS, SLOW, assert_parity, forward_backward, lstm_config, module_pair,
                     projection_loss, rel_err, source_seed, valid_shapes)
from lstm_triton import lstm_layer_directions, lstm_layer_reference
from lstm_triton.kernels import plan_lstm


def _strided_input(shape, layout, batch_dim, g):
    """A leaf tensor and a view of it with the given ``shape`` and layout."""
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    n = len(shape)
    if layout == "transposed" and n >= 2:  # storage in the other (seq-first ↔ batch-first) order
        base = rand(shape[1], shape[0], *shape[2:])
        return base, lambda b: b.transpose(0, 1)
    if layout == "strided-last-dim":
        base = rand(*shape[:-1], 2 * shape[-1] + 1)
        return base, lambda b: b[..., 1::2]
    if layout == "expanded" and n >= 2:  # stride 0 along the batch (or, unbatched, the time) dimension
        d = batch_dim if n == 3 else 0
        small = list(shape)
        small[d] = 1
        base = rand(*small)
        return base, lambda b: b.expand(*shape)
    if layout == "slice-of-bigger":  # non-zero storage offset and padded strides in every dimension
        base = rand(*[s + 2 for s in shape])
        return base, lambda b: b[tuple(slice(1, 1 + s) for s in shape)]
    base = rand(*shape)
    return base, lambda b: b


LAYOUTS = ["contiguous", "transposed", "strided-last-dim", "expanded", "slice-of-bigger"]


def _strided_params(module, g, layout):
    """Leaf tensors and non-contiguous views of them carrying the module's parameter values."""
    leaves, views = {}, {}
    for name, p in module.named_parameters():
        p = p.detach().cpu()
        if layout == "transposed" and p.dim() == 2:
            leaves[name] = p.t().contiguous().requires_grad_()
            views[name] = lambda b: b.t()
        elif layout == "strided":
            leaves[name] = torch.stack([p, torch.randn(p.shape, generator=g, dtype=F64)], -1).requires_grad_()
            views[name] = lambda b: b[..., 0]
        else:
            leaves[name] = p.clone().requires_grad_()
            views[name] = lambda b: b
    return leaves, views


@source_seed("70079df05024c74e5c96bea7566cfc42cb7923ac30252b98cb67cb04d8b3b8a28a6fbdfed37467eba7eb90389a2a27fa")
@SLOW
@given(
    config=lstm_config(),
    x_layout=st.sampled_from(LAYOUTS),
    hx_layout=st.sampled_from(["none"] + LAYOUTS),
    w_layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    seed=st.integers(0, 2**16),
)
def test_random_valid_configs_and_layouts_match_torch(config, x_layout, hx_layout, w_layout, seed):
    """Outputs and every gradient (input, hx, weights) of random valid configurations, with the input, hx and
    weights given as transposed views, strided slices, stride-0 expansions or slices of a bigger tensor."""
    I, H, kwargs, T, B = config
    xs, hs, cs = valid_shapes(I, H, kwargs, T, B)
    g = torch.Generator().manual_seed(seed)
    batch_dim = 0 if kwargs["batch_first"] else 1
    x_base, x_view = _strided_input(xs, x_layout, batch_dim, g)
    bases, views = [x_base], [x_view]
    if hx_layout != "none":
        for s in (hs, cs):
            b, v = _strided_input(s, hx_layout, 1, g)
            bases.append(b * 0.5)
            views.append(v)
    ours, ref = module_pair(I, H, device="cpu", seed=seed, **kwargs)
    results = []
    for m in (ours, ref):
        leaves = [b.clone().to(DEVICE).requires_grad_() for b in bases]
        w_leaves, w_views = _strided_params(m, torch.Generator().manual_seed(seed), w_layout)
        w_leaves = {n: t.to(DEVICE).detach().requires_grad_() for n, t in w_leaves.items()}
        params = {n: w_views[n](t) for n, t in w_leaves.items()}
        x = views[0](leaves[0])
        hx = None if len(leaves) == 1 else (views[1](leaves[1]), views[2](leaves[2]))
        assert x.shape == xs and (hx is None or (hx[0].shape == hs and hx[1].shape == cs))
        out, (h, c) = torch.func.functional_call(m.to(DEVICE), params, (x, hx))
        outs = [out, h, c]
        loss = projection_loss(outs)
        grads = torch.autograd.grad(loss, leaves + list(w_leaves.values()))
        results.append(([o.detach() for o in outs], grads))
    (outs, grads), (outs_ref, grads_ref) = results
    for name, a, b in zip(["output", "h_n", "c_n"], outs, outs_ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-12, (name, rel_err(a, b))
    names = ["input"] + ["h0", "c0"][: len(bases) - 1] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        assert rel_err(a, b) <= 1e-12, (name, rel_err(a, b))


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_each_kernel_path_runs_two_directions_in_training_like_the_reference(path):
    """Both directions in one launch, with saved state for backward (parameters requiring grad), per-sequence
    lengths and h0/c0 slices of a bigger buffer, on every kernel path: outputs and every gradient equal the
    float64 reference. (H = 40: two programs per batch tile on the cooperative path, three on the stepwise.)"""
    T, B, I, H = 4, 3, 2, 40
    g = torch.Generator().manual_seed(2)
    k = H ** -0.5
    u = lambda *s: ((torch.rand(*s, generator=g, dtype=F64) * 2 - 1) * k).to(DEVICE)  # noqa: E731
    weights = [[u(4 * H, I), u(4 * H, H), u(4 * H), u(4 * H)] for _ in range(2)]
    x = torch.randn(T, B, I, generator=g, dtype=F64).to(DEVICE)
    state = torch.randn(2, 3, B + 1, H, generator=g, dtype=F64).to(DEVICE)
    lengths = [4, 2, 3]

    def run(fn):
        leaves = [x.clone().requires_grad_(), state.clone().requires_grad_()] + [
            w.clone().requires_grad_() for ws in weights for w in ws]
        ws = [leaves[2:6], leaves[6:10]]
        h0, c0 = leaves[1][0, 1:, 1:], leaves[1][1, :2, 1:]  # [2, B, H] slices at different offsets
        outs = fn(leaves[0], h0, c0, ws)
        loss = projection_loss(outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))

    def reference(x, h0, c0, ws):
        outs = [lstm_layer_reference(x, h0[d], c0[d], *ws[d], lengths=lengths, reverse=d == 1) for d in range(2)]
        return torch.cat([o[0] for o in outs], -1), torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])

    def ours(x, h0, c0, ws):
        return lstm_layer_directions(x, h0, c0, [(*w, None) for w in ws], path=path,
                                     lengths=torch.tensor(lengths, device=DEVICE))

    try:
        plan_lstm(B, H, F64, path=path)
    except ValueError as e:
        pytest.skip(str(e))
    names = ["y", "h_n", "c_n", "dx", "dstate"] + [f"d{n}_{d}" for d in range(2)
                                                   for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
    for name, a, r in zip(names, run(ours), run(reference)):
        assert rel_err(a, r) <= 1e-12, (name, rel_err(a, r))


@pytest.mark.parametrize("hidden,T", [(36, 3), (5, 1)], ids=["H36-T3", "H5-T1"])
def test_bidirectional_module_on_the_stepwise_path_in_training_matches_torch(hidden, T):
    """The same through the module, on the two ways it reaches the stepwise kernel: float64 with H = 36 (W_hh too
    large for one program), and any single-step sequence (T = 1: one fused kernel with the input projection).
    Parameters require grad, so the forward saves its state for backward."""
    ours, ref = module_pair(3, hidden, bidirectional=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 2, 3, generator=g, dtype=F64).to(DEVICE)
    build = lambda ls: (ls[0], None)  # noqa: E731
    outs, grads = forward_backward(ours, [x.clone().requires_grad_()], build)
    outs_ref, grads_ref = forward_backward(ref, [x.clone().requires_grad_()], build)
    names = ["output", "h_n", "c_n", "d_input"] + [n for n, _ in ref.named_parameters()]
    for name, a, r in zip(names, outs + grads, outs_ref + grads_ref):
        assert rel_err(a, r) <= 1e-12, (name, rel_err(a, r))


def test_hx_slices_of_one_state_buffer_and_batch_first_views():
    """A common pattern: h0/c0 are slices of one [2, L·D, B, H] buffer that carries the state from call to
    call (truncated BPTT), and a batch-first input is a transposed view of a seq-first one. The call reads
    its views correctly, leaves them unmodified, and returns fresh tensors that can be written back."""
    ours, ref = module_pair(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    state = torch.randn(2, 4, 3, 5, dtype=F64, device=DEVICE)
    h_r, c_r = state[0].clone(), state[1].clone()
    x = torch.randn(4, 3, 3, dtype=F64, device=DEVICE).transpose(0, 1)
    assert not x.is_contiguous() and state[1].storage_offset() > 0
    with torch.no_grad():
        for _ in range(3):
            before = state.clone()
            y, (h, c) = ours(x, (state[0], state[1]))
            assert torch.equal(state, before), "the call modified its hx"
            state[0], state[1] = h, c
            y_r, (h_r, c_r) = ref(x.contiguous(), (h_r, c_r))
            assert rel_err(y, y_r) <= 1e-12
            assert rel_err(state[0], h_r) <= 1e-12 and rel_err(state[1], c_r) <= 1e-12


def test_non_contiguous_input_and_hx():
    ours, ref = module_pair(4, 6, device="cpu")
    x = torch.randn(5, 3, 8, dtype=F64)[:, :, ::2]
    hx = (torch.randn(1, 6, 3, dtype=F64).transpose(1, 2), torch.randn(6, 3, 1, dtype=F64).permute(2, 1, 0))
    assert not x.is_contiguous() and not hx[0].is_contiguous()
    assert_parity(ours, ref, x, hx)
