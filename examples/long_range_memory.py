"""Long-range memory: an LSTM solves the adding problem, a plain RNN of the same size does not.

What this demonstrates
----------------------
The *adding problem* (Hochreiter & Schmidhuber, 1997; here in its common variant with values in
[0, 1] and one marker in each half) is a synthetic task whose answer depends on information far back
in the sequence. Each input is a sequence of T steps with two channels:

    channel 0: a random value drawn uniformly from [0, 1] at every step
    channel 1: a marker, 1 at exactly two steps (one in the first half, one in the second half), else 0

The target, read out after the last step, is the sum of the two marked values. Everything between
the markers is noise that the network must ignore while it holds the first value in memory for up to
T steps. A model that remembers nothing can do no better than always answering 1.0 (the mean of the
sum), which gives the *chance* baseline: MSE = 1/6 ~ 0.167, and 7.8 % of answers within 0.04 of the
target (what counts as a correct answer for the accuracy reported here).

Why an LSTM and not a plain RNN
-------------------------------
Training signal has to flow backwards from the loss at step T to the input at the first marker. In a
plain RNN it passes through T multiplications by the recurrent Jacobian (W_hh times the tanh slope),
so it shrinks geometrically with distance: the *vanishing gradient*. After a few dozen steps nothing
is left, the network never learns that the first marker matters, and its loss stays at chance. An
LSTM's cell state is updated additively, c_t = f_t * c_{t-1} + i_t * g_t, so when the forget gate
learns to stay near 1 the gradient reaches back hundreds of steps nearly intact.

The script trains ``lstm_triton.LSTM`` and a ``torch.nn.RNN`` (tanh) with about the same number of
parameters (the RNN gets twice the hidden units), on the same batches, for the same number of steps,
then prints and plots both learning curves and the norm of the gradient of the loss with respect to
the input at every time step, ||dL/dx_t||, before and after training: for the RNN it collapses by
dozens of orders of magnitude towards the start of the sequence; for the trained LSTM it is as large at
step 0 as at the last step.

Usage
-----
    python examples/long_range_memory.py --quick                # CPU, a couple of minutes (T = 200)
    python examples/long_range_memory.py --device cuda          # full size (T = 300) on a GPU
    python examples/long_range_memory.py --quick --seed 3 --threads 1

``--compare`` additionally trains ``torch.nn.LSTM`` from the same seed and reports the time per epoch
of both implementations. It is on by default on CUDA and off on CPU, where both run PyTorch's kernel.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import lstm_triton
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lstm_triton

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: fall back to a line of text every few percent
    tqdm = None

HERE = Path(__file__).resolve().parent
CHANCE_MSE = 1.0 / 6.0  # Var(U1 + U2) for U1, U2 ~ U[0, 1]: the MSE of always answering 1.0
TOLERANCE = 0.04  # an answer counts as correct when |prediction - target| < 0.04
CHANCE_ACC = 1.0 - (1.0 - TOLERANCE) ** 2  # P(|U1 + U2 - 1| < 0.04) = 0.0784

QUICK = dict(seq_len=200, hidden=64, batch=64, steps=1000, eval_every=50)
FULL = dict(seq_len=300, hidden=128, batch=128, steps=3000, eval_every=100)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def adding_batch(batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the adding problem: x [T, B, 2] (value, marker) and the target y [B]."""
    values = torch.rand(seq_len, batch, generator=generator)
    first = torch.randint(0, seq_len // 2, (batch,), generator=generator)
    second = torch.randint(seq_len // 2, seq_len, (batch,), generator=generator)
    markers = torch.zeros(seq_len, batch)
    cols = torch.arange(batch)
    markers[first, cols] = 1.0
    markers[second, cols] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values * markers).sum(0)
    return x, y


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class SequenceRegressor(nn.Module):
    """A recurrent layer read out by a linear layer at the last step.

    The inputs are multiplied by a fixed ``input_scale`` first. PyTorch initialises the input weights of
    every recurrent layer from U(-1/sqrt(hidden), 1/sqrt(hidden)) whatever the number of inputs, so with
    only two input channels a marker barely moves the gates at the start, and the LSTM sits on a long
    plateau before it discovers that it should open its input gate on a marker. Scaling the inputs by 10
    (about what a fan-in initialisation of the input weights would give) shortens that plateau from
    ~1000 to a few hundred steps. It is applied to every model alike, and it does not rescue the plain
    RNN, whose obstacle is the vanishing gradient, not the size of its inputs.
    """

    def __init__(self, rnn: nn.Module, hidden: int, input_scale: float):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x * self.input_scale)  # out: [T, B, H]
        return self.head(out[-1]).squeeze(-1)


def build(kind: str, args, device: torch.device) -> SequenceRegressor:
    torch.manual_seed(args.seed)  # same seed for every model: same init where the shapes agree
    if kind == "lstm_triton":
        rnn, hidden = lstm_triton.LSTM(2, args.hidden), args.hidden
    elif kind == "torch_lstm":
        rnn, hidden = nn.LSTM(2, args.hidden), args.hidden
    elif kind == "rnn":
        rnn, hidden = nn.RNN(2, args.rnn_hidden, nonlinearity="tanh"), args.rnn_hidden
    else:
        raise ValueError(kind)
    return SequenceRegressor(rnn, hidden, args.input_scale).to(device)


LABELS = {"lstm_triton": "LSTM (lstm_triton)", "torch_lstm": "LSTM (torch.nn)", "rnn": "plain RNN (torch.nn)"}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(MSE, accuracy) on a fixed held-out batch."""
    model.eval()
    pred = model(x)
    model.train()
    return ((pred - y) ** 2).mean().item(), ((pred - y).abs() < TOLERANCE).float().mean().item()


def input_gradient_profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||dL/dx_t|| for every step t: how much training signal reaches the input at step t.

    The norm is taken over the batch and both channels; L is the mean squared error at the end. It is
    computed on a float64 copy of the model, so that gradients that have shrunk by 40 orders of
    magnitude still show up on the plot instead of underflowing to zero.
    """
    model = copy.deepcopy(model).double()
    x = x.detach().double().requires_grad_(True)
    loss = ((model(x) - y.double()) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, x)
    return grad.norm(dim=(1, 2)).cpu().tolist()


def use_bar() -> bool:
    """A tqdm progress bar on a terminal; plain progress lines when tqdm is missing or output is redirected."""
    return tqdm is not None and sys.stderr.isatty()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(kind: str, args, device: torch.device, eval_x, eval_y, grad_x, grad_y) -> dict:
    model = build(kind, args, device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Constant learning rate, then a linear decay to a tenth over the last 30% of the steps (steadier final numbers).
    decay_from = int(0.7 * args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else 1.0 - 0.9 * (s - decay_from) / max(args.steps - decay_from, 1))
    data = torch.Generator().manual_seed(args.seed + 1)  # the same batches, in the same order, for every model

    grad_before = input_gradient_profile(model, grad_x, grad_y)
    mse, acc = evaluate(model, eval_x, eval_y)
    curve = {"step": [0], "mse": [mse], "acc": [acc]}
    epoch_times = []

    bar = tqdm(range(1, args.steps + 1), desc=f"{LABELS[kind]:<22}", dynamic_ncols=True) if use_bar() else None
    steps = bar if bar is not None else range(1, args.steps + 1)
    sync(device)
    t_start = t_epoch = time.perf_counter()
    for step in steps:
        x, y = adding_batch(args.batch, args.seq_len, data)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()

        if step % args.epoch_steps == 0:
            sync(device)
            now = time.perf_counter()
            epoch_times.append(now - t_epoch)
            t_epoch = now
        if step % args.eval_every == 0 or step == args.steps:
            sync(device)
            t_eval = time.perf_counter()
            mse, acc = evaluate(model, eval_x, eval_y)
            curve["step"].append(step)
            curve["mse"].append(mse)
            curve["acc"].append(acc)
            if bar is not None:
                bar.set_postfix(mse=f"{mse:.4f}", acc=f"{acc:.1%}")
            elif step % max(args.steps // 10, 1) < args.eval_every:
                print(f"  {LABELS[kind]:<22} step {step:>5}/{args.steps}  eval MSE {mse:.4f}  acc {acc:6.1%}",
                      flush=True)
            t_epoch += time.perf_counter() - t_eval  # evaluation is not training time
    sync(device)
    total = time.perf_counter() - t_start  # wall time of the whole loop, evaluations included
    if bar is not None:
        bar.close()

    return dict(
        kind=kind, params=n_params, curve=curve, final_mse=curve["mse"][-1], final_acc=curve["acc"][-1],
        grad_before=grad_before, grad_after=input_gradient_profile(model, grad_x, grad_y),
        # The median skips the first epoch's one-off costs (CUDA context, Triton compilation and autotuning).
        epoch_time=statistics.median(epoch_times) if epoch_times else total, total_time=total,
    )


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def print_curves(results: list[dict], every: int) -> None:
    steps = results[0]["curve"]["step"]
    head = "  step " + "".join(f"| {LABELS[r['kind']]:^24} " for r in results)
    print("\nLearning curves on a held-out batch (MSE / accuracy; chance = "
          f"{CHANCE_MSE:.3f} / {CHANCE_ACC:.1%}):")
    print(head)
    for i, step in enumerate(steps):
        if i % every and i != len(steps) - 1:
            continue
        cells = "".join(f"| {r['curve']['mse'][i]:>9.4f}  {r['curve']['acc'][i]:>9.1%}     " for r in results)
        print(f"{step:>6} {cells}")


def print_gradients(results: list[dict], seq_len: int) -> None:
    print("\nGradient reaching early steps, ||dL/dx_t|| (mean over the first / last 10% of steps):")
    k = max(seq_len // 10, 1)
    for r in results:
        for when in ("before", "after"):
            g = r[f"grad_{when}"]
            early, late = sum(g[:k]) / k, sum(g[-k:]) / k
            ratio = early / late if late > 0 else float("nan")
            print(f"  {LABELS[r['kind']]:<22} {when:>6} training: early {early:9.2e}  late {late:9.2e}"
                  f"  early/late {ratio:9.2e}")


def plot(results: list[dict], args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    colors = {"lstm_triton": "tab:blue", "torch_lstm": "tab:cyan", "rnn": "tab:red"}
    styles = {"lstm_triton": "-", "torch_lstm": "--", "rnn": "-"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        c, ls, lab = colors[r["kind"]], styles[r["kind"]], LABELS[r["kind"]]
        axes[0].plot(r["curve"]["step"], r["curve"]["mse"], ls, color=c, label=lab)
        axes[1].plot(r["curve"]["step"], [100 * a for a in r["curve"]["acc"]], ls, color=c, label=lab)
        t = range(len(r["grad_after"]))
        axes[2].semilogy(t, r["grad_before"], ls, color=c, alpha=0.35, lw=1, label=f"{lab}, at init")
        axes[2].semilogy(t, r["grad_after"], ls, color=c, lw=1.5, label=f"{lab}, trained")
    axes[0].axhline(CHANCE_MSE, color="gray", ls=":", label="chance (always 1.0)")
    axes[0].set(yscale="log", xlabel="training step", ylabel="held-out MSE", title="Loss")
    axes[1].axhline(100 * CHANCE_ACC, color="gray", ls=":", label="chance")
    axes[1].set(xlabel="training step", ylabel="% within 0.04 of target", title="Accuracy", ylim=(0, 100))
    axes[2].set(xlabel="time step t of the input", ylabel=r"$\|\partial L / \partial x_t\|$",
                title="Gradient reaching each input step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Adding problem, T = {args.seq_len}: LSTM vs plain RNN with the same budget "
                 f"({args.steps} steps of {args.batch})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"Plot saved to {path}")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Adding problem: lstm_triton.LSTM remembers across hundreds of steps, a plain RNN does not. "
                    "Sizes default to the full run (a GPU) or, with --quick, to a small run for a CPU.")

    def size(name, kind, what):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind,
                       help=f"{what} (quick: {QUICK[name]}, full: {FULL[name]})")

    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes that train on a CPU in a couple of minutes")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the data (default: 0)")
    size("seq_len", int, "sequence length T: the first marked value must be remembered for up to T steps")
    size("hidden", int, "LSTM hidden size")
    p.add_argument("--rnn-hidden", type=int, help="plain RNN hidden size (default: 2 x hidden, ~the same parameters)")
    size("batch", int, "sequences per training step")
    size("steps", int, "training steps per model")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="Adam learning rate, decayed linearly to a tenth over the last 30%% of the steps "
                        "(default: 3e-3)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default: 1.0)")
    p.add_argument("--input-scale", type=float, default=10.0,
                   help="fixed factor applied to the inputs of every model; see SequenceRegressor (default: 10)")
    size("eval_every", int, "steps between evaluations on the held-out batch")
    p.add_argument("--eval-size", type=int, default=1000, help="sequences in the held-out batch (default: 1000)")
    p.add_argument("--epoch-steps", type=int, default=100, help="steps per 'epoch' in the timing report (default: 100)")
    p.add_argument("--models", default="lstm_triton,rnn",
                   help="comma-separated models to train, from lstm_triton, rnn, torch_lstm (default: lstm_triton,rnn)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also train torch.nn.LSTM from the same seed, to compare curves and time per epoch "
                        "(default: on for CUDA, off on CPU where both LSTMs run the same PyTorch kernel)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often fastest for these small "
                        "models on a busy machine)")
    p.add_argument("--plot", type=Path, default=HERE / "figures" / "long_range_memory.png",
                   help="where to save the PNG (default: examples/figures/long_range_memory.png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rnn_hidden is None:
        args.rnn_hidden = 2 * args.hidden
    if args.seq_len < 2:
        p.error("--seq-len must be at least 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    compare = args.compare if args.compare is not None else device.type == "cuda"
    if compare and "torch_lstm" not in models:
        models.insert(1 if models[:1] == ["lstm_triton"] else len(models), "torch_lstm")
    for m in models:
        if m not in LABELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(LABELS)}")

    triton = lstm_triton.triton_enabled(torch.empty(0, device=device))
    print(f"Adding problem: T = {args.seq_len}, batch {args.batch}, {args.steps} steps, Adam lr {args.lr}, "
          f"device {device} ({'Triton kernels' if triton else 'PyTorch CPU LSTM: no Triton on this device'})")
    print(f"Chance (always answer 1.0): MSE {CHANCE_MSE:.3f}, accuracy {CHANCE_ACC:.1%}")

    held_out = torch.Generator().manual_seed(10_000 + args.seed)  # disjoint from the training stream
    eval_x, eval_y = (t.to(device) for t in adding_batch(args.eval_size, args.seq_len, held_out))
    grad_x, grad_y = eval_x[:, :256], eval_y[:256]

    results = []
    for kind in models:
        r = train(kind, args, device, eval_x, eval_y, grad_x, grad_y)
        print(f"  {LABELS[kind]:<22} {r['params']:>6} parameters  final MSE {r['final_mse']:.4f}  "
              f"accuracy {r['final_acc']:.1%}  ({r['total_time']:.1f} s)", flush=True)
        results.append(r)

    print_curves(results, every=max(len(results[0]["curve"]["step"]) // 12, 1))
    print_gradients(results, args.seq_len)
    print(f"\nTime per epoch ({args.epoch_steps} steps of batch {args.batch}, T = {args.seq_len}, device {device}):")
    for r in results:
        print(f"  {LABELS[r['kind']]:<22} {r['epoch_time'] * 1000:9.1f} ms")
    times = {r["kind"]: r["epoch_time"] for r in results}
    if "lstm_triton" in times and "torch_lstm" in times:
        if triton:
            ratio = times["torch_lstm"] / times["lstm_triton"]
            print(f"  torch.nn.LSTM / lstm_triton.LSTM time per epoch: {ratio:.2f}x")
        else:
            print("  (both LSTMs ran PyTorch's CPU kernel here: any difference between them is noise)")

    if not args.no_plot:
        plot(results, args, args.plot)

    summary = "  ".join(f"{LABELS[r['kind']]}: MSE {r['final_mse']:.4f}, acc {r['final_acc']:.1%}" for r in results)
    print(f"\nRESULT adding problem T={args.seq_len}: {summary}  (chance: MSE {CHANCE_MSE:.3f}, acc {CHANCE_ACC:.1%})")
    return {r["kind"]: r for r in results} | {"args": vars(args)}


if __name__ == "__main__":
    main()
