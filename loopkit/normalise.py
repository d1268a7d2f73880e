"""The window arithmetic: how a gradient window's loss is normalised, in one place.

Micro-batch i of a window contributes `sum_i / ref` to the gradients, where `ref` is the
first micro-batch's item count summed over ranks (the window's *reference count*).
Closing the window multiplies the gradients by `ref / (c_1 + ... + c_k)` (counts summed
over ranks), so the window's gradient is that of `sum(sum_i) / sum(c_i)`: the mean loss
over every item, however the items were split into micro-batches and ranks. A
one-micro-batch window needs no rescaling at all.

`forward` (through `Strategy.forward_backward`), `accumulate` and the Pipeline strategy
all call these functions; nothing else does this arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._types import Count


def check_first_count(count: Count, where: object) -> None:
    """Raise ValueError unless an item count is a finite number > 0.

    host sync: called once per run, on the first micro-batch, to catch a broken item count
    (a mask that hides everything) before it silently divides by zero.
    """
    value = float(count)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{where}: loss_fn returned Loss.count={value!r} on the first micro-batch; the "
            "item count must be a finite number > 0. Check the mask or ignore_index."
        )


def reference_count(count: Count, ref_count: Count | None, strategy: Any) -> Count:
    """The window's reference count: `ref_count`, or on its first micro-batch `count`
    summed over ranks (so every rank scales alike and a data-parallel sum stays exact)."""
    return strategy.reduce_count(count) if ref_count is None else ref_count


def scaled_loss(value: torch.Tensor, count: Count, is_mean: bool, ref: Count) -> torch.Tensor:
    """The loss to backpropagate: this micro-batch's item sum divided by `ref`.

    A scalar mean counts `count` items, so its sum is `value * count`; written as
    `value * (count / ref)` so that a lone micro-batch (`ref is count`) is backpropagated
    as it is, exactly like a hand-written loop.
    """
    if is_mean:
        return value if ref is count else value * (count / ref)
    return value / ref  # type: ignore[operator]


def item_sum(value: torch.Tensor, count: Count, is_mean: bool) -> torch.Tensor:
    """The loss summed over the micro-batch's items (a scalar mean times its count)."""
    return value * count if is_mean else value  # type: ignore[operator]


def closing_factor(ref_count: Count, total: Count) -> Any:
    """What a closing window's gradients are multiplied by: `ref_count / total`, or None.

    None when `total is ref_count` (a one-micro-batch window: nothing to rescale). The
    ratio is taken in float64 where the device has it: integer count tensors would divide
    to float32, e.g. 1/3 off by 3e-8, and float64 training would see gradients that depend
    on the micro-batch split.
    """
    if total is ref_count:
        return None
    if isinstance(total, torch.Tensor) and total.device.type != "mps":
        return torch.as_tensor(ref_count, device=total.device).double() / total
    return ref_count / total  # type: ignore[operator]


def divide_grads_(params: Sequence[torch.nn.Parameter], ref: torch.Tensor) -> None:
    """Divide gradients by `ref` in place, one foreach op per dtype.

    For strategies that cannot normalise inside the graph (a pipeline's first micro-batch
    learns its reference count only after the schedule ran).
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for dtype, grads in by_dtype.items():
        torch._foreach_div_(grads, ref.to(dtype))


__all__ = [
    "check_first_count",
    "closing_factor",
    "divide_grads_",
    "item_sum",
    "reference_count",
    "scaled_loss",
]
