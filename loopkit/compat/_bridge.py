"""The bridge from fit()'s events to the HF-style callbacks and the Trainer's flow.

fit() runs the loop; the Trainer adds two loopkit callbacks and a few observer transforms:

- `Bridge` (a loopkit callback) turns fit's events into HF events, runs HF's
  log / evaluate / save flow after each step and epoch, and asks fit to save (or to end
  the epoch) with `loopkit.callbacks.Request`;
- `StopWhenAsked` (the callback after it) returns the Stop the Bridge decided on, in the
  same event as the Bridge's Request, so that fit saves first and then stops;
- `notify(...)` transforms inside the step chain fire on_step_begin, on_substep_end,
  on_pre_optimizer_step and on_optimizer_step; they read the record and return it as is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..callbacks import Request, Stop
from ..checkpoint import list_checkpoints, rotate_checkpoints, step_dir_name
from ..metrics import accumulator_dtype
from ..state import TrainState


@dataclass(frozen=True, slots=True, eq=False)
class _Notify:
    bridge: Any
    event: str

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
            self.bridge.fire(self.event)
        return state  # observes only: the record is not consumed

    def __repr__(self) -> str:
        return f"notify({self.event!r})"


def notify(bridge: Any, event: str) -> _Notify:
    """A transform that calls the HF `event` on the Trainer's callbacks when it applies."""
    return _Notify(bridge, event)


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


class StopWhenAsked:
    """Return the Bridge's pending Stop (after the Bridge's own hook ran in the same event)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def on_fit_start(self, state: Any, hparams: Any) -> Stop | None:
        return self.bridge.take_stop()

    def on_epoch_end(self, state: Any) -> Stop | None:
        return self.bridge.take_stop()

    def __repr__(self) -> str:
        return "StopWhenAsked()"


class Bridge:
    """fit() events -> HF events and HF's log/evaluate/save flow (see the module docstring)."""

    def __init__(
        self,
        trainer: Any,
        *,
        max_steps: int,
        num_train_epochs: int,
        batches_per_epoch: int | None,
        accumulation: int,
    ) -> None:
        self.trainer = trainer
        self.max_steps = max_steps
        self.num_train_epochs = num_train_epochs
        self.batches_per_epoch = batches_per_epoch
        self.accumulation = accumulation
        self.windows_per_epoch = (
            None if batches_per_epoch is None else math.ceil(batches_per_epoch / accumulation)
        )
        self.loss_since_log: Any = 0.0  # device tensor between logs (no per-step sync)
        self.loss_total = 0.0  # host float: the losses of every logged step
        self.last_logged = 0
        self.steps_in_epoch = 0
        self.saved_step = -1  # the step of the newest checkpoint this run wrote or resumed
        self.live: TrainState | None = None
        self.resumed = False
        self._keep_epoch_counters = False
        self._stop: Stop | None = None

    # -- helpers -----------------------------------------------------------------------

    @property
    def args(self) -> Any:
        return self.trainer.args

    def fire(self, event: str, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer.control = trainer.callback_handler.call(
            event, trainer.args, trainer.state, trainer.control, **kwargs
        )

    def take_stop(self) -> Stop | None:
        stop, self._stop = self._stop, None
        return stop

    def _epoch_fraction(self, state: TrainState) -> float:
        if self.batches_per_epoch is None:  # no length: HF counts max_steps windows per epoch
            return self.steps_in_epoch / max(1, self.max_steps)
        done = min(self.steps_in_epoch * self.accumulation, self.batches_per_epoch)
        return done / self.batches_per_epoch

    def _at_last_window(self) -> bool:
        return self.windows_per_epoch is not None and self.steps_in_epoch >= self.windows_per_epoch

    def _see(self, state: TrainState) -> None:
        self.live = state
        self.trainer._live_state = state

    # -- fit events --------------------------------------------------------------------

    def on_fit_start(self, state: TrainState, hparams: Any) -> None:
        self._see(state)
        trainer, ts = self.trainer, self.trainer.state
        trainer._share(state)
        if not self.resumed:
            ts.epoch, ts.global_step = 0.0, 0
        ts.max_steps = self.max_steps
        ts.num_train_epochs = self.num_train_epochs
        ts.train_batch_size = self.args.per_device_train_batch_size
        ts.compute_steps(self.args, self.max_steps)
        ts.is_world_process_zero = int(getattr(state.strategy, "rank", 0)) == 0
        ts.is_local_process_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
        self.fire("on_train_begin")
        if ts.global_step >= self.max_steps:  # a finished run resumed: nothing to train
            self._stop = Stop(f"max_steps ({self.max_steps}) reached")

    def on_epoch_start(self, state: TrainState) -> None:
        self._see(state)
        if self._keep_epoch_counters:  # resumed inside (or at the end of) an epoch
            self._keep_epoch_counters = False
        else:
            self.steps_in_epoch = 0
        self.fire("on_epoch_begin")

    def on_step_end(self, state: TrainState) -> Request | None:
        self._see(state)
        ts, metrics = self.trainer.state, state.metrics
        loss = metrics["train/loss"]
        if isinstance(loss, torch.Tensor):  # stays on device until a log step
            loss = loss.detach().to(accumulator_dtype(loss.device))
        self.loss_since_log = self.loss_since_log + loss
        self.steps_in_epoch += 1
        ts.global_step = state.step
        ts.epoch = state.epoch + self._epoch_fraction(state)
        self.fire("on_step_end")
        return self._flow(state, at_epoch_end=False)

    def on_epoch_end(self, state: TrainState) -> Request | None:
        self._see(state)
        self.fire("on_epoch_end")
        request = self._flow(state, at_epoch_end=True)
        self.steps_in_epoch = 0
        return request

    def on_checkpoint_saved(self, state: TrainState, path: str) -> None:
        self._see(state)
        self.saved_step = state.step
        self._after_save(state, Path(path))

    def on_fit_end(self, state: TrainState) -> None:
        self._see(state)

    # -- HF's _maybe_log_save_evaluate -------------------------------------------------

    def _flow(self, state: TrainState, *, at_epoch_end: bool) -> Request | None:
        trainer, ts = self.trainer, self.trainer.state
        if trainer.control.should_log and ts.global_step > self.last_logged:
            # Each rank holds its share of the loss (its items / the global count): the
            # global value is their sum. host sync: at log steps only.
            shares = state.strategy.reduce_metrics({"train/loss": self.loss_since_log})
            loss = float(shares["train/loss"])
            self.loss_since_log = 0.0
            logs: dict[str, float] = {"loss": round(loss / (ts.global_step - self.last_logged), 4)}
            norm = state.metrics.get("train/grad_norm")
            if norm is not None:
                logs["grad_norm"] = float(norm)
            logs["learning_rate"] = float(state.metrics.get("train/lr", 0.0))
            self.loss_total += loss
            self.last_logged = ts.global_step
            trainer.log(logs)
        if trainer.control.should_evaluate:
            metrics = trainer.evaluate()
            new_best = trainer._determine_best_metric(metrics)
            if self.args.save_strategy == "best":
                trainer.control.should_save = new_best
        request = Request()
        if trainer.control.should_save:
            trainer._update_best_checkpoint(ts.global_step)
            if state.step == self.saved_step:
                # This step is on disk already (a step save right before this epoch end, or
                # the checkpoint resumed from): fit writes it once; HF's events still run.
                self._after_save(state, Path(self.args.output_dir) / step_dir_name(state.step))
            else:
                request = request | Request(save=True)
        control = trainer.control
        if at_epoch_end:
            if control.should_training_stop:
                self._stop = Stop(f"should_training_stop at step {state.step}")
        elif (
            control.should_training_stop or control.should_epoch_stop
        ) and not self._at_last_window():
            # HF ends the epoch here and runs its epoch-end events; stopping follows there.
            request = request | Request(end_epoch=True)
        return None if request == Request() else request

    def _after_save(self, state: TrainState, path: Path) -> None:
        trainer = self.trainer
        if trainer.state.is_world_process_zero:
            trainer._rotate_checkpoints()
            if path.is_dir():
                trainer.state.save_to_json(path / "trainer_state.json")
        self.fire("on_save")

    # -- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the HF side needs to resume exactly; JSON-able (fit saves it)."""
        trainer = self.trainer
        return {
            "trainer_state": _plain(trainer.state.to_dict()),
            "control": _plain(trainer.control.state()["args"]),
            "callbacks": _callback_states(trainer.callback_handler.callbacks),
            "loss_since_log": float(self.loss_since_log),  # host sync: at saves only
            "loss_total": self.loss_total,
            "last_logged": self.last_logged,
            "steps_in_epoch": self.steps_in_epoch,
            "saved_step": trainer.state.global_step,  # this state is saved at this step
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        from .callbacks import TrainerControl, TrainerState

        trainer = self.trainer
        trainer.state = TrainerState(**saved["trainer_state"])
        trainer.control = TrainerControl(**saved["control"])
        _load_callback_states(trainer.callback_handler.callbacks, saved["callbacks"])
        self.loss_since_log = float(saved["loss_since_log"])
        self.loss_total = float(saved["loss_total"])
        self.last_logged = int(saved["last_logged"])
        self.steps_in_epoch = int(saved["steps_in_epoch"])
        self.saved_step = int(saved["saved_step"])
        self.resumed = True
        self._keep_epoch_counters = True

    def __repr__(self) -> str:
        return f"Bridge(max_steps={self.max_steps})"


def _plain(value: Any) -> Any:
    """Numbers as Python floats/ints (numpy scalars from compute_metrics included)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _callback_states(callbacks: list[Any]) -> list[Any]:
    """Per callback: loopkit-style state_dict(), else HF-style state(), else None."""
    states: list[Any] = []
    for callback in callbacks:
        if callable(getattr(callback, "state_dict", None)) and callable(
            getattr(callback, "load_state_dict", None)
        ):
            states.append({"state_dict": _plain(callback.state_dict())})
        elif callable(getattr(callback, "state", None)):
            states.append({"state": _plain(callback.state())})
        else:
            states.append(None)
    return states


def _load_callback_states(callbacks: list[Any], states: list[Any]) -> None:
    if len(states) != len(callbacks):
        raise ValueError(
            f"Trainer.train(resume_from_checkpoint=...): the checkpoint holds state for "
            f"{len(states)} callbacks, this Trainer has {len(callbacks)} "
            f"({[type(c).__name__ for c in callbacks]}); pass the same callbacks as the "
            "interrupted run."
        )
    for callback, saved in zip(callbacks, states, strict=True):
        if saved is None:
            continue
        if "state_dict" in saved:
            callback.load_state_dict(saved["state_dict"])
        else:
            for key, value in saved["state"].get("attributes", {}).items():
                setattr(callback, key, value)


def rotate_like_hf(output_dir: str, limit: int, best: str | None) -> None:
    """Keep `limit` checkpoints as HF's save_total_limit does, never deleting the best.

    HF keeps the newest `limit` checkpoints, except that the best one is always kept: then
    it keeps the best plus the newest limit - 1 others (with limit 1: the best and the
    newest, so that training can resume).
    """
    newest = {p.resolve() for p in list_checkpoints(output_dir)[:limit]}
    best_path = None if best is None else Path(best)
    if best_path is None or not best_path.is_dir() or best_path.resolve() in newest:
        rotate_checkpoints(output_dir, limit)
    else:
        rotate_checkpoints(output_dir, max(1, limit - 1), keep=[best_path])
