"""Determinism: the same call twice gives bitwise the same outputs and gradients; dropout follows the seed.

Forward + backward twice on every kernel path (bidirectional, per-sequence lengths; on a GPU a problem spanning
many programs) and through the module (packed, bidirectional, with projection; with and without gradients):
bitwise equal. Dropout between layers is reproducible under ``torch.manual_seed``, differs for another seed,
plays no part in eval mode, and is inverted dropout on every layer's output but the last.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (CUDA, DEVICE, F32, F64, KERNEL_PATHS, bitwise_equal, forward_backward, module_pair,
                     projection_loss, rel_err)
from lstm_triton import lstm_layer_directions, lstm_reference
from lstm_triton.kernels import plan_lstm


def _determinism_problem(device, big, path):
    # On a GPU: several batch tiles, and H per path within what the path takes (the persistent tile fits
    # on chip; the cooperative grid spans 16 programs per batch tile).
    T, B, I = (20, 40, 16) if big else (3, 3, 2)
    H = {"persistent": 64, "stepwise": 80, "cooperative": 256}[path] if big else 6
    g = torch.Generator().manual_seed(0)
    k = H ** -0.5
    u = lambda *s: ((torch.rand(*s, generator=g) * 2 - 1) * k).to(device)  # noqa: E731
    weights = [(u(4 * H, I), u(4 * H, H), u(4 * H), u(4 * H), None) for _ in range(2)]
    x = torch.randn(T, B, I, generator=g).to(device)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return x, weights, lengths.to(device)


def _run_directions(x, weights, lengths, path):
    leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for ws in weights for w in ws if w is not None]
    it = iter(leaves[1:])
    ws = [tuple(next(it) if w is not None else None for w in wd) for wd in weights]
    y, h, c = lstm_layer_directions(leaves[0], None, None, ws, lengths=lengths, path=path)
    outs = [y, h, c]
    loss = projection_loss(outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_two_forward_backward_runs_are_bitwise_identical(path):
    """Same inputs, twice: outputs and every gradient bitwise equal (weight gradients from GEMMs after the
    loop, no atomics). Bidirectional, per-sequence lengths. On a GPU with a problem that spans many programs."""
    x, weights, lengths = _determinism_problem(DEVICE, big=CUDA, path=path)
    B, H = x.shape[1], weights[0][1].shape[1]
    try:
        plan_lstm(B, H, x.dtype, path=path, directions=2, device=x.device)
    except ValueError as e:
        pytest.skip(str(e))
    first = _run_directions(x, weights, lengths, path)
    second = _run_directions(x, weights, lengths, path)
    for i, (a, b) in enumerate(zip(first, second)):
        assert bitwise_equal(a, b), f"result {i} differs between two identical runs"


def test_module_runs_are_bitwise_identical():
    """The module (packed bidirectional input with projection) twice, with gradients, then twice under no_grad."""
    ours, _ = module_pair(3, 6, num_layers=2, bidirectional=True, proj_size=4, dtype=F32)
    seqs = [torch.randn(n, 3, device=DEVICE) for n in (4, 2, 5, 1)]
    packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)

    def run():
        leaves = [packed.data.clone().requires_grad_()]
        build = lambda ls: (nn.utils.rnn.PackedSequence(ls[0], *packed[1:]), None)  # noqa: E731
        outs, grads = forward_backward(ours, leaves, build)
        return outs + grads

    for a, b in zip(run(), run()):
        assert bitwise_equal(a, b)
    with torch.no_grad():
        first, second = ours(packed), ours(packed)
    assert bitwise_equal(first[0].data, second[0].data)
    assert all(bitwise_equal(a, b) for a, b in zip(first[1], second[1]))


def test_dropout_between_layers_is_reproducible_under_manual_seed():
    """torch.manual_seed(s) fixes the dropout masks: outputs and gradients bitwise equal for the same seed,
    different for another seed; in eval mode the seed no longer matters."""
    ours, _ = module_pair(3, 5, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64, device=DEVICE)
    build = lambda ls: (ls[0], None)  # noqa: E731

    def run(seed):
        torch.manual_seed(seed)
        outs, grads = forward_backward(ours, [x.clone().requires_grad_()], build)
        return outs + grads

    a, b, other = run(11), run(11), run(12)
    for i, (u, v) in enumerate(zip(a, b)):
        assert bitwise_equal(u, v), f"result {i} differs under the same seed"
    assert not bitwise_equal(a[0], other[0])
    ours.eval()
    e1, e2 = run(1), run(2)
    assert all(bitwise_equal(u, v) for u, v in zip(e1, e2))


def test_dropout_is_inverted_dropout_between_layers_only():
    """The masks drawn under a seed are those of F.dropout on each layer's output but the last (replayed from
    the same seed on the reference): dropout sits between layers, scaled by 1/(1-p), never after the last."""
    p = 0.4
    ours, _ = module_pair(3, 5, num_layers=3, dropout=p, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64, device=DEVICE)
    torch.manual_seed(5)
    y, (h, c) = ours(x)
    torch.manual_seed(5)
    masks = [F.dropout(torch.ones(4, 2, 10, dtype=F64, device=DEVICE), p) for _ in range(2)]
    weights = [[w.detach() for w in ws] for ws in ours.all_weights]
    y_r, (h_r, c_r) = lstm_reference(x, None, weights, bidirectional=True, dropout_masks=masks)
    assert rel_err(y, y_r) <= 1e-12 and rel_err(h, h_r) <= 1e-12 and rel_err(c, c_r) <= 1e-12
