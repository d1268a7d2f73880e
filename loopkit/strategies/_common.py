"""Pieces strategies share: building the optimizer, reducing counts and metrics over ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._types import OptimizerFactory
from .env import comm_error, is_comm_error


def build_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | OptimizerFactory
) -> torch.optim.Optimizer:
    """Return a built optimizer as is, or call the factory on the trainable parameters."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    built = optimizer([p for p in model.parameters() if p.requires_grad])
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer factory {optimizer!r} returned {type(built).__name__}; it must return "
            "a torch.optim.Optimizer, e.g. `lambda params: torch.optim.AdamW(params, lr=3e-4)`."
        )
    return built


SUMMED_METRICS = frozenset({"train/loss"})
"""Train metrics that hold a rank's share of a global value, so ranks add them up.

`accumulate` records "train/loss" as this rank's loss sum over the window's *global* item
count; the sum over ranks is the mean over every item of the step. Every other tensor
metric ("train/grad_norm", a custom one) is averaged over ranks: a value that is already
global (the grad norm) stays as it is.
"""


def all_reduce_count(count: int | float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum an item count over the default process group, as a float64 device tensor.

    float64 holds integer counts exactly up to 2**53, and keeps forward's `count / ref`
    ratio (a scalar-mean loss) in float64 as it is on one device. The caller's tensor is
    never modified: `count` stays this rank's own count.
    """
    if isinstance(count, torch.Tensor):
        total = count.detach().to(device=device, dtype=torch.float64, copy=True)
    else:
        total = torch.tensor(float(count), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total


def all_reduce_metrics(
    metrics: Mapping[str, Any], world_size: int, device: torch.device
) -> dict[str, Any]:
    """Global train metrics from every rank's: SUMMED_METRICS added, other tensors averaged.

    Host numbers (such as "train/lr", the same on every rank) are returned as they are.
    One all_reduce over a packed float64 buffer; every rank must pass the same keys.
    """
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(metrics)
    packed = torch.stack(
        [metrics[k].detach().reshape(()).to(device=device, dtype=torch.float64) for k in keys]
    )
    torch.distributed.all_reduce(packed)
    reduced = dict(metrics)
    for i, key in enumerate(keys):
        reduced[key] = packed[i] if key in SUMMED_METRICS else packed[i] / world_size
    return reduced


def raise_if_comm_error(error: BaseException, strategy: Any, what: str) -> None:
    """Raise a DistributedError saying why, `from error`, if `error` came from a lost peer.

    Used as `except Exception as e: raise_if_comm_error(e, self, "backward"); raise`: a
    try block costs nothing on the hot path until something fails.
    """
    if is_comm_error(error):
        raise comm_error(
            error, strategy.rank, strategy.world_size, what, strategy.timeout_s
        ) from error


def reduce_count_over_ranks(strategy: Any, count: int | float | torch.Tensor) -> torch.Tensor:
    """`all_reduce_count` for a strategy's `reduce_count`: a lost peer raises DistributedError."""
    try:
        return all_reduce_count(count, strategy.device)
    except Exception as error:
        raise_if_comm_error(error, strategy, "summing the item count over ranks")
        raise


def reduce_metrics_over_ranks(strategy: Any, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`all_reduce_metrics` for a strategy's `reduce_metrics` (a no-op on one process)."""
    if strategy.world_size == 1:
        return dict(metrics)
    try:
        return all_reduce_metrics(metrics, strategy.world_size, strategy.device)
    except Exception as error:
        raise_if_comm_error(error, strategy, "reducing the train metrics over ranks")
        raise
