"""Memory: a long training run leaves nothing behind.

1,000 optimizer steps of a tiny model: after warm-up no more live Python objects or tensors, no growth of the
resident set (CPU) or of allocated CUDA memory (GPU).
"""
from __future__ import annotations

import gc
import os

import torch
from torch import nn

import lstm_triton
from helpers import CUDA, DEVICE


def _rss_bytes():
    """Resident set size (Linux); 0 where /proc is not available (the RSS check then compares zeros)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _live_tensors():
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_memory_growth_over_1000_training_iterations():
    """1,000 optimizer steps of a tiny model (under the interpreter a step costs its kernels' interpretation,
    whatever the sizes). A wide input (2048 features) amplifies any leak: whatever a step left behind — its
    input (16 KiB), saved tensors, a weight gradient (128 KiB) — adds up to megabytes over the run. After
    warm-up: no more live Python objects or tensors, no RSS growth (CPU), no growth of allocated CUDA memory
    (GPU)."""
    iterations, warmup, features = 1000, 100, 2048
    torch.manual_seed(0)
    model = lstm_triton.LSTM(features, 4).to(DEVICE)
    head = nn.Linear(4, 1).to(DEVICE)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=1e-3, momentum=0.9)

    def step():
        x = torch.randn(2, 1, features, device=DEVICE)
        opt.zero_grad(set_to_none=True)
        y, (h, c) = model(x)
        loss = head(y).square().mean() + c.square().mean()
        loss.backward()
        opt.step()

    def snapshot():
        gc.collect()
        if CUDA:
            torch.cuda.synchronize()
        return len(gc.get_objects()), _live_tensors(), _rss_bytes(), torch.cuda.memory_allocated() if CUDA else 0

    for _ in range(warmup):
        step()
    objects0, tensors0, rss0, cuda0 = snapshot()
    peak_rss = rss0
    for i in range(iterations - warmup):
        step()
        if i % 100 == 99:
            peak_rss = max(peak_rss, _rss_bytes())
    objects1, tensors1, rss1, cuda1 = snapshot()
    assert tensors1 == tensors0, f"live tensors {tensors0} -> {tensors1}"
    assert objects1 - objects0 <= 100, f"live Python objects {objects0} -> {objects1}"
    if CUDA:
        assert cuda1 - cuda0 <= 2**20, f"CUDA memory allocated {cuda0} -> {cuda1}"
    else:
        growth = max(peak_rss, rss1) - rss0
        assert growth <= 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
