"""FitConfig: fit()'s keyword arguments as one validated record, loadable from files."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import numbers
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import torch

from . import schedules as _schedules
from .averaging import average_kind_of, check_fit_averaging
from .metrics import is_torchmetrics


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
    "average": (
        _optional(lambda v: average_kind_of(v) is not None),
        "None, loopkit.ema(decay, ...) or loopkit.swa(start=...) (a weight average kept in "
        "the record)",
    ),
    "eval_weights": (
        lambda v: v in ("model", "ema", "swa"),
        "'model', 'ema' or 'swa' (the weights evaluations use)",
    ),
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
        _optional(lambda v: isinstance(v, (Mapping, list, tuple)) or is_torchmetrics(v)),
        "None, a list of metric names, a dict name -> metric, or a torchmetrics Metric or "
        "MetricCollection",
    ),
    "callbacks": (lambda v: isinstance(v, (list, tuple)), "a list of callbacks"),
    "step": (_optional(callable), "None or a transform `(state, batch) -> state`"),
    "predict": (_optional(callable), "None or a callable predict(model, batch)"),
    "collate_fn": (_optional(callable), "None or a callable collate_fn(samples)"),
}


_DIRECTORIES = ("checkpoint_dir", "log_dir")
_CHECKED = tuple(dict.fromkeys((*_CHECKS, *_DIRECTORIES)))
"""The fields with a check of their own (the others take any value)."""


_TRUE_HALF = (
    " Lightning's true half precision (the weights themselves in half) has no loopkit name: "
    "cast the model (model.to(torch.bfloat16)) and keep precision='fp32' (no autocast)."
)
_VALUE_HINTS = {
    # Lightning's Trainer(precision=...) names, compared as strings.
    ("precision", "bf16-mixed"): " Lightning's 'bf16-mixed' is precision='bf16'.",
    ("precision", "16-mixed"): " Lightning's '16-mixed' is precision='fp16'.",
    ("precision", "16"): " Lightning's 16 (16-bit mixed) is precision='fp16'.",
    ("precision", "32"): " Lightning's 32 is precision='fp32'.",
    ("precision", "32-true"): " Lightning's '32-true' is precision='fp32'.",
    ("precision", "bf16-true"): _TRUE_HALF,
    ("precision", "16-true"): _TRUE_HALF,
}
"""Hints for a refused value that another toolkit spells so ((field, str(value)) -> text)."""


def check_values(values: Mapping[str, Any]) -> None:
    """Check each field in `values` on its own (a config file's table, before merging).

    Raises:
        ValueError: `FitConfig(<name>=<value>): must be <what is allowed>.`
    """
    for name, value in values.items():
        if name in _CHECKS:
            check, allowed = _CHECKS[name]
            if not check(value):
                hint = _VALUE_HINTS.get((name, str(value)), "")
                raise ValueError(f"FitConfig({name}={value!r}): must be {allowed}.{hint}")
        if name in _DIRECTORIES:
            _check_directory(name, value)


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

    fit() writes these fields out as its keyword parameters, in this order, with these
    types and defaults (so editors and type checkers see them); tests/test_fit_signature.py
    keeps the two equal. A new field goes in both, with its `_CHECKS` entry and a line in
    fit's docstring.

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
    average: Any = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    strategy: Any = None
    eval_data: Any = None
    eval_every: int | None = None
    eval_batches: int | None = None
    eval_weights: Literal["model", "ema", "swa"] = "model"
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
        check_values({name: getattr(self, name) for name in _CHECKED})  # each field alone
        # The checks below read several fields: a file's values pass them only once merged
        # with the values given in code (merge_config).
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
        check_fit_averaging(self.average, self.eval_weights, self.step)

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
        """Build a config from a mapping of its fields.

        Raises:
            ValueError: an unknown key (with "did you mean ...?", or where a well-known name
                from another toolkit belongs, e.g. lr -> optimizer) or a bad value.
        """
        refuse_unknown(values, where="FitConfig.from_dict")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **code_values: Any) -> FitConfig:
        """Load a config from a .toml, .yaml/.yml or .json file, plus values given in code.

        Each of the file's values is checked on its own, with errors naming the file; the
        checks that read several fields (eval_every needs eval_data, ...) run once the
        file's values and `code_values` are merged, as `fit(config=path, **code_values)`
        does.

        Raises:
            ValueError: an unknown suffix, unparsable content, an unknown key or a bad field.
        """
        refuse_unknown(code_values, where="FitConfig.from_file")
        return _merge_file(path, code_values, where=f"FitConfig.from_file(path={str(path)!r})")


def read_table(path: str | os.PathLike[str], *, where: str) -> dict[str, Any]:
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
            values = _load_yaml(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(
                f"{where}: unknown suffix {suffix!r}; use .toml, .yaml, .yml or .json."
            )
    except Exception as error:  # each parser has its own error type (TOML's and JSON's
        if str(error).startswith(where):  # are ValueErrors): name the file in each
            raise
        raise ValueError(f"{where}: cannot parse: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of fields, got {type(values).__name__}.")
    return values


def _load_yaml(text: str) -> Any:
    """Parse YAML safely, reading `3e-4` as a float as TOML, JSON and YAML 1.2 do.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent: `lr: 3e-4`
    would load as the string "3e-4" and fail deep inside the optimizer
    (https://github.com/yaml/pyyaml/issues/173).
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return yaml.load(text, Loader=_Loader) or {}  # a SafeLoader: no arbitrary objects


_FIELD_NAMES = tuple(f.name for f in fields(FitConfig))


def _optimizer(key: str, name: str = "AdamW") -> str:
    return f"it belongs to the optimizer: optimizer={{'name': '{name}', '{key}': {{v}}}}"


_OPTIMIZER_KEYS = {
    **dict.fromkeys(("lr", "learning_rate", "base_lr"), "lr"),
    **{key: key for key in ("weight_decay", "momentum", "betas")},
    **dict.fromkeys(("eps", "adam_epsilon"), "eps"),
}
"""Names fit does not take that are a torch optimizer's keyword (the keyword)."""


_HINTS: dict[str, str] = {
    # Where well-known names from other toolkits (HF Trainer, Lightning, Keras, ...) belong.
    # "{v}" stands for the value given.
    **{key: _optimizer("lr") for key in ("lr", "learning_rate", "base_lr")},
    "weight_decay": _optimizer("weight_decay"),
    "momentum": _optimizer("momentum", "SGD"),
    "betas": _optimizer("betas"),
    **{key: _optimizer("eps") for key in ("eps", "adam_epsilon")},
    **dict.fromkeys(
        ("adam_beta1", "adam_beta2"),
        "it belongs to the optimizer: optimizer={'name': 'AdamW', 'betas': (beta1, beta2)}",
    ),
    **dict.fromkeys(
        ("optim", "optimizer_cls", "optimizer_name"),
        "use optimizer={'name': 'AdamW', 'lr': ...} (any torch.optim class) or a factory "
        "`lambda params: torch.optim.AdamW(params, lr=...)`",
    ),
    **dict.fromkeys(
        ("warmup_steps", "num_warmup_steps"),
        "it belongs to the schedule: schedule={'name': 'cosine', 'warmup_steps': {v}, "
        "'total_steps': ...} (loopkit.schedules)",
    ),
    **dict.fromkeys(
        ("warmup_ratio", "warmup"),
        "it belongs to the schedule, in steps: schedule={'name': 'cosine', 'warmup_steps': "
        "..., 'total_steps': ...} (loopkit.schedules)",
    ),
    **dict.fromkeys(
        ("lr_scheduler", "lr_scheduler_type", "scheduler", "lr_schedule", "lr_scheduler_kwargs"),
        "use schedule= (a function of the step, a torch LRScheduler, or {'name': 'cosine', ...})",
    ),
    **dict.fromkeys(
        ("gradient_accumulation_steps", "accumulate_grad_batches", "grad_accum_steps"),
        "use accumulate={v}",
    ),
    **dict.fromkeys(
        ("max_grad_norm", "gradient_clip_val", "grad_clip", "clip_grad_norm", "clip_norm"),
        "use clip={v} (the max global grad norm)",
    ),
    **dict.fromkeys(("num_epochs", "max_epochs", "num_train_epochs", "n_epochs"), "use epochs={v}"),
    **dict.fromkeys(
        ("max_iters", "num_steps", "total_steps", "max_train_steps", "num_training_steps"),
        "use max_steps={v}",
    ),
    **dict.fromkeys(
        ("accelerator", "devices", "gpus", "no_cuda", "use_cpu"),
        "use strategy=lk.SingleDevice('cuda') (or 'cpu', 'mps'), or lk.DDP() / lk.FSDP() "
        "under torchrun",
    ),
    "device": "use strategy=lk.SingleDevice({v})",
    "fp16": "use precision='fp16'",
    "bf16": "use precision='bf16'",
    **dict.fromkeys(
        ("mixed_precision", "amp", "dtype", "use_amp", "autocast"),
        "use precision='bf16' or 'fp16' ('fp32' without autocast)",
    ),
    **dict.fromkeys(
        ("output_dir", "default_root_dir", "save_dir", "out_dir", "dirpath"),
        "use checkpoint_dir={v} for checkpoints and/or log_dir={v} for logs",
    ),
    "logging_dir": "use log_dir={v}",
    **dict.fromkeys(
        ("logging_steps", "log_every_n_steps", "log_interval", "log_steps"), "use log_every={v}"
    ),
    **dict.fromkeys(
        ("eval_steps", "val_check_interval", "eval_interval", "evaluation_steps"),
        "use eval_every={v}",
    ),
    **dict.fromkeys(("save_steps", "checkpoint_every", "save_interval"), "use save_every={v}"),
    **dict.fromkeys(("save_total_limit", "save_top_k"), "use keep_last={v} (and keep_best=True)"),
    "load_best_model_at_end": "use keep_best={v} (the best checkpoint is kept; see result.best)",
    "metric_for_best_model": "use monitor='eval/<name>'",
    "greater_is_better": "use mode='max' (or 'min'; inferred from monitor when None)",
    **dict.fromkeys(
        ("per_device_train_batch_size", "train_batch_size", "micro_batch_size"),
        "use batch_size={v}",
    ),
    **dict.fromkeys(
        ("per_device_eval_batch_size", "val_batch_size", "valid_batch_size"),
        "use eval_batch_size={v}",
    ),
    **dict.fromkeys(
        ("eval_dataset", "val_data", "val_dataset", "validation_data", "val_dataloaders")
        + ("eval_dataloader", "eval_loader", "val_loader", "valid_data"),
        "use eval_data=...",
    ),
    **dict.fromkeys(
        ("train_dataset", "train_dataloader", "train_loader", "dataset"),
        "the training data is fit's second argument: fit(model, train_data, ...) (`data` in "
        "a run config)",
    ),
    **dict.fromkeys(("resume_from_checkpoint", "ckpt_path"), "use resume={v}"),
    "dataloader_num_workers": "use num_workers={v}",
    "dataloader_drop_last": "use drop_last={v}",
    "dataloader_pin_memory": "use pin_memory={v}",
    **dict.fromkeys(("data_collator", "collator"), "use collate_fn=..."),
    **dict.fromkeys(
        ("loss", "criterion", "compute_loss", "loss_func", "loss_function"),
        "use loss_fn=... (loss_fn(model, batch) -> Loss(sum, count) or a mean)",
    ),
    "torch_compile": "use compile={v}",
    **dict.fromkeys(("random_seed", "data_seed", "manual_seed"), "use seed={v}"),
    **dict.fromkeys(
        ("early_stopping_patience", "patience"),
        "use callbacks=[lk.EarlyStopping('eval/loss', patience={v})]",
    ),
    **dict.fromkeys(
        ("report_to", "logger", "loggers"),
        "use log_dir=... (TensorBoard, CSV, JSONL) or a logger in callbacks=[...]",
    ),
    **dict.fromkeys(
        ("disable_tqdm", "enable_progress_bar", "verbose"), "use progress=True or False"
    ),
}
"""Names fit does not take, mapped to where their setting belongs ("{v}": the value)."""


def unknown_hints(
    unknown: Mapping[str, Any], known: Sequence[str] = _FIELD_NAMES, *, optimizer: object = None
) -> list[str]:
    """One `name=value: hint` per unknown key: where it belongs, or "did you mean ...?".

    A well-known name from another toolkit (lr, gradient_accumulation_steps, output_dir, ...)
    says where its setting goes; any other name gets the closest of `known` (difflib), else
    the closest well-known name's hint, else "no such field". An optimizer keyword (lr,
    weight_decay, ...) next to an `optimizer` dict given too is shown added to that dict.
    """
    hints = []
    for name, value in unknown.items():
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if name in _OPTIMIZER_KEYS and isinstance(optimizer, Mapping) and "name" in optimizer:
            merged = {**optimizer, _OPTIMIZER_KEYS[name]: value}
            hint = f"it belongs to the optimizer: optimizer={merged!r}"
        elif name in _OPTIMIZER_KEYS and optimizer is not None:
            key = _OPTIMIZER_KEYS[name]
            hint = (
                f"it belongs to the optimizer given as optimizer=: build it with {key}="
                f"{value!r}, e.g. `lambda params: torch.optim.AdamW(params, {key}={value!r})`"
            )
        elif name in _HINTS:
            hint = _HINTS[name].replace("{v}", repr(value))
        elif close:
            hint = f"did you mean {close[0]!r}?"
        elif near := difflib.get_close_matches(name, _HINTS, n=1, cutoff=0.75):
            hint = _HINTS[near[0]].replace("{v}", repr(value))
        else:
            hint = "no such field"
        hints.append(f"{name}={value!r}: {hint}")
    return hints


def refuse_unknown(values: Mapping[str, Any], *, where: str) -> None:
    """Raise ValueError for keys of `values` that are not FitConfig fields, with hints.

    Raises:
        ValueError: `<where>: unknown field lr=0.001: it belongs to the optimizer: ...`.
    """
    unknown = {k: v for k, v in values.items() if k not in _FIELD_NAMES}
    if not unknown:
        return
    hints = unknown_hints(unknown, optimizer=values.get("optimizer"))
    listing = ""
    if any(h.endswith(": no such field") for h in hints):
        listing = f" The fields: {', '.join(_FIELD_NAMES)}."
    plural = "s" if len(hints) > 1 else ""
    end = "" if hints[-1].endswith("?") else "."
    raise ValueError(f"{where}: unknown field{plural} {'; '.join(hints)}{end}{listing}")


def load_fields(path: str | os.PathLike[str], *, where: str) -> dict[str, Any]:
    """A config file's values, each checked on its own (errors start with `where`).

    Raises:
        ValueError: an unreadable or unparsable file, an unknown key or a bad value.
    """
    values = read_table(path, where=where)
    refuse_unknown(values, where=where)
    try:
        check_values(values)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return values


def _merge_file(path: str | os.PathLike[str], given: Mapping[str, Any], *, where: str) -> FitConfig:
    """The file's values under `given`, checked together (cross-field checks after the merge)."""
    values = load_fields(path, where=where)
    try:
        return FitConfig(**{**values, **given})
    except ValueError as error:
        merged = (
            f"the file's values merged with {', '.join(given)} given in code"
            if given
            else "the file alone; values given in code count too: pass them with the path, "
            "e.g. FitConfig.from_file(path, eval_data=...) or fit(model, data, config=path, "
            "eval_data=...)"
        )
        raise ValueError(f"{error} ({where}: {merged}.)") from None


ConfigSource = FitConfig | Mapping[str, Any] | str | os.PathLike[str] | None
"""What `config=` takes: a FitConfig, a mapping of its fields, or a config file's path."""


def merge_config(config: ConfigSource, given: Mapping[str, Any], *, where: str) -> FitConfig:
    """The FitConfig of `config` with the keyword arguments `given` in code on top.

    `given` holds exactly the arguments the caller wrote, so one equal to its default still
    overrides the config's value. A file is read and each of its values checked on its own
    (errors name the file); the checks that read several fields run after the merge.

    Raises:
        ValueError: an unknown key (with hints), a bad value, or fields that do not go
            together.
        TypeError: `config` is none of the kinds above.
    """
    refuse_unknown(given, where=where)
    if isinstance(config, (str, os.PathLike)):
        return _merge_file(config, given, where=f"{where}(config={os.fspath(config)!r})")
    if isinstance(config, FitConfig):
        return FitConfig(**{**config, **given}) if given else config
    if isinstance(config, Mapping):
        refuse_unknown(config, where=f"{where}(config=...)")
        return FitConfig(**{**config, **given})
    if config is None:
        return FitConfig(**given)
    raise TypeError(
        f"{where}(config={config!r}): must be a FitConfig, a mapping of its fields, or the "
        "path of a .toml, .yaml/.yml or .json config file."
    )


_P = ParamSpec("_P")
_R = TypeVar("_R")


def takes_config(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Let `fn`'s written-out FitConfig keywords override its `config=` argument.

    `fn` takes `config=` and keyword parameters named like FitConfig's fields (typed, with
    FitConfig's defaults, so editors and type checkers see them; the ParamSpec keeps that
    signature). The wrapper receives exactly the keywords the caller wrote, merges them over
    `config` (merge_config: unknown names get hints, a file is validated after the merge) and
    calls `fn` with `config=` the merged FitConfig and every field at its merged value.
    """
    parameters = inspect.signature(fn).parameters
    passed = tuple(name for name in _FIELD_NAMES if name in parameters)
    own = tuple(name for name in parameters if name not in _FIELD_NAMES and name != "config")
    where = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        # Exactly the keywords the caller wrote: no guessing by comparing with defaults.
        given: dict[str, Any] = dict(kwargs)
        config = given.pop("config", None)
        own_values = {name: given.pop(name) for name in own if name in given}
        cfg = merge_config(config, given, where=where)
        call: Callable[..., _R] = fn
        return call(*args, **own_values, config=cfg, **{name: cfg[name] for name in passed})

    return wrapper


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
        try:
            return getattr(torch.optim, self.name)(params, **self.kwargs)  # type: ignore[no-any-return]
        except (TypeError, ValueError) as error:  # torch's message names no setting
            given = {"name": self.name, **self.kwargs}
            raise type(error)(f"optimizer={given!r}: {error}") from error


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


__all__ = [
    "ConfigSource",
    "FitConfig",
    "TorchOptimizer",
    "check_values",
    "load_fields",
    "merge_config",
    "read_table",
    "refuse_unknown",
    "resolve_named",
    "takes_config",
    "unknown_hints",
]
