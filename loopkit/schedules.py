"""Learning-rate schedules as pure functions of the optimizer step.

A schedule maps `step` (optimizer steps taken) to a factor of each param group's base lr,
so one schedule serves groups with different lrs. Step k of training uses `schedule(k)`,
as a torch LambdaLR stepped after every optimizer step would. The formulas follow the
usual HF/torch definitions, so a run migrated from them sees the same lrs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ._types import Schedule

LRScheduler = torch.optim.lr_scheduler.LRScheduler


def _check_steps(call: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{call}({name}={value!r}): must be an int >= 0.")


def _check_factor(call: str, name: str, value: float) -> None:
    # a floor above the peak (1.0) would turn the decay into a rise
    if not (isinstance(value, numbers.Real) and 0 <= value <= 1):
        raise ValueError(f"{call}({name}={value!r}): must be a float in [0, 1].")


def _warmup(step: int, warmup_steps: int) -> float:
    return step / max(1, warmup_steps)


@dataclass(frozen=True, slots=True)
class constant:  # noqa: N801 - a schedule factory reads like a function
    """The base lr at every step, optionally after a linear warmup from 0."""

    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check_steps("constant", warmup_steps=self.warmup_steps)

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps) if step < self.warmup_steps else 1.0


@dataclass(frozen=True, slots=True)
class _Decay:
    warmup_steps: int
    total_steps: int
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        call = type(self).__name__
        _check_steps(call, warmup_steps=self.warmup_steps, total_steps=self.total_steps)
        if self.total_steps < self.warmup_steps:
            raise ValueError(
                f"{call}(total_steps={self.total_steps}): must be >= warmup_steps "
                f"({self.warmup_steps})."
            )
        _check_factor(call, "min_factor", self.min_factor)

    def _progress(self, step: int) -> float:
        return (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)


@dataclass(frozen=True, slots=True)
class linear(_Decay):  # noqa: N801
    """Linear warmup from 0 to 1 over `warmup_steps`, then linear decay to `min_factor`."""

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        # HF's (total - step) / (total - warmup): 0 from total_steps on, also when
        # total_steps == warmup_steps (1 - progress would give 1.0 at that step).
        decay = max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))
        return self.min_factor + (1.0 - self.min_factor) * decay


@dataclass(frozen=True, slots=True)
class cosine(_Decay):  # noqa: N801
    """Linear warmup, then half a cosine from 1 down to `min_factor` at `total_steps`."""

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        progress = min(1.0, self._progress(step))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )


@dataclass(frozen=True, slots=True)
class cosine_with_restarts(_Decay):  # noqa: N801
    """Linear warmup, then `cycles` cosine decays, each restarting at 1 (hard restarts)."""

    cycles: int = 1

    def __post_init__(self) -> None:
        _Decay.__post_init__(self)
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise ValueError(f"cosine_with_restarts(cycles={self.cycles!r}): must be an int >= 1.")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        progress = self._progress(step)
        if progress >= 1.0:
            return self.min_factor
        phase = (self.cycles * progress) % 1.0
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * phase))


@dataclass(frozen=True, slots=True)
class polynomial(_Decay):  # noqa: N801
    """Linear warmup, then `(1 - progress) ** power` decay down to `min_factor`."""

    power: float = 1.0

    def __post_init__(self) -> None:
        _Decay.__post_init__(self)
        if not (isinstance(self.power, numbers.Real) and self.power > 0):
            raise ValueError(f"polynomial(power={self.power!r}): must be a float > 0.")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        if step > self.total_steps:
            return self.min_factor
        # (total - step) / (total - warmup), as linear: 0 at total_steps, also when
        # total_steps == warmup_steps, so power=1.0 is exactly linear.
        remaining = (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)
        return (1.0 - self.min_factor) * remaining**self.power + self.min_factor


@dataclass(frozen=True, slots=True)
class inverse_sqrt:  # noqa: N801
    """Linear warmup, then decay as `1 / sqrt(step / timescale)` (Transformer-style).

    `timescale` defaults to `warmup_steps` (or 10,000 without warmup), so the factor is
    continuous at the end of warmup.
    """

    warmup_steps: int = 0
    timescale: int | None = None

    def __post_init__(self) -> None:
        _check_steps("inverse_sqrt", warmup_steps=self.warmup_steps)
        if self.timescale is not None:
            _check_steps("inverse_sqrt", timescale=self.timescale)
            if self.timescale == 0:  # `timescale or ...` below would silently replace it
                raise ValueError("inverse_sqrt(timescale=0): must be an int >= 1, or None.")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        timescale = self.timescale or self.warmup_steps or 10_000
        shift = timescale - self.warmup_steps
        return 1.0 / math.sqrt((step + shift) / timescale)


def as_schedule(schedule: Schedule | LRScheduler | None, optimizer: torch.optim.Optimizer) -> Any:
    """Check a schedule argument and return what the TrainState stores.

    Raises:
        ValueError: an LRScheduler bound to another optimizer, or a schedule whose value at
            step 0 is not a finite number >= 0.
        TypeError: anything that is not None, a callable or an LRScheduler.
    """
    if schedule is None:
        return constant()
    if isinstance(schedule, LRScheduler):
        if schedule.optimizer is not optimizer:
            raise ValueError(
                f"schedule={type(schedule).__name__}: this LRScheduler drives another "
                "optimizer than the training state's. Build it on the same optimizer, or pass "
                "a pure schedule such as loopkit.schedules.cosine(warmup_steps, total_steps)."
            )
        return schedule
    if not callable(schedule):
        raise TypeError(
            f"schedule={schedule!r}: expected a function of the step returning an lr factor "
            "(e.g. loopkit.schedules.cosine(100, 1000)), a torch LRScheduler, or None."
        )
    first = schedule(0)
    if not (isinstance(first, numbers.Real) and math.isfinite(first) and first >= 0):
        raise ValueError(
            f"schedule={schedule!r}: schedule(0) returned {first!r}; a schedule must return "
            "an lr factor, a finite float >= 0 (1.0 = the optimizer's lr)."
        )
    return schedule


__all__ = [
    "LRScheduler",
    "as_schedule",
    "constant",
    "cosine",
    "cosine_with_restarts",
    "inverse_sqrt",
    "linear",
    "polynomial",
]
