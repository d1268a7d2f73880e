"""Faults to plant in a run, for trying `loopkit diff` and `loopkit certify-resume` on purpose.

    loopkit fit examples/configs/spirals.toml --set log_dir=runs/a ... \
        --set 'callbacks=[{call="faults:Nudge", step=37, parameter="2.weight"}]'
    loopkit certify-resume examples/configs/spirals.toml \
        --set 'loss_fn={call="faults:counting_loss"}'

(docs/forensics.md shows what each gives.)
"""

from __future__ import annotations

from typing import Any

import torch

import loopkit as lk
from loopkit.run_config import import_object


class Nudge:
    """Adds `amount` to the first element of parameter `parameter` after optimizer step `step`.

    A callback that changes the record, which callbacks must not do: this one plants a fault
    between two steps, for `loopkit diff` to find.
    """

    def __init__(self, step: int, parameter: str, amount: float = 1e-3) -> None:
        self.step, self.parameter, self.amount = step, parameter, amount

    def on_step_end(self, state: Any) -> None:
        if state.step == self.step:
            with torch.no_grad():
                dict(state.model.named_parameters())[self.parameter].view(-1)[0] += self.amount

    def __repr__(self) -> str:
        return f"Nudge(step={self.step}, parameter={self.parameter!r}, amount={self.amount})"


def counting_loss(inner: str = "custom_loop:loss_fn") -> Any:
    """A loss that keeps state outside the record: a call counter in its closure.

    It scales the loss `inner` (an import path) by 1 + 1e-4 * calls, so a resumed run,
    whose counter starts again at 0, computes other losses than the run it continues:
    `loopkit certify-resume` finds the first step after the first interruption.
    """
    loss_fn = import_object(inner, where="counting_loss(inner)")
    calls = [0]

    def loss(model: torch.nn.Module, batch: Any) -> lk.Loss:
        calls[0] += 1
        value = loss_fn(model, batch)
        if isinstance(value, lk.Loss):
            return lk.Loss(value.sum * (1 + 1e-4 * calls[0]), value.count)
        return value * (1 + 1e-4 * calls[0])

    return loss
