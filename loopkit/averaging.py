"""Averages of the weights kept in the record: `ema` (exponential) and `swa` (equal-weight).

Put the transform after `optimizer_step` in the step chain:

    chain(forward(loss_fn), accumulate(1), optimizer_step(), ema(0.999))

The average lives in the record (`TrainState.averages["ema"]`, an `Average` whose tensors
align with `state.params`), so checkpoints save it, a resume continues it exactly and
`snapshot()` copies it. Under FSDP its tensors are DTensors sharded like the parameters:
each rank averages its own shard, with no communication.

When it updates: a record whose `step` is s holds the weights after s optimizer steps; the
average takes them when s >= max(start, 1) and (s - start) % every == 0, once per step (the
decision reads the host ints `step` and the average's `updated_at`: no host sync), however
many micro-batches a window has. The first update copies the weights (as
torch.optim.swa_utils.AveragedModel does); then

    ema:  avg <- decay * avg + (1 - decay) * w      (torch._foreach_lerp_(avg, w, 1 - decay))
    swa:  avg <- avg + (w - avg) / (count + 1)      (the mean of the count + 1 weights taken)

Only the trainable parameters (`state.params`) are averaged; buffers (batch-norm
statistics) stay the model's. An fp16 step skipped on overflow still counts as a step (the
unchanged weights are taken again).

Cost per update: one foreach kernel over the weights (a copy the first time); memory: one
more copy of the trained parameters per average (one shard of them under FSDP).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ._types import Batch, Transform
from .compose import inner_of, parts_of
from .state import Average, TrainState, apply_staged

logger = logging.getLogger(__name__)

AverageKind = Literal["ema", "swa"]
Weights = Literal["model", "ema", "swa"]
WEIGHTS: tuple[str, ...] = ("model", "ema", "swa")
"""What `evaluate(weights=...)` and `save_model(weights=...)` accept."""


def _local(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local part (a DTensor's shard, sharing its storage), detached."""
    out = []
    for tensor in tensors:
        to_local = getattr(tensor, "to_local", None)
        out.append((tensor if to_local is None else to_local()).detach())
    return out


def _check_int(call: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{call}({name}={value!r}): must be an int >= {minimum}.")


@dataclass(frozen=True, slots=True)
class _Averaging:
    kind: AverageKind
    decay: float | None
    start: int
    every: int

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return apply_staged(self, state, batch)

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None:
        step = state.step
        current = state.averages.get(self.kind)
        if current is not None and current.updated_at == step:
            return None  # this step's weights are in already (an open window, a re-call)
        due = step >= self.start and step > 0 and (step - self.start) % self.every == 0
        if current is None:
            if step > max(self.start, 1) and state.strategy.is_main:
                # A resume from a checkpoint written without the average, or a transform
                # first called late (inside when/every): say where the average starts.
                logger.warning(
                    "%r: the record holds no %r average at step %d, after start=%d (resumed "
                    "from a checkpoint written without it, or first called at this step); "
                    "it averages the weights from step %d on.",
                    self,
                    self.kind,
                    step,
                    self.start,
                    step,
                )
            with torch.no_grad():  # the weights at creation; DTensors stay sharded alike
                tensors = tuple(p.detach().clone() for p in state.params)
            current = Average(tensors)
            if due:
                current = Average(tensors, count=1, updated_at=step)
            return {"averages": {**state.averages, self.kind: current}}
        if not due:
            return None
        if len(current.tensors) != len(state.params):
            raise ValueError(
                f"{self!r}: the record's {self.kind!r} average holds {len(current.tensors)} "
                f"tensors, the optimizer trains {len(state.params)} parameters; an average "
                "belongs to the parameters it was made for."
            )
        averaged, weights = _local(current.tensors), _local(state.params)
        with torch.no_grad():
            if current.count == 0:
                torch._foreach_copy_(averaged, weights)
            elif self.decay is not None:  # ema
                torch._foreach_lerp_(averaged, weights, 1.0 - self.decay)
            else:  # swa: the running mean of count + 1 weights
                torch._foreach_lerp_(averaged, weights, 1.0 / (current.count + 1))
        updated = Average(current.tensors, count=current.count + 1, updated_at=step)
        return {"averages": {**state.averages, self.kind: updated}}

    def __repr__(self) -> str:
        options = f"start={self.start}, every={self.every}"
        if self.decay is None:
            return f"swa({options})"
        return f"ema({self.decay}, {options})"


def ema(decay: float, *, start: int = 0, every: int = 1) -> Transform:
    """Keep an exponential moving average of the trained weights in the record.

    `avg <- decay * avg + (1 - decay) * weights` after every `every`-th optimizer step from
    step `start` on (the first update copies the weights; step 1 is the first with
    start=0). Put it after `optimizer_step()` in the chain; fit takes it as
    `average=ema(...)`. The average is `state.averages["ema"]`; evaluate and save_model
    use it with `weights="ema"`.

    Args:
        decay: in (0, 1), e.g. 0.999: the weight of the old average at each update.
        start: the first optimizer step whose weights are taken (0 or 1: the first).
        every: take the weights every this many optimizer steps.

    Raises:
        TypeError: decay is not a number.
        ValueError: decay not in (0, 1), start < 0, or every < 1.

    Example:
        >>> import loopkit as lk
        >>> lk.ema(0.99, start=10)
        ema(0.99, start=10, every=1)
    """
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"ema(decay={decay!r}): expected a float in (0, 1), e.g. ema(0.999).")
    if not (math.isfinite(decay) and 0.0 < decay < 1.0):
        raise ValueError(
            f"ema(decay={decay!r}): must be a float in (0, 1), e.g. ema(0.999); the average "
            "keeps `decay` of itself and takes `1 - decay` of the weights at each update."
        )
    _check_int("ema", "start", start, 0)
    _check_int("ema", "every", every, 1)
    return _Averaging("ema", float(decay), start, every)


def swa(*, start: int, every: int = 1) -> Transform:
    """Keep the equal-weight average of the trained weights (stochastic weight averaging).

    From optimizer step `start` on, every `every`-th step's weights join the running mean
    (`state.averages["swa"]`). Put it after `optimizer_step()`; fit takes it as
    `average=swa(start=...)`; evaluate and save_model use it with `weights="swa"`.

    Args:
        start: the first optimizer step whose weights are averaged (0 or 1: the first).
        every: average the weights every this many optimizer steps.

    Raises:
        ValueError: start < 0 or every < 1.

    Example:
        >>> import loopkit as lk
        >>> lk.swa(start=100, every=10)
        swa(start=100, every=10)
    """
    _check_int("swa", "start", start, 0)
    _check_int("swa", "every", every, 1)
    return _Averaging("swa", None, start, every)


def average_kind_of(transform: object) -> AverageKind | None:
    """Say "ema" or "swa" for a transform built by `ema` / `swa`; None for anything else."""
    return transform.kind if isinstance(transform, _Averaging) else None


def _kinds_in(step: Transform) -> set[str]:
    """The average kinds a step chain keeps (looking through `every` / `when`)."""
    kinds: set[str] = set()
    for part in parts_of(step):
        inner = inner_of(part)
        if inner is not None:
            kinds |= _kinds_in(inner)
        elif isinstance(part, _Averaging):
            kinds.add(part.kind)
    return kinds


def check_fit_averaging(average: object, eval_weights: object, step: object) -> None:
    """Refuse fit settings whose averaging cannot work, before any work.

    Raises:
        ValueError: `average=` with a custom `step=` (the chain brings its own), or
            `eval_weights` naming an average the step will not keep.
    """
    if average is not None and step is not None:
        raise ValueError(
            f"FitConfig(average={average!r}, step=...): fit appends the average to its own "
            "step only; put it in your chain after optimizer_step(), e.g. chain(..., "
            f"optimizer_step(), {average!r}), and drop average=."
        )
    if eval_weights == "model" or eval_weights not in WEIGHTS:
        return
    if step is not None:
        kinds = _kinds_in(step)  # type: ignore[arg-type]
        where = f"the step chain keeps {sorted(kinds) or 'no average'}"
    else:
        kind = average_kind_of(average)
        kinds = {kind} if kind is not None else set()
        where = f"average={average!r}"
    if eval_weights not in kinds:
        factory = "ema(0.999)" if eval_weights == "ema" else "swa(start=...)"
        fix = (
            f"add loopkit.{factory} to the chain after optimizer_step()"
            if step is not None
            else f"pass average=loopkit.{factory}"
        )
        raise ValueError(
            f"FitConfig(eval_weights={eval_weights!r}): {where}, so there is no "
            f"{eval_weights!r} average to evaluate; {fix}, or use eval_weights='model'."
        )


def check_weights(state: TrainState, weights: object, *, where: str) -> Average | None:
    """The average `weights` names in `state` (None for "model"), checked before any work.

    Raises:
        ValueError: weights is not "model", "ema" or "swa", or the record holds no such
            average.
    """
    if weights not in WEIGHTS:
        raise ValueError(
            f"{where}(weights={weights!r}): must be 'model', 'ema' or 'swa' (the averaged "
            "weights that loopkit.ema / loopkit.swa keep in the record)."
        )
    if weights == "model":
        return None
    average = state.averages.get(str(weights))
    if average is None:
        held = sorted(state.averages) or "none"
        factory = "ema(0.999)" if weights == "ema" else "swa(start=...)"
        raise ValueError(
            f"{where}(weights={weights!r}): the record holds no {weights!r} average (it holds: "
            f"{held}). Put loopkit.{factory} after optimizer_step() in the step chain (fit: "
            f"average=loopkit.{factory}) and train with it first."
        )
    return average


def reshard_gathered(model: torch.nn.Module) -> None:
    """Free FSDP's gathered parameters, so the next forward gathers the shards anew.

    FSDP's root keeps its gathered parameters after a forward (it reshards them in
    backward), so after an eval forward they would still hold the weights of that forward,
    and the module would list them instead of the sharded parameters the optimizer (and
    `TrainState.params`) hold. Local: no communication. A no-op without FSDP.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def averaged_weights(
    state: TrainState, weights: Weights, *, where: str = "averaged_weights"
) -> Iterator[None]:
    """Run the block with the averaged weights in the model; restore its weights bitwise.

    The average's values are copied into the parameters (the same tensors, so every
    wrapper, FSDP's shards and compiled code see them) and the weights are copied back
    afterwards, however the block ends. Memory: one copy of the trained parameters (this
    rank's shard under FSDP) while the block runs. With `weights="model"`, or before the
    average's first update, the block runs with the model's own weights.

    Raises:
        StaleStateError: `state` was consumed (its average and weights have moved on).
        ValueError: as `check_weights`.
    """
    state.check_fresh()
    average = check_weights(state, weights, where=where)
    if average is None or average.count == 0:
        if average is not None and state.strategy.is_main:
            logger.info("%s(weights=%r): no update yet; using the model's weights.", where, weights)
        yield
        return
    params = _local(state.params)
    reshard_gathered(state.model)
    with torch.no_grad():
        saved = [p.clone() for p in params]  # restored bit for bit
        torch._foreach_copy_(params, _local(average.tensors))
    try:
        yield
    finally:
        reshard_gathered(state.model)
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


__all__ = [
    "WEIGHTS",
    "AverageKind",
    "Weights",
    "average_kind_of",
    "averaged_weights",
    "check_fit_averaging",
    "check_weights",
    "ema",
    "reshard_gathered",
    "swa",
]
