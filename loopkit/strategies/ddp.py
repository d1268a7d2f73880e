"""DDP: every rank holds the whole model; gradients are all-reduced once per window."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .._batch import move
from .._types import Batch, OptimizerFactory
from ..precision import Precision
from . import common
from .env import DEFAULT_STARTUP_TIMEOUT_S, DEFAULT_TIMEOUT_S, init_distributed

_NO_CONTEXT = contextlib.nullcontext()


def _check_bool(where: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where}({name}={value!r}): expected True or False.")


class DDP:
    """Data parallel training with torch's DistributedDataParallel.

    Each rank runs the whole model on its own micro-batches; DistributedDataParallel
    all-reduces the gradients during the backward of a window's last micro-batch only
    (earlier micro-batches run under `no_sync`, see `gradient_sync`). loopkit normalises
    by the window's item count summed over ranks, and the reduction is a sum, so the
    window's gradient is exactly the mean-loss gradient over every item on every rank,
    however unevenly the items are spread.

    Building a DDP joins the process group the launcher describes (torchrun, srun, or a
    single process; see loopkit.strategies.env), so `rank` and `world_size` are known
    before the model is wrapped.

    Args:
        device: "cpu", "cuda", "cuda:N" or None for cuda:LOCAL_RANK when CUDA is available,
            else cpu. CUDA uses the nccl backend, cpu uses gloo.
        timeout_s: seconds a collective waits for the other ranks once fit's first step is
            done; a dead peer raises at once, a hung one after this long, naming the lost
            rank (see loopkit.strategies.liveness).
        startup_timeout_s: the same for joining the group and the first step (compiles,
            loading, first data), which may take much longer.
        find_unused_parameters: passed to DistributedDataParallel (same default).
        gradient_as_bucket_view: passed to DistributedDataParallel (same default).
        static_graph: passed to DistributedDataParallel (same default).
        bucket_cap_mb: passed to DistributedDataParallel (same default). Buffers are
            broadcast from rank 0 at every forward, as DistributedDataParallel does by
            default.

    Raises:
        ValueError: a bad argument, or a half-set launcher environment.
        DistributedError: the other processes did not join within `timeout_s`.

    Example:
        >>> strategy = DDP()  # doctest: +SKIP
        >>> state = TrainState.create(model, optimizer=factory, strategy=strategy)  # doctest: +SKIP
    """

    is_sharded = False

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = False,
        static_graph: bool = False,
        bucket_cap_mb: float | None = None,
    ) -> None:
        for name, value in (
            ("find_unused_parameters", find_unused_parameters),
            ("gradient_as_bucket_view", gradient_as_bucket_view),
            ("static_graph", static_graph),
        ):
            _check_bool("DDP", name, value)
        if bucket_cap_mb is not None and not (
            isinstance(bucket_cap_mb, (int, float))
            and not isinstance(bucket_cap_mb, bool)
            and math.isfinite(bucket_cap_mb)
            and bucket_cap_mb > 0
        ):
            raise ValueError(
                f"DDP(bucket_cap_mb={bucket_cap_mb!r}): the gradient bucket size in MiB, a "
                "positive number, or None for DistributedDataParallel's default (25)."
            )
        env, self.device = init_distributed(
            device, timeout_s=timeout_s, startup_timeout_s=startup_timeout_s, where="DDP"
        )
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.dp_rank, self.dp_world_size = self.rank, self.world_size  # every rank a replica
        self.is_main = self.rank == 0
        self.timeout_s = float(timeout_s)
        self._non_blocking = self.device.type == "cuda"
        self._wrap_kwargs: dict[str, Any] = {
            "find_unused_parameters": find_unused_parameters,
            "gradient_as_bucket_view": gradient_as_bucket_view,
            "static_graph": static_graph,
        }
        if bucket_cap_mb is not None:
            self._wrap_kwargs["bucket_cap_mb"] = bucket_cap_mb

    def _wrap(self, module: torch.nn.Module) -> DistributedDataParallel:
        # A collective: DistributedDataParallel broadcasts rank 0's parameters and buffers,
        # so every rank starts from the same weights.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        try:
            return DistributedDataParallel(module, device_ids=device_ids, **self._wrap_kwargs)
        except Exception as error:
            common.raise_if_comm_error(
                error, self, "wrapping the model (broadcast of rank 0's weights)"
            )
            raise

    def setup(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        precision: Precision,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if isinstance(model, DistributedDataParallel):
            raise ValueError(
                "DDP().setup(model=DistributedDataParallel(...)): the model is wrapped "
                "already; pass the plain module and let the strategy wrap it."
            )
        # .to() and DistributedDataParallel keep Parameter identity, so a built optimizer
        # still fits; a factory is built over the wrapped model's parameters.
        wrapped = self._wrap(model.to(self.device))
        return wrapped, common.build_optimizer(wrapped, optimizer)

    # The usual behaviour, shared with the other strategies as free functions.
    forward_backward = common.local_forward_backward
    eval_forward = staticmethod(common.local_eval_forward)
    full_model_state = staticmethod(common.whole_model_state)
    reduce_count = common.reduce_count_over_ranks
    reduce_metrics = common.reduce_metrics_over_ranks
    # After the window's all-reduce every rank holds the same gradients, so the local
    # norm is the global one: no communication.
    clip_grad_norm_ = staticmethod(common.local_clip_grad_norm_)

    def to_device(self, batch: Batch) -> Batch:
        return move(batch, self.device, self._non_blocking)

    def gradient_sync(
        self, model: torch.nn.Module, enabled: bool
    ) -> contextlib.AbstractContextManager[object]:
        if enabled:
            return _NO_CONTEXT
        return model.no_sync()  # type: ignore[operator,no-any-return]

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, *, sync: bool = True) -> None:
        if sync and not model.require_backward_grad_sync:
            raise RuntimeError(
                "DDP.backward(sync=True) inside gradient_sync(model, False): DDP decides in "
                "forward whether backward all-reduces, so this backward would not sync. "
                "Run the forward and backward of a syncing micro-batch outside it."
            )
        # DistributedDataParallel averages gradients over ranks; loopkit has already divided
        # by the item count summed over ranks, so it needs their sum. Scaling the loss by
        # world_size turns the average back into the sum, exactly for power-of-two world
        # sizes (scaling by a power of two is exact in floating point).
        if self.world_size > 1:
            loss = loss * self.world_size
        common.backward_with_peers(self, loss, "the gradient all-reduce in backward")

    def snapshot(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Deep-copy the user's module and optimizer, then wrap the copy in a new DDP.

        The copy is a full DDP replica that trains on its own. Wrapping is a collective,
        so every rank must snapshot at the same point (as SPMD code does anyway).
        """
        copied = common.deep_copy_training_objects({**fields, "model": fields["model"].module})
        copied["model"] = self._wrap(copied["model"])
        return copied

    def __repr__(self) -> str:
        return f"DDP(device={str(self.device)!r}, rank={self.rank}, world_size={self.world_size})"


__all__ = ["DDP"]
