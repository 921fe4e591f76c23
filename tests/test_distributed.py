"""DistributedDataParallel: two CPU processes (gloo), each on half the batch, train like one process on the
whole batch.

Each step's gradients (averaged by DDP) and the final parameters equal the single-process run's, with the
Triton path (the interpreter) in the workers.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

import lstm_triton
from helpers import F64, REPO, rel_err


DDP_WORKER = textwrap.dedent(
    """
    import os, sys
    from datetime import timedelta

    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import lstm_triton

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    spec = torch.load(os.path.join(workdir, "spec.pt"), weights_only=True)
    model = lstm_triton.LSTM(**spec["kwargs"]).double()
    model.load_state_dict(spec["state"])
    assert lstm_triton.triton_enabled(spec["x"]), "the worker is not on the Triton path"
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    B = spec["x"].shape[1] // world
    rows = slice(rank * B, (rank + 1) * B)
    out = {"grads": [], "state": None}
    for step in range(spec["steps"]):
        opt.zero_grad()
        y, (h, c) = ddp(spec["x"][:, rows])
        cy, ch, cc = spec["cot"]
        loss = (y * cy[:, rows]).sum() + (h * ch[:, rows]).sum() + (c * cc[:, rows]).sum()
        loss.backward()
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    dist.barrier()
    # Leave without tearing gloo down: its threads can abort a normal exit ("terminate called without an
    # active exception") after all the work above is done and saved; the barrier says both ranks are done.
    sys.stdout.flush()
    os._exit(0)
    """
)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_matches_one_process(tmp_path):
    """Two gloo processes, each with half the batch, two SGD steps: each step's gradients (averaged by DDP) and
    the final parameters equal one process training on the whole batch with the loss halved."""
    world, steps = 2, 2
    kwargs = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    model = lstm_triton.LSTM(**kwargs).double()
    x = torch.randn(3, 4, 3, dtype=F64)
    cot = tuple(torch.randn(s, dtype=F64) for s in [(3, 4, 10), (4, 4, 5), (4, 4, 5)])
    torch.save({"kwargs": kwargs, "state": model.state_dict(), "x": x, "cot": cot, "steps": steps},
               tmp_path / "spec.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), TRITON_INTERPRET="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the loopback device, whatever the host name resolves to
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(world), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    # Meanwhile, the single-process run on the whole batch.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = []
    for _ in range(steps):
        opt.zero_grad()
        y, (h, c) = model(x)
        loss = ((y * cot[0]).sum() + (h * cot[1]).sum() + (c * cot[2]).sum()) / world
        loss.backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            logs.append(out.decode(errors="replace")[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r] if r < len(logs) else ''}"
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for step in range(steps):
            for name, g in expected[step].items():
                assert rel_err(got["grads"][step][name], g) <= 1e-12, (r, step, name)
        for name, v in model.state_dict().items():
            assert rel_err(got["state"][name], v) <= 1e-12, (r, name)
