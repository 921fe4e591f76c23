"""Episodic memory: segment resets let one LSTM call run many episodes back to back.

What this demonstrates
----------------------
Reinforcement-learning rollouts, dialogue turns and documents packed into one training window all have
the same shape: a long stream made of *episodes* laid end to end, where nothing should carry over from
one episode to the next. ``lstm_triton.LSTM`` takes the episode starts as ``resets`` (a bool [T, B]
tensor beside the input): at every flagged step the recurrence starts again from the initial state, in
every layer, inside the fused kernel, and no gradient flows back across the boundary. Without it the
stream has to be cut into padded per-episode sequences, or the state leaks from one episode into the next.

The task: every step shows one of K symbols, uniformly at random. Episodes last between ``min_len`` and
``max_len`` steps; the symbol at an episode's *first* step is its cue, and at its *last* step the model
must name that cue (cross-entropy on those steps only; the steps between are distractors drawn from the
same K symbols). Nothing in the input marks where an episode starts — as in a rollout, where the "done"
flags travel beside the observations, not in them — so the boundaries are known only through ``resets``.

Two models with the same initial weights train on the same batches:

- **with resets**: ``lstm(x, resets=episode_starts)``. Every episode starts from (h0, c0) = 0, so the
  model can tell its first step (the state is empty) and learns to store that symbol and hold it: the
  recall accuracy goes to ~100%.
- **without resets**: ``lstm(x)``. The state leaks across episodes and the model cannot tell which past
  symbol was a cue. It does best on the first episode of each stream (which does start from the initial
  state); on the later ones it can only bet on the symbols shown a plausible number of steps back, and
  stays far below: about 30% overall in quick mode (chance 1/K = 12.5%), against 100% with resets.

Both use ``lstm_triton.init_forget_bias_`` (forget-gate bias 1, a common start for memory tasks). The
plot shows both learning curves and the final accuracy by the episode's position in its stream.

Usage
-----
    python examples/episodic_memory.py --quick                # CPU, well under a minute
    python examples/episodic_memory.py --device cuda          # full size on a GPU (resets in the kernels)
    python examples/episodic_memory.py --quick --seed 3 --threads 1

On a CPU without ``TRITON_INTERPRET=1`` the model with resets runs on lstm_triton's plain-PyTorch
reference (PyTorch's own CPU LSTM has no resets) and the one without on PyTorch's CPU LSTM.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
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
IGNORE = -100  # cross-entropy's ignore_index: no target at this step

QUICK = dict(seq_len=48, symbols=8, min_len=3, max_len=12, hidden=32, batch=32, steps=300, lr=1e-2, eval_every=25)
FULL = dict(seq_len=256, symbols=16, min_len=4, max_len=24, hidden=128, batch=128, steps=1000, lr=3e-3,
            eval_every=100)
VARIANTS = ("resets", "no_resets")
LABELS = {"resets": "with resets", "no_resets": "without resets"}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def episode_streams(batch: int, seq_len: int, symbols: int, min_len: int, max_len: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` streams of ``seq_len`` steps, each a run of episodes of ``min_len``..``max_len`` steps.

    Returns x [T, B] symbol ids (uniform), resets [T, B] bool (True at each episode's first step), targets
    [T, B] (at each complete episode's last step the symbol of its first step, IGNORE elsewhere; an episode
    cut off by the end of the stream has no target) and episode [T, B] (the episode's index in its stream).
    """
    x = torch.randint(0, symbols, (seq_len, batch), generator=generator)
    resets = torch.zeros(seq_len, batch, dtype=torch.bool)
    targets = torch.full((seq_len, batch), IGNORE, dtype=torch.long)
    episode = torch.zeros(seq_len, batch, dtype=torch.long)
    lengths = torch.randint(min_len, max_len + 1, (batch, seq_len // min_len + 1), generator=generator)
    for b in range(batch):
        start = 0
        for k, length in enumerate(lengths[b].tolist()):
            if start >= seq_len:
                break
            end = start + length
            resets[start, b] = True
            episode[start:end, b] = k
            if end <= seq_len:
                targets[end - 1, b] = x[start, b]
            start = end
    return x, resets, targets, episode


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class Recaller(nn.Module):
    """One-hot symbols -> lstm_triton.LSTM -> linear: a guess of the cue at every step."""

    def __init__(self, symbols: int, hidden: int):
        super().__init__()
        self.symbols = symbols
        self.lstm = lstm_triton.init_forget_bias_(lstm_triton.LSTM(symbols, hidden), 1.0)
        self.head = nn.Linear(hidden, symbols)

    def forward(self, x: torch.Tensor, resets: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.lstm(F.one_hot(x, self.symbols).float(), resets=resets)  # out: [T, B, H]
        return self.head(out)  # logits [T, B, K]


def build(args, device: torch.device) -> Recaller:
    torch.manual_seed(args.seed)  # the same initial weights for both variants
    return Recaller(args.symbols, args.hidden).to(device)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: Recaller, data, use_resets: bool) -> tuple[float, list[float]]:
    """Recall accuracy over every complete episode of the held-out streams, and by episode index in the
    stream (1st, 2nd, ...)."""
    x, resets, targets, episode = data
    model.eval()
    guess = model(x, resets if use_resets else None).argmax(-1)
    model.train()
    scored = targets != IGNORE
    correct = (guess == targets) & scored
    by_index = []
    for k in range(int(episode[scored].max()) + 1):
        at_k = scored & (episode == k)
        if at_k.sum() < 20:  # too few streams hold this many complete episodes to say anything
            break
        by_index.append((correct & at_k).sum().item() / at_k.sum().item())
    return correct.sum().item() / scored.sum().item(), by_index


def use_bar() -> bool:
    """A tqdm progress bar on a terminal; plain progress lines when tqdm is missing or output is redirected."""
    return tqdm is not None and sys.stderr.isatty()


def train(variant: str, args, device: torch.device, eval_data) -> dict:
    use_resets = variant == "resets"
    model = build(args, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(args.seed + 1)  # the same batches, in the same order, for both variants
    acc, _ = evaluate(model, eval_data, use_resets)
    curve = {"step": [0], "acc": [acc], "loss": [float("nan")]}
    bar = tqdm(range(1, args.steps + 1), desc=f"{LABELS[variant]:<15}", dynamic_ncols=True) if use_bar() else None
    steps = bar if bar is not None else range(1, args.steps + 1)
    t_start = time.perf_counter()
    for step in steps:
        x, resets, targets, _ = (t.to(device) for t in episode_streams(
            args.batch, args.seq_len, args.symbols, args.min_len, args.max_len, data))
        logits = model(x, resets if use_resets else None)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc, _ = evaluate(model, eval_data, use_resets)
            curve["step"].append(step)
            curve["acc"].append(acc)
            curve["loss"].append(loss.item())
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.1%}")
            elif step % max(args.steps // 5, 1) < args.eval_every:
                print(f"  {LABELS[variant]:<15} step {step:>5}/{args.steps}  loss {loss.item():.3f}  "
                      f"held-out recall {acc:6.1%}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    acc, by_index = evaluate(model, eval_data, use_resets)
    return dict(variant=variant, curve=curve, final_acc=acc, by_index=by_index, total_time=total)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def plot(results: list[dict], args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    colors = {"resets": "tab:blue", "no_resets": "tab:red"}
    chance = 100 / args.symbols
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        c, lab = colors[r["variant"]], LABELS[r["variant"]]
        axes[0].plot(r["curve"]["step"], [100 * a for a in r["curve"]["acc"]], color=c, label=lab)
        axes[1].plot(range(1, len(r["by_index"]) + 1), [100 * a for a in r["by_index"]], "o-", color=c, label=lab)
    for ax in axes:
        ax.axhline(chance, color="gray", ls=":", label=f"chance (1/{args.symbols})")
        ax.set(ylim=(0, 105))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set(xlabel="training step", ylabel="% of episodes recalled", title="Held-out recall accuracy")
    axes[1].set(xlabel="episode's position in its stream", ylabel="% recalled (trained models)",
                title="Recall by episode position")
    fig.suptitle(f"Episodic recall: {args.min_len}-{args.max_len}-step episodes back to back in streams of "
                 f"{args.seq_len} steps ({args.steps} steps of batch {args.batch})", fontsize=11)
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
        description="Episodes back to back in one stream: with resets marking episode starts lstm_triton.LSTM "
                    "recalls each episode's cue; without them the state leaks across episodes. Sizes default to "
                    "the full run (a GPU) or, with --quick, to a small run for a CPU.")

    def size(name, kind, what):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind,
                       help=f"{what} (quick: {QUICK[name]}, full: {FULL[name]})")

    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes that train on a CPU in well under a minute")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the data (default: 0)")
    size("seq_len", int, "steps per stream (episodes back to back)")
    size("symbols", int, "number of symbols K (chance = 1/K)")
    size("min_len", int, "shortest episode, in steps")
    size("max_len", int, "longest episode, in steps")
    size("hidden", int, "LSTM hidden size")
    size("batch", int, "streams per training step")
    size("steps", int, "training steps per variant")
    size("lr", float, "Adam learning rate")
    size("eval_every", int, "steps between evaluations on the held-out streams")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default: 1.0)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out streams (default: 256)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for PyTorch (default: 1 with --quick on a CPU, where the model's small ops gain "
                        "nothing from more threads and lose a lot on a busy machine; else PyTorch's choice)")
    p.add_argument("--plot", type=Path, default=HERE / "figures" / "episodic_memory.png",
                   help="where to save the PNG (default: examples/figures/episodic_memory.png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 2 <= args.min_len <= args.max_len:
        p.error("episodes need 2 <= --min-len <= --max-len")
    if args.seq_len < args.max_len:
        p.error("--seq-len must hold at least one episode of --max-len steps")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    triton = lstm_triton.triton_enabled(torch.empty(0, device=device))
    backend = ("Triton kernels" if triton else
               "CPU: resets on lstm_triton's reference, no resets on PyTorch's CPU LSTM")
    print(f"Episodic recall: streams of {args.seq_len} steps, episodes of {args.min_len}-{args.max_len} steps, "
          f"{args.symbols} symbols, LSTM {args.hidden} units, batch {args.batch}, {args.steps} steps, "
          f"device {device} ({backend})")
    print(f"Chance: {1 / args.symbols:.1%}")

    held_out = torch.Generator().manual_seed(10_000 + args.seed)  # disjoint from the training stream
    eval_data = tuple(t.to(device) for t in episode_streams(
        args.eval_size, args.seq_len, args.symbols, args.min_len, args.max_len, held_out))

    results = []
    for variant in VARIANTS:
        r = train(variant, args, device, eval_data)
        print(f"  {LABELS[variant]:<15} recall accuracy {r['final_acc']:.1%}  ({r['total_time']:.1f} s)", flush=True)
        results.append(r)

    print("\nRecall accuracy by the episode's position in its stream (1st, 2nd, ...):")
    for r in results:
        print(f"  {LABELS[r['variant']]:<15} " + " ".join(f"{a:4.0%}" for a in r["by_index"]))
    if not args.no_plot:
        plot(results, args, args.plot)

    res = {r["variant"]: r for r in results}
    print(f"\nRESULT episodic recall ({args.min_len}-{args.max_len}-step episodes, {args.symbols} symbols): "
          f"with resets {res['resets']['final_acc']:.1%}, without resets {res['no_resets']['final_acc']:.1%} "
          f"(chance {1 / args.symbols:.1%})")
    return res | {"args": vars(args), "chance": 1 / args.symbols}


if __name__ == "__main__":
    main()
