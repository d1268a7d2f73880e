"""Loss(sum, count): a summed loss and the number of items it sums over."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Loss(NamedTuple):
    """A micro-batch loss as a sum over items and the count of those items.

    Returning the sum and the count (instead of a mean) lets loopkit normalise a gradient
    window by the number of items in the *whole* window, so the gradient is that of the mean
    loss over every item however they were split into micro-batches and ranks.

    Attributes:
        sum: scalar tensor, the loss summed over the items.
        count: how many items `sum` adds up: an int or an integer/float scalar tensor
            (kept on device, so counting padded tokens costs no host sync).
    """

    sum: torch.Tensor
    count: int | torch.Tensor  # type: ignore[assignment]  # shadows tuple.count on purpose


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Loss:
    """Cross-entropy summed over the targets that are not `ignore_index`, and their count.

    `logits` is `(..., classes)` and `targets` the matching `(...)` class indices; padded
    positions marked with `ignore_index` add neither to the sum nor to the count.

    Example:
        >>> logits, targets = torch.zeros(2, 3, 5), torch.tensor([[1, 2, -100], [0, -100, -100]])
        >>> loss = cross_entropy(logits, targets)
        >>> int(loss.count), round(float(loss.sum / loss.count), 4)
        (3, 1.6094)
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy(logits, targets): logits shape {tuple(logits.shape)} must be "
            f"targets shape {tuple(targets.shape)} plus a class dimension."
        )
    if logits.ndim != 2:  # (..., classes) -> (items, classes); (batch, classes) is that already
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
    total = F.cross_entropy(
        logits, targets, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    return Loss(total, (targets != ignore_index).sum())


def mse(predictions: torch.Tensor, targets: torch.Tensor) -> Loss:
    """Squared error summed over all elements, counted per element (as F.mse_loss's mean)."""
    if predictions.shape != targets.shape:
        raise ValueError(
            f"mse(predictions, targets): shapes differ, {tuple(predictions.shape)} and "
            f"{tuple(targets.shape)}."
        )
    return Loss(F.mse_loss(predictions, targets, reduction="sum"), predictions.numel())


def as_loss(
    value: object, batch_size: int, where: object
) -> tuple[torch.Tensor, int | torch.Tensor, bool]:
    """Validate what a loss_fn returned: `(sum or mean, count, is_mean)`.

    A scalar tensor is a mean over `batch_size` items. Checks cost no host sync (shapes and
    dtypes only); `forward` calls this on every micro-batch.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(
                f"{where}: loss_fn returned a tensor of shape {tuple(value.shape)}; it must "
                "return a scalar (the mean loss) or loopkit.Loss(sum, count). Reduce it, e.g. "
                "loss.mean(), or return Loss(loss.sum(), loss.numel())."
            )
        return value, batch_size, True
    if isinstance(value, Loss):
        total, count = value
        if not (isinstance(total, torch.Tensor) and total.ndim == 0):
            raise ValueError(
                f"{where}: Loss.sum must be a scalar tensor, got "
                f"{type(total).__name__}{tuple(getattr(total, 'shape', ()))}."
            )
        if isinstance(count, torch.Tensor):
            if count.ndim != 0 or count.is_complex() or count.dtype == torch.bool:
                raise ValueError(
                    f"{where}: Loss.count must be a scalar int or float tensor, got dtype "
                    f"{count.dtype} and shape {tuple(count.shape)}."
                )
        elif isinstance(count, bool) or not isinstance(count, numbers.Real):
            raise TypeError(f"{where}: Loss.count must be an int or a tensor, got {count!r}.")
        elif not (math.isfinite(count) and count > 0):
            raise ValueError(
                f"{where}: Loss.count={count!r}; the item count must be a finite number > 0."
            )
        return total, count, False
    raise TypeError(
        f"{where}: loss_fn returned {type(value).__name__}; it must return a scalar tensor "
        "(the mean loss) or loopkit.Loss(sum, count)."
    )


__all__ = [
    "Loss",
    "as_loss",
    "cross_entropy",
    "mse",
]
