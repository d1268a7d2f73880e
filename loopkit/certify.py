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
   signal comes with the window still open; needs accumulate > 1) and the last micro-batch
   of a window (a "step boundary"). Where the stop leaves the data is labelled from the
   reference run: "mid-epoch" when its epoch goes on after the stop, "at an epoch
   boundary" when the stop is exactly at an epoch's end. (A window may span an epoch's
   end: a stop after such a window is mid-epoch in the next epoch, and a stop before it is
   mid-epoch in the one that ends inside it.) Interruptions land before the last step.
3. `diff_runs` of the two, bitwise, plus the final weights compared bitwise.

It certifies what fit's resume restores (weights, optimizer, schedule, RNG derivation, data
position, callbacks' state): state kept anywhere else — a counter in a loss function's
closure, a global RNG draw — shows up as the first divergent step after an interruption.
"""

from __future__ import annotations

import logging
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
        mid_epoch: the epoch went on after the stop (the data position is inside it); else
            the stop was at an epoch boundary (the data position is at the epoch's end).
        epoch: the epoch the data position is in (mid_epoch), or at whose end it is.
    """

    micro_batch: int
    stopped_at: int
    mid_window: bool
    mid_epoch: bool
    epoch: int

    def label(self) -> str:
        """Where the signal came and where the stop left the data, for the certificate."""
        signal_at = "mid-window" if self.mid_window else "step boundary"
        if self.mid_epoch:
            return f"{signal_at}; mid-epoch, in epoch {self.epoch}"
        return f"{signal_at}; at an epoch boundary, the end of epoch {self.epoch}"


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
        notes: what the draw could not cover, and interruptions that did not stop the run.
        exercised: every drawn interruption stopped the run where it should (else not ok).
    """

    steps: int
    window: int
    epochs: int
    interruptions: list[Interruption]
    report: DiffReport
    final_weights_equal: bool
    workdir: str
    notes: list[str] = field(default_factory=list)
    exercised: bool = True

    @property
    def ok(self) -> bool:
        return (
            self.exercised and self.report.first_divergent_step is None and self.final_weights_equal
        )

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
            "exercised": self.exercised,
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
            lines.append(
                f"    micro-batch {i.micro_batch}: stopped and resumed at step {i.stopped_at}"
                f" ({i.label()})"
            )
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  fingerprints compared: {len(self.report.steps_compared)} steps")
        lines.append(f"  final weights equal: {'yes' if self.final_weights_equal else 'no'}")
        lines.append(f"  bitwise: {'yes' if self.ok else 'no'}")
        lines.append(f"  runs: {self.workdir} (reference/, resumed/: `loopkit diff` them)")
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


class _EpochEnds:
    """Records where each epoch of a run ended: (steps taken, micro-batches of the open window).

    The fingerprints' `epoch` (that of each window's last micro-batch) cannot say where in a
    window of several micro-batches an epoch ended; fit's `on_epoch_end` can. It only
    observes (no state_dict, no request), so the run is the run without it.
    """

    def __init__(self) -> None:
        self.at: dict[tuple[int, int], int] = {}  # -> the epoch that ended there

    def on_epoch_end(self, state: Any) -> None:
        self.at[(state.step, state.micro_step)] = state.epoch - 1


def _run(
    config: RunConfig, *, interrupt_after: int | None = None, observe: Any = None
) -> FitResult:
    built = config.build()
    kwargs = dict(built.fit_kwargs)
    if interrupt_after is not None:
        kwargs["loss_fn"] = _Interrupting(kwargs["loss_fn"], interrupt_after)
    if observe is not None:
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), observe]
    return fit(built.model, built.data, **kwargs)


def _draw(sizes: list[int], count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (step, micro-batch offset) pairs, distinct steps before the last, sorted.

    `sizes` are the micro-batches of each step; at least one offset is inside its window
    (not the window's last micro-batch) when a drawn step has a window of several.
    """
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(len(sizes) - 1), min(count, len(sizes) - 1)))
    offsets = [rng.randrange(sizes[s]) for s in steps]
    inside = [i for i, s in enumerate(steps) if sizes[s] > 1]
    if inside and all(offsets[i] == sizes[steps[i]] - 1 for i in inside):
        i = rng.choice(inside)
        offsets[i] = rng.randrange(sizes[steps[i]] - 1)  # one mid-window
    return list(zip(steps, offsets))


def _interrupt(
    config: RunConfig,
    draws: list[tuple[int, int]],
    sizes: list[int],
    metas: dict[int, dict[str, Any]],
    epoch_ends: _EpochEnds,
) -> tuple[list[Interruption], list[str]]:
    """Run `config` (resume=True) in segments, each stopped by a drawn interruption.

    Returns the interruptions and notes on those that did not stop the run where they
    should (at the end of the window of the signal). `sizes`: each step's micro-batches.
    """
    first = [sum(sizes[:s]) for s in range(len(sizes) + 1)]  # of each step, from 0
    done, notes = [], []
    at_step = 0
    for step, offset in draws:
        micro_batch = first[step] + offset
        result = _run(config, interrupt_after=micro_batch - first[at_step] + 1)
        if result.state.step != step + 1:
            notes.append(
                f"the interruption at micro-batch {micro_batch} should have stopped the run at "
                f"step {step + 1}; it stopped at step {result.state.step} ({result.stopped_by}):"
                " resume was not exercised there, so nothing is certified"
            )
        at_step = result.state.step
        ended = epoch_ends.at.get((at_step, 0))  # an epoch ended exactly at the stop
        done.append(
            Interruption(
                micro_batch=micro_batch,
                stopped_at=at_step,
                mid_window=offset < sizes[step] - 1,
                mid_epoch=ended is None,
                # the epoch of the stopped window's last micro-batch (the reference's record)
                epoch=ended
                if ended is not None
                else int(metas.get(at_step - 1, {}).get("epoch", 0)),
            )
        )
    return done, notes


def _window_sizes(metas: dict[int, dict[str, Any]]) -> list[int]:
    """The micro-batches of each step of the reference run (its micro-step seeds)."""
    return [max(1, len(metas[s].get("micro_step_seeds") or [1])) for s in sorted(metas)]


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
        workdir: where the two runs go: a new or empty directory (default: a new
            temporary directory, kept).

    Raises:
        ValueError: interruptions < 1, the run has fewer than 2 steps, workdir is a file or
            not empty, or it cannot run here (not the main thread, no SIGUSR1).
    """
    if isinstance(interruptions, bool) or not isinstance(interruptions, int) or interruptions < 1:
        raise ValueError(f"certify_resume(interruptions={interruptions!r}): must be an int >= 1.")
    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        raise ValueError("certify_resume: needs SIGUSR1 and the main thread (POSIX, not a worker).")
    work = Path(workdir or tempfile.mkdtemp(prefix="loopkit-certify-"))
    _check_workdir(work)

    def run_config(name: str, resume: bool | None) -> RunConfig:
        return config.replace(
            progress=False,
            fingerprint_every=1,
            log_dir=str(work / name),
            checkpoint_dir=str(work / f"{name}-checkpoints"),
            resume=resume,
        )

    epoch_ends = _EpochEnds()
    reference = _run(run_config("reference", None), observe=epoch_ends)
    metas = {s: m for c in read_fingerprints(work / "reference") for s, m in zip(c.steps, c.meta)}
    n_steps = reference.state.step
    if n_steps < 2:
        raise ValueError(f"certify_resume: the run has {n_steps} step(s); it needs at least 2.")
    sizes = _window_sizes(metas)
    draws = _draw(sizes, interruptions, seed)
    resumed_cfg = run_config("resumed", True)
    done, problems = _interrupt(resumed_cfg, draws, sizes, metas, epoch_ends)
    notes = _draw_notes(n_steps, max(sizes), interruptions, len(draws)) + problems
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
        window=sizes[0],
        epochs=len({m["epoch"] for m in metas.values()}),
        interruptions=done,
        report=report,
        final_weights_equal=same and final.state.step == n_steps,
        workdir=str(work),
        notes=notes,
        exercised=not problems,
    )


def _check_workdir(work: Path) -> None:
    """Refuse a workdir that is a file or holds anything: runs there would resume old runs."""
    if work.exists() and not work.is_dir():
        raise ValueError(
            f"certify_resume(workdir={str(work)!r}): is a file; pass a new or empty directory."
        )
    if work.is_dir() and any(work.iterdir()):
        raise ValueError(
            f"certify_resume(workdir={str(work)!r}): the directory is not empty (an earlier "
            "certification's runs would be resumed instead of re-run, and files there could be "
            "overwritten). Pass a new or empty directory, or leave --workdir out (a new "
            "temporary directory)."
        )


def _draw_notes(n_steps: int, window: int, asked: int, drawn: int) -> list[str]:
    """What the draw could not cover: fewer interruptions than asked, no mid-window stop."""
    notes = []
    if drawn < asked:
        notes.append(
            f"{drawn} interruption(s) of the {asked} asked: a run of {n_steps} steps can be "
            f"interrupted before {n_steps - 1} step(s) only"
        )
    if window == 1:  # the largest window of the run
        notes.append("no mid-window interruption: the run takes 1 micro-batch per step")
    return notes


__all__ = ["Certificate", "Interruption", "certify_resume"]
