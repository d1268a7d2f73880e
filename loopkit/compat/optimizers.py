"""The Trainer's optimizer and learning-rate schedule, by HF's rules.

AdamW (or SGD) from TrainingArguments over HF's two weight-decay groups, or whatever the
Trainer was given (a built optimizer, a factory, a class and its kwargs); the schedule is
`lr_scheduler_type` with HF's formulas (loopkit.schedules), a torch LRScheduler or a
schedule factory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import schedules
from .._types import OptimizerFactory
from ..params import param_groups
from .args import TrainingArguments

# HF's no-decay rule by name (transformers' get_decay_parameter_names), on top of loopkit's
# rule by module type (loopkit.param_groups: biases and torch norm layers).
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

ScheduleFactory = Callable[..., Any]
"""`(num_warmup_steps=..., num_training_steps=...) -> schedule`."""


def no_decay_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that get no weight decay: biases and normalisation weights.

    loopkit's rule (`param_groups`: biases and parameters of torch norm layers) plus HF's
    names ("bias", "layernorm", "rmsnorm", "norm" or "_norm" as a name part), so custom
    RMSNorm classes named like HF's are caught too.
    """
    split = param_groups(model, weight_decay=1.0)
    skip = {id(p) for g in split if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, param in model.named_parameters():
        if _NO_DECAY_NAMES.search(name.lower()):
            skip.add(id(param))
    return skip


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer class and its keyword arguments, built on parameter groups when called."""

    cls: Any
    kwargs: Mapping[str, Any]

    def __call__(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return self.cls(groups, **self.kwargs)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{getattr(self.cls, '__name__', self.cls)}({kwargs})"


@dataclass(frozen=True)
class DecayGroups:
    """An optimizer factory: HF's two weight-decay groups, then `build(groups)`.

    The groups are worked out when the strategy calls the factory (after wrapping or
    sharding the model in place), from the module tree of `model`.
    """

    model: torch.nn.Module
    weight_decay: float
    build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        params = list(params)
        skip = no_decay_parameters(self.model)
        groups = [
            {"params": [p for p in params if id(p) not in skip], "weight_decay": self.weight_decay},
            {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
        ]
        return self.build([g for g in groups if g["params"]])

    def __repr__(self) -> str:  # short: fit records it with every checkpoint
        return f"decay_groups({self.build!r}, weight_decay={self.weight_decay})"


def builtin_optimizer(args: TrainingArguments) -> OptimizerSpec:
    """`args.optim` as HF builds it: torch's AdamW with adam_beta1/2 and adam_epsilon (fused
    for adamw_torch_fused, HF 5's default), or SGD / Adagrad with optim_args; all at
    args.learning_rate."""
    if args.optim == "sgd":
        return OptimizerSpec(torch.optim.SGD, {"lr": args.learning_rate, **args.optim_kwargs()})
    if args.optim == "adagrad":
        return OptimizerSpec(torch.optim.Adagrad, {"lr": args.learning_rate, **args.optim_kwargs()})
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    if args.optim == "adamw_torch_fused":
        kwargs["fused"] = True
    return OptimizerSpec(torch.optim.AdamW, kwargs)


def make_optimizer(
    model: torch.nn.Module,
    args: TrainingArguments,
    *,
    optimizer: torch.optim.Optimizer | None,
    factory: OptimizerFactory | None,
    cls_and_kwargs: tuple[type, Mapping[str, Any]] | None,
) -> torch.optim.Optimizer | OptimizerFactory:
    """What fit() gets as `optimizer`: the one given, else HF's decay groups of args.optim."""
    if optimizer is not None:
        return optimizer
    if factory is not None:
        return factory
    if cls_and_kwargs is not None:
        cls, kwargs = cls_and_kwargs
        return DecayGroups(model, args.weight_decay, OptimizerSpec(cls, dict(kwargs)))
    return DecayGroups(model, args.weight_decay, builtin_optimizer(args))


def hf_schedule(args: TrainingArguments, max_steps: int, warmup: int) -> Any:
    """The loopkit schedule for args.lr_scheduler_type, with HF's formulas and kwargs."""
    kind, kwargs = args.lr_scheduler_type, args.scheduler_kwargs()
    # A warmup longer than the run: HF's factors for the steps that run are those of a
    # run as long as the warmup (loopkit's schedules refuse total < warmup).
    total = max(max_steps, warmup)
    if kind == "linear":
        return schedules.linear(warmup, total)
    if kind == "cosine":
        return schedules.cosine(warmup, total)
    if kind == "cosine_with_restarts":
        return schedules.cosine_with_restarts(
            warmup, total, cycles=int(kwargs.get("num_cycles", 1))
        )
    if kind == "polynomial":
        lr_end = float(kwargs.get("lr_end", 1e-7))
        return schedules.polynomial(
            warmup,
            total,
            min_factor=lr_end / args.learning_rate,
            power=float(kwargs.get("power", 1.0)),
        )
    if kind == "constant":
        return schedules.constant(0)
    if kind == "constant_with_warmup":
        return schedules.constant(warmup)
    return schedules.inverse_sqrt(warmup, timescale=kwargs.get("timescale"))


def make_schedule(
    args: TrainingArguments,
    max_steps: int,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    factory: ScheduleFactory | None,
) -> Any:
    """What fit() gets as `schedule`: the scheduler given, the factory's, or hf_schedule."""
    if scheduler is not None:
        return scheduler
    warmup = args.get_warmup_steps(max_steps)
    if factory is not None:
        return factory(num_warmup_steps=warmup, num_training_steps=max_steps)
    return hf_schedule(args, max_steps, warmup)


def check_optimizers(
    optimizers: Any, factory: Any, cls_and_kwargs: Any, schedule_factory: Any
) -> None:
    """Check Trainer's optimizer and schedule arguments: kinds, and one way for each.

    Raises:
        TypeError: a wrong kind (not a pair, not a built optimizer, not an LRScheduler, ...).
        ValueError: two ways to build the optimizer or the schedule, or a scheduler built
            on another optimizer.
    """
    if not (isinstance(optimizers, (tuple, list)) and len(optimizers) == 2):
        raise TypeError(
            f"Trainer(optimizers={optimizers!r}): expected a pair (optimizer, lr_scheduler), "
            "either may be None."
        )
    optimizer, scheduler = optimizers
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Trainer(optimizers=({type(optimizer).__name__}, ...)): expected a built torch "
            "optimizer; for a factory use optimizer_factory=."
        )
    given = [
        n
        for n, v in (
            ("optimizers[0]", optimizer),
            ("optimizer_factory", factory),
            ("optimizer_cls_and_kwargs", cls_and_kwargs),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"Trainer({', '.join(given)}): give only one way to build the optimizer.")
    _check_schedule(optimizer, scheduler, schedule_factory)
    if cls_and_kwargs is not None and not (
        isinstance(cls_and_kwargs, (tuple, list))
        and len(cls_and_kwargs) == 2
        and isinstance(cls_and_kwargs[0], type)
        and isinstance(cls_and_kwargs[1], Mapping)
    ):
        raise TypeError(
            f"Trainer(optimizer_cls_and_kwargs={cls_and_kwargs!r}): expected "
            "(torch.optim.SomeOptimizer, {'lr': ..., ...})."
        )


def _check_schedule(optimizer: Any, scheduler: Any, schedule_factory: Any) -> None:
    if scheduler is not None and schedule_factory is not None:
        raise ValueError(
            "Trainer(optimizers[1], lr_scheduler_factory): give only one learning-rate schedule."
        )
    if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(
            f"Trainer(optimizers=(..., {type(scheduler).__name__})): expected a torch "
            "LRScheduler; for a loopkit schedule use lr_scheduler_factory=."
        )
    if scheduler is not None and scheduler.optimizer is not optimizer:
        raise ValueError(
            "Trainer(optimizers=(optimizer, lr_scheduler)): the scheduler must be built on "
            "that optimizer."
        )


__all__ = [
    "DecayGroups",
    "OptimizerSpec",
    "ScheduleFactory",
    "builtin_optimizer",
    "check_optimizers",
    "hf_schedule",
    "make_optimizer",
    "make_schedule",
]
