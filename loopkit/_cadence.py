"""fit()'s cadence: when to log, evaluate and save, from its settings and callbacks' Requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .callbacks import Request
from .config import FitConfig


@dataclass(frozen=True, slots=True)
class Plan:
    """What fit() does after an optimizer step or at an epoch end, in this order.

    Attributes:
        log: write a log record (`on_log`).
        evaluate: evaluate (`on_eval_end`).
        save: save a checkpoint (`on_checkpoint_saved`).
        save_if_improved: save a checkpoint if this evaluation is the new best.
    """

    log: bool = False
    evaluate: bool = False
    save: bool = False
    save_if_improved: bool = False


_NOTHING = Plan()  # frozen: one shared instance for the usual step with nothing to do
_NO_REQUEST = Request()  # frozen: one shared instance for the usual step with no requests


@dataclass(frozen=True, slots=True)
class Cadence:
    """fit()'s schedule for logging, evaluation and checkpoints; Requests add to it.

    Attributes:
        log_every: log every this many optimizer steps (None: on request only).
        eval_every: evaluate every this many steps (None: at each epoch end, with eval data).
        save_every: save every this many steps (None: not by step count).
        save_on_epoch_end: save at each epoch end (at a closed window).
        keep_best: save when an evaluation is the new best.
        has_eval: fit has eval_data.
        has_checkpoints: fit has a checkpoint_dir.
    """

    log_every: int | None
    eval_every: int | None
    save_every: int | None
    save_on_epoch_end: bool
    keep_best: bool
    has_eval: bool
    has_checkpoints: bool

    @classmethod
    def of(cls, config: FitConfig, *, has_eval: bool) -> Cadence:
        """The cadence a FitConfig sets."""
        return cls(
            log_every=config.log_every,
            eval_every=config.eval_every,
            save_every=config.save_every,
            save_on_epoch_end=config.save_on_epoch_end,
            keep_best=config.keep_best,
            has_eval=has_eval,
            has_checkpoints=config.checkpoint_dir is not None,
        )

    def merge(self, requests: Sequence[Request]) -> Request:
        """The callbacks' requests as one.

        Raises:
            ValueError: a request asks for something fit cannot do (evaluate without
                eval_data, save without checkpoint_dir).
        """
        if not requests:
            return _NO_REQUEST
        request = Request()
        for each in requests:
            request = request | each
        if request.evaluate and not self.has_eval:
            raise ValueError(
                "fit: a callback returned Request(evaluate=True) but fit has no eval_data; "
                "pass eval_data=..."
            )
        if request.save and not self.has_checkpoints:
            raise ValueError(
                "fit: a callback returned Request(save=True) but fit has no checkpoint_dir; "
                "pass checkpoint_dir=..."
            )
        return request

    def after_step(self, step: int, request: Request) -> Plan:
        """What to do after the optimizer step that reached `step`."""
        log = bool(self.log_every and step % self.log_every == 0) or request.log
        evaluate = bool(self.eval_every and step % self.eval_every == 0) or request.evaluate
        save = self.has_checkpoints and (
            bool(self.save_every and step % self.save_every == 0) or request.save
        )
        if not (log or evaluate or save):
            return _NOTHING
        return Plan(log, evaluate, save, self.has_checkpoints and self.keep_best)

    def at_epoch_end(self, window_closed: bool, request: Request) -> Plan:
        """What to do at an epoch end; `window_closed`: no micro-batch awaits its step.

        Scheduled saves need a closed window; a requested one is attempted regardless (an
        open window makes save_checkpoint raise, naming the fix).
        """
        scheduled_save = self.has_checkpoints and window_closed
        return Plan(
            log=request.log,
            evaluate=(self.has_eval and not self.eval_every) or request.evaluate,
            save=(scheduled_save and self.save_on_epoch_end) or request.save,
            save_if_improved=scheduled_save and self.keep_best,
        )


__all__ = ["Cadence", "Plan"]
