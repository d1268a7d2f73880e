"""HF-style callbacks: TrainerState, TrainerControl, TrainerCallback and the ready ones.

A callback is an object with any of the hooks below, called as
`hook(args, state, control, **kwargs)`; it may set flags on `control` (and return it, or
None). The Trainer calls the hooks in this order (see docs/migrating.md):

    on_init_end                                   end of Trainer(...)
    on_train_begin
      on_epoch_begin
        on_step_begin                             first micro-batch of each optimizer step
        on_substep_end                            each other micro-batch of the step
        on_pre_optimizer_step, on_optimizer_step  around the optimizer update
        on_step_end                               after the update; global_step is counted
          on_log                                  if control.should_log
          on_log, on_evaluate                     if control.should_evaluate
          on_save                                 if control.should_save
      on_epoch_end                                then the same log/evaluate/save
    on_log (train metrics), on_train_end

Callbacks run in the order they were added, always: DefaultFlowCallback first (it sets the
flags from TrainingArguments), then the callbacks passed to Trainer(callbacks=...), then the
progress or printer callback, then those of add_callback(...) in call order (as in HF).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .._types import Mode
from ..callbacks import improved

HF_HOOKS: tuple[str, ...] = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
)
"""Every hook a TrainerCallback may define."""


@dataclass
class TrainerState:
    """The Trainer's progress, as HF's TrainerState: given to every callback, saved with
    each checkpoint (in loopkit's checkpoint and as `trainer_state.json`).

    `epoch` is a float during training (2.5 = half-way through the third epoch);
    `global_step` counts optimizer steps. `best_metric` / `best_model_checkpoint` track the
    best evaluation by `metric_for_best_model`. `total_flos` and `num_input_tokens_seen`
    are summed over every rank, as HF counts them. Fields and JSON as transformers 5's.
    """

    epoch: float | None = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, Any] | None = None
    stateful_callbacks: dict[str, Any] = field(default_factory=dict)

    def compute_steps(self, args: Any, max_steps: int) -> None:
        """Set logging/eval/save steps from args; a value below 1 is a fraction of max_steps."""
        for kind in ("logging", "eval", "save"):
            steps = getattr(args, f"{kind}_steps")
            if steps is not None:
                if steps < 1:
                    steps = math.ceil(max_steps * steps)
                setattr(self, f"{kind}_steps", int(steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_to_json(self, json_path: str | os.PathLike[str]) -> None:
        """Write the state as HF does (indent 2, sorted keys), atomically: a temporary file
        renamed into place."""
        tmp = f"{os.fspath(json_path)}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, json_path)

    @classmethod
    def load_from_json(cls, json_path: str | os.PathLike[str]) -> TrainerState:
        with open(json_path, encoding="utf-8") as file:
            return cls(**json.load(file))


@dataclass
class TrainerControl:
    """Flags callbacks set to steer the Trainer, as HF's TrainerControl.

    should_log / should_evaluate / should_save act after the current step (or epoch end)
    and are cleared when the next step begins; should_epoch_stop ends the epoch after the
    current step; should_training_stop ends training (after that step's log, evaluation
    and save, and the epoch-end events).
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict[str, Any]:
        return {"args": dataclasses.asdict(self), "attributes": {}}


class TrainerCallback:
    """A callback whose hooks all do nothing: subclass it and override what you need.

    Each hook is called as `hook(args, state, control, **kwargs)`; kwargs hold `model`,
    `processing_class`, `optimizer`, `lr_scheduler`, `train_dataloader`, `eval_dataloader`,
    and `logs` (on_log) or `metrics` (on_evaluate). Return `control` or None.
    """

    def on_init_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """End of Trainer.__init__."""

    def on_train_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Start of training."""

    def on_train_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """End of training."""

    def on_epoch_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Start of an epoch."""

    def on_epoch_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """End of an epoch."""

    def on_step_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Before the first micro-batch of an optimizer step."""

    def on_substep_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """After each micro-batch of a step but its last (gradient accumulation)."""

    def on_pre_optimizer_step(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """After clipping, before the optimizer update."""

    def on_optimizer_step(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """After the optimizer update (gradients already zeroed in loopkit)."""

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """After an optimizer step; state.global_step counts it."""

    def on_evaluate(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """After an evaluation; kwargs["metrics"] holds its metrics."""

    def on_predict(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """After Trainer.predict; kwargs["metrics"] holds its metrics."""

    def on_save(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """After a checkpoint is written."""

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """After logs are recorded; kwargs["logs"] holds them."""

    def on_prediction_step(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        """Not called by loopkit (evaluation runs as one device-side pass)."""


class DefaultFlowCallback(TrainerCallback):
    """Set should_log / should_evaluate / should_save / should_training_stop from the
    TrainingArguments' strategies, exactly as HF's DefaultFlowCallback does."""

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if state.global_step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == "steps" and state.global_step % state.logging_steps == 0:
            control.should_log = True
        if (
            args.eval_strategy == "steps"
            and state.global_step % state.eval_steps == 0
            and args.eval_delay <= state.global_step
        ):
            control.should_evaluate = True
        if (
            args.save_strategy == "steps"
            and state.save_steps > 0
            and state.global_step % state.save_steps == 0
        ):
            control.should_save = True
        if state.global_step >= state.max_steps:
            control.should_training_stop = True
            # transformers 5: evaluate the last step too (unless it was an eval step), and
            # save it with a step-based save strategy.
            if (
                args.eval_strategy == "steps"
                and state.global_step % state.eval_steps != 0
                and args.eval_delay <= state.global_step
            ):
                control.should_evaluate = True
            if args.save_strategy == "steps":
                control.should_save = True
        return control

    def on_epoch_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.eval_strategy == "epoch" and args.eval_delay <= (state.epoch or 0):
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control


class PrinterCallback(TrainerCallback):
    """Print each log dict (main process), as HF does when disable_tqdm=True: floats to 4
    significant digits; like HF's, it removes "total_flos" from the logs it is given (so
    the metrics train() returns have none; state.log_history keeps it)."""

    def on_log(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        logs: Any = None,
        **kwargs: Any,
    ) -> Any:
        if logs is None:
            return
        logs.pop("total_flos", None)
        if state.is_world_process_zero:
            print(_shown(logs))


def _shown(logs: dict[str, Any]) -> dict[str, Any]:
    """HF 5's display of a log dict: floats as 4 significant digits, no total_flos."""
    return {
        k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"
    }


class ProgressCallback(TrainerCallback):
    """A tqdm bar over the optimizer steps that also prints each log dict (rank 0)."""

    def __init__(self) -> None:
        self.training_bar: Any = None
        self.current_step = 0

    def on_train_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, file=sys.stderr)
            self.training_bar.update(state.global_step)
        self.current_step = state.global_step

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
        self.current_step = state.global_step

    def on_log(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        logs: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.training_bar is not None and logs is not None:
            self.training_bar.write(str(_shown(logs)))

    def on_train_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class EarlyStoppingCallback(TrainerCallback):
    """Stop training when `metric_for_best_model` has not improved for
    `early_stopping_patience` evaluations in a row (HF's rule).

    An evaluation improves when it beats `state.best_metric` (the best *before* it) by more
    than `early_stopping_threshold`, in the direction `greater_is_better` says. Needs
    `metric_for_best_model` and an eval_strategy other than "no" (checked when training
    starts, before any step).

    Args:
        early_stopping_patience: evaluations without improvement before stopping, >= 1.
        early_stopping_threshold: how much better than the best a value must be, >= 0.
    """

    def __init__(
        self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0
    ) -> None:
        if (
            isinstance(early_stopping_patience, bool)
            or not isinstance(early_stopping_patience, int)
            or early_stopping_patience < 1
        ):
            raise ValueError(
                f"EarlyStoppingCallback(early_stopping_patience={early_stopping_patience!r}): "
                "the number of evaluations without improvement before stopping, an int >= 1."
            )
        if (
            isinstance(early_stopping_threshold, bool)
            or not isinstance(early_stopping_threshold, (int, float))
            or not (math.isfinite(early_stopping_threshold) and early_stopping_threshold >= 0)
        ):
            raise ValueError(
                f"EarlyStoppingCallback(early_stopping_threshold={early_stopping_threshold!r}): "
                "a finite float >= 0."
            )
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = float(early_stopping_threshold)
        self.early_stopping_patience_counter = 0

    def check_metric_value(
        self, args: Any, state: TrainerState, control: TrainerControl, metric_value: float
    ) -> None:
        mode: Mode = "max" if args.greater_is_better else "min"
        best = state.best_metric
        # HF's rule: better than the best (loopkit's `improved`), by more than the threshold.
        if best is None or (
            improved(metric_value, best, mode)
            and abs(metric_value - best) > self.early_stopping_threshold
        ):
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_train_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> Any:
        if args.metric_for_best_model is None:
            raise ValueError(
                "EarlyStoppingCallback: needs TrainingArguments(metric_for_best_model=...), "
                "e.g. 'loss' or 'accuracy' (load_best_model_at_end=True sets 'loss')."
            )
        if args.eval_strategy == "no":
            raise ValueError(
                "EarlyStoppingCallback: needs evaluations; set TrainingArguments(eval_strategy="
                "'steps' or 'epoch')."
            )

    def on_evaluate(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        metrics: Any = None,
        **kwargs: Any,
    ) -> Any:
        key = args.metric_for_best_model
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        value = (metrics or {}).get(key)
        if value is None:
            raise KeyError(
                f"EarlyStoppingCallback: metric_for_best_model={args.metric_for_best_model!r} "
                f"is not among the eval metrics {sorted(metrics or {})}."
            )
        self.check_metric_value(args, state, control, value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict[str, Any]:
        """The callback's settings and counter, JSON-able (saved with each checkpoint)."""
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }


def has_hf_hook(callback: object) -> bool:
    """Whether `callback` (an instance or a class) defines at least one HF hook."""
    return any(callable(getattr(callback, hook, None)) for hook in HF_HOOKS)


class CallbackHandler:
    """The callbacks of one Trainer, called in the order they were added.

    `call(event, args, state, control, **kwargs)` calls `event` on each callback with the
    shared kwargs (model, optimizer, ...) and returns the control (a callback may return a
    new one, as in HF). Events reset the control flags as HF's handler does.
    """

    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks: list[Any] = []
        for callback in callbacks:
            self.add(callback)
        self.shared: dict[str, Any] = {
            "model": None,
            "processing_class": None,
            "optimizer": None,
            "lr_scheduler": None,
            "train_dataloader": None,
            "eval_dataloader": None,
        }

    def add(self, callback: Any) -> None:
        if not has_hf_hook(callback):
            raise ValueError(
                f"Trainer(callbacks=[..., {callback!r}, ...]): defines none of the hooks "
                f"{', '.join(HF_HOOKS)}. Subclass loopkit.compat.TrainerCallback."
            )
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def pop(self, callback: Any) -> Any:
        for existing in self.callbacks:
            if (
                isinstance(callback, type) and isinstance(existing, callback)
            ) or existing is callback:
                self.callbacks.remove(existing)
                return existing
        return None

    def remove(self, callback: Any) -> None:
        if self.pop(callback) is None:
            raise ValueError(
                f"Trainer.remove_callback({callback!r}): no such callback; the callbacks are "
                f"{[type(c).__name__ for c in self.callbacks]}."
            )

    def call(
        self, event: str, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # HF's handler resets these flags before the event (CallbackHandler.on_*).
        if event == "on_train_begin":
            control._new_training()
        elif event == "on_epoch_begin":
            control._new_epoch()
        elif event == "on_step_begin":
            control._new_step()
        elif event == "on_evaluate":
            control.should_evaluate = False
        elif event == "on_save":
            control.should_save = False
        elif event == "on_log":
            control.should_log = False
        for callback in list(self.callbacks):
            hook = getattr(callback, event, None)
            if hook is None:
                continue
            result = hook(args, state, control, **self.shared, **kwargs)
            if result is not None:
                if not isinstance(result, TrainerControl):
                    raise TypeError(
                        f"{type(callback).__name__}.{event} returned {type(result).__name__}; "
                        "a TrainerCallback hook returns the control (or None)."
                    )
                control = result
        return control

    @property
    def callback_list(self) -> str:
        return "\n".join(type(c).__name__ for c in self.callbacks)


__all__ = [
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "PrinterCallback",
    "ProgressCallback",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
]
