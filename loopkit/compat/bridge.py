"""The bridge from fit()'s events to the HF-style callbacks and the Trainer's flow.

fit() runs the loop; the Trainer adds two loopkit callbacks (and the `notify` and
`observe_inputs` transforms of the step chain, see steps.py):

- `Bridge` turns fit's events into HF events, runs HF's log / evaluate / save flow after
  each step and epoch, asks fit to save (or to end the epoch) with
  `loopkit.callbacks.Request`, and gives each checkpoint fit writes HF's name and files;
- `StopWhenAsked` (the callback after it) returns the Stop the Bridge decided on, in the
  same event as the Bridge's Request, so that fit saves first and then stops.

What HF's loop does around the loss, the bridge does the same way: the logged loss is the
mean of the step losses since the last log, unrounded; with `logging_nan_inf_filter` a
non-finite step loss counts as the mean of the steps since the last log (on the device:
no per-step host sync) and training goes on; FLOPs and input tokens are counted per
micro-batch and summed over the ranks where HF sums them (at log steps and saves).

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
from ..metrics import accumulator_dtype
from ..state import TrainState
from .args import TrainingArguments
from .callbacks import CallbackHandler, TrainerControl, TrainerState
from .checkpoints import (
    checkpoint_name,
    publish,
    rotate_like_hf,
    update_best_checkpoint,
    update_best_metric,
    write_hf_files,
)
from .steps import RunLength


class TrainerHost(Protocol):
    """What the bridge needs of the Trainer: its HF-side state, logging and evaluation.

    Attributes:
        args: the run's TrainingArguments (read).
        state: the TrainerState; the bridge updates it, and replaces it on resume.
        control: the TrainerControl the callbacks steer with; replaced by each event.
        callback_handler: the HF callbacks, called in order.
        model: the model being trained (its config goes into each checkpoint).
    """

    args: TrainingArguments
    state: TrainerState
    control: TrainerControl
    callback_handler: CallbackHandler
    model: torch.nn.Module

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record `logs` in state.log_history and call on_log."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Evaluate on the eval dataset; log the metrics, call on_evaluate, return them."""
        ...

    def attach_train_state(self, state: TrainState) -> None:
        """Use fit's live record from now on (evaluation's model; the callbacks' kwargs)."""
        ...

    def floating_point_ops(self, inputs: Any) -> float:
        """HF's FLOPs of one forward + backward on `inputs` (0 when unknown)."""
        ...

    def input_tokens(self, inputs: Any) -> int | torch.Tensor | None:
        """The input tokens of `inputs` that include_num_input_tokens_seen counts (or None)."""
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
        start_time: when train() started (HF's token throughput in the logs).
    """

    def __init__(self, host: TrainerHost, run: RunLength, start_time: float | None = None) -> None:
        self.host = host
        self.start_time = start_time
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
        self.flos_since_store = 0.0  # this rank's FLOPs since they were last summed
        self.tokens_since_store: Any = 0  # this rank's input tokens since last summed
        self.world_size = 1
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

    # -- per micro-batch (observe_inputs) ----------------------------------------------

    def on_inputs(self, batch: Any) -> None:
        """Count one micro-batch's FLOPs and input tokens (HF does per micro-batch)."""
        self.flos_since_store += float(self.host.floating_point_ops(batch))
        tokens = self.host.input_tokens(batch)
        if tokens is not None:
            self.tokens_since_store = self.tokens_since_store + tokens
        if self.world_size == 1:
            self.store_counts(None)  # one process: HF's state moves every micro-batch

    def store_counts(self, state: TrainState | None) -> None:
        """Add the FLOPs and tokens counted since the last call to the TrainerState, summed
        over ranks (a collective with several: called at the same steps on every rank)."""
        flos, tokens = self.flos_since_store, self.tokens_since_store
        self.flos_since_store, self.tokens_since_store = 0.0, 0
        if state is not None and self.world_size > 1:
            packed = torch.tensor(
                [flos, float(tokens)], dtype=torch.float64, device=state.strategy.device
            )
            flos, tokens = torch.as_tensor(state.strategy.reduce_count(packed)).tolist()
        ts = self.host.state
        ts.total_flos += float(flos)
        if self.args.include_num_input_tokens_seen != "no":
            ts.num_input_tokens_seen += int(tokens)  # host sync (a device count): HF's too

    # -- fit events --------------------------------------------------------------------

    def on_fit_start(self, state: TrainState, hparams: Any) -> None:
        self.host.attach_train_state(state)
        self.world_size = state.strategy.world_size
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
        if args.eval_on_start and not self.resumed:
            self.host.evaluate()
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
        self._add_loss(state.metrics["train/loss"], state.step)
        self.steps_in_epoch += 1
        ts.global_step = state.step
        ts.epoch = state.epoch + self._epoch_fraction()
        steps = self.args.torch_empty_cache_steps
        if steps is not None and state.step % steps == 0:
            _empty_device_cache(state.strategy.device)
        self.fire("on_step_end")
        return self._flow(state, at_epoch_end=False)

    def _add_loss(self, loss: Any, step: int) -> None:
        """Add this step's loss to the sum since the last log (on the device).

        HF's logging_nan_inf_filter: a NaN or infinite step loss counts as the mean of the
        steps since the last log instead (on the device: no host sync).
        """
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to(accumulator_dtype(loss.device))
            if self.args.logging_nan_inf_filter:
                so_far = torch.as_tensor(self.loss_since_log, dtype=loss.dtype, device=loss.device)
                mean = so_far / (step - self.last_logged)  # HF: 1 + steps before this one
                loss = torch.where(torch.isfinite(loss), loss, mean)
        elif self.args.logging_nan_inf_filter and not math.isfinite(float(loss)):
            loss = float(self.loss_since_log) / (step - self.last_logged)
        self.loss_since_log = self.loss_since_log + loss

    def on_epoch_end(self, state: TrainState) -> Request | None:
        self.host.attach_train_state(state)
        self.fire("on_epoch_end")
        request = self._flow(state, at_epoch_end=True)
        self.steps_in_epoch = 0
        return request

    def on_checkpoint_saved(self, state: TrainState, path: str) -> None:
        self.host.attach_train_state(state)
        self.saved_step = state.step
        if state.strategy.is_main:
            self._after_save(publish(path))
        else:
            self._after_save(None)

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
            self.store_counts(state)  # HF's store_flos before a save
            update_best_checkpoint(self.args, host.state, host.state.global_step)
            if state.step == self.saved_step:
                # This step is on disk already (a step save right before this epoch end, or
                # the checkpoint resumed from): fit writes it once; HF's events still run.
                existing = Path(str(self.args.output_dir)) / checkpoint_name(state.step)
                self._after_save(existing if state.strategy.is_main else None)
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
        logs: dict[str, float] = {"loss": loss / (ts.global_step - self.last_logged)}
        norm = state.metrics.get("train/grad_norm")
        if norm is not None:
            logs["grad_norm"] = float(norm)
        logs["learning_rate"] = float(state.metrics.get("train/lr", 0.0))
        self.loss_total += loss
        self.last_logged = ts.global_step
        self.store_counts(state)
        self.host.log(logs, self.start_time)

    def _after_save(self, path: Path | None) -> None:
        """HF's end of a save: trainer_state.json and the args in the checkpoint, rotation,
        on_save. `path` is the published checkpoint (None on ranks other than the main)."""
        host = self.host
        ts = host.state
        if path is not None and path.is_dir():
            ts.stateful_callbacks = _stateful_callbacks(host)
            write_hf_files(path, ts, self.args, host.model)
            rotate_like_hf(self.args, ts)
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


def _empty_device_cache(device: torch.device | str) -> None:
    """HF's torch_empty_cache_steps: give the device's cached free memory back."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.empty_cache()
    elif kind == "mps":
        torch.mps.empty_cache()


def _stateful_callbacks(host: TrainerHost) -> dict[str, Any]:
    """HF's `stateful_callbacks` of trainer_state.json: each exportable callback's state()
    by class name (TrainerControl first), a list where a class occurs more than once."""
    states: dict[str, Any] = {"TrainerControl": _plain(host.control.state())}
    for callback in host.callback_handler.callbacks:
        state = getattr(callback, "state", None)
        if not callable(state):
            continue
        name = type(callback).__name__
        value = _plain(state())
        if name in states:
            previous = states[name]
            states[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            states[name] = value
    return states


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
