"""Where and how a Trainer run executes: its strategy, seeds, precision and model options."""

from __future__ import annotations

import inspect
import logging
import os
import random
import sys
from collections.abc import Callable
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


def enable_full_determinism(seed: int) -> None:
    """HF's full_determinism: seed, deterministic algorithms, deterministic cuDNN/cuBLAS."""
    set_seed(seed)
    os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_run(args: TrainingArguments) -> None:
    """Seed as HF's Trainer does: full determinism, or set_seed."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


COMPAT_LOGGER = "loopkit.compat"
"""The façade's own logger (loopkit's messages). Like transformers' it shows warnings and
errors unless a log_level (or your logging configuration) asks for more."""

if logging.getLogger(COMPAT_LOGGER).level == logging.NOTSET:
    logging.getLogger(COMPAT_LOGGER).setLevel(logging.WARNING)

HF_LOGGER = "transformers.trainer"
"""Where HF's Trainer logs its messages ("***** Running training *****", ...): the façade
logs the same messages there, so that handlers on transformers' logger see them."""

HF_ROOT_LOGGER = "transformers"
"""transformers' library logger, whose level HF's log_level sets (logging.set_verbosity)."""


def apply_log_level(args: TrainingArguments) -> None:
    """HF's log_level / log_level_replica on this process (HF's Trainer.__init__ does it).

    The level goes to transformers' library logger, as HF's `logging.set_verbosity` sets
    it (through transformers itself when it is imported), and to loopkit's loggers
    ("loopkit", "loopkit.compat"); "passive" leaves them all as they are.
    """
    level = args.get_process_log_level()
    if level is None:
        return
    set_hf_verbosity(level)
    logging.getLogger("loopkit").setLevel(level)
    logging.getLogger(COMPAT_LOGGER).setLevel(level)


def set_hf_verbosity(level: int) -> None:
    """transformers.utils.logging.set_verbosity(level) when transformers is imported (its
    handler set up as HF does), else the level of the stdlib logger of that name."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and callable(getattr(hf_logging, "set_verbosity", None)):
        hf_logging.set_verbosity(level)
    else:
        logging.getLogger(HF_ROOT_LOGGER).setLevel(level)


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
        return DDP(**ddp_options(args))
    return SingleDevice()


def ddp_options(args: TrainingArguments) -> dict[str, Any]:
    """loopkit.DDP's arguments from the ddp_* fields."""
    options: dict[str, Any] = {"timeout_s": float(args.ddp_timeout)}
    if args.ddp_find_unused_parameters is not None:
        options["find_unused_parameters"] = args.ddp_find_unused_parameters
    if args.ddp_static_graph is not None:
        options["static_graph"] = args.ddp_static_graph
    if args.ddp_bucket_cap_mb is not None:
        options["bucket_cap_mb"] = args.ddp_bucket_cap_mb
    return options


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
    """Apply tf32, activation checkpointing and torch.compile as `args` ask, before training.

    `compiled`: whether `model` was compiled by an earlier train(); it is compiled once.

    Returns:
        Whether the model is compiled now.

    Raises:
        ValueError: activation_checkpointing=True for a model without
            activation_checkpointing_enable() / gradient_checkpointing_enable().
    """
    if args.tf32 is not None:
        set_tf32(args.tf32)
    if args.activation_checkpointing:
        enable_activation_checkpointing(unwrap(model), args)
    if args.torch_compile and not compiled:
        options = {
            k: v
            for k, v in (("backend", args.torch_compile_backend), ("mode", args.torch_compile_mode))
            if v is not None
        }
        model.compile(**options)  # in place: names and checkpoints unchanged
        return True
    return compiled


def enable_activation_checkpointing(model: torch.nn.Module, args: TrainingArguments) -> None:
    """HF's call: activation_checkpointing_enable(activation_checkpointing_kwargs=...,
    every_n_layers=..., offload=...), or the older gradient_checkpointing_enable; each gets
    the keywords its signature takes."""
    kwargs = args.checkpointing_kwargs()
    extra = {
        "every_n_layers": kwargs.pop("every_n_layers", 1),
        "offload": kwargs.pop("offload", False),
    }
    for name, key in (
        ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
        ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
    ):
        enable = getattr(model, name, None)
        if callable(enable):
            _call_with_accepted(enable, {key: kwargs or None, **extra})
            return
    raise ValueError(
        "TrainingArguments(activation_checkpointing=True, or its old name "
        "gradient_checkpointing=True): the model has no "
        "activation_checkpointing_enable() or gradient_checkpointing_enable(); wrap its "
        "blocks in torch.utils.checkpoint yourself, or use FSDP's activation checkpointing."
    )


def _call_with_accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def set_use_cache(model: torch.nn.Module, args: TrainingArguments) -> None:
    """HF: model.config.use_cache = args.use_cache, for a model with a config."""
    config = getattr(unwrap(model), "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = args.use_cache


def _neftune_hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """HF's NEFTune: uniform noise of magnitude alpha / sqrt(length * dim), in training only."""
    if module.training:
        alpha = float(module.neftune_noise_alpha)  # type: ignore[arg-type]
        magnitude = float(alpha / torch.sqrt(torch.tensor(output.size(1) * output.size(2))))
        output = output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
    return output


def activate_neftune(model: torch.nn.Module, alpha: float) -> Any:
    """Hook NEFTune noise onto the model's input embeddings; returns the hook's handle.

    Raises:
        ValueError: the model has no get_input_embeddings().
    """
    get = getattr(unwrap(model), "get_input_embeddings", None)
    if not callable(get):
        raise ValueError(
            "TrainingArguments(neftune_noise_alpha=...): the model has no "
            "get_input_embeddings(), so there is no embedding to add noise to."
        )
    embeddings = get()
    embeddings.neftune_noise_alpha = alpha
    return embeddings.register_forward_hook(_neftune_hook)


def deactivate_neftune(model: torch.nn.Module, handle: Any) -> None:
    """Remove the NEFTune hook (after train(), as HF does)."""
    handle.remove()
    embeddings = unwrap(model).get_input_embeddings()  # type: ignore[operator]
    if hasattr(embeddings, "neftune_noise_alpha"):
        del embeddings.neftune_noise_alpha


__all__ = [
    "COMPAT_LOGGER",
    "HF_LOGGER",
    "HF_ROOT_LOGGER",
    "activate_neftune",
    "apply_log_level",
    "ddp_options",
    "deactivate_neftune",
    "enable_activation_checkpointing",
    "enable_full_determinism",
    "precision_of",
    "prepare_model",
    "resolve_strategy",
    "seed_run",
    "set_hf_verbosity",
    "set_seed",
    "set_use_cache",
]
