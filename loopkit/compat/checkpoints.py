"""HF's checkpoint rules on loopkit checkpoints: resume paths, best model, rotation, saving.

The checkpoints are loopkit's (`output_dir/step-XXXXXXXX`, written by fit); these
functions apply HF's rules to them: `resume_from_checkpoint` (HF's `checkpoint-N` names
included), `metric_for_best_model` / `best_model_checkpoint`, `save_total_limit` (never
deleting the best) and `load_best_model_at_end`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..callbacks import improved
from ..checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
    save_model,
    step_dir_name,
)
from ..strategies import unwrap
from .args import TrainingArguments
from .callbacks import TrainerState


def resume_path(args: TrainingArguments, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint train() resumes from (HF's checkpoint-N names map to step-N), or None.

    Raises:
        ValueError: True and no valid checkpoint in output_dir, or no such directory.
    """
    value = resume_from_checkpoint
    if value is None:
        value = args.resume_from_checkpoint
    if value is None or value is False:
        return None
    output_dir = str(args.output_dir)
    if value is True:
        path = latest_checkpoint(output_dir, report=lambda _: None)
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
            f"{[p.name for p in list_checkpoints(output_dir)]}."
        )
    return str(path)


def update_best_metric(
    args: TrainingArguments, state: TrainerState, metrics: Mapping[str, float]
) -> bool:
    """Update best_metric / best_global_step from an evaluation; return whether it is the best.

    HF's rule: strictly better than the best so far in the direction of greater_is_better
    (decided by loopkit.callbacks.improved); the first evaluation is compared with -inf
    (or +inf), so a NaN never becomes the best.

    Raises:
        KeyError: metric_for_best_model is not among the metrics.
    """
    if args.metric_for_best_model is None:
        return False
    key = args.metric_for_best_model
    if not key.startswith("eval_"):
        key = f"eval_{key}"
    if key not in metrics:
        raise KeyError(
            f"TrainingArguments(metric_for_best_model={args.metric_for_best_model!r}): "
            f"not among the eval metrics {sorted(metrics)}."
        )
    value = float(metrics[key])
    if state.best_metric is None:
        state.best_metric = -math.inf if args.greater_is_better else math.inf
    better = improved(value, state.best_metric, "max" if args.greater_is_better else "min")
    if better:
        state.best_metric = value
        state.best_global_step = state.global_step
    return better


def update_best_checkpoint(args: TrainingArguments, state: TrainerState, saving_step: int) -> None:
    """Point best_model_checkpoint at the best evaluation's checkpoint, once it exists."""
    best = state.best_global_step
    if best is None:
        return
    path = Path(str(args.output_dir)) / step_dir_name(best)
    if best == saving_step or path.is_dir():
        state.best_model_checkpoint = str(path)


def rotate_like_hf(args: TrainingArguments, state: TrainerState) -> None:
    """Keep `save_total_limit` checkpoints as HF does, never deleting the best.

    HF keeps the newest `limit` checkpoints, except that the best one is always kept: then
    it keeps the best plus the newest limit - 1 others (with limit 1: the best and the
    newest, so that training can resume). No limit: nothing is deleted.
    """
    limit = args.save_total_limit
    if limit is None:
        return
    output_dir = str(args.output_dir)
    best = state.best_model_checkpoint
    newest = {p.resolve() for p in list_checkpoints(output_dir)[:limit]}
    best_path = None if best is None else Path(best)
    if best_path is None or not best_path.is_dir() or best_path.resolve() in newest:
        rotate_checkpoints(output_dir, limit)
    else:
        rotate_checkpoints(output_dir, max(1, limit - 1), keep=[best_path])


def keep_only_best(args: TrainingArguments, state: TrainerState) -> None:
    """At the end of a run with save_total_limit=1, delete every checkpoint but the best (HF).

    Runs on the main process only, when there is a best checkpoint.
    """
    if not (
        state.is_world_process_zero and args.save_total_limit == 1 and state.best_model_checkpoint
    ):
        return
    best = Path(state.best_model_checkpoint).resolve()
    for path in list_checkpoints(str(args.output_dir)):
        if path.resolve() != best:
            # Hidden first (one atomic rename), as loopkit's rotation does.
            hidden = path.with_name(f".{path.name}.del-{os.getpid()}")
            os.rename(path, hidden)
            shutil.rmtree(hidden, ignore_errors=True)


def load_best_model(model: torch.nn.Module, state: TrainerState) -> None:
    """Load the weights of state.best_model_checkpoint into `model` (load_best_model_at_end).

    Raises:
        FileNotFoundError: the checkpoint has no model.safetensors (removed, or sharded).
    """
    path = Path(str(state.best_model_checkpoint)) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"Trainer: load_best_model_at_end found no {path}; the best checkpoint was "
            "removed or is sharded (FSDP): load it with loopkit.load_checkpoint instead."
        )
    unwrap(model).load_state_dict(load_file(str(path)))


def save_model_dir(
    model: torch.nn.Module, processing_class: Any, args: TrainingArguments, directory: str
) -> None:
    """Trainer.save_model's directory: the weights, the processing class, the arguments.

    A model with `save_pretrained` (an HF PreTrainedModel) saves itself that way; others
    as loopkit.save_model (`model.safetensors` + `config.json`). The arguments go to
    `training_args.json` (no pickle).
    """
    os.makedirs(directory, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(directory, safe_serialization=True)
    else:
        save_model(model, directory)
    saver = getattr(processing_class, "save_pretrained", None)
    if callable(saver):
        saver(directory)
    path = os.path.join(directory, "training_args.json")
    with open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps(args.to_dict(), indent=2, sort_keys=True) + "\n")


__all__ = [
    "keep_only_best",
    "load_best_model",
    "resume_path",
    "rotate_like_hf",
    "save_model_dir",
    "update_best_checkpoint",
    "update_best_metric",
]
