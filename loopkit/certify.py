"""certify_resume: prove, bitwise, that a run interrupted and resumed is the run not interrupted.

What `loopkit certify-resume CONFIG` runs, in this process:

1. the reference: the run config trained to its end (max_steps, or its epochs) with
   fingerprints at every step (`<workdir>/reference`);
2. the same run, interrupted at drawn points and resumed after each (`<workdir>/resumed`):
   each interruption is a SIGUSR1 raised from inside the loss function during a drawn
   micro-batch, so fit's own interrupt machinery stops the run (it finishes the open
   window, saves a checkpoint at its end and returns), and the next segment is a new
   fit(..., resume=True) with freshly built model, data and loss, as a restarted process
   would have. The draws (seeded) cover micro-batches inside a window ("mid-window": the
   stop comes with the window still open; needs accumulate > 1) and the last micro-batch
   of a window (a stop at a step boundary); a stop is "mid-epoch" when the epoch goes on
   after it. Interruptions land before the last step.
3. `diff_runs` of the two, bitwise, plus the final weights compared bitwise.

It certifies what fit's resume restores (weights, optimizer, schedule, RNG derivation, data
position, callbacks' state): state kept anywhere else — a counter in a loss function's
closure, a global RNG draw — shows up as the first divergent step after an interruption.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fingerprint import read_fingerprints
from .fit import FitResult, fit
from .forensics import DiffReport, diff_runs
from .run_config import RunConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Interruption:
    """One drawn interruption.

    Attributes:
        micro_batch: the training micro-batch (counted from 0 over the run) during which the
            signal was raised.
        stopped_at: the step the interrupted segment saved and the next one resumed from.
        mid_window: the signal came with the window still open (fit finished it first).
        mid_epoch: the epoch went on after the stop (the data position is inside it).
    """

    micro_batch: int
    stopped_at: int
    mid_window: bool
    mid_epoch: bool


@dataclass
class Certificate:
    """What certify_resume found; `ok` is the verdict.

    Attributes:
        steps: optimizer steps of the run.
        window: micro-batches per step.
        epochs: epochs the run touched.
        interruptions: the interruptions, in order.
        report: the fingerprint diff (bitwise) of the reference and the resumed run.
        final_weights_equal: the final weights agree bitwise.
        workdir: where both runs' logs and checkpoints are.
    """

    steps: int
    window: int
    epochs: int
    interruptions: list[Interruption]
    report: DiffReport
    final_weights_equal: bool
    workdir: str
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report.first_divergent_step is None and self.final_weights_equal

    def to_json(self) -> dict[str, Any]:
        return {
            "bitwise": self.ok,
            "steps": self.steps,
            "window": self.window,
            "epochs": self.epochs,
            "interruptions": [vars(i) for i in self.interruptions],
            "first_divergent_step": self.report.first_divergent_step,
            "final_weights_equal": self.final_weights_equal,
            "steps_compared": len(self.report.steps_compared),
            "workdir": self.workdir,
            "notes": self.notes,
            "diff": self.report.to_json(),
        }

    def format(self) -> str:
        lines = ["loopkit resume certificate" if self.ok else "loopkit certify-resume: FAILED"]
        lines.append(
            f"  steps: {self.steps} ({self.window} micro-batch(es) per step, "
            f"{self.epochs} epoch(s))"
        )
        lines.append(f"  interruptions: {len(self.interruptions)}")
        for i in self.interruptions:
            where = ", ".join(
                w for w, on in (("mid-window", i.mid_window), ("mid-epoch", i.mid_epoch)) if on
            )
            lines.append(
                f"    micro-batch {i.micro_batch}: stopped and resumed at step {i.stopped_at}"
                + (f" ({where})" if where else " (step boundary, epoch end)")
            )
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  fingerprints compared: {len(self.report.steps_compared)} steps")
        lines.append(f"  final weights equal: {'yes' if self.final_weights_equal else 'no'}")
        lines.append(f"  bitwise: {'yes' if self.ok else 'no'}")
        if not self.ok:
            lines.append(self.report.format())
        return "\n".join(lines)


class _Interrupting:
    """A loss function that raises SIGUSR1 during its `at`-th training call (from 1)."""

    def __init__(self, loss_fn: Any, at: int | None) -> None:
        self.loss_fn, self.at, self.calls = loss_fn, at, 0

    def __call__(self, model: Any, batch: Any) -> Any:
        if torch.is_grad_enabled():  # evaluation calls do not count
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGUSR1)  # fit stops at the end of this window
        return self.loss_fn(model, batch)

    def __repr__(self) -> str:
        return repr(self.loss_fn)


def _run(config: RunConfig, *, interrupt_after: int | None = None) -> FitResult:
    built = config.build()
    kwargs = dict(built.fit_kwargs)
    if interrupt_after is not None:
        kwargs["loss_fn"] = _Interrupting(kwargs["loss_fn"], interrupt_after)
    return fit(built.model, built.data, **kwargs)


def _draw(n_steps: int, window: int, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (step, micro-batch offset) pairs, distinct steps < n_steps - 1, sorted."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(n_steps - 1), min(count, n_steps - 1)))
    offsets = [rng.randrange(window) for _ in steps]
    if window > 1 and steps and all(o == window - 1 for o in offsets):
        offsets[rng.randrange(len(steps))] = rng.randrange(window - 1)  # one mid-window
    return list(zip(steps, offsets))


def certify_resume(
    config: RunConfig,
    *,
    interruptions: int = 3,
    seed: int = 0,
    workdir: str | None = None,
) -> Certificate:
    """Train `config` once straight and once interrupted; compare them bitwise.

    Args:
        config: the run (its max_steps or epochs set the length; log_dir, checkpoint_dir
            and resume are replaced by directories under `workdir`).
        interruptions: how many interruptions to draw (distinct steps).
        seed: seeds the draw.
        workdir: where the two runs go (default: a new temporary directory, kept).

    Raises:
        ValueError: interruptions < 1, the run has fewer than 2 steps, or it cannot run
            here (not the main thread, no SIGUSR1).
    """
    if isinstance(interruptions, bool) or not isinstance(interruptions, int) or interruptions < 1:
        raise ValueError(f"certify_resume(interruptions={interruptions!r}): must be an int >= 1.")
    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        raise ValueError("certify_resume: needs SIGUSR1 and the main thread (POSIX, not a worker).")
    work = Path(workdir or tempfile.mkdtemp(prefix="loopkit-certify-"))

    def run_config(name: str, resume: bool | None) -> RunConfig:
        return config.replace(
            progress=False,
            fingerprint_every=1,
            log_dir=str(work / name),
            checkpoint_dir=str(work / f"{name}-checkpoints"),
            resume=resume,
        )

    reference = _run(run_config("reference", None))
    metas = [m for chunk in read_fingerprints(work / "reference") for m in chunk.meta]
    n_steps = reference.state.step
    if n_steps < 2:
        raise ValueError(f"certify_resume: the run has {n_steps} step(s); it needs at least 2.")
    window = max(1, len(metas[0].get("micro_step_seeds") or [1]))
    resumed_cfg = run_config("resumed", True)
    done: list[Interruption] = []
    at_step = 0
    for step, offset in _draw(n_steps, window, interruptions, seed):
        micro_batch = step * window + offset
        result = _run(resumed_cfg, interrupt_after=micro_batch - at_step * window + 1)
        at_step = result.state.step
        epochs = {m["step"]: m["epoch"] for m in metas}
        done.append(
            Interruption(
                micro_batch=micro_batch,
                stopped_at=at_step,
                mid_window=offset < window - 1,
                mid_epoch=epochs.get(at_step, math.inf) == epochs.get(at_step - 1),
            )
        )
    final = _run(resumed_cfg)
    report = diff_runs(work / "reference", work / "resumed")
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            reference.state.model.state_dict().values(), final.state.model.state_dict().values()
        )
    )
    return Certificate(
        steps=n_steps,
        window=window,
        epochs=len({m["epoch"] for m in metas}),
        interruptions=done,
        report=report,
        final_weights_equal=same and final.state.step == n_steps,
        workdir=str(work),
    )


__all__ = ["Certificate", "Interruption", "certify_resume"]
