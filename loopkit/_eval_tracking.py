"""fit()'s evaluations: running one with fit's settings, and the best result so far."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .averaging import Weights
from .callbacks import Mode, improved
from .evaluate import evaluate
from .metrics import Metric
from .state import TrainState


@dataclass(frozen=True)
class Evaluator:
    """`evaluate(state, data, metrics, ...)` with the settings fit() was given.

    Attributes:
        data: the eval batches (fit's eval loader).
        metrics: name -> metric, as evaluate() takes them.
        loss_fn: fit's loss_fn (None: metrics only).
        predict: fit's predict (None: the outputs the model returned inside loss_fn).
        max_batches: fit's eval_batches (None: all of them).
        weights: fit's eval_weights: the model's weights or an average of them ("ema").
    """

    data: Iterable[Any]
    metrics: dict[str, Metric]
    loss_fn: Any
    predict: Any
    max_batches: int | None
    weights: Weights = "model"

    def __call__(self, state: TrainState) -> dict[str, float]:
        """Evaluate the model of `state`; return the host floats ("eval/loss", ...)."""
        return evaluate(
            state,
            self.data,
            self.metrics,
            loss_fn=self.loss_fn,
            predict=self.predict,
            max_batches=self.max_batches,
            weights=self.weights,
        )


class EvalTracker:
    """When fit() last evaluated, and its best evaluation by `monitor`.

    Args:
        monitor: the eval metric that ranks evaluations, e.g. "eval/loss".
        mode: "min" or "max"; whether an evaluation is better is decided by `improved`.
        best: the best evaluation so far ({"step": ..., "eval/...": ...}), or None.
        evaluated_at: the step of the last evaluation (-1: none yet).
    """

    def __init__(
        self,
        monitor: str,
        mode: Mode,
        *,
        best: dict[str, float] | None = None,
        evaluated_at: int = -1,
    ) -> None:
        self.monitor = monitor
        self.mode = mode
        self.best = best
        self.evaluated_at = evaluated_at

    @property
    def best_step(self) -> int | None:
        """The step of the best evaluation, or None before the first."""
        return None if self.best is None else int(self.best["step"])

    def record(self, step: int, values: Mapping[str, float]) -> bool:
        """Note the evaluation at `step`; return whether it is the new best.

        An evaluation without the monitored metric is noted but never the best.
        """
        self.evaluated_at = step
        if self.monitor not in values:
            return False
        best = None if self.best is None else self.best[self.monitor]
        if not improved(values[self.monitor], best, self.mode):
            return False
        self.best = {"step": step, **values}
        return True


__all__ = ["EvalTracker", "Evaluator"]
