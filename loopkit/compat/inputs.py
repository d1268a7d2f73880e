"""The Trainer's inputs: datasets, columns, collators, data loaders, and batches.

HF's rules, followed here:

- a dataset is any object with `__len__` and `__getitem__` (a torch Dataset or not, an HF
  `datasets.Dataset`), or an iterable dataset (torch's or `datasets.IterableDataset`);
- `remove_unused_columns`: the columns `forward` does not name (plus "label",
  "label_ids" and the label names) are dropped *before* collation, from a
  `datasets.Dataset` with `remove_columns`, from other datasets' dict samples by the
  collator (HF's RemoveColumnsCollator);
- samples are collated by `default_data_collator`, or by HF's DataCollatorWithPadding
  (the processing class's `pad`) when a tokenizer is given, or by `data_collator=`;
- a dict batch calls `model(**batch)`; the labels are under `label_names` (default: the
  forward arguments whose name contains "label", as HF finds them); a loss averages over
  the labels that are not -100 (`num_items_in_batch`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import EpochSampler, make_loader
from ..strategies import Strategy, unwrap
from .args import TrainingArguments

Collator = Callable[[list[Any]], Any]
"""Builds one batch from a list of samples."""

IGNORE_INDEX = -100
"""The label HF's losses skip (padding, masked tokens); such labels count no item."""


def default_data_collator(features: list[Any]) -> Any:
    """HF's default_data_collator: stack dict features; "label"/"label_ids" -> "labels".

    Other batches (tuples of tensors, ...) go through torch's default_collate.
    """
    first = features[0]
    if not isinstance(first, Mapping):
        return torch.utils.data.default_collate(features)
    batch: dict[str, Any] = {}
    if first.get("label") is not None:
        label = (
            first["label"].item() if isinstance(first["label"], torch.Tensor) else first["label"]
        )
        dtype = torch.long if isinstance(label, (int, np.integer)) else torch.float
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=dtype)
    elif first.get("label_ids") is not None:
        if isinstance(first["label_ids"], torch.Tensor):
            batch["labels"] = torch.stack([f["label_ids"] for f in features])
        else:
            is_int = isinstance(first["label_ids"][0], (int, np.integer))
            batch["labels"] = torch.tensor(
                [f["label_ids"] for f in features], dtype=torch.long if is_int else torch.float
            )
    for key, value in first.items():
        if key in ("label", "label_ids") or value is None or isinstance(value, str):
            continue
        try:
            batch[key] = _stacked(value, [f[key] for f in features])
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"Trainer: default_data_collator cannot stack the samples' {key!r} ({error}); "
                "samples of different lengths need padding: pass processing_class=<your "
                "tokenizer> (HF's DataCollatorWithPadding) or data_collator=... that pads."
            ) from error
    return batch


def _stacked(first: Any, values: list[Any]) -> torch.Tensor:
    """One batch tensor from the samples' values of one key (`first` is the first's)."""
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, np.ndarray):
        return torch.from_numpy(np.stack(values))
    return torch.tensor(values)


@dataclass(frozen=True, slots=True)
class PadCollator:
    """HF's DataCollatorWithPadding: `pad(features, padding=True, return_tensors="pt")`,
    labels as "labels"."""

    pad: Callable[..., Any]

    def __call__(self, features: list[Any]) -> Any:
        batch = dict(self.pad(features, padding=True, return_tensors="pt"))
        for old in ("label", "label_ids"):
            if old in batch:
                batch["labels"] = batch.pop(old)
        return batch


@dataclass(frozen=True, slots=True)
class RemoveColumns:
    """HF's RemoveColumnsCollator: drop the keys `forward` does not take, then collate.

    Attributes:
        collate: the collator that builds the batch.
        keep: the columns kept (forward's argument names, "label", "label_ids", labels).
    """

    collate: Collator
    keep: frozenset[str]

    def __call__(self, features: list[Any]) -> Any:
        if features and isinstance(features[0], Mapping):
            features = [{k: v for k, v in f.items() if k in self.keep} for f in features]
        return self.collate(features)


def default_collator(processing_class: Any) -> Collator:
    """DataCollatorWithPadding (the processing class's `pad`) with a tokenizer, else
    default_data_collator (HF's choice)."""
    pad = getattr(processing_class, "pad", None)
    return PadCollator(pad) if callable(pad) else default_data_collator


def forward_parameters(model: torch.nn.Module) -> tuple[list[str], bool]:
    """`forward`'s parameter names (in order), and whether it takes **kwargs."""
    params = inspect.signature(unwrap(model).forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return list(params), takes_any


def find_labels(model: torch.nn.Module) -> list[str]:
    """HF's default label names: forward's arguments named like a label.

    QA models' `start_positions` / `end_positions` count too; with none, ["labels"].
    """
    names, _ = forward_parameters(model)
    found = [n for n in names if "label" in n]
    if not found and {"start_positions", "end_positions"} <= set(names):
        found = ["start_positions", "end_positions"]
    return found or ["labels"]


def label_names(args: TrainingArguments, model: torch.nn.Module | None = None) -> list[str]:
    """The batch keys that hold labels: `args.label_names`, else HF's default for `model`."""
    if args.label_names is not None:
        return list(args.label_names)
    return ["labels"] if model is None else find_labels(model)


def signature_columns(model: torch.nn.Module, labels: Sequence[str]) -> frozenset[str]:
    """The sample keys HF keeps: forward's argument names, "label", "label_ids", the labels."""
    names, _ = forward_parameters(model)
    return frozenset([*names, "label", "label_ids", *labels])


def is_hf_dataset(dataset: Any) -> bool:
    """Whether `dataset` is an HF `datasets.Dataset` or `datasets.IterableDataset`."""
    return type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "remove_columns")


def dataset_for_model(dataset: Any, model: torch.nn.Module, args: TrainingArguments) -> Any:
    """An HF dataset without the columns `forward` does not take (remove_unused_columns).

    Other datasets are returned as they are (their samples lose those keys in the
    collator, see `collator_for`).

    Raises:
        ValueError: no column of the dataset is one forward takes (HF's error).
    """
    if not (args.remove_unused_columns and is_hf_dataset(dataset)):
        return dataset
    columns = list(dataset.column_names or [])
    if not columns:  # an IterableDataset whose columns are not known ahead
        return dataset
    keep = signature_columns(model, label_names(args, model))
    ignored = [c for c in columns if c not in keep]
    if len(ignored) == len(columns):
        raise ValueError(
            f"Trainer: no column of the dataset ({columns}) is an argument of "
            f"{type(unwrap(model)).__name__}.forward {sorted(keep - {'label', 'label_ids'})}; "
            "rename the columns, or pass TrainingArguments(remove_unused_columns=False)."
        )
    return dataset.remove_columns(ignored) if ignored else dataset


def collator_for(
    collate: Collator, dataset: Any, model: torch.nn.Module, args: TrainingArguments
) -> Collator:
    """`collate`, behind HF's RemoveColumnsCollator for datasets that are not HF datasets."""
    if not args.remove_unused_columns or is_hf_dataset(dataset):
        return collate
    return RemoveColumns(collate, signature_columns(model, label_names(args, model)))


def call_model(model: torch.nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """`model(**inputs)` for a dict batch, `model(*inputs)` for a tuple, else `model(inputs)`."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


class BatchReader:
    """Reads batches for one model: the labels and the item count.

    Built per train() or evaluation from the args of that moment; `forward`'s signature is
    read once, on first use.

    Args:
        model: the Trainer's model (wrappers such as DDP or torch.compile are looked through).
        label_names: the batch keys holding labels.
        shifts_labels: the model's loss predicts token t+1 from token t (a causal LM), so
            position 0 of each row is no item: count `labels[..., 1:]` (HF's rule).
    """

    def __init__(
        self, model: torch.nn.Module, label_names: Sequence[str], shifts_labels: bool = False
    ) -> None:
        self.model = unwrap(model)
        self.label_names = list(label_names)
        self.shifts_labels = shifts_labels
        self._forward: tuple[set[str], bool] | None = None

    def forward_parameters(self) -> tuple[set[str], bool]:
        """`forward`'s parameter names, and whether it takes **kwargs."""
        if self._forward is None:
            names, takes_any = forward_parameters(self.model)
            self._forward = (set(names), takes_any)
        return self._forward

    def labels(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """The label tensors of a batch: its label keys (a dict), or batch[1] (a tuple)."""
        if isinstance(batch, Mapping):
            return tuple(
                batch[n] for n in self.label_names if isinstance(batch.get(n), torch.Tensor)
            )
        if (
            isinstance(batch, (tuple, list))
            and len(batch) >= 2
            and isinstance(batch[1], torch.Tensor)
        ):
            return (batch[1],)
        return ()

    def item_count(self, batch: Any) -> torch.Tensor | None:
        """Items the loss averages over: labels that are not -100 (HF's num_items_in_batch).

        A batch's "shift_labels" are counted as they are; a causal LM's labels from
        position 1 on.
        """
        if isinstance(batch, Mapping) and isinstance(batch.get("shift_labels"), torch.Tensor):
            return batch["shift_labels"].ne(IGNORE_INDEX).sum()
        labels = self.labels(batch)
        if not labels:
            return None
        counted = labels[0][..., 1:] if self.shifts_labels else labels[0]
        return counted.ne(IGNORE_INDEX).sum()  # stays on device: no host sync


def loss_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether `model` is a transformers causal LM whose loss shifts the labels (HF's test:
    its `loss_type` maps to ForCausalLMLoss, and it is not an encoder-decoder)."""
    module = unwrap(model)
    loss_type = getattr(module, "loss_type", None)
    if loss_type is None:
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return False
    config = getattr(module, "config", None)
    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )


def batch_reader(model: torch.nn.Module, args: TrainingArguments) -> BatchReader:
    """A BatchReader for `model` with the label names of `args`."""
    return BatchReader(model, label_names(args, model), loss_shifts_labels(model))


def has_labels(dataset: Any, loader: Any, collate: Collator, reader: BatchReader) -> bool:
    """Whether the dataset's batches carry labels (its first sample, collated, is read)."""
    try:
        sample = collate([dataset[0]])
    except Exception:  # iterable or unusual datasets: read the first batch instead
        sample = next(iter(loader))
    return bool(reader.labels(sample))


class IterableShard(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """This data-parallel rank's share of an iterable dataset that every rank reads whole.

    Training (`batch_size` given): HF's IterableDatasetShard, as accelerate deals an
    iterable dataset's batches: of each `batch_size * world_size` items in a row, rank r
    takes the r-th `batch_size`; the last, short group is filled up with the first
    group's items (without `drop_last`), so every rank takes as many steps. Evaluation
    (`batch_size=None`): item i goes to rank i % world_size, each item once, as the
    eval split of a map-style dataset deals them (what the prediction gather expects).

    Args:
        dataset: the iterable dataset.
        rank, world_size: this data-parallel rank and the number of them.
        batch_size: per-rank training batch size, or None for the evaluation split.
        drop_last: drop the last, short group instead of filling it (training).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        rank: int,
        world_size: int,
        batch_size: int | None,
        drop_last: bool = False,
    ) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last

    def __iter__(self) -> Any:
        if self.batch_size is None:
            for index, item in enumerate(self.dataset):
                if index % self.world_size == self.rank:
                    yield item
            return
        group = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        first: list[Any] | None = None
        current: list[Any] = []
        for item in self.dataset:
            current.append(item)
            if len(current) == group:
                yield from current[mine]
                first = first if first is not None else current
                current = []
        if current and not self.drop_last:
            first = first if first is not None else list(current)
            while len(current) < group:
                current += first
            yield from current[mine]


def _shard(
    dataset: Any, strategy: Strategy, args: TrainingArguments, *, eval_split: bool = False
) -> Any:
    """An iterable dataset's share for this data-parallel rank (others: as they are).

    For training an HF `datasets.IterableDataset` is split by `split_dataset_by_node`, a
    torch IterableDataset by `IterableShard` (HF shards both: every rank reading all of
    it would count each item world_size times). For evaluation both are split item by
    item (`IterableShard`), the order the prediction gather puts back together
    (`split_dataset_by_node` gives whole shards to a rank when it can).
    """
    world = strategy.dp_world_size
    if world == 1:
        return dataset
    iterable = isinstance(dataset, torch.utils.data.IterableDataset) or (
        is_hf_dataset(dataset) and not hasattr(dataset, "__len__")
    )
    if eval_split and iterable:
        return IterableShard(dataset, rank=strategy.dp_rank, world_size=world, batch_size=None)
    if is_hf_dataset(dataset) and not hasattr(dataset, "__len__"):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=strategy.dp_rank, world_size=world)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return IterableShard(
            dataset,
            rank=strategy.dp_rank,
            world_size=world,
            batch_size=None if eval_split else args.per_device_train_batch_size,
            drop_last=args.dataloader_drop_last,
        )
    return dataset


def train_loader(
    dataset: Any, args: TrainingArguments, strategy: Strategy, collate: Collator
) -> Any:
    """The training loader: shuffled per epoch by (data_seed or seed, epoch) ('random'
    sampling), this data-parallel rank's share (under Pipeline every stage of a replica
    reads the same batches)."""
    return make_loader(
        _shard(dataset, strategy, args),
        batch_size=args.per_device_train_batch_size,
        shuffle=args.train_sampling_strategy == "random",
        seed=args.data_seed if args.data_seed is not None else args.seed,
        drop_last=args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory and torch.device(strategy.device).type == "cuda",
        collate_fn=collate,
        rank=strategy.dp_rank,
        world_size=strategy.dp_world_size,
        where="Trainer(train_dataset=...)",
    )


def eval_loader(
    dataset: Any, args: TrainingArguments, strategy: Strategy, collate: Collator
) -> Any:
    """An evaluation loader: dataset order, this data-parallel rank's share (rank r reads
    items r, r+w, ...), each item read once: the shares are not padded (as fit's eval
    split), so that the loss and the gathered predictions count every item once, as HF's
    gather_for_metrics leaves them."""
    return make_loader(
        _shard(dataset, strategy, args, eval_split=True),
        pad=False,
        batch_size=args.per_device_eval_batch_size,
        shuffle=False,
        seed=args.seed,
        drop_last=args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate,
        rank=strategy.dp_rank,
        world_size=strategy.dp_world_size,
        where="Trainer(eval_dataset=...)",
    )


def eval_batches_per_rank(loader: Any) -> tuple[int, int] | None:
    """(the busiest rank's, the idlest rank's) batches in an unpadded eval split, read off
    its sampler alike on every rank; None for a loader without loopkit's EpochSampler."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, EpochSampler):
        return None
    size, drop_last = int(loader.batch_size), bool(loader.drop_last)

    def batches(items: int) -> int:
        return items // size if drop_last else -(-items // size)

    idlest = sampler.size // sampler.world_size
    if sampler.drop_last:
        return batches(idlest), batches(idlest)
    return batches(sampler.busiest_share()), batches(idlest)


def batches_per_epoch(loader: Any) -> int | None:
    """The loader's batches per epoch, or None when it has no length."""
    try:
        return len(loader)
    except TypeError:
        return None


__all__ = [
    "IGNORE_INDEX",
    "BatchReader",
    "IterableShard",
    "Collator",
    "PadCollator",
    "RemoveColumns",
    "batch_reader",
    "batches_per_epoch",
    "call_model",
    "collator_for",
    "dataset_for_model",
    "default_collator",
    "default_data_collator",
    "eval_batches_per_rank",
    "eval_loader",
    "find_labels",
    "forward_parameters",
    "has_labels",
    "is_hf_dataset",
    "label_names",
    "loss_shifts_labels",
    "signature_columns",
    "train_loader",
]
