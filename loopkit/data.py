"""Data loading: StatefulDataLoader construction (its state makes resume exact)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import warnings

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata 0.11 calls the deprecated torch.set_vital on every iterator it creates.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def is_loader(data: object) -> bool:
    """Whether `data` already yields batches (a DataLoader or any non-Dataset iterable)."""
    if isinstance(data, (DataLoader, StatefulDataLoader)):
        return True
    return not isinstance(data, Dataset) and isinstance(data, Iterable)


def make_loader(
    data: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    where: str = "fit(train_data=...)",
) -> Iterable[Any]:
    """Return `data` if it already yields batches, else a StatefulDataLoader over it.

    The shuffle order comes from a generator seeded with `seed`, so it is reproducible and,
    through the loader's `state_dict()`, resumable mid-epoch.

    Raises:
        ValueError: a Dataset without batch_size, or an empty map-style Dataset.
        TypeError: data is neither a Dataset nor an iterable of batches.
    """
    if is_loader(data):
        return data  # type: ignore[no-any-return]
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{where}: got {type(data).__name__}; expected a torch Dataset, a DataLoader, a "
            "torchdata StatefulDataLoader or nodes pipeline, or any iterable of batches."
        )
    if batch_size is None:
        raise ValueError(
            f"{where}: a Dataset needs batch_size=..., e.g. fit(..., batch_size=32); or pass a "
            "DataLoader that batches it."
        )
    if not isinstance(data, IterableDataset) and len(data) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{where}: the dataset is empty (len 0).")
    generator = torch.Generator()
    generator.manual_seed(seed)
    iterable = isinstance(data, IterableDataset)
    return StatefulDataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        generator=generator,
    )
