"""Pieces strategies share: the usual forward/backward and evaluation of one micro-batch,
gradient sync, clipping, building the optimizer, reducing counts and metrics over ranks,
unwrapping and deep copies.

These are the behaviour a Strategy member usually has; a strategy of your own can call
them from its members instead of writing them again.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._types import Batch, Count, LossFn, OptimizerFactory, Predict, Strategy
from ..loss import as_loss
from ..normalise import check_first_count, item_sum, reference_count, scaled_loss
from .env import comm_error, is_comm_error

if TYPE_CHECKING:
    from ..precision import Precision


_NO_CONTEXT = contextlib.nullcontext()  # reusable: nullcontext keeps no state


def no_gradient_sync(
    model: torch.nn.Module, enabled: bool
) -> contextlib.AbstractContextManager[object]:
    """`Strategy.gradient_sync` where nothing syncs in backward: a context that does nothing."""
    return _NO_CONTEXT


def local_forward_backward(
    strategy: Strategy,
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
    """`Strategy.forward_backward` for strategies that run the whole model on each rank.

    The forward runs inside `strategy.gradient_sync(model, sync)` (DDP decides in its
    forward whether the backward all-reduces) and the precision's autocast; the loss is
    normalised by loopkit.normalise and backpropagated with `strategy.backward`.
    """
    syncing = strategy.gradient_sync(model, sync)
    # A `with` over a null context runs two Python methods; skipping it does the same.
    if type(syncing) is contextlib.nullcontext:
        return _forward_backward(
            strategy, model, batch, loss_fn, precision, n_samples, ref_count, sync, loss_scale,
            check_count,
        )  # fmt: skip
    with syncing:
        return _forward_backward(
            strategy, model, batch, loss_fn, precision, n_samples, ref_count, sync, loss_scale,
            check_count,
        )  # fmt: skip


def _forward_backward(
    strategy: Strategy,
    model: torch.nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    precision: Precision,
    n_samples: int,
    ref_count: Count | None,
    sync: bool,
    loss_scale: torch.Tensor | None,
    check_count: bool,
) -> tuple[torch.Tensor, Count, Count]:
    """local_forward_backward's work, inside the strategy's gradient-sync context."""
    autocast = precision.autocast(strategy.device)
    if type(autocast) is contextlib.nullcontext:  # fp32: no autocast context to enter
        loss = loss_fn(model, batch)
    else:
        with autocast:
            loss = loss_fn(model, batch)
    count: Count
    if type(loss) is torch.Tensor and loss.ndim == 0:
        value, count, is_mean = loss, n_samples, True  # as_loss's answer, without the call
    else:
        value, count, is_mean = as_loss(loss, n_samples, _where(loss_fn))
    if check_count and isinstance(count, torch.Tensor):
        check_first_count(count, _where(loss_fn))
    ref = reference_count(count, ref_count, strategy)
    scaled = scaled_loss(value, count, is_mean, ref)
    strategy.backward(model, scaled if loss_scale is None else scaled * loss_scale, sync=sync)
    return scaled.detach(), count, ref


def local_eval_forward(
    model: torch.nn.Module,
    batch: Batch,
    loss_fn: LossFn | None,
    predict: Predict | None,
    *,
    n_samples: int,
    want_outputs: bool,
    sum_dtype: torch.dtype,
) -> tuple[tuple[torch.Tensor, Count] | None, Any]:
    """`Strategy.eval_forward` for strategies that run the whole model on each rank.

    Outputs for the metrics: `predict(model, batch)` when given; else, with a loss_fn, the
    output of the model's last call inside loss_fn (a forward hook, so each batch runs one
    forward); else `model(batch[0])` for tuple/list batches.
    """
    captured: list[Any] = []
    hook = None
    if want_outputs and predict is None and loss_fn is not None:
        hook = model.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        summed = None
        if loss_fn is not None:
            value, count, is_mean = as_loss(loss_fn(model, batch), n_samples, "evaluate")
            summed = (item_sum(value.detach().to(sum_dtype), count, is_mean), count)
    finally:
        if hook is not None:
            hook.remove()
    if not want_outputs:
        return summed, None
    return summed, _eval_outputs(model, batch, loss_fn, predict, captured)


def _eval_outputs(
    model: torch.nn.Module,
    batch: Batch,
    loss_fn: LossFn | None,
    predict: Predict | None,
    captured: list[Any],
) -> Any:
    if predict is not None:
        return predict(model, batch)
    if loss_fn is not None:
        if not captured:
            raise RuntimeError(
                "evaluate: the metrics read the model's outputs, but loss_fn did not call the "
                f"model ({type(model).__name__}) itself, so there is nothing to read. Pass "
                "predict=lambda model, batch: ... returning the outputs the metrics need."
            )
        return captured[-1]
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise ValueError(
        "evaluate: without loss_fn or predict, metrics read model(batch[0]) of tuple/list "
        f"batches, but this batch is a {type(batch).__name__}. Pass "
        "predict=lambda model, batch: model(...)."
    )


def local_clip_grad_norm_(
    params: Sequence[torch.nn.Parameter], max_norm: float, norm_type: float
) -> torch.Tensor:
    """`Strategy.clip_grad_norm_` where every rank holds the whole, synced gradients (one
    process, or DDP after the window's all-reduce): the local norm is the global one.

    Stays on device: clip_grad_norm_ multiplies by a clamped coefficient, no `.item()`.
    """
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True)


def whole_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`Strategy.full_model_state` where every rank holds the whole model: its state_dict."""
    return dict(unwrap(model).state_dict())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / torch.compile wrappers."""
    while True:
        inner = model._modules.get("_orig_mod") or model._modules.get("module")
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def deep_copy_training_objects(values: dict[str, Any]) -> dict[str, Any]:
    """Deep-copy model, optimizer, schedule and tensors of a record's fields together.

    One `deepcopy` call over all of them shares the memo, so the copied optimizer refers to
    the copied model's parameters. Gradients are copied explicitly (Parameter's deepcopy
    drops them).
    """
    params = [p for p in values["model"].parameters()]
    grads = [p.grad for p in params]
    keep = {k: values[k] for k in ("strategy", "precision", "params")}
    copied = copy.deepcopy({k: v for k, v in values.items() if k not in keep})
    for new_p, g in zip(copied["model"].parameters(), grads):
        new_p.grad = None if g is None else g.detach().clone()
    return {**copied, **keep}


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _where(loss_fn: object) -> str:
    """How errors name the transform: built only for a check or an error (an f-string per
    micro-batch cost ~1.3k instructions)."""
    return f"forward({_name(loss_fn)})"


def gradient_accumulators(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """The autograd nodes that add gradients into the optimizer's parameters (to keep).

    Autograd makes a parameter's AccumulateGrad node when a backward first needs it and frees
    it with the graph. A hand-written loop keeps the last step's graph (in its `loss`) until
    the next forward, so these nodes live on; a loopkit step keeps no graph, so every step
    made them again, and between steps each parameter was held by its Python object alone:
    every op of the optimizer step on it then crossed torch's Python-object hand-over (a
    GIL acquire per crossing), ~22k instructions per step on the benchmark MLP (1.5 %).
    A strategy that keeps them for the run (DDP's reducer does the same) avoids both; the
    gradients are the same.
    """
    return tuple(
        torch.autograd.graph.get_gradient_edge(p).node
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad
    )


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


def raise_if_comm_error(error: BaseException, strategy: Strategy, what: str) -> None:
    """Raise a DistributedError saying why, `from error`, if `error` came from a lost peer.

    Used as `except Exception as e: raise_if_comm_error(e, self, "backward"); raise`: a
    try block costs nothing on the hot path until something fails.
    """
    if is_comm_error(error):
        raise comm_error(
            error, strategy.rank, strategy.world_size, what, strategy.timeout_s or 0.0
        ) from error


def backward_with_peers(strategy: Strategy, loss: torch.Tensor, what: str) -> None:
    """`loss.backward()` where backward communicates (DDP's all-reduce, FSDP's
    reduce-scatter): a lost peer raises DistributedError saying `what` was running."""
    try:
        loss.backward()
    except Exception as error:
        raise_if_comm_error(error, strategy, what)
        raise


def require_factory_and_no_loss_scaling(
    optimizer: torch.optim.Optimizer | OptimizerFactory,
    precision: Precision,
    *,
    needs_factory: str,
    loss_scaling: str,
) -> OptimizerFactory:
    """The optimizer factory, checked at set-up by a strategy that builds the optimizer over
    its own parameters and whose ranks check their own gradients (FSDP's shards,
    Pipeline's stages).

    Raises:
        TypeError: `optimizer` is built already (message `needs_factory`).
        ValueError: `precision` scales the loss (fp16): ranks could disagree about skipping
            a step (message `loss_scaling`).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(needs_factory)
    if precision.scales_loss:
        raise ValueError(loss_scaling)
    return optimizer


def reduce_count_over_ranks(strategy: Strategy, count: int | float | torch.Tensor) -> torch.Tensor:
    """`all_reduce_count` for a strategy's `reduce_count`: a lost peer raises DistributedError."""
    try:
        return all_reduce_count(count, strategy.device)
    except Exception as error:
        raise_if_comm_error(error, strategy, "summing the item count over ranks")
        raise


def reduce_metrics_over_ranks(strategy: Strategy, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`all_reduce_metrics` for a strategy's `reduce_metrics` (a no-op on one process)."""
    if strategy.world_size == 1:
        return dict(metrics)
    try:
        return all_reduce_metrics(metrics, strategy.world_size, strategy.device)
    except Exception as error:
        raise_if_comm_error(error, strategy, "reducing the train metrics over ranks")
        raise


__all__ = [
    "SUMMED_METRICS",
    "all_reduce_count",
    "all_reduce_metrics",
    "backward_with_peers",
    "build_optimizer",
    "deep_copy_training_objects",
    "gradient_accumulators",
    "local_clip_grad_norm_",
    "local_eval_forward",
    "local_forward_backward",
    "no_gradient_sync",
    "raise_if_comm_error",
    "reduce_count_over_ranks",
    "reduce_metrics_over_ranks",
    "require_factory_and_no_loss_scaling",
    "unwrap",
    "whole_model_state",
]
