"""Type aliases and protocols shared across loopkit: Batch, Transform, LossFn, Strategy.

This is the lowest layer: it imports nothing of loopkit at run time (the names under
TYPE_CHECKING are for annotations only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .loss import Loss
    from .precision import Precision
    from .state import TrainState

Batch = Any
"""A micro-batch: a tensor, or a dict / tuple / list / dataclass of tensors."""

Count = int | float | torch.Tensor
"""An item count: a host number, or a device tensor (kept there to avoid a host sync)."""

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer from parameters, after the strategy has wrapped the model."""

Schedule = Callable[[int], float]
"""A learning-rate factor as a pure function of the optimizer step (1.0 = the base lr)."""

Predict = Callable[[torch.nn.Module, Any], Any]
"""`predict(model, batch) -> outputs`: what evaluation metrics read."""

PrecisionName = Literal["fp32", "bf16", "fp16"]
Mode = Literal["min", "max"]
NonfinitePolicy = Literal["raise", "skip"]


class Transform(Protocol):
    """One step of the pipeline: consumes a TrainState and a batch, returns the new TrainState."""

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState: ...


class LossFn(Protocol):
    """Computes the loss of one micro-batch: a `Loss(sum, count)` or a scalar mean."""

    def __call__(self, model: torch.nn.Module, batch: Batch, /) -> Loss | torch.Tensor: ...


@runtime_checkable
class Strategy(Protocol):
    """How one process runs a training step: the whole contract, checked at TrainState.create.

    Every member is used by some part of loopkit (transforms, evaluate, fit, checkpoint,
    logging); nothing is optional and nothing is looked up by name. A strategy of your own
    implements all of it (the built-in ones share free functions in
    `loopkit.strategies.common` for the usual behaviour). docs/architecture.md describes
    each member.

    Attributes (read-only):
        device: where this process's tensors live.
        rank: this process's index among `world_size` processes.
        world_size: processes taking part in each step.
        dp_rank: this process's index among the data-parallel replicas: which shard of
            the data it reads (= rank except under Pipeline, where a pipeline's ranks
            share one shard).
        dp_world_size: data-parallel replicas (shards of the data).
        is_main: whether this process logs, prints and rotates checkpoints (rank 0).
        is_sharded: whether each rank holds only part of the model and optimizer state;
            checkpoints are then written by every rank (torch.distributed.checkpoint).
        timeout_s: seconds a collective waits for the other ranks (None: one process).
    """

    @property
    def device(self) -> torch.device: ...

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def dp_rank(self) -> int: ...

    @property
    def dp_world_size(self) -> int: ...

    @property
    def is_main(self) -> bool: ...

    @property
    def is_sharded(self) -> bool: ...

    @property
    def timeout_s(self) -> float | None: ...

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

    def forward_backward(
        self,
        model: torch.nn.Module,
        batch: Batch,
        loss_fn: LossFn,
        *,
        precision: Precision,
        n_samples: int,
        ref_count: Count | None,
        sync: bool,
        loss_scale: torch.Tensor | None,
        check_count: bool,
    ) -> tuple[torch.Tensor, Count, Count]:
        """Forward and backward of one micro-batch, normalised by the window's reference count.

        Gradients grow by those of (this micro-batch's loss sum) / ref, where ref is
        `ref_count`, or on a window's first micro-batch (`ref_count` None) this
        micro-batch's item count summed over ranks (see loopkit.normalise). `sync`: reduce
        gradients across ranks after this backward (the window's last micro-batch).
        `loss_scale`: fp16's scale to multiply the loss by before backward. `check_count`:
        check (one host sync) that the item count is a finite number > 0.

        Returns:
            (this rank's loss sum / ref, detached; this rank's item count; ref).
        """
        ...

    def gradient_sync(
        self, model: torch.nn.Module, enabled: bool
    ) -> contextlib.AbstractContextManager[object]:
        """The context one micro-batch's forward and backward run in (no sync if not enabled)."""
        ...

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, *, sync: bool) -> None:
        """Backpropagate one micro-batch's loss; reduce gradients across ranks if `sync`.

        Data-parallel strategies also undo their gradient averaging: loopkit normalises by
        the global item count itself.
        """
        ...

    def reduce_count(self, count: Count) -> Count:
        """Sum an item count over all ranks (return `count` itself on a single process)."""
        ...

    def reduce_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Global train metrics from this rank's (a collective: every rank calls it)."""
        ...

    def clip_grad_norm_(
        self, params: Sequence[torch.nn.Parameter], max_norm: float, norm_type: float
    ) -> torch.Tensor:
        """Scale gradients in place so their global norm is at most `max_norm`; return it."""
        ...

    def eval_forward(
        self,
        model: torch.nn.Module,
        batch: Batch,
        loss_fn: LossFn | None,
        predict: Predict | None,
        *,
        n_samples: int,
        want_outputs: bool,
        sum_dtype: torch.dtype,
    ) -> tuple[tuple[torch.Tensor, Count] | None, Any]:
        """One forward-only evaluation batch (called under no_grad and autocast).

        Returns:
            ((loss summed over the batch's items in `sum_dtype`, item count) or None
            without loss_fn, outputs for the metrics or None): a rank holding no part of
            the result (a pipeline's first stages) returns (None, None).
        """
        ...

    def full_model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state_dict on the main rank (a collective where sharded)."""
        ...

    def snapshot(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Deep-copy a record's fields (model, optimizer, schedule, tensors)."""
        ...


STRATEGY_MEMBERS: tuple[str, ...] = tuple(sorted(n for n in vars(Strategy) if n[0] != "_"))
"""Every member a Strategy must have (attributes and methods)."""


def check_strategy(strategy: object) -> Strategy:
    """Return `strategy` if it has every Strategy member, else raise TypeError naming them."""
    present = set(dir(strategy))
    missing = [name for name in STRATEGY_MEMBERS if name not in present]
    if missing:
        raise TypeError(
            f"strategy={strategy!r}: not a loopkit Strategy; it lacks "
            f"{', '.join(missing)}. Use SingleDevice(), DDP(), FSDP() or Pipeline(...), or "
            "implement every member of loopkit.Strategy (see docs/architecture.md)."
        )
    return strategy  # type: ignore[return-value]


__all__ = [
    "STRATEGY_MEMBERS",
    "Batch",
    "Count",
    "LossFn",
    "Mode",
    "NonfinitePolicy",
    "OptimizerFactory",
    "Predict",
    "PrecisionName",
    "Schedule",
    "Strategy",
    "Transform",
    "check_strategy",
]
