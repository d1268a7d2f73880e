"""FSDP: parameters, gradients and optimizer state sharded over ranks (FSDP2, fully_shard)."""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import _sharded
from .._batch import move
from .._types import Batch, OptimizerFactory
from ..precision import Precision
from . import common
from .env import DEFAULT_STARTUP_TIMEOUT_S, DEFAULT_TIMEOUT_S, init_distributed

ShardSpec = type | tuple[type, ...] | Callable[[nn.Module], bool] | None

_NO_CONTEXT = contextlib.nullcontext()
_VIEW_WARNING = r"FSDP2-wrapped module \(.*\) returned a view tensor"
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

NEEDS_FACTORY = (
    "FSDP() needs an optimizer factory such as "
    "`lambda params: torch.optim.AdamW(params, lr=3e-4)`, not a built optimizer: sharding "
    "replaces the parameters, so an optimizer built before would update tensors that are no "
    "longer used."
)


def _dtype(name: str, value: object) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(
        f"FSDP({name}={value!r}): None (keep the parameters' dtype), a torch.dtype, or one "
        f"of {sorted(_DTYPES)}, e.g. {name}=torch.bfloat16."
    )


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the outermost nn.ModuleLists: a transformer's blocks.

    Lists nested inside a chosen block (its heads, say) are not split further.
    """
    blocks: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(child.children())
            else:
                walk(child)

    walk(model)
    return blocks


def _meta_blueprint(model: nn.Module) -> nn.Module:
    """A copy of `model`'s structure whose parameters and buffers are on the meta device.

    Costs no memory for weights: deepcopy finds every tensor already in its memo.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(
            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


class FSDP:
    """Fully sharded data parallel training with FSDP2 (`torch.distributed.fsdp.fully_shard`).

    Each rank stores 1/world_size of every parameter, gradient and optimizer state. The
    forward all-gathers one sharded unit (a block) at a time; the backward reduce-scatters
    its gradients, on the window's last micro-batch only (`set_requires_gradient_sync`).
    The reduce-scatter sums (no averaging): loopkit has already divided by the window's
    item count summed over ranks, so the gradient is exactly the mean-loss gradient over
    every item on every rank.

    Building an FSDP joins the process group the launcher describes (see
    loopkit.strategies.env). The optimizer must be given as a factory: it is built after
    sharding, over the sharded parameters (DTensors).

    Args:
        device: "cpu", "cuda", "cuda:N" or None for cuda:LOCAL_RANK when CUDA is available,
            else cpu (gloo).
        shard: which submodules become their own sharded unit: a module class, a tuple of
            classes, or a predicate `module -> bool`; None picks the children of the
            model's outermost nn.ModuleLists (transformer blocks). The root is always a
            unit (it holds whatever the others leave: embeddings, head).
        reshard_after_forward: free each unit's gathered parameters after forward
            (gather them again in backward: less memory, more communication), or keep
            them (False); an int reshards to groups of that many ranks (see fully_shard).
            The root unit always keeps them, as fully_shard does by default.
        param_dtype: dtype the forward and backward compute in (e.g. torch.bfloat16);
            None keeps the parameters' dtype. The sharded parameters and the optimizer
            stay in their own dtype.
        reduce_dtype: dtype of the gradient reduce-scatter; None uses param_dtype.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory;
            the optimizer steps on the CPU.
        activation_checkpointing: recompute each unit's activations in backward instead of
            storing them (less memory, about one more forward of compute).
        sync_module_states: before sharding, broadcast rank 0's parameters and buffers to
            every rank (as DDP does), so ranks that initialised differently still start
            from the same weights; costs one broadcast of the model. Parameters on the
            meta device are left alone. False: each rank keeps its own slice as built.
        timeout_s: seconds a collective waits for the other ranks once fit's first step is
            done (then a DistributedError names the lost rank).
        startup_timeout_s: the same for joining the group and the first step.

    Raises:
        ValueError / TypeError: a bad argument, or a half-set launcher environment.
        DistributedError: the other processes did not join within `timeout_s`.

    Example:
        >>> strategy = FSDP(param_dtype=torch.bfloat16)  # doctest: +SKIP
        >>> state = TrainState.create(model, optimizer=lambda p: torch.optim.AdamW(p),
        ...                           strategy=strategy)  # doctest: +SKIP
    """

    is_sharded = True

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        shard: ShardSpec = None,
        reshard_after_forward: bool | int = True,
        param_dtype: torch.dtype | str | None = None,
        reduce_dtype: torch.dtype | str | None = None,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        sync_module_states: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        if not (
            shard is None
            or (isinstance(shard, type) and issubclass(shard, nn.Module))
            or (
                isinstance(shard, tuple)
                and shard
                and all(isinstance(c, type) and issubclass(c, nn.Module) for c in shard)
            )
            or (callable(shard) and not isinstance(shard, type))
        ):
            raise TypeError(
                f"FSDP(shard={shard!r}): which submodules to shard separately: a module "
                "class (shard=Block), a tuple of classes, a predicate "
                "`lambda module: ...`, or None for the blocks of the model's nn.ModuleLists."
            )
        if isinstance(reshard_after_forward, bool):
            pass
        elif not (isinstance(reshard_after_forward, int) and reshard_after_forward >= 1):
            raise ValueError(
                f"FSDP(reshard_after_forward={reshard_after_forward!r}): True, False, or an "
                "int >= 1 (reshard to groups of that many ranks)."
            )
        for name, value in (
            ("cpu_offload", cpu_offload),
            ("activation_checkpointing", activation_checkpointing),
            ("sync_module_states", sync_module_states),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"FSDP({name}={value!r}): expected True or False.")
        self.shard = shard
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = _dtype("param_dtype", param_dtype)
        self.reduce_dtype = _dtype("reduce_dtype", reduce_dtype)
        self.cpu_offload = cpu_offload
        self.activation_checkpointing = activation_checkpointing
        self.sync_module_states = sync_module_states
        env, self.device = init_distributed(
            device, timeout_s=timeout_s, startup_timeout_s=startup_timeout_s, where="FSDP"
        )
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.dp_rank, self.dp_world_size = self.rank, self.world_size  # every rank a replica
        self.is_main = self.rank == 0
        self.timeout_s = float(timeout_s)
        self._non_blocking = self.device.type == "cuda"
        self._mesh: Any = None
        # Per prepared model: its meta blueprint and optimizer factory (for snapshot), the
        # FSDP units, and whether gradient sync is currently on.
        self._prepared: weakref.WeakKeyDictionary[nn.Module, _Prepared] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------------ preparing a model

    def _units(self, model: nn.Module) -> list[nn.Module]:
        if self.shard is None:
            units = default_blocks(model)
        elif isinstance(self.shard, (type, tuple)):
            units = [m for m in model.modules() if m is not model and isinstance(m, self.shard)]
        else:
            units = [m for m in model.modules() if m is not model and self.shard(m)]
        return units

    def _shard(self, model: nn.Module) -> list[Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        units = self._units(model)
        if self.sync_module_states and self.world_size > 1:
            self._broadcast_from_rank_0(model)
        if self.activation_checkpointing:
            if not units:
                raise ValueError(
                    f"FSDP(activation_checkpointing=True): {type(model).__name__} has no "
                    "units to checkpoint (no nn.ModuleList blocks); pass shard=BlockClass "
                    "or a predicate."
                )
            # Order: checkpoint before sharding. The composable checkpoint keeps parameter
            # names (checkpoints stay compatible) and fully_shard's hooks then wrap the
            # checkpointed forward, so the recomputation in backward re-gathers the shards.
            from torch.distributed._composable import checkpoint

            for unit in units:
                checkpoint(unit)
        if self._mesh is None:
            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        offload = (
            CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
            if self.cpu_offload
            else OffloadPolicy()
        )
        options = {
            "mesh": self._mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype
            ),
            "offload_policy": offload,
        }
        # Order: innermost units first, the root last (fully_shard's requirement); the
        # root takes every parameter no unit holds. The root never reshards after
        # forward (fully_shard's own default for it): backward starts by needing its
        # parameters again, so freeing them would cost one more all-gather per step.
        try:
            for unit in reversed(units):
                fully_shard(unit, **options)
            fully_shard(model, **{**options, "reshard_after_forward": False})
        except Exception as error:
            common.raise_if_comm_error(error, self, "sharding the model")
            raise
        fsdp_units: list[Any] = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in fsdp_units:
            # Sum gradients across ranks instead of averaging: loopkit normalises by the
            # global item count itself. force_sum keeps the reduce op a plain SUM (gloo has
            # no PREMUL_SUM), and a divide factor of 1 skips the division.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        return fsdp_units

    def _broadcast_from_rank_0(self, model: nn.Module) -> None:
        import torch.distributed as dist

        if any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
            return  # not materialised yet (meta-device init): nothing to broadcast
        model.to(self.device)  # fully_shard moves it there anyway; nccl needs it first
        try:
            with torch.no_grad():
                for tensor in (*model.parameters(), *model.buffers()):
                    dist.broadcast(tensor.detach(), src=0)  # in place: shares the storage
        except Exception as error:
            common.raise_if_comm_error(error, self, "broadcasting rank 0's weights")
            raise

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        precision: Precision,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import FSDPModule

        factory = common.require_factory_and_no_loss_scaling(
            optimizer,
            precision,
            needs_factory=NEEDS_FACTORY,
            loss_scaling=f"{self!r} with precision='fp16': loss scaling checks each rank's "
            "gradient shards for overflow separately, so ranks could disagree about skipping "
            "a step. Use precision='bf16' or FSDP(param_dtype=torch.bfloat16), which need no "
            "loss scaling.",
        )
        if isinstance(model, FSDPModule):
            raise ValueError(
                "FSDP().setup(model=...): the model is sharded already (fully_shard was "
                "applied); pass the plain module and let the strategy shard it."
            )
        try:
            blueprint: nn.Module | None = _meta_blueprint(model)
        except Exception:  # e.g. a module holding something deepcopy cannot copy
            blueprint = None  # only snapshot() needs it, and says so
        # FSDP2 warns whenever a sharded model returns a view (every LM head does), about
        # in-place ops on it that loopkit never does; say it once, not at every evaluation.
        warnings.filterwarnings("once", message=_VIEW_WARNING, category=UserWarning)
        units = self._shard(model)
        built = common.build_optimizer(model, factory)
        self._prepared[model] = _Prepared(blueprint, factory, units)
        return model, built

    # ------------------------------------------------------------------------ the step

    # The usual behaviour, shared with the other strategies as free functions.
    forward_backward = common.local_forward_backward
    eval_forward = staticmethod(common.local_eval_forward)
    reduce_count = common.reduce_count_over_ranks
    reduce_metrics = common.reduce_metrics_over_ranks

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full weights gathered on rank 0 ({} elsewhere): a collective."""
        return _sharded.full_model_state(model)

    def to_device(self, batch: Batch) -> Batch:
        return move(batch, self.device, self._non_blocking)

    def _set_sync(self, model: nn.Module, enabled: bool) -> None:
        prepared = self._prepared.get(model)
        if prepared is None:
            raise ValueError(
                f"{self!r}: this model was not prepared by this FSDP strategy; build the "
                "TrainState with TrainState.create(model, ..., strategy=this_strategy)."
            )
        if prepared.sync is not enabled:  # flips twice per window, never when k == 1
            for unit in prepared.units:
                unit.set_requires_gradient_sync(enabled, recurse=False)
            prepared.sync = enabled

    def gradient_sync(
        self, model: nn.Module, enabled: bool
    ) -> contextlib.AbstractContextManager[object]:
        # FSDP reads the flag when a unit's gradients are ready in backward.
        self._set_sync(model, enabled)
        return _NO_CONTEXT

    def backward(self, model: nn.Module, loss: torch.Tensor, *, sync: bool = True) -> None:
        self._set_sync(model, sync)
        common.backward_with_peers(self, loss, "the gradient reduce-scatter in backward")

    def clip_grad_norm_(
        self, params: Sequence[torch.nn.Parameter], max_norm: float, norm_type: float
    ) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        # The gradients are DTensor shards: torch's clip_grad_norm_ reduces each shard's
        # norm across ranks (one small all-reduce per norm), so the norm is global.
        try:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True)
        except Exception as error:
            common.raise_if_comm_error(error, self, "the global gradient norm")
            raise
        # Replicated on every rank: its local value is the full norm.
        return norm.to_local() if isinstance(norm, DTensor) else norm

    # ------------------------------------------------------------------------ snapshot

    def snapshot(self, fields: dict[str, Any]) -> dict[str, Any]:
        """An independent, sharded copy: a new model sharded like this one, a new optimizer.

        FSDP modules cannot be deep-copied, so the copy is rebuilt from the model's
        structure (kept on the meta device at setup), sharded the same way, and filled
        shard by shard from the live one: parameters, gradients, buffers and optimizer
        state are copied locally, with no communication. Every rank must snapshot at the
        same point. The optimizer is rebuilt with the factory given at setup.
        """
        model, optimizer = fields["model"], fields["optimizer"]
        prepared = self._prepared.get(model)
        if prepared is None:
            raise ValueError(f"{self!r}.snapshot: the model was not prepared by this strategy.")
        if prepared.blueprint is None:
            raise RuntimeError(
                f"{self!r}.snapshot: {type(model).__name__} could not be copied at setup "
                "(copy.deepcopy failed), so no sharded copy can be built. Save a checkpoint "
                "and load it into a second state instead."
            )
        new_model = copy.deepcopy(prepared.blueprint)
        units = self._shard(new_model)
        new_model.to_empty(device=self.device)
        old_params, new_params = list(model.parameters()), list(new_model.parameters())
        with torch.no_grad():
            for old, new in zip(old_params, new_params, strict=True):
                new.copy_(old)  # same sharding on both sides: a local copy of each shard
                new.grad = None if old.grad is None else old.grad.detach().clone()
            for old_b, new_b in zip(model.buffers(), new_model.buffers(), strict=True):
                new_b.copy_(old_b)
        new_optimizer = common.build_optimizer(new_model, prepared.factory)
        by_old = {id(o): n for o, n in zip(old_params, new_params, strict=True)}
        for old_group, new_group in zip(
            optimizer.param_groups, new_optimizer.param_groups, strict=True
        ):
            if [by_old[id(p)] for p in old_group["params"]] != new_group["params"]:
                raise RuntimeError(
                    f"{self!r}.snapshot: the optimizer factory grouped the copied parameters "
                    "differently from the originals; it must depend only on the parameters "
                    "it is given."
                )
            for key, value in old_group.items():
                if key != "params":
                    new_group[key] = copy.deepcopy(value)
        for old_param, values in optimizer.state.items():
            new_optimizer.state[by_old[id(old_param)]] = {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in values.items()
            }
        self._prepared[new_model] = _Prepared(
            prepared.blueprint, prepared.factory, units, sync=prepared.sync
        )
        # The rest (schedule, loss scale, metrics, window) is deep-copied with a memo that
        # maps the old model, optimizer and parameters to the new ones, so an LRScheduler
        # follows the new optimizer.
        memo: dict[int, Any] = {id(model): new_model, id(optimizer): new_optimizer}
        memo.update({id(o): n for o, n in zip(old_params, new_params, strict=True)})
        keep = ("strategy", "precision", "params", "model", "optimizer")
        rest = copy.deepcopy({k: v for k, v in fields.items() if k not in keep}, memo)
        return {
            **rest,
            **{k: fields[k] for k in ("strategy", "precision", "params")},
            "model": new_model,
            "optimizer": new_optimizer,
        }

    def __repr__(self) -> str:
        return f"FSDP(device={str(self.device)!r}, rank={self.rank}, world_size={self.world_size})"


class _Prepared:
    """What FSDP remembers about a model it sharded."""

    __slots__ = ("blueprint", "factory", "units", "sync", "__weakref__")

    def __init__(
        self,
        blueprint: nn.Module | None,
        factory: OptimizerFactory,
        units: list[Any],
        sync: bool = True,
    ) -> None:
        self.blueprint, self.factory, self.units, self.sync = blueprint, factory, units, sync


__all__ = ["FSDP", "ShardSpec", "default_blocks"]
