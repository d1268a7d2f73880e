"""A tiny float64 fit() that tests/test_interrupts.py starts, signals and resumes.

`train(...)` runs fit on a small MLP with dropout (so the RNG stream matters too) and a
shuffled dataset, with checkpoints. In each micro-batch whose index (counted from 0 over
the run) is in `pause_at`, its loss function calls `pause()`, which tells the test and
waits for its go-ahead: the test sends its signal while that micro-batch is in flight, so
the stop step is known exactly (the end of that micro-batch's window).

As a script (`python tests/_interrupt_trainer.py CKPT_DIR --accumulate 3 --pause-at 4
[--workers 2]`) it pauses by printing "paused" and reading a line from stdin.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from helpers import mlp

import loopkit as lk

BATCH = 4
SAMPLES = 48  # 12 micro-batches an epoch: every run below crosses an epoch end
MAX_STEPS = {1: 14, 3: 6}  # accumulate -> max_steps


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class EndReason:
    """Writes `<reason> <step>` at the end of fit (the two-argument on_fit_end)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def on_fit_end(self, state: Any, reason: str = "") -> None:
        if self.path is not None:
            self.path.write_text(f"{reason} {state.step}")


class OldStyleEnd(lk.Callback):
    """A one-argument on_fit_end, as written before the reason existed: still called."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def on_fit_end(self, state: Any) -> None:
        if self.path is not None:
            self.path.write_text(f"called {state.step}")


def train(
    checkpoint_dir: Path | None,
    *,
    accumulate: int,
    resume: bool = False,
    pause_at: Container[int] = (),
    pause: Callable[[], None] | None = None,
    ends: tuple[Path | None, Path | None] = (None, None),
    save_every: int | None = 4,
    num_workers: int = 0,
) -> lk.FitResult:
    """Train to MAX_STEPS[accumulate]; call `pause()` inside each micro-batch in `pause_at`."""
    calls = 0

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        if calls in pause_at and pause is not None:
            pause()
        calls += 1
        return F.cross_entropy(model(batch[0]), batch[1])

    return lk.fit(
        mlp(seed=3, dropout=0.1),
        dataset(),
        loss_fn=loss_fn,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        batch_size=BATCH,
        accumulate=accumulate,
        max_steps=MAX_STEPS[accumulate],
        checkpoint_dir=checkpoint_dir,
        save_every=save_every,
        resume=resume,
        num_workers=num_workers,
        progress=False,
        callbacks=[EndReason(ends[0]), OldStyleEnd(ends[1])],
    )


def _pause_on_stdin() -> None:
    print("paused", flush=True)
    sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    # As an interactive shell leaves it, even where the test runner started us with
    # SIGINT ignored (a background job): fit keeps a signal the process ignores ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    train(
        args.checkpoint_dir,
        accumulate=args.accumulate,
        pause_at=(args.pause_at,),
        pause=_pause_on_stdin,
        num_workers=args.workers,
    )


if __name__ == "__main__":
    main()
