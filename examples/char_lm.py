"""Character-level language model on ``lstm_triton.LSTM``, then text generation from a prompt.

What this demonstrates
----------------------
A language model reads text one character at a time and predicts the next one. To do better than
character frequencies it must remember context: which word it is in, whether a quote is open, what
the sentence is about. That running context is exactly what an LSTM's state (h, c) carries from step
to step. The model here is the classic one:

    embedding (one vector per character) -> lstm_triton.LSTM (2 layers) -> linear (logits per character)

It trains with cross-entropy on random windows of a small corpus shipped with the repository
(``examples/data/corpus.txt``, original prose written for this project), reports the held-out loss
against two baselines (the untrained model, ~ln(vocabulary), and the best context-free guess, the
unigram entropy of the corpus), and then *generates*: it feeds a prompt through the network to build
up (h, c), then repeatedly samples the next character from softmax(logits / temperature), feeding
each sampled character back in together with the (h, c) carried over from the previous step.

``--compare`` trains ``torch.nn.LSTM`` from the same seed on the same batches and plots both loss
curves; as the two modules share their parameterisation and initialisation, the curves overlap: to
the last bit on CPU, where both run PyTorch's kernel, and on a GPU, where ours runs the Triton kernels,
within floating-point noise (and, at full size, the noise of differently drawn dropout masks). Both
runs report their time per epoch. It is on by default on CUDA and off on CPU.

Usage
-----
    python examples/char_lm.py --quick                    # CPU, about a minute
    python examples/char_lm.py --device cuda              # full size on a GPU, timed against torch.nn.LSTM
    python examples/char_lm.py --quick --prompt "The machine" --temperature 0.5
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import Counter
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
except ImportError:  # tqdm is optional: fall back to a line of text per epoch
    tqdm = None

HERE = Path(__file__).resolve().parent

QUICK = dict(embed=32, hidden=128, seq_len=64, batch=32, epochs=30, lr=5e-3, dropout=0.0, generate=300)
FULL = dict(embed=64, hidden=512, seq_len=128, batch=32, epochs=50, lr=2e-3, dropout=0.3, generate=600)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class CharData:
    """The corpus as a tensor of character ids, split into training (first 90%) and validation (last 10%)."""

    def __init__(self, text: str, val_fraction: float = 0.1):
        self.chars = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.chars)}
        ids = torch.tensor([self.index[ch] for ch in text], dtype=torch.long)
        split = int(len(ids) * (1 - val_fraction))
        self.train, self.val = ids[:split], ids[split:]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        unknown = sorted(set(s) - set(self.index))
        if unknown:
            raise SystemExit(f"the prompt uses characters that are not in the corpus: {unknown}")
        return torch.tensor([self.index[ch] for ch in s], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of the training text: inputs [B, T] and next-character targets [B, T]."""
        starts = torch.randint(0, len(self.train) - seq_len - 1, (batch,), generator=generator)
        windows = torch.stack([self.train[s:s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def unigram_entropy(self) -> float:
        """Cross-entropy (nats/char) of the best context-free model: the character frequencies."""
        counts = Counter(self.train.tolist())
        n = len(self.train)
        return -sum(c / n * math.log(c / n) for c in counts.values())


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class CharLM(nn.Module):
    """embedding -> 2-layer LSTM -> linear. ``lstm_cls`` is lstm_triton.LSTM or torch.nn.LSTM."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float, lstm_cls=lstm_triton.LSTM):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = lstm_cls(embed, hidden, num_layers=layers, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, state=None):
        """ids [B, T] -> logits [B, T, vocab], and the final state (h, c), each [layers, B, hidden]."""
        out, state = self.lstm(self.embed(ids), state)
        return self.head(self.drop(out)), state


@torch.no_grad()
def generate(model: CharLM, data: CharData, prompt: str, length: int, temperature: float,
             generator: torch.Generator, device: torch.device) -> str:
    """Sample ``length`` characters after ``prompt``, one step at a time, carrying (h, c) between steps."""
    model.eval()
    ids = data.encode(prompt).to(device).unsqueeze(0)  # [1, len(prompt)]
    logits, state = model(ids)  # read the whole prompt in one call; state = (h, c) after its last character
    out = []
    for _ in range(length):
        probs = F.softmax(logits[0, -1].float().cpu() / max(temperature, 1e-6), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # sampled on the CPU: same text on every device
        out.append(int(nxt))
        logits, state = model(nxt.to(device).view(1, 1), state)  # one character in, (h, c) carried over
    model.train()
    return prompt + data.decode(out)


@torch.no_grad()
def evaluate(model: CharLM, ids: torch.Tensor, seq_len: int, device: torch.device) -> float:
    """Mean cross-entropy (nats/char) over the validation text, cut into consecutive windows."""
    model.eval()
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len).to(device)
    y = ids[1: n * seq_len + 1].view(n, seq_len).to(device)
    logits, _ = model(x)
    model.train()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)).item()


def use_bar() -> bool:
    """A tqdm progress bar on a terminal; plain progress lines when tqdm is missing or output is redirected."""
    return tqdm is not None and sys.stderr.isatty()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(name: str, lstm_cls, data: CharData, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)  # identical initial weights for lstm_triton.LSTM and torch.nn.LSTM
    model = CharLM(data.vocab, args.embed, args.hidden, 2, args.dropout, lstm_cls).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(args.seed + 1)  # identical batches for both models
    steps_per_epoch = max(len(data.train) // (args.batch * args.seq_len), 1)
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps, eta_min=args.lr / 10)

    initial_val = evaluate(model, data.val, args.seq_len, device)
    history = {"step": [], "train": [], "val_step": [0], "val": [initial_val]}
    epoch_times = []
    bar = tqdm(total=total_steps, desc=f"{name:<20}", dynamic_ncols=True) if use_bar() else None
    step = 0
    sync(device)
    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        losses = []  # kept on the device until the end of the epoch: no GPU sync per step
        for _ in range(steps_per_epoch):
            x, y = (t.to(device, non_blocking=True) for t in data.batch(args.batch, args.seq_len, batches))
            logits, _ = model(x)
            loss = F.cross_entropy(logits.reshape(-1, data.vocab).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.detach())
            if bar is not None:
                bar.update(1)
        sync(device)
        epoch_times.append(time.perf_counter() - t0)
        history["train"].extend(torch.stack(losses).tolist())
        history["step"].extend(range(step - len(losses) + 1, step + 1))
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            val = evaluate(model, data.val, args.seq_len, device)
            history["val_step"].append(step)
            history["val"].append(val)
            if bar is not None:
                bar.set_postfix(train=f"{history['train'][-1]:.3f}", val=f"{val:.3f}")
            else:
                print(f"  {name:<20} epoch {epoch:>4}/{args.epochs}  train {history['train'][-1]:.3f}  val {val:.3f}",
                      flush=True)
    sync(device)
    total = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    return dict(name=name, model=model, history=history, initial_val=initial_val, final_val=history["val"][-1],
                # The median skips the first epoch's one-off costs (CUDA context, Triton compilation and autotuning).
                epoch_time=statistics.median(epoch_times), total_time=total, steps_per_epoch=steps_per_epoch,
                params=sum(p.numel() for p in model.parameters()))


def plot(results: list[dict], unigram: float, args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = [dict(color="tab:blue", ls="-", lw=2.5, alpha=0.8), dict(color="tab:orange", ls="--", lw=1.5)]
    for r, st in zip(results, styles):
        h = r["history"]
        ax.plot(h["step"], h["train"], label=f"{r['name']}: training batches", **st)
        ax.plot(h["val_step"], h["val"], marker="o", ms=4, label=f"{r['name']}: validation text",
                **{**st, "alpha": 1.0, "color": "tab:green" if st["color"] == "tab:blue" else "tab:red"})
    ax.axhline(unigram, color="gray", ls=":", label=f"character frequencies only ({unigram:.2f})")
    ax.set(xlabel="training step", ylabel="cross-entropy (nats / character)",
           title=f"Character-level LM on {args.corpus.name} (2-layer LSTM, hidden {args.hidden})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
        description="Train a character-level language model on lstm_triton.LSTM, then generate text from a prompt. "
                    "Sizes default to the full run (a GPU) or, with --quick, to a small run for a CPU.")

    def size(name, kind, what):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind,
                       help=f"{what} (quick: {QUICK[name]}, full: {FULL[name]})")

    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="a small model that trains on a CPU in a minute or two")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the weights, the batches and the sampling (default: 0)")
    p.add_argument("--corpus", type=Path, default=HERE / "data" / "corpus.txt",
                   help="UTF-8 text file to train on (default: examples/data/corpus.txt)")
    size("embed", int, "character embedding size")
    size("hidden", int, "LSTM hidden size, both layers")
    size("seq_len", int, "characters per training window (the truncated-BPTT length)")
    size("batch", int, "windows per training step")
    size("epochs", int, "epochs; one epoch = len(training text) / (batch x seq-len) steps")
    size("lr", float, "Adam learning rate, cosine-decayed to a tenth")
    size("dropout", float, "dropout between the LSTM layers and before the output layer")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default: 1.0)")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between validation evaluations (default: 1)")
    p.add_argument("--prompt", default="The river ", help="text to start the generation from (default: 'The river ')")
    size("generate", int, "characters to generate after the prompt")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature: lower is safer and more repetitive, higher more inventive "
                        "(default: 0.7)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also train torch.nn.LSTM from the same seed on the same batches, plot both loss curves "
                        "and time both (default: on for CUDA, off on CPU where both run the same PyTorch kernel)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often fastest for these small "
                        "models on a busy machine)")
    p.add_argument("--plot", type=Path, default=HERE / "figures" / "char_lm.png",
                   help="where to save the PNG (default: examples/figures/char_lm.png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.compare is None:
        args.compare = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.corpus.read_text(encoding="utf-8")
    data = CharData(text)
    if len(data.train) <= args.seq_len + 1 or len(data.val) <= args.seq_len + 1:
        raise SystemExit(f"the corpus is too short for --seq-len {args.seq_len}")
    unigram = data.unigram_entropy()
    triton = lstm_triton.triton_enabled(torch.empty(0, device=device))
    print(f"Corpus {args.corpus.name}: {len(text):,} characters, vocabulary {data.vocab}, "
          f"{len(data.train):,} for training / {len(data.val):,} for validation")
    print(f"Model: embedding {args.embed} -> LSTM 2 x {args.hidden} -> linear {data.vocab}; batch {args.batch} x "
          f"{args.seq_len} chars, {args.epochs} epochs, device {device} "
          f"({'Triton kernels' if triton else 'PyTorch CPU LSTM: no Triton on this device'})")

    results = [train("lstm_triton.LSTM", lstm_triton.LSTM, data, args, device)]
    if args.compare:
        results.append(train("torch.nn.LSTM", nn.LSTM, data, args, device))

    ours = results[0]
    print(f"\nValidation loss (nats/char): untrained {ours['initial_val']:.3f} (ln {data.vocab} = "
          f"{math.log(data.vocab):.3f}), character frequencies only {unigram:.3f}, "
          f"trained {ours['final_val']:.3f} ({ours['final_val'] / math.log(2):.2f} bits/char)")
    if args.compare:
        a, b = (r["history"]["train"] for r in results)
        gap = max(abs(x - y) for x, y in zip(a, b))
        print(f"lstm_triton.LSTM vs torch.nn.LSTM, same seed: final validation loss {ours['final_val']:.4f} vs "
              f"{results[1]['final_val']:.4f}; largest gap between the training-loss curves {gap:.2e}")
    print(f"\nTime per epoch ({ours['steps_per_epoch']} steps of {args.batch} x {args.seq_len} characters, "
          f"device {device}):")
    for r in results:
        print(f"  {r['name']:<18} {r['epoch_time'] * 1000:9.1f} ms   ({r['total_time']:.1f} s in all)")
    if args.compare and triton:
        ratio = results[1]["epoch_time"] / ours["epoch_time"]
        print(f"  torch.nn.LSTM / lstm_triton.LSTM time per epoch: {ratio:.2f}x")
    elif args.compare:
        print("  (both ran PyTorch's CPU kernel here: any difference is noise)")

    sampler = torch.Generator().manual_seed(args.seed)
    sample = generate(ours["model"], data, args.prompt, args.generate, args.temperature, sampler, device)
    print(f"\nGenerated by lstm_triton.LSTM (temperature {args.temperature}, prompt {args.prompt!r}):\n")
    print(sample)
    print()

    if not args.no_plot:
        plot(results, unigram, args, args.plot)

    print(f"RESULT char_lm: validation loss {ours['initial_val']:.3f} -> {ours['final_val']:.3f} nats/char "
          f"(character frequencies alone: {unigram:.3f}) after {args.epochs} epochs on {device}")
    return dict(results=results, unigram=unigram, sample=sample, args=vars(args))


if __name__ == "__main__":
    main()
