"""Data loading: StatefulDataLoader construction (its state makes resume exact)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
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
    rank: int = 0,
    world_size: int = 1,
    where: str = "fit(train_data=...)",
) -> Iterable[Any]:
    """Return `data` if it already yields batches, else a StatefulDataLoader over it.

    A map-style dataset is read through torch's DistributedSampler (also with one rank):
    each rank gets its own share, and epoch e's order is a pure function of (seed, e), so
    with `sampler.set_epoch(e)` per epoch and the loader's `state_dict()` a run resumes
    mid-epoch on exactly the next batch.

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
    sampler: DistributedSampler[Any] | None = None
    if not isinstance(data, IterableDataset):
        sampler = DistributedSampler(
            data,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
    return StatefulDataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


__all__ = ["is_loader", "make_loader"]
