"""FitConfig: fit()'s keyword arguments as one validated record, loadable from files."""

from __future__ import annotations

import json
import math
import numbers
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from . import schedules as _schedules


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return _is_int(value) and value >= 1  # type: ignore[operator]


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "max_steps": (_optional(_positive_int), "None or an int >= 1"),
    "epochs": (_optional(_positive_int), "None or an int >= 1"),
    "batch_size": (_optional(_positive_int), "None or an int >= 1"),
    "eval_batch_size": (_optional(_positive_int), "None or an int >= 1"),
    "accumulate": (_positive_int, "an int >= 1 (micro-batches per optimizer step)"),
    "samples_per_step": (_optional(_positive_int), "None or an int >= 1"),
    "tokens_per_step": (_optional(_positive_int), "None or an int >= 1"),
    "clip": (
        _optional(
            lambda v: (
                isinstance(v, numbers.Real)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v > 0  # type: ignore[operator]
            )
        ),
        "None or a positive, finite float (the max global grad norm)",
    ),
    "precision": (lambda v: v in ("fp32", "bf16", "fp16"), "'fp32', 'bf16' or 'fp16'"),
    "eval_every": (_optional(_positive_int), "None or an int >= 1 (optimizer steps)"),
    "eval_batches": (_optional(_positive_int), "None or an int >= 1"),
    "log_every": (
        _optional(_positive_int),
        "an int >= 1 (optimizer steps), or None to log only when a callback's Request asks",
    ),
    "log_dir": (_optional(lambda v: isinstance(v, (str, Path))), "None or a path"),
    "fingerprint_every": (
        _optional(lambda v: _is_int(v) and v >= 0),  # type: ignore[operator]
        "None (1 with a log_dir, else 0), 0 (off) or an int >= 1 (optimizer steps)",
    ),
    "progress": (lambda v: isinstance(v, bool), "True or False"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),  # type: ignore[operator]
    "compile": (lambda v: isinstance(v, bool), "True or False"),
    "shuffle": (lambda v: isinstance(v, bool), "True or False"),
    "drop_last": (lambda v: isinstance(v, bool), "True or False"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),  # type: ignore[operator]
    "data_timeout_s": (
        _optional(
            lambda v: (
                isinstance(v, numbers.Real)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v > 0  # type: ignore[operator]
            )
        ),
        "a positive, finite number of seconds (the longest wait for a DataLoader worker's "
        "batch), or None to wait forever",
    ),
    "pin_memory": (lambda v: isinstance(v, bool), "True or False"),
    "monitor": (lambda v: isinstance(v, str) and "/" in v, "a metric key such as 'eval/loss'"),
    "mode": (lambda v: v in (None, "min", "max"), "None (inferred from monitor), 'min' or 'max'"),
    "checkpoint_dir": (_optional(lambda v: isinstance(v, (str, Path))), "None or a path"),
    "save_every": (_optional(_positive_int), "None or an int >= 1 (optimizer steps)"),
    "save_on_epoch_end": (lambda v: isinstance(v, bool), "True or False"),
    "keep_last": (_optional(_positive_int), "None (keep all) or an int >= 1"),
    "keep_best": (lambda v: isinstance(v, bool), "True or False"),
    "resume": (
        lambda v: isinstance(v, (bool, str, Path)),
        "False, True (the newest valid checkpoint in checkpoint_dir) or a checkpoint path",
    ),
    "allow_data_reshard": (lambda v: isinstance(v, bool), "True or False"),
    "nonfinite": (lambda v: v in ("raise", "skip"), "'raise' or 'skip'"),
    "max_nonfinite_skips": (_positive_int, "an int >= 1"),
    "loss_fn": (_optional(callable), "a callable loss_fn(model, batch)"),
    "optimizer": (
        _optional(lambda v: isinstance(v, (torch.optim.Optimizer, Mapping)) or callable(v)),
        "a torch optimizer, a factory `params -> Optimizer`, or {'name': 'AdamW', 'lr': ...}",
    ),
    "schedule": (
        _optional(
            lambda v: isinstance(v, (Mapping, torch.optim.lr_scheduler.LRScheduler)) or callable(v)
        ),
        "None, a function of the step, a torch LRScheduler, or {'name': 'cosine', ...}",
    ),
    "metrics": (
        _optional(lambda v: isinstance(v, (Mapping, list, tuple))),
        "None, a list of metric names, or a dict name -> metric",
    ),
    "callbacks": (lambda v: isinstance(v, (list, tuple)), "a list of callbacks"),
    "step": (_optional(callable), "None or a transform `(state, batch) -> state`"),
    "predict": (_optional(callable), "None or a callable predict(model, batch)"),
    "collate_fn": (_optional(callable), "None or a callable collate_fn(samples)"),
}


def _check_directory(name: str, value: str | Path | None) -> None:
    """Refuse a directory argument that can never hold files: "", a file, a path under a file.

    Only looks (stat calls); whether it can be written is probed by fit before its first
    step, since that needs creating it.
    """
    if value is None:
        return
    if isinstance(value, str) and not value.strip():
        raise ValueError(
            f"FitConfig({name}={value!r}): must be None or a directory path; an empty path "
            f"would write into the current directory. Pass e.g. {name}='runs/exp1'."
        )
    path = Path(value)
    for place in (path, *path.parents):
        try:
            is_dir = stat.S_ISDIR(place.stat().st_mode)  # one stat: another run may create it
        except (FileNotFoundError, NotADirectoryError):
            continue
        if is_dir:
            return
        where = "is a file" if place == path else f"is under {str(place)!r}, a file"
        raise ValueError(
            f"FitConfig({name}={str(value)!r}): {where}, not a directory. Pass a "
            "directory path (created if missing)."
        )


@dataclass(frozen=True, kw_only=True)
class FitConfig(Mapping[str, Any]):
    """fit()'s keyword arguments as a validated record.

    Every field is checked when the config is built, with an error naming the field, the
    value and what is allowed. Scalar fields load from a dict or a TOML, YAML or JSON file;
    code (loss_fn, callbacks, data) is passed in Python. A FitConfig is a mapping, so both
    `fit(model, data, config=cfg)` and `fit(model, data, **cfg)` work.

    Optimizers and schedules may be given by name in files:
    `optimizer = {name = "AdamW", lr = 3e-4}` builds `torch.optim.AdamW(params, lr=3e-4)`;
    `schedule = {name = "cosine", warmup_steps = 100, total_steps = 1000}` builds
    `loopkit.schedules.cosine(100, 1000)`.
    """

    loss_fn: Any = None
    optimizer: Any = None
    schedule: Any = None
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    accumulate: int = 1
    samples_per_step: int | None = None
    tokens_per_step: int | None = None
    clip: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    strategy: Any = None
    eval_data: Any = None
    eval_every: int | None = None
    eval_batches: int | None = None
    metrics: Any = None
    predict: Any = None
    monitor: str = "eval/loss"
    mode: Literal["min", "max"] | None = None
    callbacks: tuple[Any, ...] | list[Any] = field(default_factory=tuple)
    log_every: int | None = 50
    log_dir: str | Path | None = None
    fingerprint_every: int | None = None
    progress: bool = True
    seed: int = 0
    compile: bool = False
    step: Any = None
    checkpoint_dir: str | Path | None = None
    save_every: int | None = None
    save_on_epoch_end: bool = False
    keep_last: int | None = None
    keep_best: bool = False
    resume: bool | str | Path = False
    allow_data_reshard: bool = False
    nonfinite: Literal["raise", "skip"] = "raise"
    max_nonfinite_skips: int = 10
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = 0
    data_timeout_s: float | None = 600.0
    pin_memory: bool = False
    collate_fn: Any = None

    def __post_init__(self) -> None:
        for name, (check, allowed) in _CHECKS.items():
            value = getattr(self, name)
            if not check(value):
                raise ValueError(f"FitConfig({name}={value!r}): must be {allowed}.")
        by_target = [n for n in ("samples_per_step", "tokens_per_step") if getattr(self, n)]
        if len(by_target) > 1 or (by_target and self.accumulate != 1):
            given = ", ".join(by_target + (["accumulate"] if self.accumulate != 1 else []))
            raise ValueError(
                f"FitConfig: {given} are given together; set the window either as "
                "accumulate=k micro-batches or as samples_per_step / tokens_per_step."
            )
        if self.eval_every is not None and self.eval_data is None:
            raise ValueError(
                f"FitConfig(eval_every={self.eval_every}): needs eval_data=...; pass the "
                "evaluation data or drop eval_every."
            )
        for name in ("checkpoint_dir", "log_dir"):
            _check_directory(name, getattr(self, name))
        needs_dir = [n for n in ("save_every", "keep_last") if getattr(self, n) is not None] + [
            n for n in ("save_on_epoch_end", "keep_best") if getattr(self, n)
        ]
        if self.resume is True:
            needs_dir.append("resume")
        if needs_dir and self.checkpoint_dir is None:
            raise ValueError(
                f"FitConfig({needs_dir[0]}={getattr(self, needs_dir[0])!r}): needs "
                "checkpoint_dir=...; pass the directory for checkpoints."
            )
        if self.fingerprint_every and self.log_dir is None:
            raise ValueError(
                f"FitConfig(fingerprint_every={self.fingerprint_every}): needs log_dir=...; "
                "fingerprints are written under <log_dir>/fingerprints/."
            )
        if self.fingerprint_every and self.step is not None:
            raise ValueError(
                f"FitConfig(fingerprint_every={self.fingerprint_every}): fit adds fingerprints "
                "to its default step only; put loopkit.fingerprint(recorder) in your step= "
                "chain (before optimizer_step) and pass the recorder in callbacks=[...]."
            )
        if self.step is not None and (self.accumulate != 1 or self.clip is not None or by_target):
            raise ValueError(
                "FitConfig(step=...): a custom step chain brings its own accumulate and clip; "
                "drop accumulate / clip / samples_per_step / tokens_per_step, or put them in "
                "the chain."
            )

    # Mapping protocol, so that fit(**config) works.
    def __getitem__(self, key: str) -> Any:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELD_NAMES)

    def __len__(self) -> int:
        return len(_FIELD_NAMES)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FitConfig:
        """Build a config from a mapping; unknown keys raise ValueError listing the fields."""
        unknown = sorted(set(values) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(
                f"FitConfig: unknown field(s) {unknown}. Fields: {', '.join(_FIELD_NAMES)}."
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> FitConfig:
        """Load a config from a .toml, .yaml/.yml or .json file.

        Raises:
            ValueError: an unknown suffix, unparsable content or a bad field.
        """
        return cls.from_dict(read_table(path, where=f"FitConfig.from_file(path={str(path)!r})"))


def read_table(path: str | Path, *, where: str) -> dict[str, Any]:
    """A config file's table of keys (TOML, YAML or JSON, by suffix); YAML is optional.

    Raises:
        ValueError: an unreadable file, an unknown suffix, unparsable content, or content
            that is not a table (the message starts with `where`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{where}: cannot read it ({error}).") from error
    try:
        if suffix == ".toml":
            if sys.version_info < (3, 11):  # pragma: no cover
                import tomli as tomllib
            else:
                import tomllib
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(
                f"{where}: unknown suffix {suffix!r}; use .toml, .yaml, .yml or .json."
            )
    except ValueError:
        raise
    except Exception as error:  # each parser has its own error type
        raise ValueError(f"{where}: cannot parse: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of fields, got {type(values).__name__}.")
    return values


_FIELD_NAMES = tuple(f.name for f in fields(FitConfig))


@dataclass(frozen=True)
class TorchOptimizer:
    """An optimizer factory from a torch.optim class name and its keyword arguments."""

    name: str
    kwargs: Mapping[str, Any]

    def __post_init__(self) -> None:
        cls = getattr(torch.optim, self.name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            names = sorted(
                n
                for n in dir(torch.optim)
                if isinstance(getattr(torch.optim, n), type)
                and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                and n != "Optimizer"
            )
            raise ValueError(
                f"optimizer={{'name': {self.name!r}}}: not a torch.optim optimizer; one of "
                f"{', '.join(names)}."
            )

    def __call__(self, params: Any) -> torch.optim.Optimizer:
        return getattr(torch.optim, self.name)(params, **self.kwargs)  # type: ignore[no-any-return]


def resolve_named(value: Any, what: str) -> Any:
    """Turn {'name': ..., **kwargs} into an optimizer factory or a schedule; else return value."""
    if not isinstance(value, Mapping):
        return value
    if "name" not in value:
        raise ValueError(f"{what}={dict(value)!r}: a mapping needs a 'name' key.")
    kwargs = {k: v for k, v in value.items() if k != "name"}
    if what == "optimizer":
        return TorchOptimizer(value["name"], kwargs)
    factory = getattr(_schedules, str(value["name"]), None)
    names = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")
    if value["name"] not in names or factory is None:
        raise ValueError(f"schedule={{'name': {value['name']!r}}}: one of {', '.join(names)}.")
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise ValueError(f"schedule={dict(value)!r}: {error}") from error


__all__ = ["FitConfig", "TorchOptimizer", "read_table", "resolve_named"]
