"""Free functions and small records the Trainer façade is built from (no Trainer state)."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import schedules
from ..checkpoint import latest_checkpoint, list_checkpoints, step_dir_name
from ..compose import chain, when
from ..params import param_groups
from ..precision import Precision
from ..transforms import accumulate
from ._bridge import LastWindowOfEpoch

# HF's no-decay rule by name (transformers' get_decay_parameter_names), on top of loopkit's
# rule by module type (loopkit.param_groups: biases and torch norm layers).
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


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
class DecayGroups:
    """An optimizer factory: HF's two weight-decay groups, then `build(groups)`.

    The groups are worked out when the strategy calls the factory (after wrapping or
    sharding the model in place), from the module tree of `model`.
    """

    model: torch.nn.Module
    weight_decay: float
    build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

    def __call__(self, params: Any) -> torch.optim.Optimizer:
        params = list(params)
        skip = no_decay_parameters(self.model)
        groups = [
            {"params": [p for p in params if id(p) not in skip], "weight_decay": self.weight_decay},
            {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
        ]
        return self.build([g for g in groups if g["params"]])

    def __repr__(self) -> str:  # short: fit records it with every checkpoint
        return f"decay_groups({self.build!r}, weight_decay={self.weight_decay})"


@dataclass(frozen=True)
class TorchOptimizer:
    cls: Any
    kwargs: Mapping[str, Any]

    def __call__(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return self.cls(groups, **self.kwargs)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{getattr(self.cls, '__name__', self.cls)}({kwargs})"


@dataclass
class EvalView:
    """What loopkit.evaluate reads of a TrainState: model, strategy, precision."""

    model: torch.nn.Module
    strategy: Any
    precision: Precision

    def check_fresh(self) -> None:
        return None


def call_model(model: torch.nn.Module, inputs: Any, **kwargs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def loss_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        loss = outputs[0] if outputs else None
    else:
        loss = getattr(outputs, "loss", None)
    if not isinstance(loss, torch.Tensor):
        keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            f"Trainer: the model returned no loss (its output: {keys}). Put the labels in the "
            "batch under 'labels' so the model computes its loss (the HF convention), or pass "
            "Trainer(loss_fn=lambda model, batch: ...)."
        )
    return loss


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (HF's set_seed); loopkit's own randomness is per step."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_data_collator(features: list[Any]) -> Any:
    """HF's default_data_collator: stack dict features; "label"/"label_ids" -> "labels".

    Other batches (tuples of tensors, ...) go through torch's default_collate.
    """
    first = features[0]
    if not isinstance(first, Mapping):
        return torch.utils.data.default_collate(features)
    batch: dict[str, Any] = {}
    if first.get("label") is not None:
        label = (
            first["label"].item() if isinstance(first["label"], torch.Tensor) else first["label"]
        )
        dtype = torch.long if isinstance(label, (int, np.integer)) else torch.float
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=dtype)
    elif first.get("label_ids") is not None:
        if isinstance(first["label_ids"], torch.Tensor):
            batch["labels"] = torch.stack([f["label_ids"] for f in features])
        else:
            batch["labels"] = torch.tensor([f["label_ids"] for f in features])
    for key, value in first.items():
        if key in ("label", "label_ids") or value is None or isinstance(value, str):
            continue
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([f[key] for f in features])
        elif isinstance(value, np.ndarray):
            batch[key] = torch.from_numpy(np.stack([f[key] for f in features]))
        else:
            batch[key] = torch.tensor([f[key] for f in features])
    return batch


def speed_metrics(
    prefix: str, start: float, num_samples: int | None, num_steps: int | None
) -> dict[str, float]:
    runtime = time.time() - start
    result = {f"{prefix}_runtime": round(runtime, 4)}
    if runtime > 0:
        if num_samples is not None:
            result[f"{prefix}_samples_per_second"] = round(num_samples / runtime, 3)
        if num_steps is not None:
            result[f"{prefix}_steps_per_second"] = round(num_steps / runtime, 3)
    return result


def hf_schedule(args: Any, max_steps: int, warmup: int) -> Any:
    """The loopkit schedule for args.lr_scheduler_type, with HF's formulas and kwargs."""
    kind, kwargs = args.lr_scheduler_type, args.lr_scheduler_kwargs
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


def hf_window(k: int, batches_per_epoch: int | None) -> Any:
    """accumulate(k), with HF's short last window of an epoch when k does not divide it."""
    if batches_per_epoch is None or batches_per_epoch % k == 0:
        return accumulate(k)
    windows = math.ceil(batches_per_epoch / k)
    last = batches_per_epoch - (windows - 1) * k
    return chain(
        when(LastWindowOfEpoch(windows, True), accumulate(last)),
        when(LastWindowOfEpoch(windows, False), accumulate(k)),
    )


def resume_path(args: Any, resume_from_checkpoint: Any) -> str | None:
    """The checkpoint train() resumes from (HF's checkpoint-N names map to step-N), or None."""
    value = resume_from_checkpoint
    if value is None:
        value = args.resume_from_checkpoint
    if value is None or value is False:
        return None
    output_dir = args.output_dir
    if value is True:
        path = latest_checkpoint(output_dir, report=lambda _: None)  # type: ignore[arg-type]
        if path is None:
            raise ValueError(
                f"Trainer.train(resume_from_checkpoint=True): no valid checkpoint in "
                f"output_dir {output_dir!r}."
            )
        return str(path)
    path = Path(value)
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if not path.exists() and match:  # HF's name for loopkit's step-XXXXXXXX directory
        path = path.parent / step_dir_name(int(match.group(1)))
    if not path.is_dir():
        raise ValueError(
            f"Trainer.train(resume_from_checkpoint={value!r}): no such checkpoint "
            f"directory; the checkpoints in {output_dir!r} are "
            f"{[p.name for p in list_checkpoints(output_dir)]}."  # type: ignore[arg-type]
        )
    return str(path)


def check_optimizers(
    optimizers: Any, factory: Any, cls_and_kwargs: Any, sched_factory: Any
) -> None:
    """Check Trainer's optimizer and schedule arguments: kinds, and one way for each."""
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
    if scheduler is not None and sched_factory is not None:
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
