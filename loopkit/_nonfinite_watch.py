"""fit()'s watch over non-finite losses: the first bad step, or the streak of skipped steps.

With several ranks the watch makes every rank take the same decision at the same step: at
a check, the ranks' records are summed over ranks in one small collective (see
`NonfiniteWatch.check`), so every rank raises the same FloatingPointError, naming the step
and the rank(s) whose loss was not finite, at the same log or save step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from .guards import NONFINITE_METRIC
from .state import TrainState
from .strategies import Strategy

NonfinitePolicy = Literal["raise", "skip"]


def _loss_is_bad(losses: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(losses)


def _flag_is_bad(flags: torch.Tensor) -> torch.Tensor:
    return flags != 0


class _FirstBad:
    """The first step whose per-step device value was bad, kept without a per-step sync.

    Deferred (fit's own step, whose values are new tensors each step): the values of
    consecutive steps are kept (one list append per step, no device op) and folded into a
    device-side record at the next `record()`, or every `chunk` steps. Not deferred (a
    user's `step=` might reuse one tensor): each value is folded at once (a few device ops).
    """

    def __init__(
        self,
        is_bad: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        *,
        deferred: bool,
        chunk: int,
    ) -> None:
        self.is_bad = is_bad
        self.chunk = chunk
        self.seen = False  # whether any value was noted (the guard's flag: it ran)
        # The first bad step, or -1: device-side, no per-step sync.
        self._first = torch.full((), -1, dtype=torch.int64, device=device)
        self._pending: list[torch.Tensor] | None = [] if deferred else None
        self._pending_start = 0  # the step (before its update) of _pending[0]

    def note(self, value: torch.Tensor, step: int) -> None:
        self.seen = True
        pending = self._pending
        if pending is None:
            bad = self.is_bad(value.reshape(()))
            self._first = torch.where((self._first < 0) & bad, step, self._first)
            return
        if pending and step != self._pending_start + len(pending):
            self._fold()  # not consecutive (never with fit's own step)
        if not pending:
            self._pending_start = step
        pending.append(value)
        if len(pending) >= self.chunk:
            self._fold()

    def _fold(self) -> None:
        """Fold the kept values into the device-side record (device ops only, no sync)."""
        assert self._pending
        values = torch.stack([v.reshape(()) for v in self._pending])
        bad = self.is_bad(values)
        first = torch.argmax(bad.to(torch.int32)) + self._pending_start  # the first True
        self._first = torch.where((self._first < 0) & bad.any(), first, self._first)
        self._pending.clear()

    def record(self) -> torch.Tensor:
        """The first bad step so far (-1: none), a 0-dim int64 device tensor."""
        if self._pending:
            self._fold()
        return self._first


class NonfiniteWatch:
    """Track non-finite training losses across optimizer steps without a per-step host sync.

    With `policy="raise"`, fit() calls `after_step` after every optimizer step and `check`
    at log and save steps and at the end, where it syncs anyway; `check` raises
    FloatingPointError naming the first step whose "train/loss" was NaN or infinite, or
    whose gradients `zero_nonfinite()` zeroed ("train/nonfinite"). With `policy="skip"`
    (the step drops such updates and counts them in `skipped_steps`, the same on every
    rank), `after_step` raises once `max_skips` steps in a row were skipped; `check` does
    nothing.

    Cost. Per step: one list append per watched value (fit's own step, `deferred=True`),
    or a few device ops (`deferred=False`). Per check: a few device ops folding what was
    kept, one copy to the host, and with several ranks one all-reduce of a 2 x world_size
    table (`strategy.reduce_count`), at steps where fit already syncs and communicates.

    Args:
        policy: fit's `nonfinite` setting, "raise" or "skip".
        strategy: the run's strategy (its device, rank and world size).
        deferred: whether values may be kept and checked later (fit's own step only).
        chunk: with `deferred`, fold the kept values on the device at least this often.
        max_skips: with "skip", how many skipped steps in a row raise.
    """

    def __init__(
        self,
        policy: NonfinitePolicy,
        strategy: Strategy,
        *,
        deferred: bool,
        chunk: int,
        max_skips: int,
    ) -> None:
        self.policy = policy
        self.strategy = strategy
        self.max_skips = max_skips
        self.skips_in_a_row = 0
        device = strategy.device
        self._losses = _FirstBad(_loss_is_bad, device, deferred=deferred, chunk=chunk)
        self._flags = _FirstBad(_flag_is_bad, device, deferred=deferred, chunk=chunk)
        self._unchecked = False  # steps noted since the last check (the same on every rank)

    def after_step(self, state: TrainState, previous_step: int, previous_skips: int) -> None:
        """Note the optimizer step that took `previous_step` to `state.step`.

        Raises:
            FloatingPointError: (policy "skip") `max_skips` steps in a row were skipped.
        """
        if self.policy == "skip":
            self._count_skip(state.skipped_steps > previous_skips, previous_step)
            return
        self._unchecked = True
        loss = state.metrics.get("train/loss")
        if isinstance(loss, torch.Tensor):
            self._losses.note(loss, previous_step)
        flag = state.metrics.get(NONFINITE_METRIC)
        if isinstance(flag, torch.Tensor):
            self._flags.note(flag, previous_step)

    def _count_skip(self, skipped: bool, step: int) -> None:
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
        if self.skips_in_a_row >= self.max_skips:
            raise FloatingPointError(
                f"fit: {self.skips_in_a_row} optimizer steps in a row were skipped for a "
                f"non-finite loss or gradient (last at step {step}); "
                f"max_nonfinite_skips={self.max_skips}."
            )

    def check(self) -> None:
        """Raise if a loss (or guarded gradient) noted so far was not finite on any rank.

        Policy "skip" never raises here. With several ranks this is a collective: every
        rank calls it at the same points (fit does, at log and save steps and the end) and
        every rank raises the same error, or none does.

        Raises:
            FloatingPointError: naming the first bad step and, with several ranks, the
                rank(s) whose loss was NaN or infinite there.
            DistributedError: another rank died or hung past the timeout.
        """
        if self.policy != "raise" or not self._unchecked:
            return
        self._unchecked = False
        records = torch.stack([self._losses.record(), self._flags.record()])
        strategy = self.strategy
        world_size = strategy.world_size
        if world_size > 1:
            # Each rank writes its column of a 2 x world_size table (first bad step + 1,
            # 0 for none); summed over ranks, every rank holds every rank's records.
            table = torch.zeros(2, world_size, dtype=torch.float64, device=records.device)
            table[:, strategy.rank] = records.to(torch.float64) + 1
            summed = torch.as_tensor(strategy.reduce_count(table))
            # host sync: at log and save steps and at the end only, where fit syncs anyway.
            losses, flags = ([int(v) - 1 for v in row] for row in summed.tolist())
        else:
            losses, flags = ([v] for v in records.tolist())  # host sync, as above
        error = _error(losses, flags, grads_guarded=self._flags.seen)
        if error is not None:
            raise error


def _error(
    losses: list[int], flags: list[int], *, grads_guarded: bool
) -> FloatingPointError | None:
    """The error for every rank's first bad loss step and guard step (-1: none), or None."""
    bad_losses = [s for s in losses if s >= 0]
    bad_flags = [s for s in flags if s >= 0]
    if not bad_losses and not bad_flags:
        return None
    fix = (
        "Checkpoints written before it are intact. Lower the lr, clip gradients, or pass "
        "nonfinite='skip' to drop such updates."
    )
    world_size = len(losses)
    kept = (
        " The weights stayed finite: zero_nonfinite() zeroed any NaN or infinite gradients "
        "before the update."
        if grads_guarded
        else ""
    )
    if bad_losses and min(bad_losses) <= min(bad_flags, default=min(bad_losses)):
        step = min(bad_losses)
        where = ""
        if world_size > 1:
            ranks = [rank for rank, s in enumerate(losses) if s == step]
            names = ", ".join(str(r) for r in ranks)
            where = f" on rank{'s' if len(ranks) > 1 else ''} {names} (of {world_size} ranks)"
        return FloatingPointError(
            f"fit: the training loss became NaN or infinite at step {step}{where}.{kept} {fix}"
        )
    step = min(bad_flags)
    return FloatingPointError(
        f"fit: the gradients became NaN or infinite at step {step} while the training loss "
        f"was finite{' on every rank' if world_size > 1 else ''}.{kept} {fix}"
    )


__all__ = ["NonfinitePolicy", "NonfiniteWatch"]
