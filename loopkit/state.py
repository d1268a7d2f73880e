"""TrainState: the immutable record that every step transform reads and returns.

Glossary:
    step: one optimizer step (`TrainState.step` counts those taken).
    micro-step: one micro-batch (`TrainState.micro_step` counts those in the open window).
    window: the micro-batches whose gradients make one optimizer step.
    item: the unit a loss counts (a token or a sample); the window's loss is the mean over
        every item in it, however the items were split into micro-batches.
    consume: pass a record to a transform; afterwards that record is stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch

from ._types import Batch, OptimizerFactory, Schedule, Strategy
from .precision import Precision, PrecisionName, as_precision
from .schedules import as_schedule
from .strategies import SingleDevice, check_strategy

Number = int | float | torch.Tensor


class StaleStateError(RuntimeError):
    """A consumed TrainState was used again (its tensors have since been updated in place)."""


@dataclass(frozen=True, eq=False, init=False)
class Window:
    """Bookkeeping of the open gradient window (the micro-batches of one optimizer step).

    Gradients accumulate as sum-of-losses / `ref_count` (the first micro-batch's item count),
    so a one-micro-batch window needs no rescaling; closing multiplies them by
    `ref_count / count` to get the gradient of the mean loss over all `count` items.

    Attributes:
        loss: sum of the micro-batch loss sums divided by `ref_count` (detached).
        count: items in the window so far (int or device tensor).
        ref_count: the first micro-batch's item count (summed over ranks); None while the
            window is empty.
        size: micro-batches per window as set by `accumulate(k)`; None until it is known.
        closed: True once `accumulate` has normalised the gradients.
        found_inf: fp16 only: device flag set when the closed window's gradients overflowed.
    """

    loss: Number = 0.0
    count: Number = 0
    ref_count: Number | None = None
    size: int | None = None
    closed: bool = False
    found_inf: torch.Tensor | None = None

    # Written out instead of generated, and on an instance __dict__ rather than slots: the
    # step builds a window per micro-batch and one when it closes. Setting a frozen
    # instance's fields one `object.__setattr__` at a time cost ~1.3k instructions each;
    # one dict update sets all six (frozen all the same: assignment still raises).
    def __init__(
        self,
        loss: Number = 0.0,
        count: Number = 0,
        ref_count: Number | None = None,
        size: int | None = None,
        closed: bool = False,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        self.__dict__.update(
            {
                "loss": loss,
                "count": count,
                "ref_count": ref_count,
                "size": size,
                "closed": closed,
                "found_inf": found_inf,
            }
        )


def new_window(
    loss: Number,
    count: Number,
    ref_count: Number | None,
    size: int | None,
    closed: bool = False,
    found_inf: torch.Tensor | None = None,
) -> Window:
    """`Window(loss, count, ref_count, size, closed, found_inf)` without a type call.

    For the step's transforms, which make one or two windows per micro-batch: calling the
    class packs the arguments for `__init__` (~10k instructions per window before, with
    slots); this makes the same window for a fraction of that.
    """
    window = object.__new__(Window)
    window.__dict__.update(
        {
            "loss": loss,
            "count": count,
            "ref_count": ref_count,
            "size": size,
            "closed": closed,
            "found_inf": found_inf,
        }
    )
    return window


@dataclass(frozen=True, slots=True, eq=False)
class Average:
    """An average of the trained weights that the record keeps (`loopkit.ema`, `loopkit.swa`).

    Attributes:
        tensors: one per `TrainState.params`, in that order, with the same shape, dtype,
            device and sharding (DTensors sharded like the parameters under FSDP); updated
            in place, like the weights.
        count: weights folded in so far; 0 before the first update (the average has not
            started: the tensors then hold the weights at its creation, and evaluate /
            save_model use the model's weights).
        updated_at: the `step` of the last update (-1: none yet).
    """

    tensors: tuple[torch.Tensor, ...]
    count: int = 0
    updated_at: int = -1


@runtime_checkable
class StagedTransform(Protocol):
    """A transform that separates its work from making its record (loopkit's built-in ones).

    `_changes(state, batch)` does the transform's work and returns the fields of the record
    to return, or None to return `state` itself; it only reads `state` and never keeps it.
    Calling the transform checks that `state` is fresh and applies the changes to a new
    record (`state._advance(self, changes)`); `chain` applies the changes of consecutive
    staged parts to one record instead (see `compose`), so the records a window makes are
    one per chain call, not one per part.
    """

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None: ...


class _Consumption:
    """Per record: whether it was consumed, by which transform (None: replace()), at which step.

    Kept per record, not per lineage, so a stale record names the call that consumed *it*,
    not the latest call on its successors.
    """

    # Class-level defaults and no __init__: every step makes one of these, and a C-level
    # `_Consumption()` costs ~10x less than a Python __init__ setting three attributes. The
    # instance gets its own values (a __dict__) only when it is consumed.
    consumed: bool = False
    consumer: object = None
    at_step: int = 0


# Not slotted: a record's fields live in its __dict__, so `_advance` copies them in one
# C-level dict copy (~0.5 us) instead of ~20 setattr calls; assignment still raises.
@dataclass(frozen=True, kw_only=True, eq=False)
class TrainState:
    """Everything one training step reads and writes.

    Transforms consume the record they receive (tensors are updated in place, like a
    donated buffer) and return a new one; using a consumed record again raises
    StaleStateError. `snapshot()` gives an independent deep copy for branching and tests.
    Build one with `TrainState.create(...)`; change one with `state.replace(...)`.

    Attributes:
        model: the (strategy-wrapped) model.
        optimizer: the optimizer over the model's trainable parameters.
        strategy: how forward/backward, gradient sync, norms and checkpoints run.
        schedule: lr factor as a function of `step`, or a torch LRScheduler stepped per step.
        precision: autocast and loss-scaling policy.
        seed: root of all randomness; micro-step randomness derives from
            (seed, step, micro_step, rank).
        base_lrs: each param group's lr at factor 1.0.
        params: the parameters the optimizer trains (gradients are normalised and clipped
            over these).
        step: optimizer steps taken.
        micro_step: micro-batches in the open window.
        epoch: passes over the training data completed (set by the loop).
        samples_seen: samples consumed (leading batch dimension, summed).
        tokens_seen: items the loss counted (tokens for token losses), summed; may be a
            device tensor until read.
        skipped_steps: fp16 windows whose update was skipped on overflow.
        loss_scale: fp16 loss scale (device tensor), None otherwise.
        growth_tracker: fp16 clean windows since the last scale change (device tensor).
        window: the open gradient window.
        metrics: the last closed window's metrics ("train/loss", "train/lr",
            "train/grad_norm", ...), device tensors or host floats; never synced in a step.
        averages: averages of the weights by kind ("ema", "swa"), each an `Average` whose
            tensors align with `params`; kept by `loopkit.ema` / `loopkit.swa` (empty
            without them), saved in checkpoints, deep-copied by `snapshot()`, and stale
            with the record that held them, like the weights.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    strategy: Strategy
    schedule: Schedule | torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    seed: int
    base_lrs: tuple[float, ...]
    params: tuple[torch.nn.Parameter, ...]
    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: Number = 0
    skipped_steps: int = 0
    loss_scale: torch.Tensor | None = None
    growth_tracker: torch.Tensor | None = None
    window: Window = field(default_factory=Window)
    metrics: Mapping[str, Number] = field(default_factory=dict)
    averages: Mapping[str, Average] = field(default_factory=dict)
    _consumption: _Consumption = field(default_factory=_Consumption, repr=False)

    @classmethod
    def create(
        cls,
        model: torch.nn.Module,
        *,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        schedule: Schedule | torch.optim.lr_scheduler.LRScheduler | None = None,
        precision: Precision | PrecisionName = "fp32",
        strategy: Strategy | None = None,
        seed: int = 0,
    ) -> TrainState:
        """Prepare `model` with `strategy` and build the initial record.

        Args:
            model: the module to train.
            optimizer: a factory `params -> Optimizer` (required by sharding strategies) or
                a built optimizer over `model`'s parameters.
            schedule: lr factor per step (see loopkit.schedules), a torch LRScheduler, or
                None for a constant lr.
            precision: "fp32", "bf16", "fp16" or a Precision.
            strategy: a Strategy; None means SingleDevice() (cuda > mps > cpu).
            seed: root of all randomness in the run.

        Raises:
            TypeError: model is not an nn.Module, optimizer is neither an optimizer nor a
                callable, seed is not an int, or the strategy lacks members of the
                Strategy protocol (each one is named).
            ValueError: the optimizer has no parameters, or holds parameters `model` lacks.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"TrainState.create(model={type(model).__name__}): expected a torch.nn.Module."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"TrainState.create(seed={seed!r}): expected an int, e.g. seed=0.")
        precision = as_precision(precision)
        strategy = SingleDevice() if strategy is None else check_strategy(strategy)
        _check_optimizer(model, optimizer)
        model, opt = strategy.setup(model, optimizer, precision)
        if not any(group["params"] for group in opt.param_groups):
            raise ValueError(
                "TrainState.create(optimizer=...): the optimizer has no parameters. Are all "
                "parameters frozen (requires_grad=False)? Unfreeze some or check the factory."
            )
        schedule = as_schedule(schedule, opt)
        scale = tracker = None
        if precision.scales_loss:
            device = strategy.device
            scale = torch.full((), precision.init_scale, dtype=torch.float32, device=device)
            tracker = torch.zeros((), dtype=torch.int32, device=device)
        return cls(
            model=model,
            optimizer=opt,
            strategy=strategy,
            schedule=schedule,
            precision=precision,
            seed=seed,
            base_lrs=tuple(float(g.get("initial_lr", g["lr"])) for g in opt.param_groups),
            params=_optimizer_params(opt),
            loss_scale=scale,
            growth_tracker=tracker,
        )

    def replace(self, **changes: Any) -> TrainState:
        """Return a new record with `changes` applied; this record becomes stale.

        Raises:
            StaleStateError: this record was already consumed.
            TypeError: a name in `changes` is not a TrainState field.
        """
        self.check_fresh()
        if not _PUBLIC_FIELDS.issuperset(changes):
            name = next(n for n in changes if n not in _PUBLIC_FIELDS)
            raise TypeError(
                f"TrainState.replace({name}=...): not a field. Fields: "
                f"{', '.join(sorted(_PUBLIC_FIELDS))}."
            )
        return self._advance(None, changes)

    def snapshot(self) -> TrainState:
        """Return an independent deep copy: model, gradients, optimizer, schedule, tensors.

        The copy starts a new lineage, so stepping it never makes this record stale (and
        vice versa). Use it to branch a run, or to keep a "before" for comparisons.
        """
        self.check_fresh()
        copied = {f.name: getattr(self, f.name) for f in fields(self) if f.name[0] != "_"}
        copied = self.strategy.snapshot(copied)
        return TrainState(**{**copied, "params": _optimizer_params(copied["optimizer"])})

    def check_fresh(self) -> None:
        """Raise StaleStateError if a transform (or `replace`) already consumed this record."""
        consumption = self._consumption
        if consumption.consumed:
            by = consumption.consumer
            by_text = f"by {by!r} " if by is not None else "by replace() "
            raise StaleStateError(
                f"This TrainState (step={self.step}, micro_step={self.micro_step}) was "
                f"consumed {by_text}at step {consumption.at_step}: its tensors have been "
                "updated in place since. Use the record that call returned, or call "
                "state.snapshot() before the call to keep an independent copy."
            )

    def _advance(self, by: object, changes: Mapping[str, Any]) -> TrainState:
        """Consume this record on behalf of transform `by` and return the successor.

        `changes` must name fields only: `replace()` checks the names a user passes; the
        transforms pass names they spell in their source, so the step does not check them.
        """
        consumption = self._consumption
        if consumption.consumed:
            self.check_fresh()
        new = object.__new__(TrainState)
        values = new.__dict__
        values.update(self.__dict__)
        values.update(changes)
        values["_consumption"] = _Consumption()
        consumption.consumed = True
        consumption.consumer = by
        consumption.at_step = self.step
        return new

    def _update_(self, changes: Mapping[str, Any]) -> None:
        """Apply `changes` to this record in place.

        Only for a record that no one but the call that made it has seen: `chain` gives a
        run of staged parts (`StagedTransform`) one record this way, where calling the parts
        one by one would make a record per part. `changes` must name fields only.
        """
        self.__dict__.update(changes)

    def __repr__(self) -> str:
        return (
            f"TrainState(step={self.step}, micro_step={self.micro_step}, epoch={self.epoch}, "
            f"samples_seen={self.samples_seen}, precision={self.precision.name!r}, "
            f"strategy={self.strategy!r}, model={type(self.model).__name__})"
        )


_FIELD_NAMES = tuple(f.name for f in fields(TrainState))
_PUBLIC_FIELDS = frozenset(n for n in _FIELD_NAMES if not n.startswith("_"))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Parameter, ...]:
    return tuple(p for group in optimizer.param_groups for p in group["params"])


def _check_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | OptimizerFactory
) -> None:
    """Check that `optimizer` is a factory, or a built optimizer over `model`'s parameters."""
    if isinstance(optimizer, torch.optim.Optimizer):
        model_params = {id(p) for p in model.parameters()}
        foreign = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params
        ]
        if foreign:
            raise ValueError(
                f"TrainState.create(optimizer={type(optimizer).__name__}): {len(foreign)} of "
                "its parameters are not parameters of the model. Build the optimizer from "
                "model.parameters(), or pass a factory such as "
                "`lambda params: torch.optim.AdamW(params, lr=3e-4)`."
            )
        trainable = any(p.requires_grad for g in optimizer.param_groups for p in g["params"])
        name = type(optimizer).__name__
    elif not callable(optimizer):
        raise TypeError(
            f"TrainState.create(optimizer={optimizer!r}): expected a torch.optim.Optimizer or "
            "a factory such as `lambda params: torch.optim.AdamW(params, lr=3e-4)`."
        )
    else:
        trainable = any(p.requires_grad for p in model.parameters())
        name = getattr(optimizer, "__qualname__", None) or repr(optimizer)
    # Checked before the factory runs: torch's own "empty parameter list" error names no
    # argument, and a built optimizer over frozen parameters would only fail in backward.
    if not trainable:
        raise ValueError(
            f"TrainState.create(optimizer={name}): the optimizer has no trainable parameters. "
            "Are all parameters frozen (requires_grad=False)? Unfreeze some or check the "
            "factory."
        )


def apply_staged(transform: StagedTransform, state: TrainState, batch: Batch) -> TrainState:
    """Call a staged transform on its own: check `state`, then apply its changes (if any)
    to a new record consumed on the transform's behalf."""
    state.check_fresh()
    changes = transform._changes(state, batch)
    return state if changes is None else state._advance(transform, changes)


__all__ = [
    "Average",
    "Number",
    "StaleStateError",
    "StagedTransform",
    "TrainState",
    "Window",
    "apply_staged",
]
