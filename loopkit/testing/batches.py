"""Batches as the checks see them: one full batch per optimizer step, cut into micro-batches.

A *window* here is the full batch of one optimizer step; a *split* lists the sizes of the
micro-batches it is cut into along dim 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._batch import first_tensor

__all__ = [
    "as_batch_list",
    "batch_windows",
    "common_batch_size",
    "describe_batches",
    "leading_size",
    "micro_batches",
    "micro_batches_per_window",
    "split_batch",
]


def as_batch_list(batches: Any, where: str) -> list[Any]:
    """A list is one batch per step; anything else (tuple, dict, tensor) is one batch."""
    if isinstance(batches, list):
        if not batches:
            raise ValueError(f"{where}(batches=[]): pass at least one batch.")
        return list(batches)
    if batches is None:
        raise ValueError(f"{where}(batches=None): pass a batch or a list of batches.")
    return [batches]


def batch_windows(batches: Any, steps: int | None, where: str) -> list[Any]:
    """One full batch per optimizer step: a list as given (cycled to `steps`), or one batch
    repeated (twice by default, so a second step sees the first step's leftovers)."""
    full = as_batch_list(batches, where)
    if steps is None:
        steps = len(full) if len(full) > 1 else 2
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}(steps={steps!r}): must be an int >= 1.")
    return [full[i % len(full)] for i in range(steps)]


def leading_size(batch: Any, where: str) -> int:
    """The batch dimension: the leading size of the batch's first tensor."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            f"{where}: the batch ({type(batch).__name__}) holds no tensor with a batch "
            "dimension; expected a tensor, or a dict / tuple / list / dataclass of tensors."
        )
    return int(tensor.shape[0])


def common_batch_size(windows: Sequence[Any], where: str) -> int:
    """The size every window shares (ValueError if they differ)."""
    n = leading_size(windows[0], where)
    for window in windows[1:]:
        if leading_size(window, where) != n:
            raise ValueError(f"{where}(batches=...): every batch must have the same size ({n}).")
    return n


def micro_batches_per_window(
    split: Sequence[int] | None, windows: Sequence[Any], where: str
) -> int:
    """k (micro-batches per window) for `split`, after checking it fits every window."""
    if split is None:
        return 1
    for window in windows:
        n = leading_size(window, where)
        if sum(split) != n or any(int(s) < 1 for s in split):
            raise ValueError(
                f"{where}(split={list(split)}): sizes must be >= 1 and sum to the batch size, {n}."
            )
    return len(split)


def micro_batches(window: Any, split: Sequence[int] | None, where: str) -> list[Any]:
    """`window` cut by `split`, or the whole window as one micro-batch when split is None."""
    return [window] if split is None else split_batch(window, split, where)


def split_batch(batch: Any, sizes: Sequence[int], where: str) -> list[Any]:
    """Cut every tensor of `batch` along dim 0 into pieces of `sizes` (0-d ones are shared).

    Raises:
        ValueError: sizes do not sum to the batch size, or a tensor has another length.
    """
    total = leading_size(batch, where)
    sizes = [int(s) for s in sizes]
    if sum(sizes) != total or any(s < 1 for s in sizes):
        raise ValueError(
            f"{where}: split {sizes} must be sizes >= 1 summing to the batch size {total}."
        )

    def cut(node: Any, path: str) -> list[Any]:
        if isinstance(node, torch.Tensor):
            if node.ndim == 0:
                return [node] * len(sizes)
            if node.shape[0] != total:
                raise ValueError(
                    f"{where}: batch{path} has leading size {node.shape[0]}, the batch has "
                    f"{total}; every tensor must share the batch dimension to be split."
                )
            return list(node.split(sizes))
        if isinstance(node, Mapping):
            parts = {k: cut(v, f"{path}[{k!r}]") for k, v in node.items()}
            return [type(node)({k: v[i] for k, v in parts.items()}) for i in range(len(sizes))]  # type: ignore[call-arg]
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            cols = [cut(v, f"{path}.{f}") for f, v in zip(node._fields, node, strict=True)]
            return [type(node)(*(c[i] for c in cols)) for i in range(len(sizes))]
        if isinstance(node, (list, tuple)):
            cols = [cut(v, f"{path}[{j}]") for j, v in enumerate(node)]
            return [type(node)(c[i] for c in cols) for i in range(len(sizes))]
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            fields = [f.name for f in dataclasses.fields(node) if f.init]
            by_field = {f: cut(getattr(node, f), f"{path}.{f}") for f in fields}
            return [
                dataclasses.replace(node, **{f: c[i] for f, c in by_field.items()})
                for i in range(len(sizes))
            ]
        return [node] * len(sizes)

    return cut(batch, "")


def describe_batches(batches: Sequence[Any]) -> str:
    """'<2 batches of 8 items: dict(tokens=(8, 5) int64, ...)>' for reproduction messages."""

    def shape(node: Any) -> str:
        if isinstance(node, torch.Tensor):
            return f"{tuple(node.shape)} {str(node.dtype).replace('torch.', '')}"
        if isinstance(node, Mapping):
            return "dict(" + ", ".join(f"{k}={shape(v)}" for k, v in node.items()) + ")"
        if isinstance(node, (list, tuple)):
            return f"{type(node).__name__}(" + ", ".join(shape(v) for v in node) + ")"
        return type(node).__name__

    first = batches[0]
    size = first_tensor(first)
    items = f" of {size.shape[0]} items" if size is not None and size.ndim else ""
    plural = "batch" if len(batches) == 1 else "batches"
    return f"<{len(batches)} {plural}{items}: {shape(first)}>"
