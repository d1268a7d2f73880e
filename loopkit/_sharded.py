"""Sharded model and optimizer state: torch.distributed.checkpoint over safetensors files.

Used by checkpoint.py for strategies whose ranks each hold part of the state (FSDP). Each
rank writes its own shards with DCP's `HuggingFaceStorageWriter(save_distributed=True)`:
one safetensors file per rank whose JSON header records each shard's offset in the full
tensor. Reading goes through `HuggingFaceStorageReader`, which builds DCP's metadata from
those headers alone, so a checkpoint loads at any world size (DCP reshards) and nothing
is unpickled: DCP's default format keeps its metadata in a pickled `.metadata` file, this
one has none.

The tensors are addressed by their path in `{"model": ..., "optimizer": ...}` as
torch.distributed.checkpoint.state_dict returns them (parameter names, not indices), and
the non-tensor rest (param groups, hyperparameters) goes to the checkpoint's JSON.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import _tree

_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def has_dtensors(module: torch.nn.Module) -> bool:
    """Whether `module`'s parameters are DTensors (sharded by FSDP or tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, with_optimizer: bool
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not with_optimizer:
        return {"model": get_model_state_dict(model), "optimizer": None}
    # get_state_dict fills an empty optimizer's state with one zero-lr step first, so
    # callers only ask for the optimizer when it has state (or when loading into it).
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


@contextlib.contextmanager
def _quiet_no_dist(collective: bool) -> Iterator[None]:
    if collective:
        yield  # no catch_warnings: it would reset the "once" registry of every warning
        return
    # DCP warns when it runs without a process group; one process is what we asked for.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
        yield


def write_shards(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    *,
    collective: bool,
) -> Any:
    """Write this rank's shards of the model and optimizer state into `directory`.

    A collective when `collective` (every rank of the default process group must call
    it); otherwise DCP runs without a process group. Returns the JSON-able
    skeleton of the state (the same on every rank): tensors appear as references to the
    shard files' keys.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    tree = _state_dicts(model, optimizer, with_optimizer=bool(optimizer.state))
    skeleton, tensors = _tree.split(tree, by_path=True)
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)
    with _quiet_no_dist(collective):
        save(tensors, storage_writer=writer, no_dist=not collective)
    return skeleton


def _tensor_keys(skeleton: Any) -> Iterator[str]:
    if isinstance(skeleton, list):
        for value in skeleton:
            yield from _tensor_keys(value)
    elif isinstance(skeleton, dict):
        if _tree.TENSOR in skeleton:
            yield skeleton[_tree.TENSOR]
        else:
            for value in skeleton.values():
                yield from _tensor_keys(value)


def read_shards(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    skeleton: Any,
    *,
    collective: bool,
) -> None:
    """Load sharded state written by `write_shards` (at any world size) into model/optimizer.

    Raises:
        ValueError: the checkpoint's tensors do not fit (missing, unexpected, or of another
            shape), naming both sides.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if not (isinstance(skeleton, dict) and "model" in skeleton and "optimizer" in skeleton):
        raise ValueError("the sharded state's skeleton lacks 'model' or 'optimizer'.")
    with_optimizer = skeleton["optimizer"] is not None
    _, targets = _tree.split(_state_dicts(model, optimizer, with_optimizer), by_path=True)
    reader = HuggingFaceStorageReader(str(directory))
    stored = reader.read_metadata().state_dict_metadata
    expected = set(_tensor_keys(skeleton))
    problems = []
    missing = sorted(set(targets) - set(stored))
    unexpected = sorted(set(stored) - set(targets))
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint: {unexpected[:10]}")
    shapes = [
        f"{k}: checkpoint {tuple(stored[k].size)}, here {tuple(targets[k].shape)}"  # type: ignore[union-attr]
        for k in sorted(set(targets) & set(stored))
        if tuple(stored[k].size) != tuple(targets[k].shape)  # type: ignore[union-attr]
    ]
    if shapes:
        problems.append(f"shape mismatches: {shapes[:10]}")
    if expected != set(stored):
        problems.append("state.json and the shard files list different tensors")
    if problems:
        raise ValueError("the sharded state does not fit; " + "; ".join(problems) + ".")
    with _quiet_no_dist(collective):
        load(targets, storage_reader=reader, no_dist=not collective)
    # The skeleton brings the saved hyperparameters (lr, betas, ...); the tensors were
    # loaded in place into this run's (differently sharded) tensors.
    tree = _tree.join(skeleton, targets)
    if with_optimizer:
        set_state_dict(
            model, optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optimizer"]
        )
    else:
        set_model_state_dict(model, tree["model"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state_dict gathered to rank 0's CPU memory ({} on other ranks).

    A collective: every rank must call it. Peak memory on rank 0: the full model once.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)  # type: ignore[return-value]


__all__ = ["full_model_state", "has_dtensors", "read_shards", "write_shards"]
