"""TrainingArguments: the HF-style settings of a Trainer run, validated when built.

Every field of transformers' TrainingArguments (5.x, and the 4.46-4.57 names that 5
removed) is accepted here; what the façade does with each one is
`loopkit.compat.fields.FIELDS` (same, different, no effect, or refused with why and what
to use instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import json
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from ..strategies.env import DistributedError, detect_env
from .fields import FIELDS, refusal_of

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
OptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adamw_hf", "sgd", "adagrad"]
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
TokenCount = Literal["no", "all", "non_padding"]
"""include_num_input_tokens_seen: which input tokens state.num_input_tokens_seen counts."""

INTERVALS: tuple[str, ...] = get_args(IntervalStrategy)
SAVE_STRATEGIES: tuple[str, ...] = get_args(SaveStrategy)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerType)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
REPORT_TO: tuple[str, ...] = get_args(ReportTarget)
PIPELINE_SCHEDULES: tuple[str, ...] = get_args(PipelineSchedule)
TOKEN_COUNTS: tuple[str, ...] = get_args(TokenCount)
LOG_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
"""HF's log levels (plus "passive": leave the logger's level as it is; "detail" = debug)."""
_OPTIM_ARGS = {
    "sgd": {"momentum", "dampening", "weight_decay", "nesterov"},
    "adagrad": {"lr_decay", "weight_decay", "eps"},
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _bad(name: str, value: object, allowed: str, fix: str = "") -> ValueError:
    return ValueError(
        f"TrainingArguments({name}={value!r}): {allowed}." + (f" {fix}" if fix else "")
    )


def _plain(value: Any) -> Any:
    """An HF str-Enum member (IntervalStrategy.EPOCH, ...) as its plain value."""
    return value.value if isinstance(value, enum.Enum) else value


def _json_dict(name: str, value: Any) -> dict[str, Any]:
    """None, a dict, or a JSON object string (HF accepts all three) as a dict."""
    if value is None:
        return {}
    if isinstance(value, str) and value.strip().startswith("{"):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise _bad(name, value, "must be None, a dict or a JSON object string")
    return dict(value)


def _refused_setter(name: str, fields_hint: str) -> Callable[..., Any]:
    """HF's TrainingArguments.<name>(...): refused, naming the fields to pass instead."""

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"not supported by loopkit.compat: TrainingArguments.{name}() (the arguments are "
            "checked together when they are built, so they are not changed afterwards); pass "
            f"the fields to TrainingArguments(...) instead, e.g. {fields_hint}."
        )

    refused.__name__ = name
    refused.__doc__ = f"Not supported by loopkit.compat: pass {fields_hint} when building."
    return refused


@dataclass
class TrainingArguments:
    """The settings of a Trainer run, with the names and defaults of HF's TrainingArguments.

    Every field of transformers 5's TrainingArguments exists here, with its default, plus
    those of transformers 4.46-4.57 that 5 removed (`warmup_ratio`, `no_cuda`,
    `per_gpu_train_batch_size`, `overwrite_output_dir`, ...; fields.OLD_FIELDS), with
    their 4.x defaults and meaning. Each is checked when the object is built (or by
    `from_dict`): a bad value raises ValueError naming the field, the value and the fix;
    a field the façade cannot honour (`deepspeed`, `push_to_hub`, ...) accepts only HF's
    default and otherwise raises "not supported by loopkit.compat: <field> (<why>; <what
    to use instead>)". `loopkit.compat.fields.FIELDS` and docs/migrating.md say what each
    field does here.

    Example:
        >>> args = TrainingArguments(output_dir="out", learning_rate=1e-3, max_steps=10)
        >>> args.eval_strategy, args.lr_scheduler_type, args.get_warmup_steps(10)
        ('no', 'linear', 0)
    """

    output_dir: str | None = None
    per_device_train_batch_size: int = 8
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    lr_scheduler_type: SchedulerType = "linear"
    lr_scheduler_kwargs: dict[str, Any] | str | None = None
    warmup_steps: float = 0
    optim: OptimizerName = "adamw_torch_fused"
    optim_args: str | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim_target_modules: str | list[str] | None = None
    gradient_accumulation_steps: int = 1
    average_tokens_across_devices: bool = True
    max_grad_norm: float | None = 1.0
    label_smoothing_factor: float = 0.0
    bf16: bool = False
    fp16: bool = False
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    tf32: bool | None = None
    activation_checkpointing: bool | None = None
    activation_checkpointing_kwargs: dict[str, Any] | str | None = None
    gradient_checkpointing: bool | None = None
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = None
    torch_compile: bool = False
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    use_liger_kernel: bool = False
    liger_kernel_config: dict[str, bool] | None = None
    use_cache: bool = False
    neftune_noise_alpha: float | None = None
    torch_empty_cache_steps: int | None = None
    auto_find_batch_size: bool = False
    logging_strategy: IntervalStrategy = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    log_on_each_node: bool = True
    logging_nan_inf_filter: bool = True
    include_num_input_tokens_seen: TokenCount | bool = "no"
    log_level: str = "passive"
    log_level_replica: str = "warning"
    disable_tqdm: bool | None = None
    report_to: ReportTarget | list[ReportTarget] | None = "none"
    run_name: str | None = None
    project: str = "huggingface"
    trackio_space_id: str | None = None
    trackio_bucket_id: str | None = None
    trackio_static_space_id: str | None = None
    eval_strategy: IntervalStrategy = "no"
    eval_steps: float | None = None
    eval_delay: float = 0
    per_device_eval_batch_size: int = 8
    prediction_loss_only: bool = False
    eval_on_start: bool = False
    eval_do_concat_batches: bool = True
    eval_use_gather_object: bool = False
    eval_accumulation_steps: int | None = None
    include_for_metrics: list[str] = field(default_factory=list)
    batch_eval_metrics: bool = False
    save_only_model: bool = False
    save_strategy: SaveStrategy = "steps"
    save_steps: float = 500
    save_on_each_node: bool = False
    save_total_limit: int | None = None
    enable_jit_checkpoint: bool = False
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_model_id: str | None = None
    hub_strategy: str = "every_save"
    hub_always_push: bool = False
    hub_revision: str | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    ignore_data_skip: bool = False
    restore_callback_states_from_checkpoint: bool = False
    full_determinism: bool = False
    seed: int = 42
    data_seed: int | None = None
    use_cpu: bool = False
    accelerator_config: dict[str, Any] | str | None = None
    parallelism_config: Any = None
    dataloader_drop_last: bool = False
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: int | None = None
    dataloader_multiprocessing_context: str | None = None
    dataloader_in_order: bool = True
    remove_unused_columns: bool = True
    label_names: list[str] | None = None
    train_sampling_strategy: str = "random"
    length_column_name: str = "length"
    ddp_find_unused_parameters: bool | None = None
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_static_graph: bool | None = None
    ddp_backend: str | None = None
    ddp_timeout: int = 1800
    fsdp: str | list[str] | None = None
    fsdp_config: dict[str, Any] | str | None = None
    deepspeed: dict[str, Any] | str | None = None
    debug: str | list[str] = ""
    skip_memory_metrics: bool = True
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    resume_from_checkpoint: str | bool | None = None
    local_rank: int = -1
    # Older transformers versions' fields, still in scripts (docs/migrating.md).
    overwrite_output_dir: bool = False
    warmup_ratio: float = 0.0
    logging_dir: str | None = None
    save_safetensors: bool = True
    group_by_length: bool = False
    evaluation_strategy: IntervalStrategy | None = None
    # transformers 4.46-4.57's fields gone in 5 (fields.OLD_FIELDS: what each does here).
    no_cuda: bool = False
    use_mps_device: bool = False
    per_gpu_train_batch_size: int | None = None
    per_gpu_eval_batch_size: int | None = None
    torchdynamo: str | None = None
    push_to_hub_token: str | None = None
    push_to_hub_model_id: str | None = None
    push_to_hub_organization: str | None = None
    adafactor: bool = False
    fp16_backend: str = "auto"
    half_precision_backend: str = "auto"
    fp16_opt_level: str = "O1"
    fsdp_min_num_params: int = 0
    fsdp_transformer_layer_cls_to_wrap: str | None = None
    include_inputs_for_metrics: bool = False
    include_tokens_per_second: bool = False
    jit_mode_eval: bool = False
    use_ipex: bool = False
    past_index: int = -1
    tpu_metrics_debug: bool = False
    tpu_num_cores: int | None = None
    mp_parameters: str = ""
    ray_scope: str = "last"
    use_legacy_prediction_loop: bool = False
    dispatch_batches: bool | None = None
    split_batches: bool | None = None
    # loopkit: pipeline parallelism, mapped onto loopkit.strategies.Pipeline(...).
    pipeline_split_spec: list[str] | None = None
    pipeline_chunks: int | None = None
    pipeline_schedule: PipelineSchedule = "1F1B"

    def __post_init__(self) -> None:
        self._check_refused()
        self._resolve_aliases()
        self._check_numbers()
        self._check_counts()
        self._check_flags()
        self._check_scheduler()
        self._check_choices()
        self._check_logging()
        self._check_pipeline()
        self._check_strategies()
        self._check_best_model()

    # -- checks, in the order a reader meets the fields ------------------------------------

    def _check_refused(self) -> None:
        for f in fields(TrainingArguments):
            reason = refusal_of(f.name, getattr(self, f.name))
            if reason is not None:
                raise ValueError(
                    f"TrainingArguments({f.name}={getattr(self, f.name)!r}): {reason}."
                )
        if self.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(
                f"TrainingArguments(train_sampling_strategy={self.train_sampling_strategy!r}): "
                "not supported by loopkit.compat: train_sampling_strategy (only 'random' and "
                "'sequential' are built in; sort or bucket the dataset yourself and use "
                "'sequential')."
            )

    def _resolve_aliases(self) -> None:
        for name in ("eval_strategy", "logging_strategy", "save_strategy", "evaluation_strategy"):
            setattr(self, name, _plain(getattr(self, name)))
        self.lr_scheduler_type = _plain(self.lr_scheduler_type)
        self.optim = _plain(self.optim)
        if self.evaluation_strategy is not None:
            if self.eval_strategy != "no" and self.eval_strategy != self.evaluation_strategy:
                raise ValueError(
                    f"TrainingArguments(eval_strategy={self.eval_strategy!r}, "
                    f"evaluation_strategy={self.evaluation_strategy!r}): both given and they "
                    "differ; evaluation_strategy is the old name, keep only eval_strategy."
                )
            self.eval_strategy = self.evaluation_strategy
            self.evaluation_strategy = None
        self._resolve_old_names()
        # HF 5: gradient_checkpointing* are old names of activation_checkpointing*; once
        # resolved, the old names mirror the new ones.
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
            setattr(self, old, getattr(self, new))
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing = False
        self._resolve_dirs()
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.torch_compile = True
        if self.report_to is None:
            self.report_to = "none"
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = (
                "all" if self.include_num_input_tokens_seen else "no"
            )
        if self.save_total_limit is not None and _is_int(self.save_total_limit):
            if self.save_total_limit <= 0:
                self.save_total_limit = None  # HF: <= 0 means no limit

    def _resolve_old_names(self) -> None:
        """transformers 4.x's deprecated names, resolved as its __post_init__ did."""
        if not isinstance(self.no_cuda, bool):
            raise _bad("no_cuda", self.no_cuda, "must be True or False")
        if self.no_cuda:
            self.use_cpu = True
        for old, new in (
            ("per_gpu_train_batch_size", "per_device_train_batch_size"),
            ("per_gpu_eval_batch_size", "per_device_eval_batch_size"),
        ):
            value = getattr(self, old)
            if value is not None:
                if not (_is_int(value) and value >= 1):
                    raise _bad(old, value, "must be None or an int >= 1")
                setattr(self, new, value)  # HF's train/eval_batch_size prefer the old name
        if self.torchdynamo is not None:
            self.torch_compile_backend = self.torchdynamo
        if self.push_to_hub_token is not None:
            self.hub_token = self.push_to_hub_token

    def _resolve_dirs(self) -> None:
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if not isinstance(self.output_dir, (str, os.PathLike)):
            raise _bad("output_dir", self.output_dir, "must be a directory path")
        self.output_dir = os.path.expanduser(os.fspath(self.output_dir))
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")

    def _check_numbers(self) -> None:
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise _bad(name, value, "must be an int >= 1")
        for name in ("learning_rate", "weight_decay", "warmup_ratio", "eval_delay", "warmup_steps"):
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
        if self.warmup_steps > 1 and not float(self.warmup_steps).is_integer():
            raise _bad(
                "warmup_steps",
                self.warmup_steps,
                "must be a whole number of steps when above 1 (below 1: a fraction of the run)",
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
        if self.neftune_noise_alpha is not None and not (
            _is_real(self.neftune_noise_alpha) and self.neftune_noise_alpha > 0
        ):
            raise _bad("neftune_noise_alpha", self.neftune_noise_alpha, "must be None or > 0")

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
        for name in ("seed", "dataloader_num_workers"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                raise _bad(name, value, "must be an int >= 0")
        for name in ("torch_empty_cache_steps", "ddp_bucket_cap_mb"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 1):
                raise _bad(name, value, "must be None or an int >= 1")
        if not (_is_int(self.ddp_timeout) and self.ddp_timeout >= 1):
            raise _bad("ddp_timeout", self.ddp_timeout, "must be an int >= 1 (seconds)")
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
            "logging_nan_inf_filter",
            "use_cpu",
            "prediction_loss_only",
            "activation_checkpointing",
            "eval_on_start",
            "eval_do_concat_batches",
            "batch_eval_metrics",
            "full_determinism",
            "skip_memory_metrics",
            "use_cache",
            "overwrite_output_dir",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _bad(name, value, "must be True or False")
        for name in ("ddp_find_unused_parameters", "ddp_static_graph", "tf32"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise _bad(name, value, "must be None, True or False")
        if self.bf16 and self.fp16:
            raise ValueError(
                "TrainingArguments(bf16=True, fp16=True): choose one mixed precision. bf16 "
                "where the hardware has it (no loss scaling needed), else fp16."
            )
        self.activation_checkpointing_kwargs = _json_dict(
            "activation_checkpointing_kwargs", self.activation_checkpointing_kwargs
        )
        self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs

    def _check_scheduler(self) -> None:
        if self.lr_scheduler_type not in SCHEDULERS:
            raise _bad(
                "lr_scheduler_type",
                self.lr_scheduler_type,
                f"not supported by loopkit.compat: lr_scheduler_type (built in: "
                f"{', '.join(map(repr, SCHEDULERS))}; for another schedule pass "
                "Trainer(optimizers=(optimizer, scheduler)) or lr_scheduler_factory=)",
            )
        self.lr_scheduler_kwargs = kwargs = _json_dict(
            "lr_scheduler_kwargs", self.lr_scheduler_kwargs
        )
        allowed_kwargs = {
            "cosine": {"num_cycles"},
            "cosine_with_restarts": {"num_cycles"},
            "polynomial": {"power", "lr_end"},
            "inverse_sqrt": {"timescale"},
        }.get(self.lr_scheduler_type, set())
        unknown = sorted(set(kwargs) - allowed_kwargs)
        if unknown:
            raise _bad(
                "lr_scheduler_kwargs",
                kwargs,
                f"{unknown} not accepted by lr_scheduler_type={self.lr_scheduler_type!r}; "
                f"accepted: {sorted(allowed_kwargs) or 'none'}",
            )
        if self.lr_scheduler_type == "cosine" and kwargs.get("num_cycles", 0.5) != 0.5:
            raise _bad(
                "lr_scheduler_kwargs",
                kwargs,
                "cosine supports num_cycles=0.5 only (half a cosine)",
                "Use cosine_with_restarts for several cycles.",
            )
        self._check_scheduler_kwargs(kwargs)

    def _check_scheduler_kwargs(self, kwargs: dict[str, Any]) -> None:
        if self.lr_scheduler_type == "cosine_with_restarts" and not (
            _is_int(kwargs.get("num_cycles", 1)) and kwargs.get("num_cycles", 1) >= 1
        ):
            raise _bad("lr_scheduler_kwargs", kwargs, "num_cycles must be an int >= 1")
        if self.lr_scheduler_type == "polynomial":
            lr_end, power = kwargs.get("lr_end", 1e-7), kwargs.get("power", 1.0)
            if not (_is_real(lr_end) and 0 <= lr_end < self.learning_rate):
                raise _bad(
                    "lr_scheduler_kwargs",
                    kwargs,
                    f"lr_end ({lr_end}) must be >= 0 and smaller than learning_rate "
                    f"({self.learning_rate})",
                )
            if not (_is_real(power) and power > 0):
                raise _bad("lr_scheduler_kwargs", kwargs, "power must be a float > 0")
        if (
            self.lr_scheduler_type == "inverse_sqrt"
            and kwargs.get("timescale") is not None
            and not (_is_int(kwargs["timescale"]) and kwargs["timescale"] >= 1)
        ):
            raise _bad("lr_scheduler_kwargs", kwargs, "timescale must be None or an int >= 1")

    def _check_choices(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise _bad(
                "optim",
                self.optim,
                f"not supported by loopkit.compat: optim (built in: "
                f"{', '.join(map(repr, OPTIMIZERS))}; for another optimizer pass "
                "Trainer(optimizer_cls_and_kwargs=(cls, kwargs)))",
            )
        self.optim_kwargs()  # optim_args must parse for this optimizer
        if self.label_names is not None and not (
            isinstance(self.label_names, (list, tuple))
            and all(isinstance(n, str) for n in self.label_names)
        ):
            raise _bad("label_names", self.label_names, "must be None or a list of batch keys")
        reports = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(reports, (list, tuple)) or any(r not in REPORT_TO for r in reports):
            raise _bad(
                "report_to",
                self.report_to,
                f"not supported by loopkit.compat: report_to (loopkit reports to "
                f"{', '.join(map(repr, REPORT_TO))}; for another service add a TrainerCallback "
                "whose on_log sends the logs)",
            )

    def _check_logging(self) -> None:
        if self.include_num_input_tokens_seen not in TOKEN_COUNTS:
            raise _bad(
                "include_num_input_tokens_seen",
                self.include_num_input_tokens_seen,
                f"must be True, False or one of {', '.join(map(repr, TOKEN_COUNTS))}",
            )
        for name in ("log_level", "log_level_replica"):
            value = getattr(self, name)
            if value not in (*LOG_LEVELS, "passive", "detail"):
                raise _bad(
                    name,
                    value,
                    f"must be one of {', '.join(map(repr, [*LOG_LEVELS, 'passive', 'detail']))}",
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
            self._check_load_best()
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

    def _check_load_best(self) -> None:
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

    # HF's grouped setters (set_training, ...) change fields after the checks above ran.
    set_training = _refused_setter(
        "set_training", "learning_rate, per_device_train_batch_size, num_train_epochs, max_steps"
    )
    set_evaluate = _refused_setter("set_evaluate", "eval_strategy, eval_steps, eval_delay")
    set_testing = _refused_setter("set_testing", "per_device_eval_batch_size")
    set_save = _refused_setter("set_save", "save_strategy, save_steps, save_total_limit")
    set_logging = _refused_setter("set_logging", "logging_strategy, logging_steps, report_to")
    set_push_to_hub = _refused_setter("set_push_to_hub", "push_to_hub (refused)")
    set_optimizer = _refused_setter("set_optimizer", "optim, learning_rate, weight_decay")
    set_lr_scheduler = _refused_setter("set_lr_scheduler", "lr_scheduler_type, warmup_steps")
    set_dataloader = _refused_setter(
        "set_dataloader", "per_device_train_batch_size, dataloader_num_workers"
    )

    # -- derived values, with HF's rules ---------------------------------------------------

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """HF's rule: warmup_steps if >= 1, a fraction of the run if below 1; else (older
        transformers) ceil(warmup_ratio * num_training_steps)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        if self.warmup_steps > 0:
            return math.ceil(num_training_steps * self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_ratio)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """lr_scheduler_kwargs as a dict (None and JSON strings resolved)."""
        return _json_dict("lr_scheduler_kwargs", self.lr_scheduler_kwargs)

    def checkpointing_kwargs(self) -> dict[str, Any]:
        """activation_checkpointing_kwargs as a dict (None and JSON strings resolved)."""
        return _json_dict("activation_checkpointing_kwargs", self.activation_checkpointing_kwargs)

    def optim_kwargs(self) -> dict[str, Any]:
        """optim_args ("momentum=0.9,nesterov=True") parsed for sgd / adagrad (HF's keys).

        Raises:
            ValueError: optim_args with another optimizer, or a key it does not take.
        """
        if not self.optim_args:
            return {}
        allowed = _OPTIM_ARGS.get(self.optim)
        if allowed is None:
            raise _bad(
                "optim_args",
                self.optim_args,
                f"not supported by loopkit.compat: optim_args with optim={self.optim!r} "
                "(read for 'sgd' and 'adagrad' only; pass optimizer_cls_and_kwargs= instead)",
            )
        parsed: dict[str, Any] = {}
        for item in str(self.optim_args).replace(" ", "").split(","):
            key, _, value = item.partition("=")
            if key not in allowed:
                raise _bad(
                    "optim_args", self.optim_args, f"{key!r} is not one of {sorted(allowed)}"
                )
            parsed[key] = (
                value.lower() in ("true", "1", "yes") if key == "nesterov" else float(value)
            )
        return parsed

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def device(self) -> torch.device:
        """The device a single-process run uses: cpu with use_cpu, else cuda if available."""
        if self.use_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", max(self.local_process_index, 0))

    @property
    def n_gpu(self) -> int:
        """Devices this process drives: loopkit runs one per process (0 on the CPU)."""
        return 0 if self.device.type == "cpu" else 1

    def _env(self) -> tuple[int, int, int]:
        try:
            env = detect_env()
        except DistributedError:
            return 0, 1, 0
        return env.rank, env.world_size, env.local_rank

    @property
    def world_size(self) -> int:
        return self._env()[1]

    @property
    def process_index(self) -> int:
        return self._env()[0]

    @property
    def local_process_index(self) -> int:
        return self._env()[2]

    @property
    def should_save(self) -> bool:
        """Whether this process writes files (the main one)."""
        return self.process_index == 0

    @property
    def should_log(self) -> bool:
        """Whether this process gets log_level (else log_level_replica), HF's rule: the
        first process of each node with log_on_each_node (the default), else rank 0."""
        if self.log_on_each_node:
            return self.local_process_index == 0
        return self.process_index == 0

    @property
    def report_targets(self) -> tuple[str, ...]:
        """The loggers to write: a subset of ('tensorboard',)."""
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)  # type: ignore[arg-type]
        return ("tensorboard",) if ("tensorboard" in reports or "all" in reports) else ()

    def get_process_log_level(self) -> int | None:
        """This process's log level: log_level where `should_log`, else log_level_replica
        (None: "passive", leave the loggers' levels as they are)."""
        name = self.log_level if self.should_log else self.log_level_replica
        name = "debug" if name == "detail" else name
        return LOG_LEVELS.get(name)

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work") -> Iterator[None]:
        """Run the block on the main process first, then on the others (HF's helper for
        dataset preprocessing: the others then read the main process's cache)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        is_main = (self.local_process_index if local else self.process_index) == 0
        if distributed and not is_main:
            torch.distributed.barrier()
        yield
        if distributed and is_main:
            torch.distributed.barrier()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (HF hides hub_token and the other *_token
        fields: so does this)."""
        values = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        for name in values:
            if name.endswith("_token") and values[name] is not None:
                values[name] = f"<{name.upper()}>"  # HF hides every *_token
        return values

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """to_dict() with only numbers, strings and bools (what TensorBoard's hparams take)."""
        return {
            k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in self.to_dict().items()
        }

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
    value = _plain(value)
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainingArguments))
NO_EFFECT_FIELDS = tuple(name for name, note in FIELDS.items() if note.support == "no effect")
"""Accepted HF fields that change nothing in loopkit (listed in docs/migrating.md)."""

__all__ = [
    "INTERVALS",
    "LOG_LEVELS",
    "NO_EFFECT_FIELDS",
    "OPTIMIZERS",
    "PIPELINE_SCHEDULES",
    "REPORT_TO",
    "SAVE_STRATEGIES",
    "SCHEDULERS",
    "TOKEN_COUNTS",
    "IntervalStrategy",
    "OptimizerName",
    "PipelineSchedule",
    "ReportTarget",
    "SaveStrategy",
    "SchedulerType",
    "TokenCount",
    "TrainingArguments",
]
