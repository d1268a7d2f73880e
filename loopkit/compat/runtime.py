"""Where and how a Trainer run executes: its strategy, seeds, precision and model options."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from ..precision import Precision, set_tf32
from ..strategies import DDP, Pipeline, SingleDevice, Strategy, check_strategy, unwrap
from .args import TrainingArguments


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (HF's set_seed); loopkit's own randomness is per step."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_strategy(args: TrainingArguments, strategy: Strategy | None) -> Strategy:
    """The run's strategy: the one given, or Pipeline from the pipeline_* args, or else
    SingleDevice("cpu") with use_cpu, DDP() under a multi-process launcher (WORLD_SIZE > 1),
    SingleDevice().

    Raises:
        ValueError: both a strategy and pipeline_* args, or bad pipeline_* args.
        TypeError: `strategy` is not a loopkit Strategy.
    """
    given = [
        name
        for name, value in (
            ("pipeline_split_spec", args.pipeline_split_spec),
            ("pipeline_chunks", args.pipeline_chunks),
        )
        if value is not None
    ]
    if given:
        if strategy is not None:
            raise ValueError(
                f"Trainer(strategy={strategy!r}) with TrainingArguments({given[0]}=...): "
                "give either a strategy or the pipeline_* arguments."
            )
        return _pipeline(args)
    if strategy is not None:
        return check_strategy(strategy)
    if args.use_cpu:
        return SingleDevice("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DDP()
    return SingleDevice()


def _pipeline(args: TrainingArguments) -> Pipeline:
    if args.pipeline_split_spec is None:
        raise ValueError(
            "TrainingArguments(pipeline_chunks=...): needs pipeline_split_spec, the "
            "module names to split the model before, e.g. ['layers.4']."
        )
    kwargs: dict[str, Any] = {"schedule": args.pipeline_schedule}
    if args.pipeline_chunks is not None:
        kwargs["n_microbatches"] = args.pipeline_chunks
    try:
        return Pipeline(list(args.pipeline_split_spec), **kwargs)
    except (ValueError, TypeError) as error:
        raise type(error)(
            f"TrainingArguments(pipeline_split_spec={args.pipeline_split_spec!r}, "
            f"pipeline_chunks={args.pipeline_chunks!r}, pipeline_schedule="
            f"{args.pipeline_schedule!r}): {error}"
        ) from error


def precision_of(args: TrainingArguments) -> Precision:
    """bf16, fp16 or fp32, from the args' flags."""
    return Precision("bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")


def prepare_model(model: torch.nn.Module, args: TrainingArguments, *, compiled: bool) -> bool:
    """Apply tf32, gradient checkpointing and torch.compile as `args` ask, before training.

    `compiled`: whether `model` was compiled by an earlier train(); it is compiled once.

    Returns:
        Whether the model is compiled now.

    Raises:
        ValueError: gradient_checkpointing=True for a model without
            gradient_checkpointing_enable().
    """
    if args.tf32 is not None:
        set_tf32(args.tf32)
    if args.gradient_checkpointing:
        enable = getattr(unwrap(model), "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(
                "TrainingArguments(gradient_checkpointing=True): the model has no "
                "gradient_checkpointing_enable(); wrap its blocks in "
                "torch.utils.checkpoint yourself, or use FSDP's activation checkpointing."
            )
        enable()
    if args.torch_compile and not compiled:
        options = {
            k: v
            for k, v in (("backend", args.torch_compile_backend), ("mode", args.torch_compile_mode))
            if v is not None
        }
        model.compile(**options)  # in place: names and checkpoints unchanged
        return True
    return compiled


__all__ = ["precision_of", "prepare_model", "resolve_strategy", "set_seed"]
