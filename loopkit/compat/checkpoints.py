"""HF's checkpoint rules on loopkit checkpoints: names, resume, best model, rotation, saving.

fit() writes each checkpoint atomically as `output_dir/step-XXXXXXXX` (loopkit's format:
safetensors + JSON + a manifest of checksums). The Trainer then gives it HF's name,
`output_dir/checkpoint-N`, with one atomic rename (`publish`), and adds HF's files
beside loopkit's: `trainer_state.json`, `training_args.json` (JSON, never pickled) and,
for a transformers model, its `config.json`. So HF scripts find `checkpoint-N`, and
loopkit's validation, loading and exact resume read the same directory.

HF's rules applied to them: `resume_from_checkpoint` (True: the newest valid one),
a fresh run over an earlier run's checkpoints (moved aside, or deleted with
`overwrite_output_dir`), `metric_for_best_model` / `best_model_checkpoint`,
`save_total_limit` (the newest and the best are kept) and `load_best_model_at_end`.
"""

from __future__ import annotations

import json
import logging
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
    CheckpointError,
    save_model,
    validate_checkpoint,
    write_pointer,
)
from ..strategies import unwrap
from .args import TrainingArguments
from .callbacks import TrainerState

logger = logging.getLogger("loopkit.compat")

PREFIX_CHECKPOINT_DIR = "checkpoint"
"""HF's checkpoint directory prefix: `checkpoint-<global_step>`."""
_NAME = re.compile(rf"^(?:{PREFIX_CHECKPOINT_DIR}-(\d+)|step-(\d{{8,}}))$")


def checkpoint_name(step: int) -> str:
    """HF's directory name of the checkpoint at `step`."""
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory by its name (HF's or loopkit's), else None."""
    match = _NAME.match(path.name)
    return None if match is None else int(match.group(1) or match.group(2))


def list_hf_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint directories under `output_dir`, newest step first.

    HF's `checkpoint-N` names, and loopkit's `step-XXXXXXXX` of a checkpoint whose renaming
    a crash cut off (or of an older loopkit): both are checkpoints of the run.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def _replace_dir(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first, then deleted."""
    if not target.exists():
        os.rename(source, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old, ignore_errors=True)


def publish(path: str | os.PathLike[str]) -> Path:
    """Give fit's checkpoint `output_dir/step-XXXXXXXX` HF's name `checkpoint-N` (one atomic
    rename; an older `checkpoint-N` is replaced) and point `latest` at it. Main rank only."""
    source = Path(path)
    target = source.with_name(checkpoint_name(int(source.name.split("-")[1])))
    _replace_dir(source, target)
    write_pointer(source.parent, target.name)
    return target


def newest_valid_checkpoint(output_dir: str) -> Path | None:
    """The newest complete checkpoint under output_dir (each is validated), or None."""
    for path in list_hf_checkpoints(output_dir):
        try:
            validate_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping checkpoint %s: %s", path.name, error)
            continue
        return path
    return None


def resume_path(args: TrainingArguments, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint train() resumes from, or None (a fresh run).

    None means `args.resume_from_checkpoint`; False or None there: a fresh run. True: the
    newest valid checkpoint-N of output_dir. A path: that checkpoint (loopkit's older
    `step-XXXXXXXX` names are accepted too).

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
        path = newest_valid_checkpoint(output_dir)
        if path is None:
            raise ValueError(
                f"Trainer.train(resume_from_checkpoint=True): no valid checkpoint in "
                f"output_dir {output_dir!r}."
            )
        return str(path)
    path = Path(value)
    if not path.is_dir():
        raise ValueError(
            f"Trainer.train(resume_from_checkpoint={value!r}): no such checkpoint "
            f"directory; the checkpoints in {output_dir!r} are "
            f"{[p.name for p in list_hf_checkpoints(output_dir)]}."
        )
    return str(path)


def _move_aside(paths: list[Path], target_name: str) -> Path:
    target, n = paths[0].parent / target_name, 1
    while target.exists():
        n += 1
        target = target.with_name(f"{target_name}-{n}")
    target.mkdir()
    for path in paths:
        os.rename(path, target / path.name)  # one atomic rename each: nothing half-moved
    return target


def prepare_output_dir(args: TrainingArguments, resume: str | None) -> None:
    """Make output_dir hold only this run's future checkpoints (main rank, before fit).

    A fresh run (no resume) over an earlier run's checkpoint-N: they are moved, unchanged,
    to `output_dir/previous-run[-k]/` (or deleted with `overwrite_output_dir=True`), so
    resume_from_checkpoint=True and rotation never mix two runs. A resume from an older
    checkpoint: the newer ones (the future it abandons) go to
    `output_dir/abandoned-after-checkpoint-N/`, as loopkit's fit does.
    """
    output_dir = str(args.output_dir)
    found = list_hf_checkpoints(output_dir)
    if resume is None:
        if not found:
            return
        if args.overwrite_output_dir:
            for path in found:
                shutil.rmtree(path)
            logger.warning("overwrite_output_dir=True: deleted %d earlier checkpoints.", len(found))
            return
        target = _move_aside(found, "previous-run")
        logger.warning(
            "a fresh train() in %s, which holds an earlier run's checkpoints: moved them, "
            "unchanged, to %s (pass resume_from_checkpoint=True to continue that run instead).",
            output_dir,
            target,
        )
        return
    resumed = Path(resume)
    step = step_of(resumed)
    if step is None or resumed.parent.resolve() != Path(output_dir).resolve():
        return
    newer = [p for p in found if (step_of(p) or 0) > step]
    if newer:
        target = _move_aside(newer, f"abandoned-after-{resumed.name}")
        logger.warning("resumed from %s: moved the newer checkpoints to %s.", resumed.name, target)


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
    """Point best_model_checkpoint at the best evaluation's checkpoint-N, once it exists."""
    best = state.best_global_step
    if best is None:
        return
    path = Path(str(args.output_dir)) / checkpoint_name(best)
    if best == saving_step or path.is_dir():
        state.best_model_checkpoint = str(path)


def _delete(path: Path) -> None:
    # Hidden first (one atomic rename), as loopkit's rotation does: no half-deleted
    # checkpoint under its name after a crash.
    hidden = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def rotate_like_hf(args: TrainingArguments, state: TrainerState) -> None:
    """Keep `save_total_limit` checkpoints as HF does: the newest and the best always.

    HF's rule (transformers.trainer_utils.rotate_checkpoints): protect the newest and the
    best, keep max(limit, protected) checkpoints, deleting the oldest unprotected first.
    """
    limit = args.save_total_limit
    if limit is None:
        return
    found = list(reversed(list_hf_checkpoints(str(args.output_dir))))  # oldest first
    if len(found) <= limit:
        return
    protected = {found[-1].resolve()}
    if state.best_model_checkpoint is not None:
        protected.add(Path(state.best_model_checkpoint).resolve())
    keep = max(limit, len(protected))
    remaining = len(found)
    for path in found:
        if remaining <= keep:
            break
        if path.resolve() in protected:
            continue
        _delete(path)
        remaining -= 1


def keep_only_best(args: TrainingArguments, state: TrainerState) -> None:
    """At the end of a run with save_total_limit=1, delete every checkpoint but the best (HF).

    Runs on the main process only, when there is a best checkpoint.
    """
    if not (
        state.is_world_process_zero and args.save_total_limit == 1 and state.best_model_checkpoint
    ):
        return
    best = Path(state.best_model_checkpoint).resolve()
    for path in list_hf_checkpoints(str(args.output_dir)):
        if path.resolve() != best:
            _delete(path)


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


def write_args(args: TrainingArguments, directory: str | os.PathLike[str]) -> None:
    """`training_args.json`: HF's training_args.bin as JSON (nothing pickled)."""
    path = os.path.join(directory, "training_args.json")
    with open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps(args.to_dict(), indent=2, sort_keys=True) + "\n")


def write_model_config(model: torch.nn.Module, directory: str | os.PathLike[str]) -> None:
    """A transformers model's `config.json` (so `from_pretrained(checkpoint-N)` loads)."""
    config = getattr(unwrap(model), "config", None)
    to_json_file = getattr(config, "to_json_file", None)
    if callable(to_json_file):
        to_json_file(os.path.join(directory, "config.json"))


def write_hf_files(
    path: Path, state: TrainerState, args: TrainingArguments, model: torch.nn.Module
) -> None:
    """HF's files beside loopkit's in checkpoint-N: trainer_state.json, training_args.json,
    and a transformers model's config.json."""
    state.save_to_json(path / "trainer_state.json")
    write_args(args, path)
    write_model_config(model, path)


def save_extras(processing_class: Any, args: TrainingArguments, directory: str) -> None:
    """What save_model writes besides the weights: the processing class and the arguments."""
    saver = getattr(processing_class, "save_pretrained", None)
    if callable(saver):
        saver(directory)
    write_args(args, directory)


def save_model_dir(
    model: torch.nn.Module, processing_class: Any, args: TrainingArguments, directory: str
) -> None:
    """Trainer.save_model's directory, one process: weights, processing class, arguments.

    A model with `save_pretrained` (an HF PreTrainedModel) saves itself that way; others
    as loopkit.save_model (`model.safetensors` + `config.json`).
    """
    os.makedirs(directory, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(directory)  # safetensors (the default since transformers 4.35)
    else:
        save_model(model, directory)
    save_extras(processing_class, args, directory)


__all__ = [
    "PREFIX_CHECKPOINT_DIR",
    "checkpoint_name",
    "keep_only_best",
    "list_hf_checkpoints",
    "load_best_model",
    "newest_valid_checkpoint",
    "prepare_output_dir",
    "publish",
    "resume_path",
    "rotate_like_hf",
    "save_extras",
    "save_model_dir",
    "step_of",
    "update_best_checkpoint",
    "update_best_metric",
    "write_args",
    "write_hf_files",
    "write_model_config",
]
