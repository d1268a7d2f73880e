"""The bridge from fit()'s events to the HF-style callbacks and the Trainer's flow.

fit() runs the loop; the Trainer adds two loopkit callbacks (and the `notify` transforms
of the step chain, see steps.py):

- `Bridge` turns fit's events into HF events, runs HF's log / evaluate / save flow after
  each step and epoch, and asks fit to save (or to end the epoch) with
  `loopkit.callbacks.Request`;
- `StopWhenAsked` (the callback after it) returns the Stop the Bridge decided on, in the
  same event as the Bridge's Request, so that fit saves first and then stops.

The bridge sees the Trainer only through `TrainerHost`, the few members it reads and
writes; the Trainer implements it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from ..callbacks import Request, Stop
from ..checkpoint import step_dir_name
from ..metrics import accumulator_dtype
from ..state import TrainState
from .args import TrainingArguments
from .callbacks import CallbackHandler, TrainerControl, TrainerState
from .checkpoints import rotate_like_hf, update_best_checkpoint, update_best_metric
from .steps import RunLength


class TrainerHost(Protocol):
    """What the bridge needs of the Trainer: its HF-side state, logging and evaluation.

    Attributes:
        args: the run's TrainingArguments (read).
        state: the TrainerState; the bridge updates it, and replaces it on resume.
        control: the TrainerControl the callbacks steer with; replaced by each event.
        callback_handler: the HF callbacks, called in order.
    """

    args: TrainingArguments
    state: TrainerState
    control: TrainerControl
    callback_handler: CallbackHandler

    def log(self, logs: dict[str, float]) -> None:
        """Record `logs` in state.log_history and call on_log."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Evaluate on the eval dataset; log the metrics, call on_evaluate, return them."""
        ...

    def attach_train_state(self, state: TrainState) -> None:
        """Use fit's live record from now on (evaluation's model; the callbacks' kwargs)."""
        ...


class StopWhenAsked:
    """Return the Bridge's pending Stop (after the Bridge's own hook ran in the same event)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def on_fit_start(self, state: TrainState, hparams: Any) -> Stop | None:
        return self.bridge.take_stop()

    def on_epoch_end(self, state: TrainState) -> Stop | None:
        return self.bridge.take_stop()

    def __repr__(self) -> str:
        return "StopWhenAsked()"


class Bridge:
    """fit() events -> HF events and HF's log/evaluate/save flow (see the module docstring).

    Args:
        host: the Trainer.
        run: the run's length (steps, epochs, batches per epoch, accumulation).
    """

    def __init__(self, host: TrainerHost, run: RunLength) -> None:
        self.host = host
        self.max_steps = run.max_steps
        self.num_train_epochs = run.epochs or 0
        self.batches_per_epoch = run.batches_per_epoch
        self.accumulation = run.accumulation
        self.windows_per_epoch = (
            None
            if run.batches_per_epoch is None
            else math.ceil(run.batches_per_epoch / run.accumulation)
        )
        self.loss_since_log: Any = 0.0  # device tensor between logs (no per-step sync)
        self.loss_total = 0.0  # host float: the losses of every logged step
        self.last_logged = 0
        self.steps_in_epoch = 0
        self.saved_step = -1  # the step of the newest checkpoint this run wrote or resumed
        self.resumed = False
        self._keep_epoch_counters = False
        self._stop: Stop | None = None

    # -- helpers -----------------------------------------------------------------------

    @property
    def args(self) -> TrainingArguments:
        return self.host.args

    def fire(self, event: str, **kwargs: Any) -> None:
        """Call HF `event` on the Trainer's callbacks; keep the control they return."""
        host = self.host
        host.control = host.callback_handler.call(
            event, host.args, host.state, host.control, **kwargs
        )

    def take_stop(self) -> Stop | None:
        stop, self._stop = self._stop, None
        return stop

    def _epoch_fraction(self) -> float:
        if self.batches_per_epoch is None:  # no length: HF counts max_steps windows per epoch
            return self.steps_in_epoch / max(1, self.max_steps)
        done = min(self.steps_in_epoch * self.accumulation, self.batches_per_epoch)
        return done / self.batches_per_epoch

    def _at_last_window(self) -> bool:
        return self.windows_per_epoch is not None and self.steps_in_epoch >= self.windows_per_epoch

    # -- fit events --------------------------------------------------------------------

    def on_fit_start(self, state: TrainState, hparams: Any) -> None:
        self.host.attach_train_state(state)
        ts, args = self.host.state, self.args
        if not self.resumed:
            ts.epoch, ts.global_step = 0.0, 0
        ts.max_steps = self.max_steps
        ts.num_train_epochs = self.num_train_epochs
        ts.train_batch_size = args.per_device_train_batch_size
        ts.compute_steps(args, self.max_steps)
        ts.is_world_process_zero = state.strategy.is_main
        ts.is_local_process_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
        self.fire("on_train_begin")
        if ts.global_step >= self.max_steps:  # a finished run resumed: nothing to train
            self._stop = Stop(f"max_steps ({self.max_steps}) reached")

    def on_epoch_start(self, state: TrainState) -> None:
        self.host.attach_train_state(state)
        if self._keep_epoch_counters:  # resumed inside (or at the end of) an epoch
            self._keep_epoch_counters = False
        else:
            self.steps_in_epoch = 0
        self.fire("on_epoch_begin")

    def on_step_end(self, state: TrainState) -> Request | None:
        self.host.attach_train_state(state)
        ts = self.host.state
        loss = state.metrics["train/loss"]
        if isinstance(loss, torch.Tensor):  # stays on device until a log step
            loss = loss.detach().to(accumulator_dtype(loss.device))
        self.loss_since_log = self.loss_since_log + loss
        self.steps_in_epoch += 1
        ts.global_step = state.step
        ts.epoch = state.epoch + self._epoch_fraction()
        self.fire("on_step_end")
        return self._flow(state, at_epoch_end=False)

    def on_epoch_end(self, state: TrainState) -> Request | None:
        self.host.attach_train_state(state)
        self.fire("on_epoch_end")
        request = self._flow(state, at_epoch_end=True)
        self.steps_in_epoch = 0
        return request

    def on_checkpoint_saved(self, state: TrainState, path: str) -> None:
        self.host.attach_train_state(state)
        self.saved_step = state.step
        self._after_save(Path(path))

    def on_fit_end(self, state: TrainState) -> None:
        self.host.attach_train_state(state)

    # -- HF's _maybe_log_save_evaluate -------------------------------------------------

    def _flow(self, state: TrainState, *, at_epoch_end: bool) -> Request | None:
        host = self.host
        if host.control.should_log and host.state.global_step > self.last_logged:
            self._log(state)
        if host.control.should_evaluate:
            metrics = host.evaluate()
            new_best = update_best_metric(self.args, host.state, metrics)
            if self.args.save_strategy == "best":
                host.control.should_save = new_best
        request = Request()
        if host.control.should_save:
            update_best_checkpoint(self.args, host.state, host.state.global_step)
            if state.step == self.saved_step:
                # This step is on disk already (a step save right before this epoch end, or
                # the checkpoint resumed from): fit writes it once; HF's events still run.
                self._after_save(Path(str(self.args.output_dir)) / step_dir_name(state.step))
            else:
                request = request | Request(save=True)
        control = host.control
        if at_epoch_end:
            if control.should_training_stop:
                self._stop = Stop(f"should_training_stop at step {state.step}")
        elif (
            control.should_training_stop or control.should_epoch_stop
        ) and not self._at_last_window():
            # HF ends the epoch here and runs its epoch-end events; stopping follows there.
            request = request | Request(end_epoch=True)
        return None if request == Request() else request

    def _log(self, state: TrainState) -> None:
        ts = self.host.state
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
        self.host.log(logs)

    def _after_save(self, path: Path) -> None:
        ts = self.host.state
        if ts.is_world_process_zero:
            rotate_like_hf(self.args, ts)
            if path.is_dir():
                ts.save_to_json(path / "trainer_state.json")
        self.fire("on_save")

    # -- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the HF side needs to resume exactly; JSON-able (fit saves it)."""
        host = self.host
        return {
            "trainer_state": _plain(host.state.to_dict()),
            "control": _plain(host.control.state()["args"]),
            "callbacks": _callback_states(host.callback_handler.callbacks),
            "loss_since_log": float(self.loss_since_log),  # host sync: at saves only
            "loss_total": self.loss_total,
            "last_logged": self.last_logged,
            "steps_in_epoch": self.steps_in_epoch,
            "saved_step": host.state.global_step,  # this state is saved at this step
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        host = self.host
        host.state = TrainerState(**saved["trainer_state"])
        host.control = TrainerControl(**saved["control"])
        _load_callback_states(host.callback_handler.callbacks, saved["callbacks"])
        self.loss_since_log = float(saved["loss_since_log"])
        self.loss_total = float(saved["loss_total"])
        self.last_logged = int(saved["last_logged"])
        self.steps_in_epoch = int(saved["steps_in_epoch"])
        self.saved_step = int(saved["saved_step"])
        self.resumed = True
        self._keep_epoch_counters = True

    def unlogged_loss(self, state: TrainState) -> float:
        """The loss of every step since the last log, summed over ranks (one host sync)."""
        unlogged = self.loss_since_log
        if isinstance(unlogged, torch.Tensor):  # this rank's share: sum over ranks
            unlogged = state.strategy.reduce_metrics({"train/loss": unlogged})["train/loss"]
        return float(unlogged)

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


__all__ = ["Bridge", "StopWhenAsked", "TrainerHost"]
