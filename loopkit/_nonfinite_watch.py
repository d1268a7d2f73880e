"""fit()'s watch over non-finite losses: the first bad step, or the streak of skipped steps."""

from __future__ import annotations

import math
from typing import Literal

import torch

from .state import TrainState

NonfinitePolicy = Literal["raise", "skip"]


class NonfiniteWatch:
    """Track non-finite training losses across optimizer steps without a per-step host sync.

    With `policy="raise"`, fit() calls `after_step` after every optimizer step and `check`
    at log and save steps and at the end, where it syncs anyway; `check` raises
    FloatingPointError naming the first step whose "train/loss" was NaN or infinite. With
    `policy="skip"` (the step drops such updates and counts them in `skipped_steps`),
    `after_step` raises once `max_skips` steps in a row were skipped; `check` does nothing.

    Cost. fit's own step makes a new "train/loss" tensor every optimizer step and never
    writes to it again, so its check can wait (`deferred=True`): the losses of consecutive
    steps since the last check are kept (one list append per step, no device op) and read
    at the next `check` (one stack and one copy to the host); a run that checks less often
    than every `chunk` steps folds them into a device-side "first bad step" record. A
    user's `step=` might reuse one tensor (`deferred=False`): its loss is folded into that
    record on the device every step.

    Args:
        policy: fit's `nonfinite` setting, "raise" or "skip".
        device: where the device-side record lives (the strategy's device).
        deferred: whether losses may be kept and checked later (fit's own step only).
        chunk: with `deferred`, fold the kept losses on the device at least this often.
        max_skips: with "skip", how many skipped steps in a row raise.
    """

    def __init__(
        self,
        policy: NonfinitePolicy,
        device: torch.device,
        *,
        deferred: bool,
        chunk: int,
        max_skips: int,
    ) -> None:
        self.policy = policy
        self.chunk = chunk
        self.max_skips = max_skips
        self.skips_in_a_row = 0
        # The first step whose loss was not finite, or -1: device-side, no per-step sync.
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._pending: list[torch.Tensor] | None = [] if deferred else None
        self._pending_start = 0  # the step (before its update) of _pending[0]
        self._on_device = not deferred  # whether _first_bad may hold a step

    def after_step(self, state: TrainState, previous_step: int, previous_skips: int) -> None:
        """Note the optimizer step that took `previous_step` to `state.step`.

        Raises:
            FloatingPointError: (policy "skip") `max_skips` steps in a row were skipped.
        """
        if self.policy == "skip":
            self._count_skip(state.skipped_steps > previous_skips, previous_step)
            return
        loss = state.metrics.get("train/loss")
        if isinstance(loss, torch.Tensor):
            self._note_loss(loss, previous_step)

    def _count_skip(self, skipped: bool, step: int) -> None:
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
        if self.skips_in_a_row >= self.max_skips:
            raise FloatingPointError(
                f"fit: {self.skips_in_a_row} optimizer steps in a row were skipped for a "
                f"non-finite loss or gradient (last at step {step}); "
                f"max_nonfinite_skips={self.max_skips}."
            )

    def _note_loss(self, loss: torch.Tensor, step: int) -> None:
        pending = self._pending
        if pending is None:
            self._first_bad = torch.where(
                (self._first_bad < 0) & ~torch.isfinite(loss), step, self._first_bad
            )
            return
        if pending and step != self._pending_start + len(pending):
            self._fold()  # not consecutive (never with fit's own step)
        if not pending:
            self._pending_start = step
        pending.append(loss)
        if len(pending) >= self.chunk:
            self._fold()

    def _fold(self) -> None:
        """Fold the kept losses into the device-side record (device ops only, no host sync)."""
        assert self._pending
        bad = ~torch.isfinite(torch.stack(self._pending))
        first_bad = torch.argmax(bad.to(torch.int32)) + self._pending_start  # the first True
        self._first_bad = torch.where((self._first_bad < 0) & bad.any(), first_bad, self._first_bad)
        self._on_device = True
        self._pending.clear()

    def check(self) -> None:
        """Raise if a loss noted so far was not finite (policy "raise"; "skip" never raises here).

        Raises:
            FloatingPointError: naming the first step whose loss was NaN or infinite.
        """
        if self.policy != "raise":
            return
        # host sync: at log and save steps and at the end only.
        bad = int(self._first_bad) if self._on_device else -1
        if bad < 0 and self._pending:
            values = torch.stack(self._pending).tolist()
            bad = next(
                (self._pending_start + i for i, v in enumerate(values) if not math.isfinite(v)),
                -1,
            )
            self._pending.clear()
        if bad >= 0:
            raise FloatingPointError(
                f"fit: the training loss became NaN or infinite at step {bad}. Checkpoints "
                "written before it are intact. Lower the lr, clip gradients, or pass "
                "nonfinite='skip' to drop such updates."
            )


__all__ = ["NonfinitePolicy", "NonfiniteWatch"]
