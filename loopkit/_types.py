"""Type aliases and protocols shared across loopkit: Batch, Transform, LossFn, Schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from .loss import Loss
    from .state import TrainState

Batch = Any
"""A micro-batch: a tensor, or a dict / tuple / list / dataclass of tensors."""

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer from parameters, after the strategy has wrapped the model."""

Schedule = Callable[[int], float]
"""A learning-rate factor as a pure function of the optimizer step (1.0 = the base lr)."""


class Transform(Protocol):
    """One step of the pipeline: consumes a TrainState and a batch, returns the new TrainState."""

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState: ...


class LossFn(Protocol):
    """Computes the loss of one micro-batch: a `Loss(sum, count)` or a scalar mean."""

    def __call__(self, model: torch.nn.Module, batch: Batch, /) -> Loss | torch.Tensor: ...
