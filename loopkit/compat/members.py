"""The smaller Trainer members HF users call, as free functions, and the refused ones.

The Trainer's methods of the same names call these (see trainer.py); `REFUSED_MEMBERS`
lists HF's members that the façade does not provide, each with why and what to use
instead: calling one raises NotImplementedError saying so.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..strategies import unwrap
from .optimizers import no_decay_parameters

logger = logging.getLogger("loopkit.compat")


def num_trainable_parameters(model: torch.nn.Module) -> int:
    """HF's get_num_trainable_parameters: the elements of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def learning_rates(optimizer: torch.optim.Optimizer | None, state: Any = None) -> list[float]:
    """HF's get_learning_rates: each parameter group's lr, as HF's optimizer holds it.

    HF's scheduler steps right after each optimizer step, so the groups hold the lr of
    the *next* step. loopkit sets the lr when a step runs; with fit's record `state` and a
    loopkit schedule (step -> factor) the next step's lr is `base_lr * schedule(step)`.

    Raises:
        ValueError: before train() (there is no optimizer yet).
    """
    if optimizer is None:
        raise ValueError(
            "Trainer.get_learning_rates(): the optimizer is built by train(); call it after."
        )
    schedule = None if state is None else state.schedule
    if schedule is not None and not isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        factor = float(schedule(state.step))
        return [float(base) * factor for base in state.base_lrs]
    return [float(group["lr"]) for group in optimizer.param_groups]


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """HF's get_decay_parameter_names: the parameters that get weight decay."""
    module = unwrap(model)
    skip = no_decay_parameters(module)
    return [name for name, p in module.named_parameters() if id(p) not in skip]


def floating_point_ops(model: torch.nn.Module, inputs: Any) -> int:
    """HF's rule: 6 * tokens * parameters without embeddings, for a model that counts its
    parameters (`num_parameters(exclude_embeddings=True)`, as transformers models do) and
    a batch with its `main_input_name` (default "input_ids"); else 0."""
    module = unwrap(model)
    main = getattr(module, "main_input_name", "input_ids")
    count = getattr(module, "num_parameters", None)
    if isinstance(inputs, Mapping) and main in inputs and callable(count):
        return 6 * int(inputs[main].numel()) * int(count(exclude_embeddings=True))
    return 0


def input_tokens(
    mode: str, model: torch.nn.Module, processing_class: Any, inputs: Any
) -> int | torch.Tensor | None:
    """HF's count for include_num_input_tokens_seen ("all" / "non_padding"; None for "no").

    "all": the main input's elements; "non_padding": the attention mask's sum, else the
    main input's tokens other than the tokenizer's pad_token_id, else (with a warning)
    all of them. A count on a device tensor stays there until the bridge adds it up.
    """
    if mode == "no":
        return None
    main = getattr(unwrap(model), "main_input_name", "input_ids")
    if not isinstance(inputs, Mapping) or main not in inputs:
        logger.warning(
            "include_num_input_tokens_seen: the batch has no %r (the model's main_input_name); "
            "no tokens counted.",
            main,
        )
        return None
    tokens = inputs[main]
    if mode == "all":
        return int(tokens.numel())
    if "attention_mask" in inputs:
        return _as_count(inputs["attention_mask"].sum())
    pad = getattr(processing_class, "pad_token_id", None)
    if pad is not None:
        return _as_count((tokens != pad).sum())
    logger.warning(
        "Could not determine method to count non-padding tokens, falling back to counting "
        "all tokens."
    )
    return int(tokens.numel())


def _as_count(value: torch.Tensor) -> int | torch.Tensor:
    return int(value) if value.device.type == "cpu" else value  # no device sync here


def num_examples(loader: Any) -> int:
    """HF's num_examples: the loader's dataset length (else batches * batch size)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return len(loader) * int(getattr(loader, "batch_size", 1) or 1)


def metrics_format(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """HF's metrics_format: *_runtime as h:mm:ss.ss, memory in MB, floats to 4 digits."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if "_mem_" in key:
            out[key] = f"{value >> 20}MB"
        elif "_runtime" in key:
            hours, rest = divmod(float(value), 3600)
            minutes, seconds = divmod(rest, 60)
            out[key] = f"{int(hours)}:{int(minutes):02d}:{seconds:05.2f}"
        elif key == "total_flos":
            out[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            out[key] = round(value, 4)
        else:
            out[key] = value
    return out


def log_metrics(split: str, metrics: Mapping[str, Any]) -> None:
    """HF's log_metrics: the formatted metrics of `split`, one per line (main rank)."""
    print(f"***** {split} metrics *****")
    formatted = metrics_format(metrics)
    width = max((len(k) for k in formatted), default=0)
    for key in sorted(formatted):
        print(f"  {key: <{width}} = {formatted[key]:>9}")


def save_metrics(
    output_dir: str, split: str, metrics: Mapping[str, Any], combined: bool = True
) -> None:
    """HF's save_metrics: `<split>_results.json` (and merged into all_results.json)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{split}_results.json"), "w", encoding="utf-8") as file:
        json.dump(dict(metrics), file, indent=4, sort_keys=True)
    if combined:
        path = os.path.join(output_dir, "all_results.json")
        everything: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                everything = json.load(file)
        everything.update(metrics)
        with open(path, "w", encoding="utf-8") as file:
            json.dump(everything, file, indent=4, sort_keys=True)


REFUSED_MEMBERS: dict[str, tuple[str, str]] = {
    "hyperparameter_search": (
        "no Optuna / Ray integration",
        "run one Trainer per trial from your search loop",
    ),
    "push_to_hub": ("loopkit does not upload", "huggingface_hub.upload_folder(output_dir)"),
    "init_hf_repo": ("loopkit does not upload", "huggingface_hub.create_repo"),
    "create_model_card": ("loopkit does not upload", "write README.md yourself"),
    "training_step": (
        "a step is loopkit's chain of transforms run by fit()",
        "override compute_loss, or pass loss_fn=",
    ),
    "prediction_step": (
        "evaluation is one device-side pass of loopkit.evaluate",
        "override compute_loss, or pass preprocess_logits_for_metrics=",
    ),
    "evaluation_loop": (
        "evaluation is one device-side pass of loopkit.evaluate",
        "call evaluate() or predict()",
    ),
    "create_optimizer": (
        "fit() builds the optimizer after the strategy wraps the model",
        "pass optimizers=, optimizer_cls_and_kwargs= or optimizer_factory=",
    ),
    "create_scheduler": (
        "fit() builds the schedule",
        "pass optimizers=(optimizer, scheduler) or lr_scheduler_factory=",
    ),
    "create_optimizer_and_scheduler": (
        "fit() builds both after the strategy wraps the model",
        "pass optimizers= / optimizer_factory= / lr_scheduler_factory=",
    ),
    "get_batch_samples": (
        "windows are loopkit's accumulate transform",
        "set gradient_accumulation_steps",
    ),
    "get_optimizer_group": (
        "the optimizer is built inside fit()",
        "read trainer.optimizer.param_groups after train()",
    ),
    "get_resumed_dataloader": (
        "resume restores the loader's exact position inside fit()",
        "pass resume_from_checkpoint= to train()",
    ),
    "set_initial_training_values": (
        "the run's length is worked out by train()",
        "read trainer.state.max_steps after train() starts",
    ),
    "autocast_smart_context_manager": (
        "autocast is loopkit's precision policy, inside the step",
        "set bf16= / fp16=",
    ),
    "compute_loss_context_manager": (
        "autocast is loopkit's precision policy, inside the step",
        "set bf16= / fp16=",
    ),
    "create_accelerator_and_postprocess": (
        "there is no accelerate.Accelerator",
        "pass strategy= (a loopkit Strategy)",
    ),
    "end": (
        "loopkit's strategies own the process group and there are no trackers",
        "nothing to call: torch.distributed.destroy_process_group() if you made the group",
    ),
}
"""HF Trainer methods the façade does not provide: name -> (why, what to use instead)."""


class AcceleratorView:
    """`trainer.accelerator`: the few accelerate.Accelerator members HF scripts call,
    answered by the Trainer's loopkit Strategy. Any other member raises AttributeError
    saying so (there is no accelerate.Accelerator behind it).

    Args:
        strategy: the Trainer's strategy.
    """

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy

    def unwrap_model(
        self, model: torch.nn.Module, keep_fp32_wrapper: bool = True
    ) -> torch.nn.Module:
        """The user's module inside DDP / DataParallel / torch.compile wrappers."""
        return unwrap(model)

    @property
    def is_main_process(self) -> bool:
        return bool(self._strategy.is_main)

    @property
    def is_local_main_process(self) -> bool:
        return int(os.environ.get("LOCAL_RANK", "0")) == 0

    @property
    def process_index(self) -> int:
        return int(self._strategy.rank)

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def num_processes(self) -> int:
        return int(self._strategy.world_size)

    @property
    def device(self) -> torch.device:
        return torch.device(self._strategy.device)

    def wait_for_everyone(self) -> None:
        """A barrier over every process (nothing with one)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on the main process only."""
        if self._strategy.is_main:
            print(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"not supported by loopkit.compat: Trainer.accelerator.{name} (there is no "
            "accelerate.Accelerator: the view answers unwrap_model, is_main_process, "
            "is_local_main_process, process_index, local_process_index, num_processes, "
            "device, wait_for_everyone and print; use trainer.strategy for the rest)"
        )


class Refused:
    """A Trainer member that is not provided: calling it raises NotImplementedError.

    Reading it (hasattr, help) works; it is a function that refuses with why and what to
    use instead.
    """

    def __init__(self) -> None:
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        why, instead = REFUSED_MEMBERS[self.name]
        name = self.name

        def refused(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(
                f"not supported by loopkit.compat: Trainer.{name} ({why}; {instead})"
            )

        refused.__name__ = name
        refused.__doc__ = f"Not supported by loopkit.compat: {why}; {instead}."
        return refused


__all__ = [
    "REFUSED_MEMBERS",
    "AcceleratorView",
    "Refused",
    "decay_parameter_names",
    "floating_point_ops",
    "input_tokens",
    "learning_rates",
    "log_metrics",
    "metrics_format",
    "num_examples",
    "num_trainable_parameters",
    "save_metrics",
]
