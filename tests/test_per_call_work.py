"""Per-call host work, counted with torch.profiler (:func:`lstm_triton.profiling.call_work`): what a GPU would
pay for on every call besides the kernels themselves.

On every path: no weight-sized copy on a repeat call and no host sync, forward or backward. On the persistent
and cooperative paths nothing grows with the sequence length — the operators and the kernel launches of a
call are the same at T and 2T. Named exception: under the interpreter the cooperative kernel runs one launch
per step (its programs would otherwise wait on each other forever, see kernels/cooperative.py), so there its
launches are T (forward) and T + 1 (backward) instead of 1 and 1. The stepwise path launches once per step by
design.
"""
import pytest
import torch

from helpers import DEVICE, KERNEL_PATHS
from lstm_triton import lstm_layer_directions
from lstm_triton.kernels.dispatch import interpreter_active
from lstm_triton.profiling import call_work

T_SHORT, T_LONG = 3, 6


def _problem(T, D, H=12, I=5, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: (torch.randn(*s, generator=g) * H ** -0.5).to(DEVICE).requires_grad_()  # noqa: E731
    weights = [(w(4 * H, I), w(4 * H, H), w(4 * H), w(4 * H), None) for _ in range(D)]
    x = torch.randn(T, B, I, generator=g).to(DEVICE).requires_grad_()
    return x, weights


def _work(path, T, D):
    """(forward, backward) CallWork of a training call, each counted on a repeat call."""
    x, weights = _problem(T, D)
    matrices = [m for w in weights for m in w[:2]]

    def forward():
        return lstm_layer_directions(x, None, None, weights, path=path)

    def backward(outs):
        return lambda: sum(o.sum() for o in outs).backward()

    backward(forward())()  # first call: compiles, fills caches
    fwd = call_work(forward, matrices)
    bwd = call_work(backward(forward()), matrices)
    return fwd, bwd


@pytest.mark.parametrize("D", [1, 2], ids=["one-direction", "bidirectional"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_no_weight_copy_and_no_host_sync(path, D):
    for T in (T_SHORT, T_LONG):
        for which, work in zip(("forward", "backward"), _work(path, T, D)):
            assert work.weight_copies == 0, f"{which} T={T}: {work}"
            assert work.host_syncs == 0, f"{which} T={T}: {work}"


@pytest.mark.parametrize("path", ["persistent", "cooperative"])
def test_nothing_grows_with_the_sequence_length(path):
    short, long = _work(path, T_SHORT, 2), _work(path, T_LONG, 2)
    for which, a, b in zip(("forward", "backward"), short, long):
        assert a.aten_ops == b.aten_ops, f"{which}: {a.aten_ops} operators at T={T_SHORT}, {b.aten_ops} at T={T_LONG}"
        if path == "cooperative" and interpreter_active():
            per_step = {"forward": (T_SHORT, T_LONG), "backward": (T_SHORT + 1, T_LONG + 1)}[which]
            assert (a.kernel_launches, b.kernel_launches) == per_step, (which, a, b)
        else:
            assert a.kernel_launches == b.kernel_launches == 1, (which, a, b)
        if a.device_ops is not None:
            assert a.device_ops == b.device_ops, (which, a, b)


def test_stepwise_launches_once_per_step():
    fwd, bwd = _work("stepwise", T_SHORT, 1)
    assert fwd.kernel_launches == T_SHORT and bwd.kernel_launches == T_SHORT + 1  # + the dh0 launch
