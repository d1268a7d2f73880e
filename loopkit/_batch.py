"""Walking batches: move their tensors to a device, read their size."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


def move(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    """Return `batch` with every tensor on `device`; containers keep their types."""
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=non_blocking)
    cls = type(batch)
    # Fast path, same result as the generic branch below: exact tuples and lists (the usual
    # `(x, y)` batch) skip the Mapping ABC check, and their tensors already on `device` skip
    # a recursive call; a few us per step in an overhead-bound loop.
    if cls is tuple or cls is list:
        return cls(
            [
                v
                if type(v) is torch.Tensor and v.device == device
                else move(v, device, non_blocking)
                for v in batch
            ]
        )
    if isinstance(batch, Mapping):
        return type(batch)({k: move(v, device, non_blocking) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device, non_blocking) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: move(getattr(batch, f.name), device, non_blocking)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found in `batch` (depth first), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values: Any
    cls = type(batch)
    if cls is tuple or cls is list:  # fast path for the usual `(x, y)` batch, as in move()
        values = batch
    elif isinstance(batch, Mapping):
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(batch: Any, where: object) -> int:
    """The leading dimension of the batch's first tensor: the number of samples in it.

    Raises:
        ValueError: the batch holds no tensor, or its first tensor is empty or 0-d.
    """
    cls = type(batch)
    tensor: torch.Tensor | None
    # Fast path, same result as first_tensor(): the usual `(x, y)` batch starts with a tensor.
    if (cls is tuple or cls is list) and batch and type(batch[0]) is torch.Tensor:
        tensor = batch[0]
    else:
        tensor = first_tensor(batch)
    shape = None if tensor is None else tensor.shape
    if not shape:  # no tensor, or a 0-d one
        raise ValueError(
            f"{where}: the batch ({type(batch).__name__}) has no tensor with a batch "
            "dimension; expected a tensor, or a dict / tuple / list / dataclass of tensors."
        )
    size = shape[0]
    if size == 0:
        raise ValueError(
            f"{where}: empty batch (first tensor has shape {tuple(shape)}). Drop "
            "empty batches from the data, or use drop_last=True in the DataLoader."
        )
    return size
