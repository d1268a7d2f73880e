"""TrainingArguments: the HF-style settings of a Trainer run, validated when built."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

IntervalStrategy = Literal["no", "steps", "epoch"]
"""When to log or evaluate (HF's IntervalStrategy)."""
SaveStrategy = Literal["no", "steps", "epoch", "best"]
"""When to save a checkpoint (HF's SaveStrategy)."""
SchedulerType = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]
"""The learning-rate schedules, with HF's formulas (loopkit.schedules)."""
OptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adamw_hf", "sgd"]
"""The built-in optimizers (HF's OptimizerNames that loopkit provides)."""
ReportTarget = Literal["none", "tensorboard", "all"]
"""Where logs go besides the callbacks."""
PipelineSchedule = Literal[
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
]
"""torch.distributed.pipelining schedules, by loopkit.strategies.Pipeline's names."""

INTERVALS: tuple[str, ...] = get_args(IntervalStrategy)
SAVE_STRATEGIES: tuple[str, ...] = get_args(SaveStrategy)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerType)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
REPORT_TO: tuple[str, ...] = get_args(ReportTarget)
PIPELINE_SCHEDULES: tuple[str, ...] = get_args(PipelineSchedule)

# HF fields this façade accepts so that scripts run unchanged, but that change nothing here
# (documented in docs/migrating.md). Anything else unknown is an error.
_NO_EFFECT = (
    "overwrite_output_dir",
    "do_train",
    "do_eval",
    "do_predict",
    "eval_accumulation_steps",
    "logging_nan_inf_filter",
    "local_rank",
    "run_name",
    "ignore_data_skip",
    "include_num_input_tokens_seen",
    "full_determinism",
    "save_only_model",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _bad(name: str, value: object, allowed: str, fix: str = "") -> ValueError:
    return ValueError(
        f"TrainingArguments({name}={value!r}): {allowed}." + (f" {fix}" if fix else "")
    )


@dataclass
class TrainingArguments:
    """The settings of a Trainer run, with the names and defaults of HF's TrainingArguments.

    Every field is checked when the object is built (or by `from_dict`); a bad or
    contradictory value raises ValueError naming the field, the value and the fix, before
    any work. Fields HF has that change nothing here (`do_train`, `run_name`, ...) are
    accepted so scripts run unchanged; the migration guide lists them.

    Example:
        >>> args = TrainingArguments(output_dir="out", learning_rate=1e-3, max_steps=10)
        >>> args.eval_strategy, args.lr_scheduler_type, args.get_warmup_steps(10)
        ('no', 'linear', 0)
    """

    output_dir: str | None = None
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    eval_strategy: IntervalStrategy = "no"
    prediction_loss_only: bool = False
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    eval_accumulation_steps: int | None = None
    eval_delay: float = 0
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: SchedulerType = "linear"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_dir: str | None = None
    logging_strategy: IntervalStrategy = "steps"
    logging_first_step: bool = False
    logging_steps: float = 500
    logging_nan_inf_filter: bool = True
    save_strategy: SaveStrategy = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    save_safetensors: bool = True
    save_only_model: bool = False
    use_cpu: bool = False
    seed: int = 42
    data_seed: int | None = None
    bf16: bool = False
    fp16: bool = False
    tf32: bool | None = None
    local_rank: int = -1
    dataloader_drop_last: bool = False
    eval_steps: float | None = None
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    run_name: str | None = None
    disable_tqdm: bool | None = None
    remove_unused_columns: bool = True
    label_names: list[str] | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    ignore_data_skip: bool = False
    optim: OptimizerName = "adamw_torch"
    group_by_length: bool = False
    report_to: ReportTarget | list[ReportTarget] | None = "none"
    resume_from_checkpoint: str | bool | None = None
    gradient_checkpointing: bool = False
    include_num_input_tokens_seen: bool = False
    full_determinism: bool = False
    push_to_hub: bool = False
    torch_compile: bool = False
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    # loopkit: pipeline parallelism, mapped onto loopkit.strategies.Pipeline(...).
    pipeline_split_spec: list[str] | None = None
    pipeline_chunks: int | None = None
    pipeline_schedule: PipelineSchedule = "1F1B"
    # HF's name before 4.46; accepted and moved to eval_strategy.
    evaluation_strategy: IntervalStrategy | None = None

    def __post_init__(self) -> None:
        self._resolve_aliases()
        self._check_numbers()
        self._check_counts()
        self._check_flags()
        self._check_scheduler()
        self._check_choices()
        self._check_pipeline()
        self._check_strategies()
        self._check_best_model()
        self._check_unsupported()

    # -- checks, in the order a reader meets the fields ------------------------------------

    def _resolve_aliases(self) -> None:
        if self.evaluation_strategy is not None:
            if self.eval_strategy != "no" and self.eval_strategy != self.evaluation_strategy:
                raise ValueError(
                    f"TrainingArguments(eval_strategy={self.eval_strategy!r}, "
                    f"evaluation_strategy={self.evaluation_strategy!r}): both given and they "
                    "differ; evaluation_strategy is the old name, keep only eval_strategy."
                )
            self.eval_strategy = self.evaluation_strategy
            self.evaluation_strategy = None
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if not isinstance(self.output_dir, (str, os.PathLike)):
            raise _bad("output_dir", self.output_dir, "must be a directory path")
        self.output_dir = os.fspath(self.output_dir)
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.torch_compile = True
        if self.report_to is None:
            self.report_to = "none"
        if self.save_total_limit is not None and _is_int(self.save_total_limit):
            if self.save_total_limit <= 0:
                self.save_total_limit = None  # HF: <= 0 means no limit

    def _check_numbers(self) -> None:
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise _bad(name, value, "must be an int >= 1")
        for name in ("learning_rate", "weight_decay", "warmup_ratio", "eval_delay"):
            value = getattr(self, name)
            if not (_is_real(value) and value >= 0):
                raise _bad(name, value, "must be a finite float >= 0")
        if self.warmup_ratio > 1:
            raise _bad(
                "warmup_ratio",
                self.warmup_ratio,
                "must lie in [0, 1]",
                "Use warmup_steps for a number of steps.",
            )
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not (_is_real(value) and 0 <= value < 1):
                raise _bad(name, value, "must lie in [0, 1)")
        if not (_is_real(self.adam_epsilon) and self.adam_epsilon > 0):
            raise _bad("adam_epsilon", self.adam_epsilon, "must be a float > 0")
        if self.max_grad_norm is not None and not (
            _is_real(self.max_grad_norm) and self.max_grad_norm >= 0
        ):
            raise _bad(
                "max_grad_norm", self.max_grad_norm, "must be a float >= 0 (0 or None: no clipping)"
            )

    def _check_counts(self) -> None:
        if not _is_int(self.max_steps):
            raise _bad("max_steps", self.max_steps, "must be an int (-1: train num_train_epochs)")
        if self.max_steps <= 0 and not (
            _is_real(self.num_train_epochs) and self.num_train_epochs > 0
        ):
            raise _bad(
                "num_train_epochs",
                self.num_train_epochs,
                "must be a float > 0 when max_steps is not set",
            )
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise _bad("warmup_steps", self.warmup_steps, "must be an int >= 0")
        for name in ("seed", "dataloader_num_workers"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                raise _bad(name, value, "must be an int >= 0")
        if self.data_seed is not None and not (_is_int(self.data_seed) and self.data_seed >= 0):
            raise _bad("data_seed", self.data_seed, "must be None or an int >= 0")
        if self.save_total_limit is not None and not _is_int(self.save_total_limit):
            raise _bad("save_total_limit", self.save_total_limit, "must be None or an int")

    def _check_flags(self) -> None:
        for name in (
            "bf16",
            "fp16",
            "torch_compile",
            "load_best_model_at_end",
            "disable_tqdm",
            "remove_unused_columns",
            "dataloader_drop_last",
            "dataloader_pin_memory",
            "logging_first_step",
            "use_cpu",
            "prediction_loss_only",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _bad(name, value, "must be True or False")
        if self.bf16 and self.fp16:
            raise ValueError(
                "TrainingArguments(bf16=True, fp16=True): choose one mixed precision. bf16 "
                "where the hardware has it (no loss scaling needed), else fp16."
            )

    def _check_scheduler(self) -> None:
        if self.lr_scheduler_type not in SCHEDULERS:
            raise _bad(
                "lr_scheduler_type",
                self.lr_scheduler_type,
                f"must be one of {', '.join(map(repr, SCHEDULERS))}",
            )
        if not isinstance(self.lr_scheduler_kwargs, Mapping):
            raise _bad("lr_scheduler_kwargs", self.lr_scheduler_kwargs, "must be a dict")
        allowed_kwargs = {
            "cosine": {"num_cycles"},
            "cosine_with_restarts": {"num_cycles"},
            "polynomial": {"power", "lr_end"},
            "inverse_sqrt": {"timescale"},
        }.get(self.lr_scheduler_type, set())
        unknown = sorted(set(self.lr_scheduler_kwargs) - allowed_kwargs)
        if unknown:
            raise _bad(
                "lr_scheduler_kwargs",
                dict(self.lr_scheduler_kwargs),
                f"{unknown} not accepted by lr_scheduler_type={self.lr_scheduler_type!r}; "
                f"accepted: {sorted(allowed_kwargs) or 'none'}",
            )
        if (
            self.lr_scheduler_type == "cosine"
            and self.lr_scheduler_kwargs.get("num_cycles", 0.5) != 0.5
        ):
            raise _bad(
                "lr_scheduler_kwargs",
                dict(self.lr_scheduler_kwargs),
                "cosine supports num_cycles=0.5 only (half a cosine)",
                "Use cosine_with_restarts for several cycles.",
            )
        kwargs = self.lr_scheduler_kwargs
        if self.lr_scheduler_type == "cosine_with_restarts" and not (
            _is_int(kwargs.get("num_cycles", 1)) and kwargs.get("num_cycles", 1) >= 1
        ):
            raise _bad("lr_scheduler_kwargs", dict(kwargs), "num_cycles must be an int >= 1")
        if self.lr_scheduler_type == "polynomial":
            lr_end, power = kwargs.get("lr_end", 1e-7), kwargs.get("power", 1.0)
            if not (_is_real(lr_end) and 0 <= lr_end < self.learning_rate):
                raise _bad(
                    "lr_scheduler_kwargs",
                    dict(kwargs),
                    f"lr_end ({lr_end}) must be >= 0 and smaller than learning_rate "
                    f"({self.learning_rate})",
                )
            if not (_is_real(power) and power > 0):
                raise _bad("lr_scheduler_kwargs", dict(kwargs), "power must be a float > 0")
        if (
            self.lr_scheduler_type == "inverse_sqrt"
            and kwargs.get("timescale") is not None
            and not (_is_int(kwargs["timescale"]) and kwargs["timescale"] >= 1)
        ):
            raise _bad("lr_scheduler_kwargs", dict(kwargs), "timescale must be None or an int >= 1")

    def _check_choices(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise _bad(
                "optim",
                self.optim,
                f"must be one of {', '.join(map(repr, OPTIMIZERS))}",
                "For another optimizer pass Trainer(optimizer_cls_and_kwargs=...).",
            )
        if self.label_names is not None and not (
            isinstance(self.label_names, (list, tuple))
            and self.label_names
            and all(isinstance(n, str) for n in self.label_names)
        ):
            raise _bad("label_names", self.label_names, "must be None or a list of batch keys")
        reports = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(reports, (list, tuple)) or any(r not in REPORT_TO for r in reports):
            raise _bad(
                "report_to",
                self.report_to,
                f"loopkit reports to {', '.join(map(repr, REPORT_TO))}",
                "For another service, add a TrainerCallback whose on_log sends the logs.",
            )

    def _check_pipeline(self) -> None:
        if self.pipeline_chunks is not None and not (
            _is_int(self.pipeline_chunks) and self.pipeline_chunks >= 1
        ):
            raise _bad("pipeline_chunks", self.pipeline_chunks, "must be None or an int >= 1")
        if self.pipeline_split_spec is not None and not (
            isinstance(self.pipeline_split_spec, (list, tuple))
            and self.pipeline_split_spec
            and all(isinstance(s, str) for s in self.pipeline_split_spec)
        ):
            raise _bad(
                "pipeline_split_spec",
                self.pipeline_split_spec,
                "must be None or a list of module names to split before, e.g. "
                "['layers.4', 'layers.8']",
            )
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise _bad(
                "pipeline_schedule",
                self.pipeline_schedule,
                f"must be one of {', '.join(map(repr, PIPELINE_SCHEDULES))}",
            )

    def _check_interval(self, name: str, value: Any, strategy: str) -> None:
        if not _is_real(value) or value <= 0:
            raise _bad(
                name,
                value,
                f"must be > 0 with the {strategy!r} strategy",
                "An int counts optimizer steps; a float in (0, 1) is a fraction of "
                "the total steps.",
            )
        if value > 1 and not float(value).is_integer():
            raise _bad(
                name,
                value,
                "must be an int when above 1 (a float in (0, 1) is a fraction of the total steps)",
            )

    def _check_strategies(self) -> None:
        for name, allowed in (
            ("eval_strategy", INTERVALS),
            ("logging_strategy", INTERVALS),
            ("save_strategy", SAVE_STRATEGIES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise _bad(name, value, f"must be one of {', '.join(map(repr, allowed))}")
        if self.logging_strategy == "steps":
            self._check_interval("logging_steps", self.logging_steps, "steps")
        if self.eval_strategy == "steps":
            if self.eval_steps is None or self.eval_steps == 0:
                self.eval_steps = self.logging_steps  # HF's default
            self._check_interval("eval_steps", self.eval_steps, "steps")
        if self.save_strategy == "steps":
            self._check_interval("save_steps", self.save_steps, "steps")

    def _check_best_model(self) -> None:
        if self.save_strategy == "best" and self.metric_for_best_model is None:
            raise ValueError(
                "TrainingArguments(save_strategy='best'): needs metric_for_best_model, e.g. "
                "metric_for_best_model='loss' or 'accuracy'."
            )
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ValueError(
                    "TrainingArguments(load_best_model_at_end=True, eval_strategy='no'): the "
                    "best model is chosen by evaluations; set eval_strategy='steps' or 'epoch'."
                )
            if self.save_strategy != "best" and self.save_strategy != self.eval_strategy:
                raise ValueError(
                    f"TrainingArguments(load_best_model_at_end=True, eval_strategy="
                    f"{self.eval_strategy!r}, save_strategy={self.save_strategy!r}): the save "
                    "and eval strategies must match, so that every evaluated model is saved. "
                    f"Set save_strategy={self.eval_strategy!r} (or 'best')."
                )
            if self.save_strategy == "steps":
                eval_steps, save_steps = float(self.eval_steps), float(self.save_steps)  # type: ignore[arg-type]
                if (eval_steps < 1) != (save_steps < 1):
                    raise ValueError(
                        f"TrainingArguments(load_best_model_at_end=True, save_steps="
                        f"{self.save_steps}, eval_steps={self.eval_steps}): give both as "
                        "numbers of steps or both as fractions of the total steps."
                    )
                scale = 1_000_000  # HF's rule for fractions: compare them as integers
                if round(save_steps * scale) % round(eval_steps * scale) != 0:
                    raise ValueError(
                        f"TrainingArguments(load_best_model_at_end=True, save_steps="
                        f"{self.save_steps}, eval_steps={self.eval_steps}): save_steps must be "
                        "a round multiple of eval_steps, so that the best evaluation is saved."
                    )
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None:
            if not isinstance(self.metric_for_best_model, str) or not self.metric_for_best_model:
                raise _bad(
                    "metric_for_best_model",
                    self.metric_for_best_model,
                    "must be an eval metric name such as 'loss' or 'accuracy'",
                )
            if self.greater_is_better is None:
                self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.greater_is_better is not None and not isinstance(self.greater_is_better, bool):
            raise _bad("greater_is_better", self.greater_is_better, "must be None, True or False")

    def _check_unsupported(self) -> None:
        for name, why in (
            ("push_to_hub", "loopkit does not upload; push the saved output_dir yourself"),
            ("group_by_length", "not supported; sort or bucket the dataset yourself"),
            ("dataloader_persistent_workers", "not supported by loopkit's data loader"),
        ):
            if getattr(self, name):
                raise _bad(name, getattr(self, name), why)
        if self.save_safetensors is not True:
            raise _bad(
                "save_safetensors",
                self.save_safetensors,
                "loopkit always writes safetensors (it never pickles)",
            )

    # -- derived values, with HF's rules ---------------------------------------------------

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """warmup_steps if set, else ceil(warmup_ratio * num_training_steps) (HF's rule)."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        return math.ceil(num_training_steps * self.warmup_ratio)

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def report_targets(self) -> tuple[str, ...]:
        """The loggers to write: a subset of ('tensorboard',)."""
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)  # type: ignore[arg-type]
        return ("tensorboard",) if ("tensorboard" in reports or "all" in reports) else ()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingArguments:
        """Build from a plain dict; an unknown name raises ValueError naming it.

        Raises:
            ValueError: an unknown field (with the closest known names) or a bad value.
        """
        if isinstance(values, TrainingArguments):
            return values
        if not isinstance(values, Mapping):
            raise TypeError(
                f"TrainingArguments.from_dict({type(values).__name__}): expected a dict of "
                "field names to values."
            )
        unknown = [k for k in values if k not in _FIELD_NAMES]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(str(name), _FIELD_NAMES, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"TrainingArguments: unknown field(s) {', '.join(hints)}. Check the spelling; "
                "docs/migrating.md lists every accepted name."
            )
        return cls(**values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainingArguments))
NO_EFFECT_FIELDS = _NO_EFFECT
"""Accepted HF fields that change nothing in loopkit (listed in docs/migrating.md)."""

__all__ = [
    "INTERVALS",
    "NO_EFFECT_FIELDS",
    "OPTIMIZERS",
    "PIPELINE_SCHEDULES",
    "REPORT_TO",
    "SAVE_STRATEGIES",
    "SCHEDULERS",
    "IntervalStrategy",
    "OptimizerName",
    "PipelineSchedule",
    "ReportTarget",
    "SaveStrategy",
    "SchedulerType",
    "TrainingArguments",
]
