"""SingleDevice: the whole model on one device (cuda, mps or cpu)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._batch import move
from .._types import Batch, Count, OptimizerFactory
from ..precision import Precision
from . import common


def default_device() -> torch.device:
    """cuda if available, else mps if available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class SingleDevice:
    """Train on one device: no wrapping, no communication.

    Args:
        device: "cpu", "cuda", "cuda:1", "mps", a torch.device, or None to pick
            cuda > mps > cpu.
    """

    rank = 0
    world_size = 1
    dp_rank = 0
    dp_world_size = 1
    is_main = True
    is_sharded = False
    timeout_s: float | None = None

    def __init__(self, device: str | torch.device | None = None) -> None:
        try:
            self.device = default_device() if device is None else torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"SingleDevice(device={device!r}): not a device; use 'cpu', 'cuda', "
                "'cuda:N', 'mps' or None."
            ) from error
        self._non_blocking = self.device.type == "cuda"
        self._cpu = self.device.type == "cpu"

    def setup(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        precision: Precision,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)  # keeps Parameter identity, so a built optimizer still fits
        built = common.build_optimizer(model, optimizer)
        # Kept for the run (see gradient_accumulators): the nodes of the last model set up.
        self._grad_accumulators = common.gradient_accumulators(built)
        return model, built

    def to_device(self, batch: Batch) -> Batch:
        if self._cpu and type(batch) is tuple:
            # The usual `(x, y)` batch of CPU tensors is where it must be already: the same
            # tuple, as move() would rebuild it, without reading each tensor's device object.
            for value in batch:
                if type(value) is not torch.Tensor or not value.is_cpu:
                    break
            else:
                return batch
        # non_blocking from pinned host memory overlaps the copy with compute on CUDA.
        return move(batch, self.device, self._non_blocking)

    # The usual behaviour, shared with the other strategies as free functions.
    forward_backward = common.local_forward_backward
    eval_forward = staticmethod(common.local_eval_forward)
    full_model_state = staticmethod(common.whole_model_state)
    clip_grad_norm_ = staticmethod(common.local_clip_grad_norm_)
    snapshot = staticmethod(common.deep_copy_training_objects)
    gradient_sync = staticmethod(common.no_gradient_sync)  # one process: nothing to sync

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, *, sync: bool = True) -> None:
        loss.backward()

    def reduce_count(self, count: Count) -> Count:
        return count  # one process: the local count is the global count

    def reduce_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return dict(metrics)  # one process: local metrics are global

    def __getstate__(self) -> dict[str, Any]:
        # The autograd nodes kept by setup() cannot be pickled; a copy makes its own.
        return {k: v for k, v in self.__dict__.items() if k != "_grad_accumulators"}

    def __repr__(self) -> str:
        return f"SingleDevice(device={str(self.device)!r})"


__all__ = ["SingleDevice", "default_device"]
