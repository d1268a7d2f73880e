"""The Trainer's inputs: collators, data loaders, and how a batch reaches the model.

HF's rules for a batch: samples are collated by `default_data_collator` (or the
processing class's `pad`); a dict batch loses the keys `forward` does not take
(`remove_unused_columns`) and calls `model(**batch)`; the labels are under
`args.label_names` (default "labels"), and a loss averages over the labels that are not
-100 (`num_items_in_batch`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import make_loader
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
            batch["labels"] = torch.tensor([f["label_ids"] for f in features])
    for key, value in first.items():
        if key in ("label", "label_ids") or value is None or isinstance(value, str):
            continue
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([f[key] for f in features])
        elif isinstance(value, np.ndarray):
            batch[key] = torch.from_numpy(np.stack([f[key] for f in features]))
        else:
            batch[key] = torch.tensor([f[key] for f in features])
    return batch


@dataclass(frozen=True, slots=True)
class PadCollator:
    """Collate with a tokenizer's `pad(features, return_tensors="pt")`, labels as "labels"."""

    pad: Callable[..., Any]

    def __call__(self, features: list[Any]) -> Any:
        batch = dict(self.pad(features, return_tensors="pt"))
        for old in ("label", "label_ids"):
            if old in batch:
                batch["labels"] = batch.pop(old)
        return batch


def default_collator(processing_class: Any) -> Collator:
    """The processing class's `pad` when it has one (a tokenizer), else default_data_collator."""
    pad = getattr(processing_class, "pad", None)
    return PadCollator(pad) if callable(pad) else default_data_collator


def label_names(args: TrainingArguments) -> list[str]:
    """The batch keys that hold labels: `args.label_names`, default ["labels"]."""
    return list(args.label_names or ["labels"])


def call_model(model: torch.nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """`model(**inputs)` for a dict batch, `model(*inputs)` for a tuple, else `model(inputs)`."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


class BatchReader:
    """Reads batches for one model: what reaches `forward`, the labels, the item count.

    Built per train() or evaluation from the args of that moment; `forward`'s signature is
    read once, on first use.

    Args:
        model: the Trainer's model (wrappers such as DDP or torch.compile are looked through).
        label_names: the batch keys holding labels.
        remove_unused_columns: drop dict keys `forward` does not take (HF's option).
    """

    def __init__(
        self, model: torch.nn.Module, label_names: Sequence[str], remove_unused_columns: bool
    ) -> None:
        self.model = unwrap(model)
        self.label_names = list(label_names)
        self.remove_unused_columns = remove_unused_columns
        self._forward: tuple[set[str], bool] | None = None

    def forward_parameters(self) -> tuple[set[str], bool]:
        """`forward`'s parameter names, and whether it takes **kwargs."""
        if self._forward is None:
            params = inspect.signature(self.model.forward).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            self._forward = (set(params), takes_any)
        return self._forward

    def prepare(self, batch: Any) -> Any:
        """A dict batch without the keys forward does not take (remove_unused_columns)."""
        if not isinstance(batch, Mapping) or not self.remove_unused_columns:
            return batch
        names, takes_any = self.forward_parameters()
        if takes_any:
            return dict(batch)
        keep = names | set(self.label_names)
        return {k: v for k, v in batch.items() if k in keep}

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
        """Items the loss averages over: labels that are not -100 (HF's num_items_in_batch)."""
        labels = self.labels(batch)
        if not labels:
            return None
        return labels[0].ne(IGNORE_INDEX).sum()  # stays on device: no host sync


def batch_reader(model: torch.nn.Module, args: TrainingArguments) -> BatchReader:
    """A BatchReader for `model` with the label names and column rule of `args`."""
    return BatchReader(model, label_names(args), args.remove_unused_columns)


def has_labels(dataset: Any, loader: Any, collate: Collator, reader: BatchReader) -> bool:
    """Whether the dataset's batches carry labels (its first sample, collated, is read)."""
    try:
        sample = collate([dataset[0]])
    except Exception:  # iterable or unusual datasets: read the first batch instead
        sample = next(iter(loader))
    return bool(reader.labels(sample))


def train_loader(
    dataset: Any, args: TrainingArguments, strategy: Strategy, collate: Collator
) -> Any:
    """The training loader: shuffled per epoch by (data_seed or seed, epoch), this rank's share."""
    return make_loader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        drop_last=args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory and torch.device(strategy.device).type == "cuda",
        collate_fn=collate,
        rank=strategy.rank,
        world_size=strategy.world_size,
        where="Trainer(train_dataset=...)",
    )


def eval_loader(
    dataset: Any, args: TrainingArguments, strategy: Strategy, collate: Collator
) -> Any:
    """An evaluation loader: dataset order, this rank's share (rank r reads items r, r+w, ...)."""
    return make_loader(
        dataset,
        batch_size=args.per_device_eval_batch_size,
        shuffle=False,
        seed=args.seed,
        drop_last=args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate,
        rank=strategy.rank,
        world_size=strategy.world_size,
        where="Trainer(eval_dataset=...)",
    )


def batches_per_epoch(loader: Any) -> int | None:
    """The loader's batches per epoch, or None when it has no length."""
    try:
        return len(loader)
    except TypeError:
        return None


__all__ = [
    "IGNORE_INDEX",
    "BatchReader",
    "Collator",
    "PadCollator",
    "batch_reader",
    "batches_per_epoch",
    "call_model",
    "default_collator",
    "default_data_collator",
    "eval_loader",
    "has_labels",
    "label_names",
    "train_loader",
]
