"""Callbacks: observers of fit()'s events that may ask it to stop, never change the record.

A callback is any object defining any subset of the hooks below; nothing needs a base class
or registering. fit() calls them in this order (see docs/callbacks-and-logging.md):

    on_fit_start(state, hparams)
      on_epoch_start(state)
        on_step_end(state)               after each optimizer step (state.metrics on device)
        log_metrics(state) -> dict       at log steps: extra metrics for the log record
        on_log(state, metrics)           at log steps: host floats ("train/loss", ...)
        on_eval_end(state, metrics)      after each evaluation ("eval/loss", ...)
        on_checkpoint_saved(state, path)
      on_epoch_end(state)
    on_fit_end(state, reason)            reason: FitResult.stopped_by ("max_steps", "SIGTERM", ...)

A hook returns None, or `Stop(reason)` to ask fit() to stop after the current step.
`on_step_end` and `on_epoch_end` may also return `Request(log=..., evaluate=..., save=...,
end_epoch=...)` to have fit() log, evaluate or save right then, besides its own schedule.
Hooks read the TrainState; they never call `state.replace` or step it.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .strategies import unwrap

Mode = Literal["min", "max"]
"""Whether lower ("min") or higher ("max") values of a monitored metric are better."""

HOOKS: tuple[str, ...] = (
    "on_fit_start",
    "on_epoch_start",
    "on_epoch_end",
    "on_step_end",
    "on_log",
    "on_eval_end",
    "on_checkpoint_saved",
    "on_fit_end",
)
"""The event hooks fit() dispatches, in the order they first fire."""

CONTRIBUTOR_HOOKS: tuple[str, ...] = ("log_metrics",)
"""Hooks that return values: `log_metrics(state) -> dict[str, float | Tensor]`."""

REQUEST_HOOKS: tuple[str, ...] = ("on_step_end", "on_epoch_end")
"""The hooks whose `Request(...)` fit() honours (each may also return Stop or None)."""


@dataclass(frozen=True, slots=True)
class Stop:
    """A hook's request that fit() stop after the current step.

    Attributes:
        reason: why, in words; fit() reports it (e.g. in FitResult and the progress output).

    Example:
        >>> Stop("eval/loss has not improved for 3 evals")
        Stop(reason='eval/loss has not improved for 3 evals')
    """

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str):
            raise TypeError(
                f"Stop(reason={self.reason!r}): expected a str saying why training stops, "
                'e.g. Stop("loss is NaN").'
            )


@dataclass(frozen=True, slots=True)
class Request:
    """A hook's request that fit() log, evaluate and/or save now, besides its own schedule.

    Returned from `on_step_end` (acted on right after that optimizer step) or `on_epoch_end`
    (acted on at that epoch end). fit() runs what was asked in its usual order, once each
    even if several callbacks ask: log (`on_log`), evaluate (`on_eval_end`), save
    (`on_checkpoint_saved`). Its own schedule (`log_every`, `eval_every`, `save_every`, ...)
    still applies; a Request only adds work, it never cancels any.

    Attributes:
        log: write a log record of the last step's train metrics now.
        evaluate: evaluate now (fit needs `eval_data`).
        save: save a checkpoint now (fit needs `checkpoint_dir`).
        end_epoch: (on_step_end only) end this epoch after the current step: fit runs the
            epoch-end events and goes on with the next epoch. A checkpoint saved at such a
            shortened epoch's end records the data position inside it, so a resume from it
            finishes that epoch's remaining batches first.

    To save and then stop, return `Request(save=True)` from `on_step_end` and
    `Stop(reason)` from `on_checkpoint_saved`.

    Example:
        >>> class SaveAtStep100:
        ...     def on_step_end(self, state):
        ...         return Request(save=True) if state.step == 100 else None
        >>> Request(save=True) | Request(evaluate=True)
        Request(log=False, evaluate=True, save=True, end_epoch=False)
    """

    log: bool = False
    evaluate: bool = False
    save: bool = False
    end_epoch: bool = False

    def __post_init__(self) -> None:
        for name in ("log", "evaluate", "save", "end_epoch"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(
                    f"Request({name}={value!r}): expected True or False, e.g. Request(save=True)."
                )

    def __or__(self, other: Request) -> Request:
        """Both requests together: each action asked by either."""
        if not isinstance(other, Request):
            return NotImplemented
        return Request(
            log=self.log or other.log,
            evaluate=self.evaluate or other.evaluate,
            save=self.save or other.save,
            end_epoch=self.end_epoch or other.end_epoch,
        )


class Callback:
    """A callback that does nothing: subclass it and override only the hooks you need.

    Optional: any object with some of these methods is a callback too. Each hook may return
    `Stop(reason)`, and `on_step_end` / `on_epoch_end` also `Request(...)`; anything else but
    None is an error. A subclass's methods named `on_*` must be hooks: a misspelled one is
    an error naming the hook it meant (name helper methods otherwise).
    """

    def on_fit_start(self, state: Any, hparams: dict[str, object]) -> Stop | None:
        """Called once before the first step; `hparams` are fit()'s settings."""
        return None

    def on_epoch_start(self, state: Any) -> Stop | None:
        """Called before the first batch of each epoch."""
        return None

    def on_epoch_end(self, state: Any) -> Stop | None:
        """Called after the last batch of each epoch."""
        return None

    def on_step_end(self, state: Any) -> Stop | None:
        """Called after each optimizer step; `state.metrics` are still device tensors."""
        return None

    def on_log(self, state: Any, metrics: dict[str, float]) -> Stop | None:
        """Called at log steps with host floats ("train/loss", "train/lr", "perf/...")."""
        return None

    def on_eval_end(self, state: Any, metrics: dict[str, float]) -> Stop | None:
        """Called after each evaluation with host floats ("eval/loss", ...)."""
        return None

    def on_checkpoint_saved(self, state: Any, path: str) -> Stop | None:
        """Called after a checkpoint directory has been written (and renamed into place)."""
        return None

    def on_fit_end(self, state: Any) -> Stop | None:
        """Called once after the last step (also after a Stop or a stop signal).

        Override it as `on_fit_end(self, state, reason="")` to also get why the fit ended
        (FitResult.stopped_by: "max_steps", "epochs", a Stop's reason, or "SIGINT",
        "SIGTERM", "SIGUSR1"); the one-argument form keeps working.
        """
        return None


def _callback_name(callback: object) -> str:
    return type(callback).__name__


def dispatch(
    callbacks: Iterable[object],
    hook_name: str,
    *args: Any,
    requests: list[Request] | None = None,
) -> Stop | None:
    """Call `hook_name(*args)` on each callback that defines it, in order.

    Every callback is called even after one returns Stop, so all of them observe the event.

    Args:
        callbacks: the callbacks, in call order.
        hook_name: one of HOOKS.
        *args: the hook's arguments (the state first).
        requests: for the hooks in REQUEST_HOOKS, a list that collects every `Request` the
            callbacks return (the caller acts on them); None if the caller takes none.

    Returns:
        The first Stop returned, or None.

    Raises:
        ValueError: hook_name is not one of HOOKS.
        TypeError: a hook returned something other than None or Stop (or a Request where
            `requests` collects them).

    Example:
        >>> class Halt:
        ...     def on_step_end(self, state):
        ...         return Stop("enough")
        >>> dispatch([Callback(), Halt()], "on_step_end", None)
        Stop(reason='enough')
    """
    if hook_name not in HOOKS:
        raise ValueError(
            f"dispatch(hook_name={hook_name!r}): not an event hook. Hooks: {', '.join(HOOKS)}."
        )
    first: Stop | None = None
    for callback in callbacks:
        hook = getattr(callback, hook_name, None)
        if hook is None:
            continue
        result = hook(*_arguments_for(hook, hook_name, args))
        if result is None:
            continue
        if isinstance(result, Stop):
            if first is None:
                first = result
            continue
        if isinstance(result, Request) and requests is not None:
            requests.append(result)
            continue
        hint = ""
        if type(result).__name__ == "TrainState":
            hint = " Callbacks observe the TrainState; they never replace or step it."
        elif isinstance(result, Request):
            hint = f" A Request is honoured only from {' and '.join(REQUEST_HOOKS)}" + (
                " as fit() calls them." if hook_name in REQUEST_HOOKS else "."
            )
        raise TypeError(
            f"{_callback_name(callback)}.{hook_name} returned {type(result).__name__} "
            f"({_short_repr(result)}); a hook must return None or loopkit.Stop(reason).{hint}"
        )
    return first


_OPTIONAL_ARGUMENTS: dict[str, int] = {"on_fit_end": 1}
"""Hooks whose last arguments a callback may leave out: `on_fit_end(state)` is still called
(without the reason) where `on_fit_end(state, reason)` is not defined."""


def _arguments_for(hook: Callable[..., Any], hook_name: str, args: tuple[Any, ...]) -> tuple:
    """`args`, less the optional trailing ones `hook`'s signature does not take."""
    optional = _OPTIONAL_ARGUMENTS.get(hook_name, 0)
    if not optional:
        return args
    try:
        inspect.signature(hook).bind(*args)
    except TypeError:
        return args[: len(args) - optional]  # e.g. on_fit_end(self, state): no reason
    except ValueError:  # no signature to read (a builtin): pass everything
        pass
    return args


def collect_log_metrics(callbacks: Iterable[object], state: Any) -> dict[str, Any]:
    """Merge what each callback's `log_metrics(state)` contributes to a log record.

    Values may be host numbers or device tensors (convert them together with
    `loopkit.metrics.to_host`, one host sync per log step).

    Raises:
        TypeError: a log_metrics returned something other than a dict of str keys.
        ValueError: two callbacks contributed the same key.
    """
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for callback in callbacks:
        hook = getattr(callback, "log_metrics", None)
        if hook is None:
            continue
        result = hook(state)
        if result is None:
            continue
        if not isinstance(result, Mapping) or not all(isinstance(k, str) for k in result):
            raise TypeError(
                f"{_callback_name(callback)}.log_metrics returned {_short_repr(result)}; it "
                'must return a dict of str keys to floats or scalar tensors, e.g. {"lr/group0": '
                "3e-4}."
            )
        for key, value in result.items():
            if key in merged:
                raise ValueError(
                    f"{_callback_name(callback)}.log_metrics: key {key!r} is already "
                    f"contributed by {owner[key]}. Give one of them another name."
                )
            merged[key] = value
            owner[key] = _callback_name(callback)
    return merged


def check_callbacks(callbacks: Iterable[object], where: str = "fit") -> tuple[object, ...]:
    """Validate callbacks up front; return them as a tuple.

    Raises:
        TypeError: `callbacks` is not an iterable of objects (e.g. a single callback).
        ValueError: a callback defines none of the hooks, or a `Callback` subclass has an
            `on_*` method that is no hook (the message suggests the hook a misspelled
            method probably meant).
    """
    if any(hasattr(callbacks, hook) for hook in HOOKS + CONTRIBUTOR_HOOKS):
        raise TypeError(
            f"{where}(callbacks={_callback_name(callbacks)}(...)): pass a list, "
            f"callbacks=[{_callback_name(callbacks)}(...)]."
        )
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        raise TypeError(
            f"{where}(callbacks={_short_repr(callbacks)}): expected a list of callbacks, e.g. "
            "callbacks=[EarlyStopping()]."
        )
    result = tuple(callbacks)
    for callback in result:
        if isinstance(callback, Callback):
            _check_subclass_hooks(callback, where)
            continue
        if any(callable(getattr(callback, h, None)) for h in HOOKS + CONTRIBUTOR_HOOKS):
            continue
        own = [n for n in dir(callback) if n.startswith("on_") and callable(getattr(callback, n))]
        hints = sorted({m for n in own for m in difflib.get_close_matches(n, HOOKS, n=1)})
        fix = f" Did you mean {', '.join(hints)}?" if hints else ""
        raise ValueError(
            f"{where}(callbacks=[..., {_short_repr(callback)}, ...]): defines none of the hooks "
            f"{', '.join(HOOKS + CONTRIBUTOR_HOOKS)}.{fix}"
        )
    return result


def _check_subclass_hooks(callback: Callback, where: str) -> None:
    """Refuse an `on_*` method of a Callback subclass that is no hook (a misspelled one).

    A Callback subclass declares that it observes fit's events, and the base class defines
    every hook, so a misspelled override would be silently never called. Helper methods
    whose names do not start with `on_` are the user's own business.
    """
    for name in dir(type(callback)):
        if not name.startswith("on_") or name in HOOKS:
            continue
        if not callable(getattr(callback, name, None)):
            continue
        hint = difflib.get_close_matches(name, HOOKS, n=1)
        fix = f"Did you mean {hint[0]}?" if hint else f"The hooks are {', '.join(HOOKS)}."
        raise ValueError(
            f"{where}(callbacks=[..., {_short_repr(callback)}, ...]): "
            f"{type(callback).__name__}.{name} is not a hook, so fit() would never call it. "
            f"{fix} (Rename a helper method so that its name does not start with on_.)"
        )


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- mode inference and monitoring, shared by EarlyStopping and BestModel ---

_MIN_WORDS = (
    "loss",
    "perplexity",
    "ppl",
    "nll",
    "error",
    "err",
    "mse",
    "rmse",
    "mae",
    "wer",
    "cer",
)
_MAX_WORDS = (
    "accuracy",
    "acc",
    "f1",
    "precision",
    "recall",
    "auc",
    "auroc",
    "bleu",
    "rouge",
    "score",
    "iou",
)


def infer_mode(monitor: str, mode: str | None = None, *, where: str = "infer_mode") -> Mode:
    """Return "min" or "max" for a monitored metric: `mode` if given, else from its name.

    The name is split on non-alphanumerics ("eval/top5_acc" -> eval, top5, acc); a word
    starting or ending with one of loss, perplexity, ppl, nll, error, mse, mae, ... means
    "min", one of accuracy, acc, f1, precision, recall, auc, bleu, score, ... means "max".

    Raises:
        ValueError: mode is not None/"min"/"max", or the name says neither (or both).

    Example:
        >>> infer_mode("eval/loss"), infer_mode("eval/top5_accuracy")
        ('min', 'max')
    """
    if mode is not None:
        if mode not in ("min", "max"):
            raise ValueError(f'{where}(mode={mode!r}): allowed values are "min", "max" or None.')
        return mode  # type: ignore[return-value]
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f'{where}(monitor={monitor!r}): expected a metric key, e.g. "eval/loss".')
    words = [w for w in re.split(r"[^a-z0-9]+", monitor.lower()) if w]

    def says(vocabulary: tuple[str, ...]) -> bool:
        return any(w.startswith(v) or w.endswith(v) for w in words for v in vocabulary)

    is_min, is_max = says(_MIN_WORDS), says(_MAX_WORDS)
    if is_min != is_max:
        return "min" if is_min else "max"
    why = "says both" if is_min else "says neither"
    raise ValueError(
        f"{where}(monitor={monitor!r}, mode=None): cannot tell whether lower or higher is "
        f'better (the name {why}). Pass mode="min" or mode="max".'
    )


def improved(value: float, best: float | None, mode: Mode, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta`: loopkit's one rule for "improved".

    Lower is better in mode "min", higher in mode "max"; any value but NaN beats `best=None`
    (nothing seen yet), and a NaN never improves. fit()'s best evaluation (and so
    `keep_best`), EarlyStopping and BestModel all decide with this function.

    Args:
        value: the new value of the monitored metric (a host float).
        best: the best value so far, or None before the first.
        mode: "min" or "max".
        min_delta: how much `value` must beat `best` by, >= 0.

    Returns:
        True if `value` is the new best.

    Example:
        >>> improved(0.5, 0.6, "min"), improved(0.5, 0.6, "max"), improved(0.5, None, "max")
        (True, False, True)
        >>> improved(0.59, 0.6, "min", min_delta=0.05), improved(float("nan"), None, "min")
        (False, False)
    """
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class MetricNotFoundError(KeyError):
    """A monitored metric is not among the metrics an event carried."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def _read_monitor(metrics: Mapping[str, Any], monitor: str, where: str) -> float:
    if monitor not in metrics:
        raise MetricNotFoundError(
            f"{where}: monitor {monitor!r} is not among the eval metrics "
            f"{sorted(metrics)}. Monitor one of them, or add a metric named "
            f"{monitor.removeprefix('eval/')!r} to fit(metrics=...)."
        )
    # host sync: once per eval if the value is still a device tensor.
    return float(metrics[monitor])


def _check_monitor(monitor: object, where: str) -> None:
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f'{where}(monitor={monitor!r}): expected a metric key, e.g. "eval/loss".')


def _json_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class _Settings:
    monitor: str
    mode: Mode


class EarlyStopping:
    """Stop when an eval metric has not improved for `patience` evaluations in a row.

    An eval improves when its value beats the best so far by more than `min_delta`
    (lower for mode "min", higher for "max"); a NaN never improves. After `patience`
    evals without improvement, `on_eval_end` returns Stop (and keeps returning it).

    Args:
        monitor: the eval metric key, e.g. "eval/loss" or "eval/accuracy".
        mode: "min", "max", or None to infer it from the name (see `infer_mode`).
        patience: evals without improvement before stopping, an int >= 1.
        min_delta: how much a value must beat the best by to count, a float >= 0.

    Attributes:
        best_value: the best value seen (None before the first eval).
        best_step: the step of that eval.
        wait: evals since the last improvement.

    Raises:
        ValueError: bad mode/patience/min_delta, or a mode that cannot be inferred.
        MetricNotFoundError (a KeyError): at an eval whose metrics lack `monitor`.

    Example:
        >>> stopper = EarlyStopping("eval/accuracy", patience=2)
        >>> stopper.mode
        'max'
    """

    def __init__(
        self,
        monitor: str = "eval/loss",
        mode: Mode | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        _check_monitor(monitor, "EarlyStopping")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(
                f"EarlyStopping(patience={patience!r}): the number of evals without "
                "improvement before stopping, an int >= 1."
            )
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, numbers.Real)
            or not (math.isfinite(min_delta) and min_delta >= 0)
        ):
            raise ValueError(
                f"EarlyStopping(min_delta={min_delta!r}): a finite float >= 0, e.g. 0.0 or 1e-3."
            )
        self._settings: _Settings = _Settings(
            monitor, infer_mode(monitor, mode, where="EarlyStopping")
        )
        self.patience: int = patience
        self.min_delta: float = float(min_delta)
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.wait: int = 0

    @property
    def monitor(self) -> str:
        return self._settings.monitor

    @property
    def mode(self) -> Mode:
        return self._settings.mode

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> Stop | None:
        value = _read_monitor(metrics, self.monitor, "EarlyStopping")
        if improved(value, self.best_value, self.mode, self.min_delta):
            self.best_value, self.best_step, self.wait = value, int(state.step), 0
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        return Stop(
            f"EarlyStopping: {self.monitor} has not improved by more than {self.min_delta} "
            f"({self.mode}) for {self.wait} evals; best {self.best_value} at step "
            f"{self.best_step}."
        )

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able record of the tracking state, for checkpoints and resume."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_value": _json_float(self.best_value),
            "best_step": self.best_step,
            "wait": self.wait,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` returned.

        Raises:
            ValueError: it was saved for another monitor or mode.
        """
        _check_same_settings(self, state_dict, "EarlyStopping")
        self.best_value = _json_float(state_dict["best_value"])
        self.best_step = state_dict["best_step"]
        self.wait = int(state_dict["wait"])

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"patience={self.patience}, min_delta={self.min_delta})"
        )


def _check_same_settings(callback: Any, state_dict: Mapping[str, Any], where: str) -> None:
    for key in ("monitor", "mode"):
        if state_dict.get(key) != getattr(callback, key):
            raise ValueError(
                f"{where}.load_state_dict: saved {key}={state_dict.get(key)!r} but this "
                f"callback has {key}={getattr(callback, key)!r}. Build it with the same "
                "monitor and mode as the run being resumed."
            )


class BestModel:
    """Keep (and optionally save) the weights of the best evaluation so far.

    On each eval whose `monitor` improves, copies `model.state_dict()` to CPU (cost: one
    device-to-host copy of the weights, and that much host memory) and, if `path` is given,
    writes it atomically with safetensors to `path` plus a JSON sidecar
    (`path` with suffix ".json") holding step, monitor, mode and value. Files are written
    by rank 0 only. For sharded strategies (FSDP) use checkpoints instead: the local
    state_dict holds shards.

    Args:
        monitor: the eval metric key, e.g. "eval/loss".
        mode: "min", "max", or None to infer it from the name.
        path: a file such as "runs/best.safetensors", or None to keep the copy in memory only.

    Attributes:
        best_value: the best monitored value (None before the first eval).
        best_step: the step it was reached at.
        best_weights: the best weights, {name: CPU tensor}, keyed like the unwrapped
            model's state_dict (None before the first eval).

    Example:
        >>> best = BestModel("eval/accuracy")
        >>> best.mode
        'max'
    """

    def __init__(
        self,
        monitor: str = "eval/loss",
        mode: Mode | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        _check_monitor(monitor, "BestModel")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"BestModel(path={path!r}): expected a file path such as "
                '"runs/best.safetensors", or None to keep the weights in memory only.'
            )
        self._settings: _Settings = _Settings(monitor, infer_mode(monitor, mode, where="BestModel"))
        self.path = None if path is None else os.fspath(path)
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    @property
    def monitor(self) -> str:
        return self._settings.monitor

    @property
    def mode(self) -> Mode:
        return self._settings.mode

    @property
    def sidecar_path(self) -> str | None:
        """Where the JSON sidecar goes: `path` with its suffix replaced by ".json"."""
        return None if self.path is None else os.path.splitext(self.path)[0] + ".json"

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> Stop | None:
        value = _read_monitor(metrics, self.monitor, "BestModel")
        if not improved(value, self.best_value, self.mode):
            return None
        self.best_value, self.best_step = value, int(state.step)
        # host sync: copies every weight to the host, on improving evals only.
        self.best_weights = {
            name: tensor.detach().to("cpu", copy=True).contiguous()
            for name, tensor in unwrap(state.model).state_dict().items()
            if isinstance(tensor, torch.Tensor)
        }
        if self.path is not None and state.strategy.is_main:
            self._save()
        return None

    def _save(self) -> None:
        from safetensors.torch import save_file

        if self.path is None or self.sidecar_path is None or self.best_weights is None:
            return
        info = {
            "step": self.best_step,
            "monitor": self.monitor,
            "mode": self.mode,
            "value": self.best_value,
        }
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # Written under a temporary name and renamed: a crash never leaves half a file.
        tmp = f"{self.path}.tmp-{os.getpid()}"
        save_file(self.best_weights, tmp, metadata={k: json.dumps(v) for k, v in info.items()})
        os.replace(tmp, self.path)
        tmp_json = f"{self.sidecar_path}.tmp-{os.getpid()}"
        with open(tmp_json, "w", encoding="utf-8") as file:
            json.dump(info, file, indent=2)
        os.replace(tmp_json, self.sidecar_path)

    def restore(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the best weights into `model` (in place) and return it.

        Raises:
            RuntimeError: no eval has been seen yet, so there are no best weights.
        """
        if self.best_weights is None:
            raise RuntimeError(
                f"BestModel({self.monitor!r}).restore: no eval has been seen yet, so there are "
                "no best weights. Pass eval_data and eval_every to fit(), or check "
                "best_weights is not None first."
            )
        unwrap(model).load_state_dict(self.best_weights)
        return model

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able record of the tracking state (not the weights), for resume."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_value": _json_float(self.best_value),
            "best_step": self.best_step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` returned; reload the saved weights if `path` exists.

        Raises:
            ValueError: it was saved for another monitor or mode.
        """
        _check_same_settings(self, state_dict, "BestModel")
        self.best_value = _json_float(state_dict["best_value"])
        self.best_step = state_dict["best_step"]
        if self.path is not None and os.path.exists(self.path):
            from safetensors.torch import load_file

            self.best_weights = load_file(self.path)

    def __repr__(self) -> str:
        return f"BestModel(monitor={self.monitor!r}, mode={self.mode!r}, path={self.path!r})"


class LRMonitor:
    """Add each param group's learning rate to the log record as "lr/group{i}".

    Costs nothing: the lrs are host floats in the optimizer's param groups.
    """

    def log_metrics(self, state: Any) -> dict[str, Any]:
        return {f"lr/group{i}": group["lr"] for i, group in enumerate(state.optimizer.param_groups)}

    def __repr__(self) -> str:
        return "LRMonitor()"


# Dense bf16 tensor-core peak FLOP/s per GPU (vendor datasheets, without sparsity).
# Checked in order: the first entry whose words all occur in the device name wins.
PEAK_FLOPS_BF16: tuple[tuple[tuple[str, ...], float], ...] = (
    (("B200",), 2.25e15),
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("A10G",), 70e12),
    (("A10",), 125e12),
    (("V100",), 125e12),  # fp16: V100 has no bf16
    (("T4",), 65e12),  # fp16
)


def peak_flops_for(device_name: str) -> float | None:
    """Look up a GPU's dense bf16 peak FLOP/s by (part of) its name, or None if unknown.

    Example:
        >>> peak_flops_for("NVIDIA H100 80GB HBM3")
        989000000000000.0
    """
    name = device_name.upper()
    for words, flops in PEAK_FLOPS_BF16:
        if all(w in name for w in words):
            return flops
    return None


class ThroughputMonitor:
    """Add samples/s and tokens/s of the whole job, and (optionally) MFU, to each log record.

    Rates are the growth of `state.samples_seen` and `state.tokens_seen` (the items the loss
    counted, summed over every rank) over the wall time between log steps. MFU divides the
    job's FLOP/s by the peak of all `world_size` devices. Eval and checkpoint time is left out:
    the window restarts after `on_eval_end` and `on_checkpoint_saved`.
    `tokens_seen` may be a device tensor: it is read only at log steps (host sync there,
    where fit() syncs anyway).

    Args:
        flops_per_item: training FLOPs per item (forward + backward), e.g. about
            6 * n_params for a transformer's token; enables "perf/mfu".
        peak_flops: the device's peak FLOP/s for the MFU denominator; None looks the CUDA
            device up in PEAK_FLOPS_BF16 (required on CPU and unknown GPUs).
        clock: seconds as a float; injectable for tests.

    Raises:
        ValueError: a non-positive flops_per_item/peak_flops, or (at fit start) MFU asked
            for on a device whose peak is unknown and peak_flops is None.
    """

    def __init__(
        self,
        flops_per_item: float | None = None,
        peak_flops: float | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        for name, value in (("flops_per_item", flops_per_item), ("peak_flops", peak_flops)):
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(
                    f"ThroughputMonitor({name}={value!r}): a positive finite number of FLOPs, "
                    f"e.g. {name}=6 * n_params."
                )
        if not callable(clock):
            raise TypeError(f"ThroughputMonitor(clock={clock!r}): expected a callable.")
        self.flops_per_item = None if flops_per_item is None else float(flops_per_item)
        self.peak_flops = None if peak_flops is None else float(peak_flops)
        self._clock = clock
        self._last: tuple[float, float, Any] | None = None  # time, samples_seen, tokens_seen

    def _mark(self, state: Any) -> None:
        self._last = (self._clock(), float(state.samples_seen), state.tokens_seen)

    def on_fit_start(self, state: Any, hparams: dict[str, object]) -> None:
        if self.flops_per_item is not None and self.peak_flops is None:
            self.peak_flops = _default_peak_flops(state.strategy.device)
        self._mark(state)

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._mark(state)

    def on_checkpoint_saved(self, state: Any, path: str) -> None:
        self._mark(state)

    def log_metrics(self, state: Any) -> dict[str, float]:
        now = self._clock()
        if self._last is None:  # not started by fit(): this call only opens the window
            self._mark(state)
            return {}
        then, samples_then, tokens_then = self._last
        # host sync: tokens_seen may be a device tensor; read once per log step.
        tokens_now = float(state.tokens_seen)
        samples_now = float(state.samples_seen)
        self._last = (now, samples_now, tokens_now)
        elapsed_s = now - then
        if elapsed_s <= 0:
            return {}
        tokens_per_s = (tokens_now - float(tokens_then)) / elapsed_s
        result = {
            "perf/samples_per_s": (samples_now - samples_then) / elapsed_s,
            "perf/tokens_per_s": tokens_per_s,
        }
        if self.flops_per_item is not None and self.peak_flops is not None:
            devices = state.strategy.world_size
            result["perf/mfu"] = self.flops_per_item * tokens_per_s / (self.peak_flops * devices)
        return result

    def __repr__(self) -> str:
        return (
            f"ThroughputMonitor(flops_per_item={self.flops_per_item}, peak_flops={self.peak_flops})"
        )


def _default_peak_flops(device: torch.device) -> float:
    name = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = peak_flops_for(name)
        if flops is not None:
            return flops
    where = f"device {name!r}" if name else f"device type {device.type!r}"
    raise ValueError(
        f"ThroughputMonitor(peak_flops=None): the peak FLOP/s of {where} is not known, so "
        "MFU cannot be computed. Pass peak_flops=<the device's peak FLOP/s for your "
        "precision>, e.g. peak_flops=989e12 for an H100 in bf16, or drop flops_per_item."
    )


__all__ = [
    "HOOKS",
    "REQUEST_HOOKS",
    "BestModel",
    "Callback",
    "EarlyStopping",
    "LRMonitor",
    "MetricNotFoundError",
    "Mode",
    "Request",
    "Stop",
    "ThroughputMonitor",
    "check_callbacks",
    "collect_log_metrics",
    "dispatch",
    "improved",
    "infer_mode",
    "peak_flops_for",
]
