"""Data loading: StatefulDataLoader construction (its state makes resume exact).

How `fit(train_data=..., batch_size=...)` reads its data (the same rule holds for
`eval_data` with `eval_batch_size`, which defaults to `batch_size`):

- a DataLoader or StatefulDataLoader batches itself: used as is; with batch_size, an error;
- a torch Dataset (map-style or iterable): batched by a StatefulDataLoader; needs batch_size;
- any other object with `__len__` and `__getitem__` (a list, tuple, tensor, numpy array, an
  HF dataset) is a sequence of *samples* when batch_size is given (batched like a Dataset),
  and a sequence of ready batches without it (each element is one batch);
- any other iterable (a generator, a torchdata nodes pipeline) yields ready batches: used as
  is; with batch_size, an error;
- a str, bytes or mapping (e.g. a dict of splits): an error.

A sequence read as ready batches whose first element holds a 0-d tensor (a class label
without a batch dimension) is a sequence of samples given without batch_size: an error.
An eval batch size inherited from batch_size is no error for data that batches itself.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata 0.11 calls the deprecated torch.set_vital on every iterator it creates.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

DataKind = Literal["loader", "dataset", "sequence", "batches"]
"""How make_loader reads data: a loader, a torch Dataset, a sequence, or ready batches."""


class DataTimeoutError(RuntimeError):
    """A DataLoader worker delivered no batch within the loader's timeout (data_timeout_s)."""


def data_kind(data: object) -> DataKind:
    """Which row of the module's table `data` falls in (batch_size decides the rest).

    Raises:
        TypeError: a str, bytes or mapping, or an object that is not iterable at all.
    """
    if isinstance(data, (DataLoader, StatefulDataLoader)):
        return "loader"
    if isinstance(data, Dataset):
        return "dataset"
    if isinstance(data, (str, bytes, Mapping)):
        hint = " Pick one split, e.g. data['train']." if isinstance(data, Mapping) else ""
        raise TypeError(
            f"got a {type(data).__name__}; expected a torch Dataset, a sequence of samples, "
            f"a DataLoader or an iterable of batches.{hint}"
        )
    if hasattr(type(data), "__len__") and hasattr(type(data), "__getitem__"):
        return "sequence"
    if isinstance(data, Iterable):
        return "batches"
    raise TypeError(
        f"got {type(data).__name__}; expected a torch Dataset, a sequence of samples, a "
        "DataLoader, a torchdata StatefulDataLoader or nodes pipeline, or any iterable of batches."
    )


def is_loader(data: object, batch_size: int | None = None) -> bool:
    """Whether `data` is used as it is, as ready batches (see the module's table)."""
    kind = data_kind(data)
    return kind in ("loader", "batches") or (kind == "sequence" and batch_size is None)


def _check_combination(
    data: Any, kind: DataKind, batch_size: int | None, batch_size_inherited: bool, where: str
) -> None:
    """Refuse the combinations of data and batch_size that would silently misread the data."""
    name = type(data).__name__
    if batch_size is not None and not batch_size_inherited and kind in ("loader", "batches"):
        what = (
            f"a {name}, which batches itself (its batch_size is {data.batch_size})"
            if kind == "loader"
            else f"a {name}, an iterable read as ready batches"
        )
        fix = (
            "pass its dataset (loader.dataset) with batch_size=..."
            if kind == "loader"
            else "pass a Dataset or a sequence of samples (a list) to have it batched"
        )
        raise ValueError(
            f"{where}: got {what}; batch_size={batch_size} would have no effect. Drop "
            f"batch_size=..., or {fix}."
        )
    if kind == "dataset" and batch_size is None:
        raise ValueError(
            f"{where}: a Dataset needs batch_size=..., e.g. fit(..., batch_size=32); or pass a "
            "DataLoader that batches it."
        )
    if kind == "sequence" and batch_size is None and len(data) > 0:
        try:
            first = data[0]
        except Exception:  # not indexable by position (a table keyed by column): no hint
            return
        scalar = _zero_dim_tensor(first)
        if scalar is not None:
            raise ValueError(
                f"{where}: got a {name} without batch_size, so each element would be one "
                f"batch, but element 0 holds a 0-d tensor ({scalar}): it is one sample, not a "
                "batch. Pass batch_size=... to batch the samples, e.g. fit(..., batch_size=32)."
            )


def _zero_dim_tensor(element: Any) -> str | None:
    """A 0-d tensor that is a sample or sits directly in one (a tuple, list or dict), as text."""
    values: Any = [element]
    if isinstance(element, Mapping):
        values = list(element.values())
    elif isinstance(element, (tuple, list)):
        values = element
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            return f"tensor({value.item()!r})"
    return None


class EpochSampler(Sampler[int]):
    """This rank's share of epoch e's order, read from a global position on.

    Epoch e's order is a pure function of (seed, e): `torch.randperm(size)` drawn from a
    generator seeded `seed + e` (torch's DistributedSampler draws the same one), or
    `range(size)` without shuffling. A pass starts at a *global position* p (items of the
    order consumed so far by all ranks together, 0 at an epoch's start): rank r of W reads
    items p + r, p + r + W, ... of the order. After every rank has read y items the ranks
    together have consumed exactly the items p .. p + W*y - 1, so the position saved in
    `state_dict()` is p + W*y, whatever W was, and a pass at another world size starts
    there: every remaining item is read exactly once, by one of the new ranks. From
    position 0 the shares are DistributedSampler's, item for item.

    `pad=True` (training) gives every rank the same number of items, as DistributedSampler
    does: the remaining items are padded up to a multiple of W with the epoch's first items
    (so ranks take the same number of steps; at most W-1 items repeat), or cut to that
    multiple with `drop_last=True`. `pad=False` (evaluation) reads each remaining item
    exactly once; ranks then get one item fewer or more, and possibly one batch fewer.

    It is `Stateful` for torchdata's StatefulDataLoader, which saves `state_dict()` with the
    loader's. Call `set_epoch(e)` before each epoch, as with DistributedSampler: a position
    loaded with `load_state_dict` applies to the next pass of its own epoch only (a
    checkpoint written at an epoch's end starts the next epoch at its beginning).

    Args:
        size: the number of items in the dataset (>= 1).
        rank, world_size: this rank and the number of ranks sharing the data.
        shuffle: draw the order from (seed, epoch), else read the items in order.
        seed: the order's seed.
        drop_last: cut the remaining items to a multiple of world_size (pad=True only
            matters without it).
        pad: pad the ranks' shares to the same length (training) or not (evaluation).

    Raises:
        ValueError: a size < 1, world_size < 1 or rank outside [0, world_size).

    Example:
        >>> sampler = EpochSampler(10, rank=1, world_size=2, shuffle=False, seed=0)
        >>> list(sampler)
        [1, 3, 5, 7, 9]
        >>> sampler.load_state_dict({**sampler.state_dict(), "position": 4})
        >>> list(sampler)  # 4 items consumed: rank 1 of 2 continues with items 5, 7, 9
        [5, 7, 9]
    """

    def __init__(
        self,
        size: int,
        *,
        rank: int,
        world_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        for name, value, low in (("size", size, 1), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EpochSampler({name}={value!r}): an int >= {low}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(
                f"EpochSampler(rank={rank!r}): an int in [0, world_size={world_size})."
            )
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.pad = shuffle, seed, drop_last, pad
        self.epoch = 0
        self._start = 0  # the global position this pass started at
        self._yielded = 0  # items this rank has yielded in this pass
        self._pending: tuple[int | None, int] | None = None  # (epoch, position) loaded

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch`'s order from the next pass on."""
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s order of the whole dataset (the same on every rank)."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _share(self, start: int) -> list[int]:
        """This rank's items of the current epoch from global position `start` on."""
        order = self.order(self.epoch)
        rest = order[start:]
        world = self.world_size
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % world]
        elif self.pad and rest and len(rest) % world:
            missing = world - len(rest) % world  # DistributedSampler pads from the epoch's start
            rest += (order * math.ceil(missing / len(order)))[:missing]
        return rest[self.rank :: world]

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._pending is not None and self._pending[0] in (None, self.epoch):
            start = self._pending[1]
        self._pending = None
        self._start, self._yielded = start, 0
        return self._items(self._share(start))

    def _items(self, share: list[int]) -> Iterator[int]:
        for index in share:
            self._yielded += 1  # before the yield: the loader's snapshot counts this item
            yield index

    def __len__(self) -> int:
        """Items this rank reads in a whole epoch (from position 0)."""
        rest, world = self.size, self.world_size
        if self.drop_last:
            return rest // world
        if self.pad:
            return math.ceil(rest / world)
        return len(range(self.rank, rest, world))

    def busiest_share(self) -> int:
        """The most items any rank reads in a whole epoch (rank 0's share)."""
        return math.ceil(self.size / self.world_size) if not self.drop_last else len(self)

    def position(self) -> int:
        """Items of this epoch's order consumed by all ranks together (each read as many)."""
        return min(self.size, self._start + self.world_size * self._yielded)

    def state_dict(self) -> dict[str, Any]:
        """The global position, and what the order depends on (checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position(),
            "size": self.size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Start the next pass of the saved epoch at the saved global position.

        Raises:
            ValueError: the saved order is another one (dataset size, seed or shuffle).
        """
        for key in ("size", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"EpochSampler.load_state_dict: the saved data position is in an order "
                    f"with {key}={state[key]!r}, this one has {key}={getattr(self, key)!r}; "
                    "resume with the same dataset, seed and shuffle."
                )
        position = int(state["position"])
        epoch = state.get("epoch")
        self._pending = (None if epoch is None else int(epoch), position)


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
    timeout_s: float | None = None,
    batch_size_inherited: bool = False,
    pad: bool = True,
    where: str = "fit(train_data=...)",
) -> Iterable[Any]:
    """Return `data` if it is used as ready batches, else a StatefulDataLoader over it.

    Which data is batched is the module's table. A map-style dataset (or sequence of
    samples) is read through an `EpochSampler` (also with one rank): each rank gets its own
    share of epoch e's order, a pure function of (seed, e), and the loader's `state_dict()`
    holds the *global* position in it, so with `sampler.set_epoch(e)` per epoch a run
    resumes mid-epoch on exactly the next items, at the same or another world size.

    Args:
        timeout_s: with num_workers > 0, the longest wait for a worker's batch (torch's
            DataLoader `timeout=`); None waits forever. Without workers there is none.
        batch_size_inherited: batch_size was not asked for this data but inherited (fit's
            eval_batch_size defaults to batch_size): a loader then ignores it without error.
        pad: every rank reads as many items (training: the ranks step together); False
            reads each item exactly once (evaluation; see EpochSampler).

    Raises:
        ValueError: a Dataset without batch_size, batch_size with data that batches itself,
            a sequence of samples without batch_size, or an empty map-style dataset.
        TypeError: data is neither a Dataset, a sequence nor an iterable of batches.
    """
    try:
        kind = data_kind(data)
    except TypeError as error:
        raise TypeError(f"{where}: {error}") from None
    _check_combination(data, kind, batch_size, batch_size_inherited, where)
    if kind in ("loader", "batches") or batch_size is None:
        return data  # type: ignore[no-any-return]
    is_iterable = isinstance(data, IterableDataset)
    if not is_iterable and len(data) == 0:
        raise ValueError(f"{where}: the dataset is empty (len 0).")
    sampler: EpochSampler | None = None
    if not is_iterable:
        sampler = EpochSampler(
            len(data),
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            pad=pad,
        )
    return StatefulDataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        worker_init_fn=functools.partial(keep_workers_through_sigterm, main_pid=os.getpid()),
        # torch allows a timeout only with worker processes (0 means none).
        timeout=float(timeout_s) if timeout_s is not None and num_workers > 0 else 0.0,
    )


_TAKES_SIGNALS = hasattr(signal, "sigwaitinfo")  # not on macOS or Windows


def keep_workers_through_sigterm(worker_id: int, *, main_pid: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: the worker ends on a SIGTERM from the main process only.

    A SIGTERM to the whole process group (`kill -- -PGID`; SLURM signals every process of a
    job step) would otherwise kill the workers at once (torch's own worker handler lets any
    sender but the parent kill it), and the main process would fail with "DataLoader
    worker exited unexpectedly" before fit could finish its window and save. Here the
    worker blocks SIGTERM and a thread takes each one: from the main process (or the
    worker's parent), which ends its workers itself, the worker exits as torch's handler
    makes it; from anyone else it is ignored, and the main process, which got the same
    signal, stops the run and ends its workers.

    Only threads that block SIGTERM leave it to that thread; one a library starts in the
    worker before this runs (e.g. jemalloc's, with pyarrow loaded) would get torch's
    handler. So `iterate` starts such workers with SIGTERM blocked in the calling thread,
    which every thread of the worker inherits. fit, evaluate, find_lr and the Trainer
    façade build their loaders with this and read them through `iterate`; for a DataLoader
    of your own, pass it as `worker_init_fn` (or call it from yours) and loop over
    `loopkit.data.iterate(loader)`. Where the system lacks `sigwaitinfo` (macOS, Windows)
    it does nothing.

    Args:
        worker_id: the worker's index (unused; torch passes it).
        main_pid: the process that owns the loader, where it is not the worker's parent
            (the "forkserver" start method); by default the parent.
    """
    del worker_id
    if not _TAKES_SIGNALS:  # torch's own handler stays
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_take_sigterms, args=(main_pid,), name="loopkit-sigterm", daemon=True
    ).start()


def _take_sigterms(main_pid: int | None) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender in (main_pid, os.getppid()):
            os._exit(0)


def _keeps_workers_through_sigterm(loader: object) -> bool:
    init = getattr(loader, "worker_init_fn", None)
    init = init.func if isinstance(init, functools.partial) else init
    return init is keep_workers_through_sigterm and getattr(loader, "num_workers", 0) > 0


def workers_die_on_sigterm(loader: object) -> bool:
    """Whether a SIGTERM sent to the whole process group would kill `loader`'s workers.

    True for a DataLoader with worker processes that does not start them with
    `keep_workers_through_sigterm` (a loader of the user's own, as a rule), where the
    system has `sigwaitinfo` to do better. A `worker_init_fn` of the user's own that calls
    it cannot be seen from here.
    """
    return (
        isinstance(loader, (DataLoader, StatefulDataLoader))
        and loader.num_workers > 0
        and not _keeps_workers_through_sigterm(loader)
        and _TAKES_SIGNALS
    )


@contextlib.contextmanager
def _sigterm_blocked(blocked: bool) -> Iterator[None]:
    """SIGTERM blocked in this thread while the block runs (one that arrives waits)."""
    if not (blocked and _TAKES_SIGNALS):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def has_global_position(loader: object) -> bool:
    """Whether `loader`'s `state_dict()` holds a global data position (an EpochSampler's).

    Such a position resumes exactly at any world size; any other loader's position is
    this rank's own (rank 0's, in a checkpoint).
    """
    return isinstance(loader, StatefulDataLoader) and isinstance(loader.sampler, EpochSampler)


def as_global_position(position: Any, world_size: int) -> Any:
    """A StatefulDataLoader state saved before EpochSampler, with its position made global.

    Such a state (torch's DistributedSampler under the loader) counts the samples this rank
    drew (`samples_yielded`); every rank drew as many, so the global position is that times
    the world size it was saved at. States that hold an EpochSampler's already are returned
    as they are.
    """
    if isinstance(position, Mapping):
        converted = {key: as_global_position(value, world_size) for key, value in position.items()}
        if "samples_yielded" in converted and "sampler_state" not in converted:
            converted["sampler_state"] = {
                "epoch": None,  # the epoch the run is in, whichever it is
                "position": int(converted["samples_yielded"]) * world_size,
            }
        return converted
    return position


def iterate(loader: Iterable[Any], *, where: str = "fit(train_data=...)") -> Iterator[Any]:
    """Yield the loader's batches; a worker's timeout becomes a DataTimeoutError.

    torch raises a bare `RuntimeError("DataLoader timed out after ... seconds")` when a
    worker delivers no batch within the loader's `timeout`; this names the worker and the
    fixes instead, and stops the loader's workers (the stuck one included) at once. A
    loader whose workers start with `keep_workers_through_sigterm` starts them with SIGTERM
    blocked here (see there why).

    Raises:
        DataTimeoutError: a worker delivered no batch within the loader's timeout.
    """
    # Workers start here: with keep_workers_through_sigterm, each starts with SIGTERM
    # blocked (this thread's mask is inherited), so only its own handler thread takes one.
    with _sigterm_blocked(_keeps_workers_through_sigterm(loader)):
        iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            if not str(error).startswith("DataLoader timed out"):
                raise
            raise _timeout_error(loader, iterator, where) from error
        yield batch


def _timeout_error(loader: Any, iterator: Any, where: str) -> DataTimeoutError:
    """The DataTimeoutError for a timed-out multi-process iterator; stops its workers."""
    # torch keeps these on its multi-process iterators (and torchdata's copy of them):
    # `_task_info[i]` holds the id of the worker asked for batch i, the next one due is
    # `_rcvd_idx`. Read defensively: they are not public.
    due = getattr(iterator, "_rcvd_idx", None)
    info = getattr(iterator, "_task_info", {}).get(due) or (None,)
    workers = getattr(iterator, "_workers", [])
    worker = "a worker"
    if isinstance(info[0], int) and info[0] < len(workers):
        worker = f"worker {info[0]} (pid {workers[info[0]].pid})"
    dataset = type(getattr(loader, "dataset", None)).__name__
    timeout_s = getattr(loader, "timeout", None)
    # The loader keeps its iterator, and the stuck worker with it, as long as this error's
    # traceback holds fit's frames; torch has no public call to stop an iterator's workers.
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    return DataTimeoutError(
        f"{where}: DataLoader {worker} delivered no batch within {timeout_s} s (batch "
        f"{due} of this epoch); it is probably stuck in {dataset}.__getitem__ or collate_fn. "
        "Fixes: find the hang in the dataset (a lock, a network read, an endless loop); run "
        "with num_workers=0 to see it in the main process's traceback; or raise "
        "fit(data_timeout_s=...) (a DataLoader you pass: its timeout=) if batches are "
        "legitimately this slow. Checkpoints already written are intact: resume=True "
        "continues from the newest."
    )


__all__ = [
    "DataKind",
    "DataTimeoutError",
    "EpochSampler",
    "as_global_position",
    "data_kind",
    "has_global_position",
    "is_loader",
    "iterate",
    "keep_workers_through_sigterm",
    "make_loader",
    "workers_die_on_sigterm",
]
