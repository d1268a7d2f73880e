"""Strategies decide how forward/backward, gradient sync, norms and snapshots run."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .._types import Batch, OptimizerFactory
from ..precision import Precision
from .ddp import DDP
from .env import DistributedError
from .fsdp import FSDP
from .pipeline import Pipeline
from .single import SingleDevice


@runtime_checkable
class Strategy(Protocol):
    """How one process runs a training step; every implementation passes one contract test.

    Attributes:
        device: where this process's tensors live.
        rank: this process's index among `world_size` processes.
        world_size: processes taking part in each step.
        is_sharded: whether each rank holds only part of the model and optimizer state;
            checkpoints are then written by every rank (torch.distributed.checkpoint)
            instead of by rank 0 alone.

    Optional methods, for strategies that run the model differently (loopkit calls them
    when present; SingleDevice, DDP and FSDP have none):

    - `forward_backward(model, batch, loss_fn, *, n_samples, ref_count, sync)
      -> (loss share / ref, count share, ref)`: forward and backward of one micro-batch
      in one call, normalised as `forward` does (Pipeline: one schedule step).
    - `eval_forward(model, batch, loss_fn, predict, n_samples)
      -> ((loss sum, count) | None, outputs | None)`: one forward-only evaluation batch.
    - `full_model_state(model) -> state_dict`: the whole model gathered on rank 0, for
      `save_model` (a collective).
    """

    device: torch.device
    rank: int
    world_size: int
    is_sharded: bool

    def setup(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        precision: Precision,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Place/wrap the model, then build the optimizer over its trainable parameters."""
        ...

    def to_device(self, batch: Batch) -> Batch:
        """Move a micro-batch to this process's device."""
        ...

    def gradient_sync(
        self, model: torch.nn.Module, enabled: bool
    ) -> contextlib.AbstractContextManager[object]:
        """The context one micro-batch's forward and backward run in.

        With `enabled` False, gradients stay local (accumulated) instead of being reduced
        across ranks. It wraps the forward too because DDP decides in its forward whether
        the following backward all-reduces.
        """
        ...

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, *, sync: bool) -> None:
        """Backpropagate one micro-batch's loss; reduce gradients across ranks if `sync`.

        Data-parallel strategies also undo their gradient averaging (multiply by the world
        size): loopkit normalises by the global item count itself.
        """
        ...

    def reduce_count(self, count: int | float | torch.Tensor) -> int | float | torch.Tensor:
        """Sum an item count over all ranks (return `count` itself on a single process)."""
        ...

    def reduce_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Global train metrics from this rank's (a collective: every rank calls it).

        "train/loss" is a rank's share of the global mean, so ranks sum it; other tensor
        metrics are averaged. Single process: the metrics as they are.
        """
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
            "DDP(), FSDP() or Pipeline(...)."
        )
    return strategy


__all__ = [
    "DDP",
    "FSDP",
    "DistributedError",
    "Pipeline",
    "SingleDevice",
    "Strategy",
    "check_strategy",
]
