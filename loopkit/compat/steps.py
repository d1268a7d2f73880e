"""The Trainer's step chain and run length: loopkit's public transforms, with HF's windows.

    notify("on_step_begin") -> observe_inputs -> forward(loss)
    -> accumulate(k, HF's short last window)
    -> notify("on_substep_end") -> clip(max_grad_norm) or grad_norm()
    -> notify("on_pre_optimizer_step")
    -> optimizer_step() -> notify("on_optimizer_step")

`notify` transforms fire an HF callback event when they apply, and `observe_inputs` hands
each micro-batch (as the loader made it, before it moves to the device) to the Trainer,
which counts its FLOPs and input tokens as HF does; both read the record and return it as
is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .._types import LossFn, Transform
from ..compose import chain, when
from ..state import TrainState
from ..transforms import accumulate, clip, forward, optimizer_step
from .args import TrainingArguments
from .inputs import batches_per_epoch

StepEvent = Literal["on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step"]
"""The HF events fired from inside the step chain."""


class EventSink(Protocol):
    """Whatever fires HF events on the Trainer's callbacks (the bridge)."""

    def fire(self, event: str, **kwargs: Any) -> None: ...

    def on_inputs(self, batch: Any) -> None:
        """See one micro-batch before its forward (FLOPs, input tokens)."""
        ...


@dataclass(frozen=True, slots=True, eq=False)
class _Notify:
    sink: EventSink
    event: StepEvent

    def __call__(self, state: TrainState, batch: Any, /) -> TrainState:
        window = state.window
        if self.event == "on_step_begin":
            fire = state.micro_step == 0 and not window.closed  # a window's first micro-batch
        elif self.event == "on_substep_end":
            fire = state.micro_step > 0 and not window.closed  # inside a window, not its last
        elif self.event == "on_pre_optimizer_step":
            fire = window.closed  # after clip, before optimizer_step
        else:  # on_optimizer_step: right after optimizer_step applied a window
            fire = state.micro_step == 0 and not window.closed
        if fire:
            self.sink.fire(self.event)
        return state  # observes only: the record is not consumed

    def __repr__(self) -> str:
        return f"notify({self.event!r})"


def notify(sink: EventSink, event: StepEvent) -> Transform:
    """A transform that calls the HF `event` on the Trainer's callbacks when it applies."""
    return _Notify(sink, event)


@dataclass(frozen=True, slots=True, eq=False)
class _ObserveInputs:
    sink: EventSink

    def __call__(self, state: TrainState, batch: Any, /) -> TrainState:
        self.sink.on_inputs(batch)
        return state  # observes only: the record is not consumed

    def __repr__(self) -> str:
        return "observe_inputs()"


@dataclass(frozen=True, slots=True)
class _GradNorm:
    def __call__(self, state: TrainState, batch: Any, /) -> TrainState:
        if not state.window.closed:
            return state
        # HF logs the norm without clipping too: an infinite bound scales by 1.
        norm = state.strategy.clip_grad_norm_(state.params, math.inf, 2.0)
        return state.replace(metrics={**state.metrics, "train/grad_norm": norm})

    def __repr__(self) -> str:
        return "grad_norm()"


def grad_norm() -> Transform:
    """At a window's close, record the global gradient norm as "train/grad_norm", unclipped.

    HF's Trainer logs grad_norm when max_grad_norm is 0 too; this is `clip` with no bound.
    Cost: one pass over the gradients per optimizer step, as clipping.
    """
    return _GradNorm()


def observe_inputs(sink: EventSink) -> Transform:
    """A transform that shows each micro-batch to `sink.on_inputs` (FLOPs, input tokens)."""
    return _ObserveInputs(sink)


@dataclass(frozen=True, slots=True)
class LastWindowOfEpoch:
    """Predicate: is this optimizer step the last (short) one of its epoch?

    HF closes an epoch's last window early when the epoch's micro-batches are not a multiple
    of gradient_accumulation_steps; with `windows_per_epoch` windows per epoch that is step
    number windows_per_epoch - 1 (mod windows_per_epoch).
    """

    windows_per_epoch: int
    is_last: bool

    def __call__(self, state: TrainState) -> bool:
        last = state.step % self.windows_per_epoch == self.windows_per_epoch - 1
        return last == self.is_last

    def __repr__(self) -> str:
        kind = "last" if self.is_last else "not_last"
        return f"{kind}_window_of({self.windows_per_epoch})"


def hf_window(k: int, batches_per_epoch: int | None) -> Transform:
    """accumulate(k), with HF's short last window of an epoch when k does not divide it."""
    if batches_per_epoch is None or batches_per_epoch % k == 0:
        return accumulate(k)
    windows = math.ceil(batches_per_epoch / k)
    last = batches_per_epoch - (windows - 1) * k
    return chain(
        when(LastWindowOfEpoch(windows, True), accumulate(last)),
        when(LastWindowOfEpoch(windows, False), accumulate(k)),
    )


@dataclass(frozen=True, slots=True)
class RunLength:
    """How long train() runs, by HF's rules.

    Attributes:
        batches_per_epoch: the train loader's batches per epoch (None: no length).
        accumulation: micro-batches per optimizer step (gradient_accumulation_steps).
        max_steps: optimizer steps in the run.
        epochs: epochs fit runs (None: no length, fit stops at max_steps itself).
    """

    batches_per_epoch: int | None
    accumulation: int
    max_steps: int
    epochs: int | None


def run_length(args: TrainingArguments, loader: Any) -> RunLength:
    """max_steps, else ceil(num_train_epochs * ceil(batches_per_epoch / k)) steps (HF).

    Raises:
        ValueError: max_steps is not set and the loader has no length.
    """
    batches = batches_per_epoch(loader)
    k = args.gradient_accumulation_steps
    if args.max_steps > 0:
        windows = None if batches is None else math.ceil(batches / k)
        epochs = None if windows is None else math.ceil(args.max_steps / windows)
        return RunLength(batches, k, args.max_steps, epochs)
    if batches is None:
        raise ValueError(
            "TrainingArguments(max_steps=-1): the train dataset has no length, so "
            "epochs cannot be counted; set max_steps."
        )
    max_steps = math.ceil(args.num_train_epochs * math.ceil(batches / k))
    return RunLength(batches, k, max_steps, math.ceil(args.num_train_epochs))


def train_samples(args: TrainingArguments, dataset: Any, run: RunLength, world_size: int) -> int:
    """Samples the run trains on, as HF counts them for train_samples_per_second."""
    if args.max_steps > 0 or not hasattr(dataset, "__len__"):
        batch = args.per_device_train_batch_size * run.accumulation * world_size
        return run.max_steps * batch
    return int(len(dataset) * args.num_train_epochs)


def train_step(
    sink: EventSink, loss_fn: LossFn, run: RunLength, max_grad_norm: float | None
) -> Transform:
    """The Trainer's step chain (see the module docstring); no clipping for 0 or None (the
    norm is still recorded, as HF logs it)."""
    return chain(
        notify(sink, "on_step_begin"),
        observe_inputs(sink),
        forward(loss_fn),
        hf_window(run.accumulation, run.batches_per_epoch),
        notify(sink, "on_substep_end"),
        clip(max_grad_norm) if max_grad_norm else grad_norm(),
        notify(sink, "on_pre_optimizer_step"),
        optimizer_step(),
        notify(sink, "on_optimizer_step"),
    )


__all__ = [
    "EventSink",
    "LastWindowOfEpoch",
    "RunLength",
    "StepEvent",
    "hf_window",
    "grad_norm",
    "notify",
    "observe_inputs",
    "run_length",
    "train_samples",
    "train_step",
]
