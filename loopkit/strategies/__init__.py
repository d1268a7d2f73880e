"""Strategies decide how forward/backward, gradient sync, norms and snapshots run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, Union, runtime_checkable

import torch

from .._types import Batch, OptimizerFactory
from ..precision import Precision
from .single import SingleDevice


@runtime_checkable
class Strategy(Protocol):
    """How one process runs a training step; every implementation passes one contract test.

    Attributes:
        device: where this process's tensors live.
        rank: this process's index among `world_size` processes.
        world_size: processes taking part in each step.
    """

    device: torch.device
    rank: int
    world_size: int

    def setup(
        self,
        model: torch.nn.Module,
        optimizer: Union[torch.optim.Optimizer, OptimizerFactory],
        precision: Precision,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Place/wrap the model, then build the optimizer over its trainable parameters."""
        ...

    def to_device(self, batch: Batch) -> Batch:
        """Move a micro-batch to this process's device."""
        ...

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, *, sync: bool) -> None:
        """Backpropagate one micro-batch's loss; reduce gradients across ranks if `sync`.

        Data-parallel strategies also undo their gradient averaging (multiply by the world
        size): loopkit normalises by the global item count itself.
        """
        ...

    def reduce_count(self, count: Union[int, float, torch.Tensor]) -> Union[int, float, torch.Tensor]:
        """Sum an item count over all ranks (return `count` itself on a single process)."""
        ...

    def clip_grad_norm_(
        self, params: Sequence[torch.nn.Parameter], max_norm: float, norm_type: float
    ) -> torch.Tensor:
        """Scale gradients in place so their global norm is at most `max_norm`; return it."""
        ...

    def snapshot(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Deep-copy a record's fields (model, optimizer, schedule, tensors)."""
        ...


def check_strategy(strategy: object) -> Strategy:
    """Return `strategy` if it implements the Strategy protocol, else raise TypeError."""
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"strategy={strategy!r}: expected a loopkit Strategy such as SingleDevice(), "
            "DDP() or FSDP()."
        )
    return strategy


__all__ = ["SingleDevice", "Strategy", "check_strategy"]
