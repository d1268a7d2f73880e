"""What the Trainer reports besides its callbacks: speed metrics and TensorBoard scalars."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..logging import TensorBoardLogger
from ..strategies import Strategy
from .args import TrainingArguments


def speed_metrics(
    prefix: str,
    start: float,
    num_samples: float | None = None,
    num_steps: int | None = None,
    num_tokens: int | None = None,
) -> dict[str, float]:
    """HF's `<prefix>_runtime`, `_samples_per_second`, `_steps_per_second`,
    `_tokens_per_second` since `start`."""
    runtime = time.time() - start
    result = {f"{prefix}_runtime": round(runtime, 4)}
    if runtime > 0:
        for unit, count in (("samples", num_samples), ("steps", num_steps), ("tokens", num_tokens)):
            if count is not None:
                result[f"{prefix}_{unit}_per_second"] = round(count / runtime, 3)
    return result


@dataclass(frozen=True, slots=True)
class LogView:
    """What a loopkit logger reads of a TrainState when the Trainer logs."""

    step: int
    epoch: int
    strategy: Strategy


def loopkit_keys(logs: Mapping[str, Any]) -> dict[str, float]:
    """HF's log keys as loopkit's: eval_x -> eval/x, test_x -> test/x, else train/x.

    Only numbers are kept (not "epoch"); a dict with any eval_ (or test_) key is renamed
    as a whole under that group.
    """
    numbers = {
        k: float(v)
        for k, v in logs.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
    }
    for prefix in ("eval", "test"):
        if any(k.startswith(f"{prefix}_") for k in numbers):
            return {f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in numbers.items()}
    return {f"train/{k}": v for k, v in numbers.items()}


class Reporters:
    """loopkit loggers fed with the Trainer's logs: TensorBoard with report_to, main rank."""

    def __init__(self, args: TrainingArguments, strategy: Strategy) -> None:
        self.strategy = strategy
        self.loggers = (
            [TensorBoardLogger(str(args.logging_dir))]
            if "tensorboard" in args.report_targets and strategy.is_main
            else []
        )

    def log(self, logs: Mapping[str, Any], *, step: int, epoch: float | None) -> None:
        """Write `logs` (HF's keys) at `step`."""
        if not self.loggers:
            return
        view = LogView(step=step, epoch=int(epoch or 0), strategy=self.strategy)
        scalars = loopkit_keys(logs)
        for logger in self.loggers:
            logger.on_log(view, scalars)

    def close(self) -> None:
        """Flush and close the loggers (end of train())."""
        for logger in self.loggers:
            logger.on_fit_end(None)


__all__ = ["LogView", "Reporters", "loopkit_keys", "speed_metrics"]
