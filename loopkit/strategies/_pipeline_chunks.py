"""Per-step pieces of a pipeline: batches cut into chunks, the chunk loss, stand-in models.

The user's `loss_fn(model, batch)` is used unchanged under a pipeline: the first stage
reads the model's inputs from it (a Recorder stands in for the model), the last stage
calls it per chunk with a StandIn that returns the pipeline's output for that chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._types import LossFn
from ..loss import as_loss
from ..normalise import item_sum
from ..precision import Precision


class ModelCalledError(Exception):
    """Raised by Recorder to stop loss_fn once the model's inputs are known."""


class Recorder:
    """Stands in for the model inside loss_fn to read what the model is called with."""

    def __init__(self) -> None:
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.args, self.kwargs = args, kwargs
        raise ModelCalledError


class StandIn:
    """Stands in for the model inside loss_fn: returns the pipeline's output, once."""

    def __init__(self, output: Any) -> None:
        self.output, self.calls = output, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                "Pipeline: loss_fn called the model twice on one micro-batch; under a "
                "pipeline the model runs once per micro-batch (its output comes from the "
                "last stage). Call the model once in loss_fn."
            )
        return self.output


def leaves(batch: Any) -> list[Any]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [x for v in batch.values() for x in leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [x for v in batch for x in leaves(v)]
    return [batch]


def signature(batch: Any) -> tuple[Any, ...]:
    """Shapes and dtypes of a batch: stages keep buffers sized for one such signature."""
    return tuple(
        (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        for x in leaves(batch)
    )


def chunks(batch: Any, n: int, size: int) -> list[Any]:
    """Cut every tensor of `batch` with `size` rows into n equal pieces along dim 0.

    Others (0-d tensors, numbers, strings) are shared by every piece. The pieces match the
    schedule's own split of the inputs (torch.tensor_split along dim 0), since n divides size.
    """
    if isinstance(batch, torch.Tensor):
        if batch.ndim and batch.shape[0] == size:
            return list(batch.tensor_split(n))
        return [batch] * n
    if isinstance(batch, Mapping):
        parts = {k: chunks(v, n, size) for k, v in batch.items()}
        return [type(batch)({k: v[i] for k, v in parts.items()}) for i in range(n)]  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        cols = [chunks(v, n, size) for v in batch]
        return [type(batch)(*(c[i] for c in cols)) for i in range(n)]
    if isinstance(batch, (list, tuple)):
        cols = [chunks(v, n, size) for v in batch]
        return [type(batch)(c[i] for c in cols) for i in range(n)]
    return [batch] * n


class ChunkLoss:
    """The schedule's loss_fn(output, target): the user's loss of one chunk, normalised.

    The target the schedule hands over is the chunk's index (a tensor arange(n), split by
    the schedule like any target), so the loss reads the matching chunk of the batch.
    Contributions are recorded per call; metadata inference at a schedule's first step
    calls it once more with a placeholder output, before the real chunks, so a step's
    chunks are its last n records.
    """

    def __init__(self, precision: Precision, device: torch.device) -> None:
        self.precision, self.device = precision, device
        self.loss_fn: LossFn | None = None
        self.chunks: list[Any] = []
        self.size = 0
        self.ref: Any = None
        self.records: list[tuple[torch.Tensor, Any]] = []
        # A traced model's last stage returns its outputs flattened (torch's stages pass
        # tensors and tuples only); this gives them back their structure (a dict, say).
        self.unflatten: Callable[[Any], Any] | None = None

    def start(self, loss_fn: LossFn, chunks: list[Any], size: int, ref: Any) -> None:
        self.loss_fn, self.chunks, self.size, self.ref = loss_fn, chunks, size, ref
        self.records = []

    def __call__(self, output: Any, index: torch.Tensor) -> torch.Tensor:
        assert self.loss_fn is not None
        chunk = self.chunks[int(index[0])]  # index lives on the CPU: no device sync
        stand_in = StandIn(output if self.unflatten is None else self.unflatten(output))
        with self.precision.autocast(self.device):
            returned = self.loss_fn(stand_in, chunk)  # type: ignore[arg-type]
            value, count, is_mean = as_loss(returned, self.size, "Pipeline")
        if stand_in.calls == 0:
            raise RuntimeError(
                "Pipeline: loss_fn did not call the model; under a pipeline the loss reads "
                "the last stage's output through the model call in loss_fn."
            )
        # Sum over the chunk's items: a scalar mean counts as mean * (rows of the chunk).
        total = item_sum(value, count, is_mean)
        self.records.append((total.detach(), count))
        # Normalised in the graph when the window's reference count is known already;
        # the first micro-batch of a window divides the gradients after the step instead.
        return total if self.ref is None else total / self.ref

    def take(self, n: int) -> list[tuple[torch.Tensor, Any]]:
        """This step's n chunk records (loss sum, item count), clearing the list."""
        records, self.records = self.records[-n:], []
        return records


def summed(records: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """The chunks' loss sums added in float64, and their item counts added."""
    total = torch.stack([t.double() for t, _ in records]).sum()
    count: Any = records[0][1]
    for _, c in records[1:]:
        count = count + c
    return total, count


class Autocast(nn.Module):
    """Runs a stage module under the state's autocast policy (forward only, not backward)."""

    def __init__(self, module: nn.Module, precision: Precision, device: torch.device) -> None:
        super().__init__()
        self.module, self._precision, self._device = module, precision, device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._precision.autocast(self._device):
            return self.module(*args, **kwargs)


__all__ = [
    "Autocast",
    "ChunkLoss",
    "ModelCalledError",
    "Recorder",
    "StandIn",
    "chunks",
    "leaves",
    "signature",
    "summed",
]
