"""loopkit's main demo: a character-level GPT learns Python from the standard library.

    python examples/demo.py                 # about a minute on a laptop CPU
    python examples/demo.py --quick         # a few seconds (what the tests run)
    tensorboard --logdir runs/demo          # curves: train/loss, eval/loss, train/lr, ...

The text is the Python standard library's own source (every Python ships it, nothing is
downloaded). The model is a small GPT written with einops (examples/gpt.py); training is
one call to `loopkit.fit`, which shows a progress bar, evaluates every `eval_every` steps,
and writes TensorBoard, CSV and JSONL logs. At the end the demo compares the eval loss with
the unigram baseline (what a model that ignores context can reach) and prints a sample.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from gpt import (
    GPT,
    CharDataset,
    CharTokenizer,
    generate,
    load_stdlib_text,
    loss_fn,
    split,
    unigram_baseline,
)

import loopkit
from loopkit.callbacks import Stop


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo trains with; `FULL` and `QUICK` below are the two presets."""

    text_chars: int  # characters of stdlib source to train on
    val_fraction: float  # the tail of the text held out for evaluation
    block_size: int  # context length (characters)
    d_model: int
    n_layers: int
    n_heads: int
    dropout: float
    batch_size: int  # sequences per optimizer step
    lr: float  # peak AdamW lr
    weight_decay: float
    warmup_steps: int
    max_steps: int
    eval_every: int
    eval_batches: int  # evaluation covers eval_batches * eval_batch_size sequences
    eval_batch_size: int
    log_every: int
    sample_chars: int


# Sized for about a minute on 2 CPU cores (~23 steps/s when nothing else runs): the 0.35 M
# parameter model predicts 1200 * 32 * 64 = 2.5 M characters, 1.7 times the training text.
FULL = DemoConfig(
    text_chars=1_500_000,
    val_fraction=0.05,
    block_size=64,
    d_model=96,
    n_layers=3,
    n_heads=4,
    dropout=0.0,
    batch_size=32,
    lr=5e-3,
    weight_decay=0.1,
    warmup_steps=50,
    max_steps=1200,
    eval_every=100,
    eval_batches=8,
    eval_batch_size=64,
    log_every=20,
    sample_chars=300,
)

# A few seconds: enough to beat the unigram baseline by a wide margin (tests/test_demo.py).
QUICK = replace(
    FULL,
    text_chars=300_000,
    d_model=64,
    n_layers=2,
    warmup_steps=10,
    max_steps=200,
    eval_every=50,
    eval_batches=4,
    log_every=10,
    sample_chars=100,
)


class TimeBudget:
    """A callback that stops training once `budget_s` seconds have passed since fit start."""

    def __init__(self, budget_s: float) -> None:
        if not budget_s > 0:
            raise ValueError(f"TimeBudget(budget_s={budget_s!r}): must be > 0 seconds.")
        self.budget_s = budget_s
        self._start = 0.0

    def on_fit_start(self, state: Any, hparams: dict[str, object]) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, state: Any) -> Stop | None:
        elapsed_s = time.perf_counter() - self._start
        if elapsed_s < self.budget_s:
            return None
        return Stop(f"time budget of {self.budget_s:g} s spent after {state.step} steps")

    def __repr__(self) -> str:
        return f"TimeBudget(budget_s={self.budget_s})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a character-level GPT on the Python stdlib with loopkit.fit.",
    )
    parser.add_argument("--quick", action="store_true", help="a few-second run (for tests)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="optimizer steps (default: the preset's max_steps)",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=60.0,
        help="stop after this many seconds, even before --max-steps (default: 60; 0: no limit)",
    )
    parser.add_argument(
        "--log-dir",
        default="runs/demo",
        help="where the TensorBoard/CSV/JSONL logs go (default: runs/demo)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's, the cores)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data order, init, sampling")
    parser.add_argument(
        "--prompt", default="def ", help="start of the generated sample (default: 'def ')"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; return its numbers (used by tests/test_demo.py)."""
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.max_steps is not None:
        cfg = replace(
            cfg, max_steps=args.max_steps, warmup_steps=min(cfg.warmup_steps, args.max_steps)
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the model's initial weights

    text = load_stdlib_text(cfg.text_chars, seed=args.seed)
    tokenizer = CharTokenizer(text)
    train_ids, val_ids = split(tokenizer.encode(text), cfg.val_fraction)
    train_data = CharDataset(train_ids, cfg.block_size)
    # Non-overlapping validation windows: every eval reads the same distinct text.
    val_data = CharDataset(val_ids, cfg.block_size, stride=cfg.block_size)
    baseline = unigram_baseline(train_ids, val_ids, tokenizer.vocab_size)

    model = GPT(
        tokenizer.vocab_size, cfg.block_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.dropout
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"data: {len(text):,} characters of Python stdlib source, vocabulary "
        f"{tokenizer.vocab_size}, {len(train_ids):,} train / {len(val_ids):,} val"
    )
    print(
        f"model: GPT with {n_params / 1e6:.2f} M parameters ({cfg.n_layers} layers, "
        f"d_model {cfg.d_model}, {cfg.n_heads} heads, context {cfg.block_size})"
    )
    print(
        f"training: up to {cfg.max_steps} steps of {cfg.batch_size} x {cfg.block_size} "
        f"characters" + (f", at most {args.time_budget_s:g} s" if args.time_budget_s else "")
    )

    callbacks: list[Any] = [TimeBudget(args.time_budget_s)] if args.time_budget_s else []
    start = time.perf_counter()
    result = loopkit.fit(
        model,
        train_data,
        loss_fn=loss_fn,
        # No weight decay on biases and LayerNorm gains (tensors with fewer than 2 dims).
        optimizer=lambda params: torch.optim.AdamW(
            loopkit.param_groups(params, weight_decay=cfg.weight_decay),
            lr=cfg.lr,
            betas=(0.9, 0.99),
        ),
        schedule=loopkit.schedules.cosine(cfg.warmup_steps, cfg.max_steps, min_factor=0.1),
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        clip=1.0,
        eval_data=val_data,
        eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches,
        eval_batch_size=cfg.eval_batch_size,
        log_every=cfg.log_every,
        log_dir=args.log_dir,
        strategy=loopkit.SingleDevice(args.device),
        seed=args.seed,
        callbacks=callbacks,
    )
    elapsed_s = time.perf_counter() - start
    state = result.state
    final = next(h for h in reversed(result.history) if "eval/loss" in h)
    eval_loss = final["eval/loss"]

    generator = torch.Generator().manual_seed(args.seed)
    sample_ids = generate(
        state.model,
        tokenizer.encode(args.prompt),
        cfg.sample_chars,
        temperature=0.8,
        generator=generator,
    )
    sample = tokenizer.decode(sample_ids)

    print()
    print(result)
    print()
    print(
        f"{state.step} steps in {elapsed_s:.1f} s ({state.step / elapsed_s:.1f} steps/s, "
        f"stopped by {result.stopped_by})"
    )
    print(f"unigram baseline: {baseline:.3f} nats/char (perplexity {math.exp(baseline):.1f})")
    print(
        f"final eval loss:  {eval_loss:.3f} nats/char (perplexity {math.exp(eval_loss):.2f}), "
        f"{baseline - eval_loss:.2f} nats/char below the baseline"
    )
    print(f"\n--- sample (prompt {args.prompt!r}, temperature 0.8) ---\n{sample}\n---")
    print(
        f"\nlogs: {args.log_dir} (TensorBoard, metrics.csv, metrics.jsonl); view them with\n"
        f"    tensorboard --logdir {args.log_dir}"
    )
    return {
        "config": asdict(cfg),
        "result": result,
        "baseline": baseline,
        "eval_loss": eval_loss,
        "steps": state.step,
        "elapsed_s": elapsed_s,
        "sample": sample,
    }


if __name__ == "__main__":
    main()
