"""Options beyond torch.nn.LSTM: segment resets, recurrent dropout, cell states, init_forget_bias_.

- Layer op (``lstm_layer_directions(..., path=p)``, every kernel path): outputs and every gradient — x, h0, c0,
  every weight and bias, through y, h_n, c_n and the cell states — against the float64 reference
  (``lstm_triton/reference.py``) within 1e-12, with resets at the first step, the last step, adjacent steps,
  none and all, combined with lengths, both directions, projection, a recurrent-dropout mask and recompute;
  strided operands, misshapen ones refused before any launch, and double backward.
- Module: resets against ``torch.nn.LSTM`` run segment by segment (every segment of every sequence as a
  sequence of its own from hx, stitched back), in every layout torch takes; several layers, dropout between
  them, recurrent dropout and cell states against the reference with the module's own masks.
- Recurrent dropout: one mask per layer, direction and sequence, the same at every step, new at every call,
  none in eval mode, p = 0 bit for bit the plain module, p = 1 cuts h out of the recurrence.
- torch.compile and torch.export; the CPU path without the interpreter (the module falls back to the
  reference) agrees with the kernels. Misshapen module options are refused in test_bad_input.py.

Shapes are tiny (the interpreter is slow); H = 20 splits the hidden units over several programs on the
cooperative path (5 forward programs of 4 units, 2 backward programs of 16).
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstm_triton
from helpers import (DEVICE, F64, KERNEL_PATHS, assert_raises_before_any_kernel, intercepted_launches, module_pair,
                     random_cotangents, rel_err, run_with_grads, seeded_loss_and_grads)
from lstm_triton import lstm_layer_directions, lstm_layer_directions_reference, lstm_reference
from lstm_triton import modules

TOL = 1e-12


def bools(T, B, steps):
    """A [T, B] bool tensor, True at the (t, b) in ``steps``."""
    r = torch.zeros(T, B, dtype=torch.bool)
    for t, b in steps:
        r[t, b] = True
    return r.to(DEVICE)


def reset_pattern(name, T, B):
    """Segment starts [T, B] by name (None: no resets argument at all)."""
    r = torch.zeros(T, B, dtype=torch.bool)
    if name == "none":
        return None
    if name == "first":  # step 0 starts a segment anyway: the same as no resets
        r[0] = True
    elif name == "last":  # a one-step segment at the end (for the reverse direction: its first step)
        r[-1] = True
    elif name == "adjacent":  # steps 2 and 3 both start one: a one-step segment in the middle
        r[2:4] = True
    elif name == "all":  # every step is a sequence of its own
        r[:] = True
    elif name == "mixed":  # a different pattern per sequence, one sequence without any
        r[2, 0] = True
        r[1, 1] = r[2, 1] = r[-1, 1] = True
    elif name != "all-false":
        raise ValueError(name)
    return r.to(DEVICE)


RESET_PATTERNS = ["none", "all-false", "first", "last", "adjacent", "all", "mixed"]


# ----------------------------------------------------------------------------------------------------------------
# The layer op on every kernel path against the float64 reference.


def layer_problem(T, B, I, H, D=2, proj=0, bias=True, with_state=True, seed=0):
    """x [T, B, I], h0 [D, B, P], c0 [D, B, H] and per direction (w_ih, w_hh, b_ih, b_hh, w_hr), float64."""
    g = torch.Generator().manual_seed(seed)
    P = proj or H

    def u(*shape):
        return ((torch.rand(*shape, generator=g, dtype=F64) * 2 - 1) * H ** -0.5).to(DEVICE)

    x = torch.randn(T, B, I, generator=g, dtype=F64).to(DEVICE)
    h0 = (torch.randn(D, B, P, generator=g, dtype=F64) * 0.5).to(DEVICE)
    c0 = (torch.randn(D, B, H, generator=g, dtype=F64) * 0.5).to(DEVICE)
    weights = [(u(4 * H, I), u(4 * H, P), u(4 * H) if bias else None, u(4 * H) if bias else None,
                u(P, H) if proj else None) for _ in range(D)]
    return dict(x=x, h0=h0 if with_state else None, c0=c0 if with_state else None, weights=weights)


def run_layer(fn, problem, cotangents=None, **options):
    """``fn(x, h0, c0, weights, **options)`` differentiated, through a random projection of every output, with
    respect to every tensor input (``run_with_grads``, the weights named ``w_ih[d]`` etc.). Returns (outputs,
    {name: gradient}, cotangents)."""
    named = {"x": problem["x"], "h0": problem["h0"], "c0": problem["c0"]}
    for d, w in enumerate(problem["weights"]):
        named.update({f"{k}[{d}]": t for k, t in zip(("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"), w)})

    def call(**args):
        weights = [tuple(args[f"{k}[{d}]"] for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"))
                   for d in range(len(problem["weights"]))]
        return fn(args["x"], args["h0"], args["c0"], weights, **options)

    return run_with_grads(call, named, cotangents)


def reference_layer(x, h0, c0, weights, **options):
    """The reference's twin of lstm_layer_directions (zeros for an absent h0 / c0)."""
    D, (T, B, _) = len(weights), x.shape
    H, P = weights[0][1].shape[0] // 4, weights[0][1].shape[1]
    h0 = x.new_zeros(D, B, P) if h0 is None else h0
    c0 = x.new_zeros(D, B, H) if c0 is None else c0
    options.pop("path", None)
    options.pop("recompute", None)
    return lstm_layer_directions_reference(x, h0, c0, weights, **options)


def assert_layer_matches_reference(problem, path, **options):
    ref_outs, ref_grads, cot = run_layer(reference_layer, problem, **options)
    outs, grads, _ = run_layer(lstm_layer_directions, problem, cot, path=path, **options)
    names = ["y", "h_n", "c_n", "cell_states"][:len(outs)]
    assert len(outs) == len(ref_outs) and set(grads) == set(ref_grads)
    errors = {n: rel_err(a, b) for n, a, b in zip(names, outs, ref_outs)}
    errors.update({f"d{k}": rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    for n, a, b in zip(names, outs, ref_outs):
        assert a.shape == b.shape, n
    failures = {n: f"{e:.1e}" for n, e in errors.items() if not e <= TOL}
    assert not failures, failures


@pytest.mark.parametrize("pattern", RESET_PATTERNS)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_layer_resets_match_reference(path, pattern):
    """Both directions in one launch, h0 / c0 given, cell states differentiated too."""
    T, B = 5, 3
    problem = layer_problem(T, B, 4, 20)
    assert_layer_matches_reference(problem, path, resets=reset_pattern(pattern, T, B), return_cell_states=True)


COMBOS = {
    # lengths [5, 2, 4]: resets past a sequence's end (t ≥ length) must change nothing
    "lengths": dict(lengths=[5, 2, 4]),
    "lengths-dropout-mask": dict(lengths=[2, 5, 4], mask=True),
    "projection-lengths-dropout-mask": dict(proj=7, lengths=[4, 5, 1], mask=True),
    "no-bias-no-state": dict(bias=False, with_state=False, mask=True),
    "reverse-only": dict(D=1, reverse=(True,), lengths=[3, 5, 4]),
    "no-cell-states": dict(cells=False, lengths=[5, 3, 4], mask=True),
    "recompute": dict(recompute=True, lengths=[4, 5, 2], mask=True),
}


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_layer_resets_combined_with_other_options(path, combo):
    c = COMBOS[combo]
    if path == "cooperative" and c.get("proj"):
        pytest.skip("the cooperative path takes no projection (the dispatcher never sends one there)")
    T, B, D = 5, 3, c.get("D", 2)
    problem = layer_problem(T, B, 4, 20, D=D, proj=c.get("proj", 0), bias=c.get("bias", True),
                            with_state=c.get("with_state", True))
    resets = bools(T, B, [(1, 0), (3, 0), (4, 0), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2)])
    options = dict(resets=resets, return_cell_states=c.get("cells", True), recompute=c.get("recompute", False))
    if "lengths" in c:
        options["lengths"] = torch.tensor(c["lengths"], device=DEVICE)
    if c.get("mask"):
        g = torch.Generator().manual_seed(2)
        P = c.get("proj") or 20
        options["dropout_mask"] = (torch.bernoulli(torch.full((D, B, P), 0.6, dtype=F64), generator=g) / 0.6).to(DEVICE)
    if "reverse" in c:
        options["reverse"] = c["reverse"]
    assert_layer_matches_reference(problem, path, **options)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_layer_options_without_grad(path):
    """Inference (nothing saved for a backward) with resets, lengths and a mask."""
    T, B = 5, 3
    p = layer_problem(T, B, 4, 20)
    mask = (torch.bernoulli(torch.full((2, B, 20), 0.5, dtype=F64), generator=torch.Generator().manual_seed(4))
            * 2).to(DEVICE)
    options = dict(resets=reset_pattern("mixed", T, B), lengths=torch.tensor([4, 5, 3], device=DEVICE),
                   dropout_mask=mask)
    with torch.no_grad():
        for cells in (False, True):
            outs = lstm_layer_directions(p["x"], p["h0"], p["c0"], p["weights"], path=path,
                                         return_cell_states=cells, **options)
            ref = reference_layer(p["x"], p["h0"], p["c0"], p["weights"], return_cell_states=cells, **options)
            assert len(outs) == len(ref) == 3 + cells
            for a, b in zip(outs, ref):
                assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_layer_takes_strided_operands(path):
    """A transposed resets, an expanded and transposed dropout mask, a strided int32 lengths: views, not copies
    (the kernels read dense arrays; the op hands them over contiguous)."""
    T, B = 4, 3
    p = layer_problem(T, B, 3, 20)
    g = torch.Generator().manual_seed(6)
    resets = (torch.rand(B, T, generator=g) < 0.4).to(DEVICE).t()
    lengths = torch.tensor([[4, 9], [2, 9], [3, 9]], dtype=torch.int32, device=DEVICE)[:, 0]
    # [20, B, 1] expanded over the two directions and transposed to [2, B, 20]: both directions share a mask
    mask = (torch.bernoulli(torch.full((20, B, 1), 0.5, dtype=F64), generator=g) * 2).to(DEVICE)
    mask = mask.expand(20, B, 2).permute(2, 1, 0)
    assert not (resets.is_contiguous() or lengths.is_contiguous() or mask.is_contiguous())
    assert_layer_matches_reference(p, path, resets=resets, lengths=lengths, dropout_mask=mask, return_cell_states=True)


BAD_LAYER_OPERANDS = {
    "resets-broadcastable": (dict(resets=lambda T, B: torch.ones(T, 1, dtype=torch.bool)), r"resets .*\(4, 3\)"),
    "resets-int8": (dict(resets=lambda T, B: torch.ones(T, B, dtype=torch.int8)), r"resets must be a bool"),
    "mask-without-directions": (dict(dropout_mask=lambda T, B: torch.ones(B, 20, dtype=F64)),
                                r"dropout_mask .*\(2, 3, 20\)"),
    "lengths-column": (dict(lengths=lambda T, B: torch.full((B, 1), T)), r"lengths .*\(3,\)"),
}


@pytest.mark.parametrize("case", list(BAD_LAYER_OPERANDS))
def test_layer_refuses_misshapen_operands_before_any_kernel(case):
    options, match = BAD_LAYER_OPERANDS[case]
    p = layer_problem(4, 3, 3, 20)
    options = {k: f(4, 3).to(DEVICE) for k, f in options.items()}
    assert_raises_before_any_kernel(
        lambda: lstm_layer_directions(p["x"], p["h0"], p["c0"], p["weights"], **options), ValueError, match)


def test_layer_double_backward_with_options():
    """create_graph=True (double backward differentiates the reference): second derivatives with resets,
    lengths, a dropout mask and cell states, both directions, equal the reference's."""
    T, B = 4, 3
    p = layer_problem(T, B, 3, 5)
    options = dict(resets=reset_pattern("mixed", T, B), lengths=torch.tensor([4, 2, 3], device=DEVICE),
                   dropout_mask=(torch.bernoulli(torch.full((2, B, 5), 0.5, dtype=F64),
                                                 generator=torch.Generator().manual_seed(8)) * 2).to(DEVICE),
                   return_cell_states=True)

    def second_derivatives(fn):
        leaves = [p["x"], p["h0"], p["c0"], *p["weights"][0][:4], *p["weights"][1][:4]]
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        weights = [(*leaves[3:7], None), (*leaves[7:11], None)]
        outs = fn(leaves[0], leaves[1], leaves[2], weights, **options)
        g = torch.Generator().manual_seed(9)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(DEVICE)).sum() for o in outs)
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        total = sum((d * torch.randn(d.shape, generator=g, dtype=F64).to(DEVICE)).sum() for d in first)
        return torch.autograd.grad(total, leaves)

    ours = second_derivatives(lambda *a, **k: lstm_layer_directions(*a, path="stepwise", **k))
    ref = second_derivatives(reference_layer)
    errors = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert max(errors) <= 1e-10, errors


def test_module_create_graph_gives_the_same_first_derivatives():
    """A bidirectional module with resets and cell states: the gradients taken with create_graph=True (the double-
    backward path) are those without it, and of torch's segment by segment."""
    ours, ref = module_pair(3, 4, bidirectional=True)
    x, hx = random_inputs(5, 2, 3, 2, 4, 4)
    x.requires_grad_()
    resets = bools(5, 2, [(2, 0), (4, 1)])
    y_ref, _ = torch_by_segments(ref, x, hx, resets)
    (expected,) = torch.autograd.grad(y_ref.square().sum(), [x])
    for create_graph in (False, True):
        y, (h, c), cells = ours(x, hx, resets=resets, return_cell_states=True)
        (dx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=create_graph)
        assert rel_err(dx, expected) <= TOL, create_graph


def test_reference_resets_are_segments_run_separately():
    """The yardstick itself: the reference with resets equals the reference run on each segment from (h0, c0),
    forward and reverse, with h_n of the last segment forward and of the first one in reverse."""
    T, B = 6, 2
    p = layer_problem(T, B, 3, 5, D=1)
    w = p["weights"][0]
    resets = bools(T, B, [(2, 0), (3, 0), (5, 1)])
    for reverse in (False, True):
        y, h, c = lstm_triton.lstm_layer_reference(p["x"], p["h0"][0], p["c0"][0], *w, resets=resets,
                                                   reverse=reverse)
        for b, bounds in ((0, [(0, 2), (2, 3), (3, 6)]), (1, [(0, 5), (5, 6)])):
            pieces = [lstm_triton.lstm_layer_reference(p["x"][s:e, b:b + 1], p["h0"][0, b:b + 1],
                                                       p["c0"][0, b:b + 1], *w, reverse=reverse) for s, e in bounds]
            assert rel_err(y[:, b:b + 1], torch.cat([q[0] for q in pieces])) <= TOL
            final = pieces[0] if reverse else pieces[-1]
            assert rel_err(h[b:b + 1], final[1]) <= TOL and rel_err(c[b:b + 1], final[2]) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# The module in every layout. Tensors are built seq-first [T, B, ...] and handed to the module in its layout.

LAYOUTS = ["seq-first", "batch-first", "unbatched", "packed"]


def call_module(module, layout, x, hx, resets=None, lengths=None, **kwargs):
    """``module`` on x [T, B, I], hx (h0, c0) [L·D, B, ·] or None and resets [T, B] or None, presented in
    ``layout``; returns seq-first (y [T, B, D·P] zero past each length, (h_n, c_n), cell states or None)."""
    T = x.size(0)
    if resets is not None:
        kwargs["resets"] = resets
    cells = None
    if layout == "seq-first":
        out = module(x, hx, **kwargs)
        y, hidden = out[0], out[1]
        cells = out[2] if len(out) > 2 else None
    elif layout == "batch-first":
        assert module.batch_first
        if resets is not None:
            kwargs["resets"] = resets.t()
        out = module(x.transpose(0, 1), hx, **kwargs)
        y, hidden = out[0].transpose(0, 1), out[1]
        cells = out[2].transpose(0, 1) if len(out) > 2 else None
    elif layout == "unbatched":
        assert x.size(1) == 1
        if resets is not None:
            kwargs["resets"] = resets[:, 0]
        out = module(x[:, 0], None if hx is None else (hx[0][:, 0], hx[1][:, 0]), **kwargs)
        assert out[0].dim() == 2 and out[1][0].dim() == 2
        y, hidden = out[0].unsqueeze(1), (out[1][0].unsqueeze(1), out[1][1].unsqueeze(1))
        cells = out[2].unsqueeze(1) if len(out) > 2 else None
    elif layout == "packed":
        packed = pack_padded_sequence(x, torch.as_tensor(lengths), enforce_sorted=False)
        out = module(packed, hx, **kwargs)
        assert isinstance(out[0], PackedSequence)
        y = pad_packed_sequence(out[0], total_length=T)[0]
        hidden = out[1]
        if len(out) > 2:
            assert isinstance(out[2], PackedSequence)
            assert torch.equal(out[2].batch_sizes, out[0].batch_sizes)
            assert torch.equal(out[2].unsorted_indices, out[0].unsorted_indices)
            cells = pad_packed_sequence(out[2], total_length=T)[0]
    else:
        raise ValueError(layout)
    return y, hidden, cells


def run_torch(ref: nn.LSTM, x, hx):
    """torch.nn.LSTM on seq-first x, whatever its batch_first."""
    if not ref.batch_first:
        return ref(x, hx)
    y, hidden = ref(x.transpose(0, 1), hx)
    return y.transpose(0, 1), hidden


def torch_by_segments(ref: nn.LSTM, x, hx, resets, lengths=None):
    """torch.nn.LSTM (seq-first) run on every segment of every sequence as a sequence of its own, from hx:
    y [T, B, D·P] stitched back (zero past each length), h_n / c_n the forward direction's from the last
    segment, the reverse direction's from the first."""
    T, B, _ = x.shape
    D = 2 if ref.bidirectional else 1
    forward_rows = (torch.arange(ref.num_layers * D, device=x.device) % D == 0).view(-1, 1, 1)
    ys, hs, cs = [], [], []
    for b in range(B):
        n = T if lengths is None else int(lengths[b])
        starts = [0] + [t for t in range(1, n) if resets is not None and resets[t, b]]
        state = (hx[0][:, b:b + 1], hx[1][:, b:b + 1])
        pieces = [run_torch(ref, x[s:e, b:b + 1], state) for s, e in zip(starts, starts[1:] + [n])]
        y = torch.cat([q[0] for q in pieces])
        ys.append(torch.cat([y, y.new_zeros(T - n, 1, y.size(2))]))
        hs.append(torch.where(forward_rows, pieces[-1][1][0], pieces[0][1][0]))
        cs.append(torch.where(forward_rows, pieces[-1][1][1], pieces[0][1][1]))
    return torch.cat(ys, 1), (torch.cat(hs, 1), torch.cat(cs, 1))


def random_inputs(T, B, I, rows, H, P, with_state=True, seed=3, lengths=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=F64)
    if lengths is not None:  # padding: zeros past each length, as pad_packed_sequence gives back
        x = x * (torch.arange(T).view(T, 1, 1) < torch.as_tensor(lengths).view(1, B, 1))
    hx = (torch.randn(rows, B, P, generator=g, dtype=F64) * 0.5, torch.randn(rows, B, H, generator=g, dtype=F64) * 0.5)
    return x.to(DEVICE), tuple(h.to(DEVICE) for h in hx) if with_state else None


def forward_and_grads(fn, x, hx, params, cotangents=None):
    """fn(x, hx) -> (y, (h_n, c_n)[, cells]); gradients of a random projection of every output w.r.t. x, hx and
    ``params`` (a name -> tensor dict). Returns (outputs, {name: gradient}, cotangents)."""
    leaves = {"x": x.detach().clone().requires_grad_()}
    if hx is not None:
        leaves["h0"] = hx[0].detach().clone().requires_grad_()
        leaves["c0"] = hx[1].detach().clone().requires_grad_()
    out = fn(leaves["x"], (leaves["h0"], leaves["c0"]) if hx is not None else None)
    outs = [out[0], *out[1]] + ([out[2]] if len(out) > 2 and out[2] is not None else [])
    if cotangents is None:
        cotangents = random_cotangents(outs, seed=5, cast=False)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    wrt = {**leaves, **params}
    grads = torch.autograd.grad(loss, list(wrt.values()))
    return [o.detach() for o in outs], dict(zip(wrt, grads)), cotangents


def assert_all_close(outs, grads, ref_outs, ref_grads, names=("y", "h_n", "c_n", "cell_states"), tol=TOL):
    assert len(outs) == len(ref_outs) and set(grads) == set(ref_grads)
    errors = {n: rel_err(a, b) for n, a, b in zip(names, outs, ref_outs)}
    errors.update({f"d{k}": rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    for n, a, b in zip(names, outs, ref_outs):
        assert a.shape == b.shape, (n, a.shape, b.shape)
    failures = {n: f"{e:.1e}" for n, e in errors.items() if not e <= tol}
    assert not failures, failures


MODULE_CASES = {  # name: (layout, module kwargs, T, B, lengths, with_state)
    "seq-first": ("seq-first", dict(), 5, 3, None, True),
    "bidirectional-2-layers": ("seq-first", dict(num_layers=2, bidirectional=True), 5, 3, None, True),
    "batch-first-no-hx": ("batch-first", dict(batch_first=True, bidirectional=True), 5, 3, None, False),
    "unbatched-2-layers": ("unbatched", dict(num_layers=2, bidirectional=True), 6, 1, None, True),
    "packed-2-layers": ("packed", dict(num_layers=2, bidirectional=True), 5, 4, [3, 5, 2, 4], True),
    "proj-2-layers": ("seq-first", dict(num_layers=2, bidirectional=True, proj_size=3), 5, 3, None, True),
    "packed-proj": ("packed", dict(bidirectional=True, proj_size=3), 5, 4, [2, 5, 5, 3], True),
    "hidden-20-stepwise": ("seq-first", dict(bidirectional=True, hidden=20), 4, 3, None, True),
}


def segment_starts(T, B):
    """Segment starts [T, B], per sequence b (cyclically): at step 2 and at the last step; at steps 1 and 2
    (adjacent); at the last step only; none. With lengths, some fall on or past a sequence's last step."""
    patterns = [[2, T - 1], [1, 2], [T - 1], []]
    return bools(T, B, [(t, b) for b in range(B) for t in patterns[b % 4]])


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_resets_match_torch_run_segment_by_segment(case):
    layout, kwargs, T, B, lengths, with_state = MODULE_CASES[case]
    kwargs = dict(kwargs)
    H = kwargs.pop("hidden", 6)
    ours, ref = module_pair(3, H, **kwargs)
    D, L, P = 1 + ref.bidirectional, ref.num_layers, ref.proj_size or H
    x, hx = random_inputs(T, B, 3, L * D, H, P, with_state, lengths=lengths)
    resets = segment_starts(T, B)
    zeros = (x.new_zeros(L * D, B, P), x.new_zeros(L * D, B, H))

    def run_ours(x, hx):
        return call_module(ours, layout, x, hx, resets, lengths)

    def run_torch(x, hx):
        return torch_by_segments(ref, x, zeros if hx is None else hx, resets, lengths)

    outs, grads, cot = forward_and_grads(run_ours, x, hx, dict(ours.named_parameters()))
    ref_outs, ref_grads, _ = forward_and_grads(run_torch, x, hx, dict(ref.named_parameters()), cot)
    assert_all_close(outs, grads, ref_outs, ref_grads)


@pytest.mark.parametrize("pattern", ["first", "last", "adjacent", "all", "all-false"])
def test_module_reset_patterns_match_torch(pattern):
    """Two bidirectional layers; "first" and "all-false" must equal no resets at all."""
    ours, ref = module_pair(3, 6, num_layers=2, bidirectional=True)
    T, B = 5, 3
    x, hx = random_inputs(T, B, 3, 4, 6, 6)
    resets = reset_pattern(pattern, T, B)
    outs, grads, cot = forward_and_grads(lambda x, hx: ours(x, hx, resets=resets), x, hx, dict(ours.named_parameters()))
    ref_outs, ref_grads, _ = forward_and_grads(lambda x, hx: torch_by_segments(ref, x, hx, resets), x, hx,
                                               dict(ref.named_parameters()), cot)
    assert_all_close(outs, grads, ref_outs, ref_grads)
    if pattern in ("first", "all-false"):
        plain, plain_grads, _ = forward_and_grads(ours, x, hx, dict(ours.named_parameters()), cot)
        assert_all_close(outs, grads, plain, plain_grads)


def test_module_packed_resets_are_in_the_original_batch_order():
    """resets for a PackedSequence are (T_max, B) in the caller's batch order, whatever the packing order:
    permuting the batch permutes the results."""
    ours, _ = module_pair(3, 5, bidirectional=True)
    T, lengths = 5, [2, 5, 3]
    x, hx = random_inputs(T, 3, 3, 2, 5, 5, lengths=lengths)
    resets = bools(T, 3, [(1, 0), (2, 1), (3, 1), (1, 2)])
    y, (h, c) = ours(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False), hx, resets=resets)
    perm = [2, 0, 1]
    y_p, (h_p, c_p) = ours(pack_padded_sequence(x[:, perm], torch.tensor(lengths)[perm], enforce_sorted=False),
                           (hx[0][:, perm], hx[1][:, perm]), resets=resets[:, perm])
    y, y_p = pad_packed_sequence(y)[0], pad_packed_sequence(y_p)[0]
    assert rel_err(y_p, y[:, perm]) <= TOL and rel_err(h_p, h[:, perm]) <= TOL and rel_err(c_p, c[:, perm]) <= TOL


def test_module_resets_stop_the_gradient_at_segment_starts():
    """Nothing on one side of a segment start reaches the other, in either direction of a bidirectional layer;
    h0 / c0 receive the gradient of both segments, which both start from them."""
    ours, _ = module_pair(2, 4, num_layers=2, bidirectional=True)
    T = 6
    x, (h0, c0) = random_inputs(T, 1, 2, 4, 4, 4)
    x, h0, c0 = (t.requires_grad_() for t in (x, h0, c0))
    resets = bools(T, 1, [(3, 0)])
    y, _ = ours(x, (h0, c0), resets=resets)
    late = torch.autograd.grad(y[3:].sum(), [x, h0, c0], retain_graph=True)
    early = torch.autograd.grad(y[:3].sum(), [x, h0, c0])
    assert torch.count_nonzero(late[0][:3]) == 0 and torch.count_nonzero(late[0][3:]) > 0
    assert torch.count_nonzero(early[0][3:]) == 0 and torch.count_nonzero(early[0][:3]) > 0
    for g in (*late[1:], *early[1:]):
        assert torch.count_nonzero(g) == g.numel()


# ----------------------------------------------------------------------------------------------------------------
# Several layers, dropout between them, recurrent dropout and cell states against the reference, with the
# module's own masks captured.


class CapturedMasks:
    """Records the recurrent-dropout masks the module draws and the dropout masks between layers (drawn by
    this stand-in for F.dropout, so that the reference can apply the same ones)."""

    def __init__(self, monkeypatch):
        self.recurrent, self.between = [], []
        draw = lstm_triton.LSTM._recurrent_dropout_masks

        def recurrent(module, *args):
            masks = draw(module, *args)
            self.recurrent.append(masks)
            return masks

        def dropout(x, p, training):
            if not training or p == 0:
                return x
            mask = torch.bernoulli(torch.full_like(x, 1 - p)) / (1 - p)
            self.between.append(mask)
            return x * mask

        monkeypatch.setattr(lstm_triton.LSTM, "_recurrent_dropout_masks", recurrent)
        monkeypatch.setattr(modules, "F", types.SimpleNamespace(dropout=dropout))


def reference_module(module, layout, masks: CapturedMasks, x, hx, resets, lengths, sorted_indices=None):
    """lstm_reference with the module's weights and the masks it drew in its last call, as fn(x, hx) for
    forward_and_grads (seq-first; masks drawn in the packed order are taken back to the original order)."""
    D, L = 1 + module.bidirectional, module.num_layers
    H, P = module.hidden_size, module.proj_size or module.hidden_size
    recurrent = masks.recurrent[-1]
    between = masks.between[-(L - 1):] if L > 1 and module.dropout > 0 and module.training else None
    order = None
    if layout == "packed":  # the module draws per sequence in the packed (length-sorted) order
        order = pack_padded_sequence(x, torch.as_tensor(lengths), enforce_sorted=False).unsorted_indices
    if recurrent is not None:
        recurrent = [m[d] if order is None else m[d].index_select(0, order) for m in recurrent for d in range(D)]
    if between is not None and order is not None:
        between = [m.index_select(1, order) for m in between]

    def fn(x, hx):
        if hx is None:
            hx = (x.new_zeros(L * D, x.size(1), P), x.new_zeros(L * D, x.size(1), H))
        return lstm_reference(x, hx, module.all_weights, bias=module.bias, bidirectional=module.bidirectional,
                              proj_size=module.proj_size, dropout_masks=between, lengths=lengths, resets=resets,
                              recurrent_dropout_masks=recurrent, return_cell_states=True)

    return fn


OPTION_CASES = {  # name: (layout, module kwargs, T, B, lengths, with_state)
    "seq-first-2-layers-dropout": ("seq-first", dict(num_layers=2, bidirectional=True, dropout=0.5), 5, 3, None,
                                   True),
    "batch-first-proj-no-hx": ("batch-first", dict(batch_first=True, num_layers=2, proj_size=3, dropout=0.3), 5, 3,
                               None, False),
    "unbatched-bidirectional": ("unbatched", dict(bidirectional=True), 6, 1, None, True),
    "packed-2-layers-dropout": ("packed", dict(num_layers=2, bidirectional=True, dropout=0.5), 5, 4,
                                [3, 5, 2, 4], True),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_module_options_match_reference(monkeypatch, case, train):
    """resets + recurrent_dropout (p = 0.4) + return_cell_states in every layout; in train mode the reference
    gets the masks the module drew (one per layer, direction and sequence, applied at every step), in eval mode
    none. Cell states come back in the output's layout and are differentiable."""
    layout, kwargs, T, B, lengths, with_state = OPTION_CASES[case]
    masks = CapturedMasks(monkeypatch)
    torch.manual_seed(0)
    ours = lstm_triton.LSTM(3, 5, recurrent_dropout=0.4, **kwargs).to(device=DEVICE, dtype=F64).train(train)
    D, L, P = 1 + ours.bidirectional, ours.num_layers, ours.proj_size or 5
    x, hx = random_inputs(T, B, 3, L * D, 5, P, with_state, lengths=lengths)
    resets = segment_starts(T, B)
    params = dict(ours.named_parameters())

    outs, grads, cot = forward_and_grads(
        lambda x, hx: call_module(ours, layout, x, hx, resets, lengths, return_cell_states=True), x, hx, params)
    recurrent = masks.recurrent[-1]
    if train:
        assert len(recurrent) == L and all(m.shape == (D, B, P) for m in recurrent)
        assert all(set(m.unique().tolist()) <= {0.0, 1 / 0.6} for m in recurrent)
    else:
        assert recurrent is None and not masks.between
    ref_outs, ref_grads, _ = forward_and_grads(reference_module(ours, layout, masks, x, hx, resets, lengths), x, hx,
                                               params, cot)
    assert_all_close(outs, grads, ref_outs, ref_grads)
    assert outs[3].shape == (T, B, D * 5)


def test_cell_states_alone_and_their_gradient():
    """return_cell_states without any other option: the same y, h_n, c_n as without it; the cell states are the
    reference's and differentiable in everything (the last layer's, both directions)."""
    ours, ref = module_pair(3, 5, num_layers=2, bidirectional=True)
    x, hx = random_inputs(4, 3, 3, 4, 5, 5)
    y, (h, c), cells = ours(x, hx, return_cell_states=True)
    y0, (h0, c0) = ours(x, hx)
    assert rel_err(y, y0) <= TOL and rel_err(h, h0) <= TOL and rel_err(c, c0) <= TOL
    # the last layer's c_n sits in the cell states: forward direction at the last step, reverse at step 0
    assert rel_err(cells[-1, :, :5], c[2]) <= TOL and rel_err(cells[0, :, 5:], c[3]) <= TOL
    params = dict(ours.named_parameters())
    outs, grads, cot = forward_and_grads(lambda x, hx: ours(x, hx, return_cell_states=True), x, hx, params)
    ref_fn = lambda x, hx: lstm_reference(x, hx, ours.all_weights, bidirectional=True,  # noqa: E731
                                          return_cell_states=True)
    ref_outs, ref_grads, _ = forward_and_grads(ref_fn, x, hx, params, cot)
    assert_all_close(outs, grads, ref_outs, ref_grads)


# ----------------------------------------------------------------------------------------------------------------
# Recurrent dropout.


def seeded_masks(seed, L, D, B, P, p, device=DEVICE):
    """The module's draw, reproduced: one call of torch.bernoulli over (layers, directions, batch, P)."""
    torch.manual_seed(seed)
    keep = torch.full((L, D, B, P), 1 - p, dtype=F64, device=device)
    return torch.bernoulli(keep) / (1 - p)


def test_recurrent_dropout_reproducible_under_manual_seed_and_the_same_at_every_step():
    """Reseeding before the call reproduces the module's masks; the reference with that mask at every step
    gives the module's outputs and gradients; the same seed gives bitwise the same results."""
    torch.manual_seed(0)
    ours = lstm_triton.LSTM(3, 6, num_layers=2, bidirectional=True, recurrent_dropout=0.5).to(DEVICE, F64)
    T, B = 4, 3
    x, hx = random_inputs(T, B, 3, 4, 6, 6)
    params = dict(ours.named_parameters())

    def run(x, hx):
        torch.manual_seed(11)
        return ours(x, hx)

    outs, grads, cot = forward_and_grads(run, x, hx, params)
    masks = seeded_masks(11, 2, 2, B, 6, 0.5)
    recurrent = [masks[l, d] for l in range(2) for d in range(2)]
    ref_fn = lambda x, hx: lstm_reference(x, hx, ours.all_weights, bidirectional=True,  # noqa: E731
                                          recurrent_dropout_masks=recurrent)
    ref_outs, ref_grads, _ = forward_and_grads(ref_fn, x, hx, params, cot)
    assert_all_close(outs, grads, ref_outs, ref_grads)
    # the dropout actually does something here, and the same seed repeats it bit for bit
    plain_outs, _, _ = forward_and_grads(lambda x, hx: ours.eval()(x, hx), x, hx, params, cot)
    ours.train()
    assert rel_err(outs[0], plain_outs[0]) > 1e-3
    again, again_grads, _ = forward_and_grads(run, x, hx, params, cot)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    assert all(torch.equal(grads[k], again_grads[k]) for k in grads)


def test_recurrent_dropout_differs_between_sequences_and_calls_and_is_absent_in_eval(monkeypatch):
    masks = CapturedMasks(monkeypatch)
    torch.manual_seed(0)
    ours = lstm_triton.LSTM(3, 8, bidirectional=True, recurrent_dropout=0.5).to(DEVICE, F64)
    plain = lstm_triton.LSTM(3, 8, bidirectional=True).to(DEVICE, F64)
    plain.load_state_dict(ours.state_dict())
    T, B = 4, 4
    x = torch.randn(T, 1, 3, dtype=F64, device=DEVICE).expand(T, B, 3)  # the same sequence B times
    with torch.no_grad():
        y1, _ = ours(x)
        y2, _ = ours(x)
    m1, m2 = masks.recurrent[0][0], masks.recurrent[1][0]  # [D, B, P]
    for b in range(B):
        for b2 in range(b):
            assert not torch.equal(m1[:, b], m1[:, b2])  # per sequence
            assert rel_err(y1[:, b], y1[:, b2]) > 1e-3
    assert not torch.equal(m1, m2) and rel_err(y1, y2) > 1e-3  # per call
    assert not torch.equal(m1[0], m1[1])  # per direction
    ours.eval()
    with torch.no_grad():
        y_eval, (h_eval, c_eval) = ours(x)
        y_plain, (h_plain, c_plain) = plain.eval()(x)
    assert masks.recurrent[-1] is None
    assert torch.equal(y_eval, y_plain) and torch.equal(h_eval, h_plain) and torch.equal(c_eval, c_plain)
    assert all(torch.equal(y_eval[:, 0], y_eval[:, b]) for b in range(B))


def test_recurrent_dropout_per_layer(monkeypatch):
    masks = CapturedMasks(monkeypatch)
    ours = lstm_triton.LSTM(2, 8, num_layers=3, recurrent_dropout=0.5).to(DEVICE, F64)
    with torch.no_grad():
        ours(torch.randn(2, 3, 2, dtype=F64, device=DEVICE))
    (drawn,) = masks.recurrent
    assert len(drawn) == 3 and not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_recurrent_dropout_zero_is_the_plain_module_bit_for_bit(train):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.5).to(DEVICE, F64)
    plain = lstm_triton.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.5).to(DEVICE, F64)
    zero = lstm_triton.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.5,
                            recurrent_dropout=0.0).to(DEVICE, F64)
    some = lstm_triton.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.5,
                            recurrent_dropout=0.3).to(DEVICE, F64)
    for m in (plain, zero, some):
        m.load_state_dict(ref.state_dict())
        m.train(train)
    x, hx = random_inputs(4, 3, 3, 4, 5, 5)

    def run(module):
        def fn(x, hx):
            torch.manual_seed(7)  # dropout between layers draws the same masks
            return module(x, hx)
        return fn

    outs, grads, cot = forward_and_grads(run(plain), x, hx, dict(plain.named_parameters()))
    outs0, grads0, _ = forward_and_grads(run(zero), x, hx, dict(zero.named_parameters()), cot)
    assert all(torch.equal(a, b) for a, b in zip(outs, outs0))
    assert all(torch.equal(grads[k], grads0[k]) for k in grads)
    # state_dict unchanged: the same keys as torch's, loading strictly both ways
    for m in (zero, some):
        assert list(m.state_dict()) == list(ref.state_dict())
        nn.LSTM(3, 5, num_layers=2, bidirectional=True).load_state_dict(m.state_dict(), strict=True)
    assert "recurrent_dropout=0.3" in repr(some) and "recurrent_dropout" not in repr(zero)
    if not train:  # eval mode: the recurrent_dropout module is torch's module
        y_ref, _ = ref.eval()(x, hx)
        assert rel_err(some(x, hx)[0], y_ref) <= TOL


def test_recurrent_dropout_one_cuts_h_out_of_the_recurrence():
    """p = 1: h_{t-1} never reaches W_hh (the cell state still carries over): no gradient reaches W_hh or h0,
    and the result is the reference's with a zero mask."""
    torch.manual_seed(0)
    ours = lstm_triton.LSTM(3, 5, bidirectional=True, recurrent_dropout=1.0).to(DEVICE, F64)
    x, hx = random_inputs(4, 3, 3, 2, 5, 5)
    params = dict(ours.named_parameters())
    outs, grads, cot = forward_and_grads(lambda x, hx: ours(x, hx), x, hx, params)
    zeros = [x.new_zeros(3, 5)] * 2
    ref_fn = lambda x, hx: lstm_reference(x, hx, ours.all_weights, bidirectional=True,  # noqa: E731
                                          recurrent_dropout_masks=zeros)
    ref_outs, ref_grads, _ = forward_and_grads(ref_fn, x, hx, params, cot)
    assert_all_close(outs, grads, ref_outs, ref_grads)
    for k in ("h0", "weight_hh_l0", "weight_hh_l0_reverse"):
        assert torch.count_nonzero(grads[k]) == 0, k
    assert torch.count_nonzero(grads["c0"]) > 0


# ----------------------------------------------------------------------------------------------------------------
# init_forget_bias_


def test_init_forget_bias_on_every_lstm_kind():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "ours": lstm_triton.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
        "torch": nn.LSTM(3, 5),
        "cell": nn.LSTMCell(3, 6),
        "our_cell": lstm_triton.LSTMCell(3, 7),
        "no_bias": lstm_triton.LSTM(3, 4, bias=False),
        "linear": nn.Linear(3, 3),
    })
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert lstm_triton.init_forget_bias_(model, 2.5) is model
    changed = set()
    for name, value in model.state_dict().items():
        if "bias_ih" in name or "bias_hh" in name:
            H = value.numel() // 4
            expect = torch.full((H,), 2.5 if "bias_ih" in name else 0.0)
            assert torch.equal(value[H:2 * H], expect), name
            keep = torch.cat([value[:H], value[2 * H:]]), torch.cat([before[name][:H], before[name][2 * H:]])
            assert torch.equal(*keep), name  # the other gates are untouched
            changed.add(name.split(".")[0])
        else:
            assert torch.equal(value, before[name]), name
    assert changed == {"ours", "torch", "cell", "our_cell"}
    lstm = nn.LSTM(2, 3)
    assert lstm_triton.init_forget_bias_(lstm) is lstm
    assert torch.equal((lstm.bias_ih_l0 + lstm.bias_hh_l0)[3:6], torch.ones(3))
    with pytest.raises(ValueError, match="holds no LSTM"):
        lstm_triton.init_forget_bias_(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------------
# torch.compile and torch.export.


class ResetModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = lstm_triton.LSTM(3, 5, num_layers=2, bidirectional=True, recurrent_dropout=0.3)
        self.head = nn.Linear(10, 1)

    def forward(self, x, resets):
        y, (h, c), cells = self.lstm(x, resets=resets, return_cell_states=True)
        return self.head(y).sum() + h.square().sum() + c.sum() + cells.square().sum()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_with_resets_and_recurrent_dropout_matches_eager(train):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ResetModel().to(DEVICE, F64).train(train)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 2, 3, dtype=F64, device=DEVICE)
    resets = bools(4, 2, [(1, 0), (2, 1), (3, 1)])

    def loss_and_grads(fn):  # seed 3: the recurrent-dropout masks, the same draw in both
        return seeded_loss_and_grads(fn, (x, resets), model.parameters(), seed=3)

    eager, result = loss_and_grads(model), loss_and_grads(compiled)
    assert all(torch.equal(a, b) for a, b in zip(result, eager))
    torch._dynamo.reset()


def test_export_with_resets_is_one_op_per_layer():
    torch.manual_seed(0)
    lstm = lstm_triton.LSTM(3, 5, num_layers=2, bidirectional=True).to(DEVICE, F64).eval()
    x = torch.randn(4, 2, 3, dtype=F64, device=DEVICE)
    resets = bools(4, 2, [(1, 0), (3, 1)])
    with warnings.catch_warnings():  # torch notes that RNNBase's _flat_weights list is assigned in forward
        warnings.simplefilter("ignore", UserWarning)
        ep = torch.export.export(lstm, (x,), kwargs={"resets": resets})
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("lstm_triton.lstm_layer_fwd" in t for t in targets) == 2
    assert not any("lstm" in t and "lstm_triton" not in t for t in targets)
    # resets is an input of the program, not a constant: another pattern gives the eager result for it
    other = bools(4, 2, [(2, 0), (2, 1)])
    y, (h, c) = ep.module()(x, resets=other)
    y_ref, (h_ref, c_ref) = lstm(x, resets=other)
    assert rel_err(y, y_ref) <= TOL and rel_err(h, h_ref) <= TOL and rel_err(c, c_ref) <= TOL


def test_compile_on_the_cpu_path_with_options(monkeypatch):
    """Without the interpreter the module runs the options on the reference: that compiles too, bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ResetModel().to(dtype=F64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 2, 3, dtype=F64)
    resets = bools(4, 2, [(1, 0), (2, 1), (3, 1)]).cpu()

    def loss_and_grads(fn):
        return seeded_loss_and_grads(fn, (x, resets), model.parameters(), seed=3)

    with intercepted_launches(fail=True):
        eager, result = loss_and_grads(model), loss_and_grads(compiled)
    assert all(torch.equal(a, b) for a, b in zip(result, eager))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# The CPU path without the interpreter: the options run on the reference there, with the same results.


@pytest.mark.parametrize("layout", ["batch-first", "packed"])
def test_cpu_path_without_interpreter_agrees_with_the_kernels(monkeypatch, layout):
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=3, recurrent_dropout=0.4, dropout=0.5)
    cpu = lstm_triton.LSTM(3, 5, batch_first=layout == "batch-first", **kwargs).to(dtype=F64)
    kernels = lstm_triton.LSTM(3, 5, batch_first=layout == "batch-first", **kwargs).to(DEVICE, F64)
    kernels.load_state_dict(cpu.state_dict())
    T, B, lengths = 5, 4, [4, 5, 2, 5] if layout == "packed" else None
    x, hx = random_inputs(T, B, 3, 4, 5, 3, lengths=lengths)
    resets = segment_starts(T, B)
    # The same masks in both runs, whatever device draws them: recurrent dropout fixed, dropout between layers
    # drawn on the CPU generator.
    fixed = [seeded_masks(4, 1, 2, B, 3, 0.4, device="cpu")[0], seeded_masks(5, 1, 2, B, 3, 0.4, device="cpu")[0]]
    monkeypatch.setattr(lstm_triton.LSTM, "_recurrent_dropout_masks",
                        lambda self, batch, dtype, device: [m.to(device, dtype) for m in fixed])

    def dropout(x, p, training):
        assert training and p == 0.5
        return x * (torch.bernoulli(torch.full(x.shape, 1 - p, dtype=F64)) / (1 - p)).to(x.device)

    monkeypatch.setattr(modules, "F", types.SimpleNamespace(dropout=dropout))

    def run(module, device):
        def fn(x, hx):
            torch.manual_seed(9)
            r = resets.to(device)
            return call_module(module, layout, x.to(device), tuple(h.to(device) for h in hx), r, lengths,
                               return_cell_states=True)
        return fn

    outs, grads, cot = forward_and_grads(run(kernels, DEVICE), x, hx, dict(kernels.named_parameters()))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not lstm_triton.triton_enabled(torch.empty(0))
    x_cpu, hx_cpu = x.cpu(), tuple(h.cpu() for h in hx)
    with intercepted_launches(fail=True):  # the reference, not a kernel, answers here
        outs_cpu, grads_cpu, _ = forward_and_grads(run(cpu, "cpu"), x_cpu, hx_cpu, dict(cpu.named_parameters()),
                                                   [c.cpu() for c in cot])
    assert_all_close([o.cpu() for o in outs], {k: g.cpu() for k, g in grads.items()}, outs_cpu, grads_cpu)
