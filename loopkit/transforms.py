"""The four core step transforms: forward, accumulate, clip, optimizer_step.

One optimizer step is `chain(forward(loss_fn), accumulate(k), clip(max_norm),
optimizer_step())` applied to each of k micro-batches in turn:

- `forward` runs forward + backward of one micro-batch and adds it to the open window;
- `accumulate(k)` closes the window after k micro-batches, normalising its gradients;
- `clip` and `optimizer_step` act on closed windows only and pass open ones through.

How the loss is normalised (loopkit.normalise, the one place that does this arithmetic):
micro-batch i contributes `sum_i / c_1` to the gradients, where c_1 is the first
micro-batch's item count. Closing multiplies them by `c_1 / (c_1 + ... + c_k)`, so the
window's gradient is that of `sum(sum_i) / sum(c_i)`: the mean loss over every item,
however the items were split. A one-micro-batch window needs no rescaling at all, so
`accumulate(1)` costs nothing over a hand-written loop.

Each transform is a `StagedTransform`: its `_changes(state, batch)` does the work and says
which fields change, and its `__call__` puts them in a new record. In a chain the parts'
changes go into one record per call (see `compose.chain`), so a window costs one record,
not one per part.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from ._batch import batch_size
from ._rng import micro_step_seed, seed_devices_
from ._types import Batch, LossFn, Transform
from .compose import parts_of
from .normalise import closing_factor
from .state import TrainState, Window, apply_staged, new_window

LRScheduler = torch.optim.lr_scheduler.LRScheduler


@functools.cache
def _empty_window(size: int | None) -> Window:
    return Window(size=size)  # frozen, so one per size can be shared


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


@dataclass(frozen=True, slots=True)
class _Forward:
    loss_fn: LossFn
    seed_rng: bool = True

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise TypeError(
                f"forward(loss_fn={self.loss_fn!r}): expected a callable "
                "`loss_fn(model, batch)` returning a scalar mean or loopkit.Loss(sum, count)."
            )
        if type(self.seed_rng) is not bool:
            raise TypeError(
                f"forward(seed_rng={self.seed_rng!r}): expected True (seed torch's generators "
                "before each micro-batch, the default) or False."
            )

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return apply_staged(self, state, batch)

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None:
        window = state.window
        if window.closed:
            raise RuntimeError(
                f"{self!r}: the gradient window closed at step {state.step} has not been "
                "applied. Put optimizer_step() after accumulate(k) in the chain."
            )
        strategy = state.strategy
        batch = strategy.to_device(batch)
        n_samples = batch_size(batch, self)
        if self.seed_rng:
            seed_devices_(
                micro_step_seed(state.seed, state.step, state.micro_step, strategy.rank),
                strategy.device,
            )
        # Sync gradients across ranks only on the window's last micro-batch (and whenever
        # the window's size is not known yet: syncing more often is redundant, not wrong).
        # Decided before the forward: DDP's forward already arms (or skips) the all-reduce.
        size = window.size
        first = window.ref_count is None
        scaled, count, ref = strategy.forward_backward(
            state.model,
            batch,
            self.loss_fn,
            precision=state.precision,
            n_samples=n_samples,
            ref_count=window.ref_count,
            sync=size is None or state.micro_step + 1 >= size,
            loss_scale=state.loss_scale,
            check_count=state.step == 0 and state.micro_step == 0,
        )
        return {
            "micro_step": state.micro_step + 1,
            "samples_seen": state.samples_seen + n_samples,
            "tokens_seen": state.tokens_seen + count,
            "window": new_window(
                scaled if first else window.loss + scaled,
                count if first else window.count + count,
                ref,
                size,
            ),
        }

    def __repr__(self) -> str:
        if self.seed_rng:
            return f"forward({_name(self.loss_fn)})"
        return f"forward({_name(self.loss_fn)}, seed_rng=False)"


@dataclass(frozen=True, slots=True)
class _Accumulate:
    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(
                f"accumulate(k={self.k!r}): k is the number of micro-batches per optimizer "
                "step, an int >= 1. Use accumulate(1) for no accumulation."
            )

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return apply_staged(self, state, batch)

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None:
        window = state.window
        if window.closed:
            return None
        if state.micro_step < self.k:
            if window.size == self.k:
                return None
            # Tell forward how long windows are, so it syncs gradients only on the last.
            return {"window": replace(window, size=self.k)}
        if state.micro_step > self.k:
            raise RuntimeError(
                f"{self!r}: the open window already holds {state.micro_step} micro-batches. "
                "Use a single accumulate(k) per chain, before clip and optimizer_step."
            )
        # A one-micro-batch window's total is its reference count (already summed over
        # ranks), so it needs no second reduction; `total is ref_count` then means its
        # gradients are already sum / count and need no rescaling.
        if state.micro_step == 1:
            total = window.ref_count
        else:
            total = state.strategy.reduce_count(window.count)
        factor = closing_factor(window.ref_count, total)  # type: ignore[arg-type]
        found_inf = None
        # The gradient list is built only where it is used: a one-micro-batch fp32/bf16
        # window (factor None) skips the walk over every parameter.
        if state.loss_scale is not None:
            grads = [p.grad for p in state.params if p.grad is not None]
            found_inf = torch.zeros((), device=state.loss_scale.device)
            inv_scale = ((1.0 if factor is None else factor) / state.loss_scale.double()).float()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        elif factor is not None:
            grads = [p.grad for p in state.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)
        loss: Any = window.loss
        if factor is not None:
            loss = (loss * factor).to(loss.dtype)
        closed = new_window(window.loss, window.count, window.ref_count, self.k, True, found_inf)
        return {"window": closed, "metrics": {"train/loss": loss}}

    def __repr__(self) -> str:
        return f"accumulate({self.k})"


@dataclass(frozen=True, slots=True)
class _Clip:
    max_norm: float
    norm_type: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_norm", "norm_type"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"clip({name}={value!r}): expected a float, e.g. clip(1.0).")
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(
                f"clip(max_norm={self.max_norm!r}): max_norm must be a positive, finite "
                "float, e.g. clip(1.0). Leave clip out of the chain to disable clipping."
            )
        if not (self.norm_type > 0):
            raise ValueError(f"clip(norm_type={self.norm_type!r}): must be > 0 (2.0, 1.0 or inf).")

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return apply_staged(self, state, batch)

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None:
        if not state.window.closed:  # clipping acts on whole windows only
            return None
        norm = state.strategy.clip_grad_norm_(state.params, self.max_norm, self.norm_type)
        return {"metrics": {**state.metrics, "train/grad_norm": norm}}

    def __repr__(self) -> str:
        if self.norm_type == 2.0:
            return f"clip({self.max_norm})"
        return f"clip({self.max_norm}, norm_type={self.norm_type})"


def warn_groups_added(state: TrainState, where: object) -> None:
    """Warn that the optimizer holds param groups added after the record was made.

    The record's `params` and `base_lrs` are fixed by TrainState.create: an added group's
    gradients would be left out of the window's normalisation and the clip, and its lr
    out of the schedule, without a word.
    """
    warnings.warn(
        f"{where!r}: the optimizer has {len(state.optimizer.param_groups)} param groups, the "
        f"TrainState was made with {len(state.base_lrs)} (optimizer.add_param_group after "
        "TrainState.create): the added parameters' gradients are not normalised over the "
        "window or clipped, and their lr follows no schedule. To unfreeze layers later, put "
        "them in the optimizer from the start with requires_grad=False (they train nothing "
        "until you set it True), or create a new record with TrainState.create.",
        stacklevel=4,
    )


@dataclass(frozen=True, slots=True)
class _OptimizerStep:
    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return apply_staged(self, state, batch)

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None:
        window = state.window
        if not window.closed:
            if window.size is None and state.micro_step >= 2:
                # accumulate(k) sets the size of each window it sees: none has seen this one
                raise ValueError(
                    f"{self!r}: {state.micro_step} micro-batches ran without an optimizer "
                    f"step (state.step stayed {state.step}) into one gradient window that no "
                    "accumulate(k) has seen, so it never closes and nothing trains. Put "
                    "accumulate(k) between forward and "
                    "optimizer_step, e.g. chain(forward(loss_fn), accumulate(1), "
                    "optimizer_step())."
                )
            return None
        optimizer, schedule = state.optimizer, state.schedule
        if len(optimizer.param_groups) != len(state.base_lrs):
            warn_groups_added(state, self)
        if isinstance(schedule, LRScheduler):
            lr = optimizer.param_groups[0]["lr"]
        else:
            factor = schedule(state.step)
            # A host float, so this check costs no sync; a NaN lr would silently ruin weights.
            if not (
                (type(factor) is float or isinstance(factor, numbers.Real))
                and math.isfinite(factor)
                and factor >= 0  # type: ignore[operator]
            ):
                raise ValueError(
                    f"{self!r}: schedule={_name(schedule)} returned {factor!r} at step "
                    f"{state.step}; a schedule must return an lr factor, a finite float >= 0."
                )
            for group, base_lr in zip(optimizer.param_groups, state.base_lrs):
                group["lr"] = base_lr * factor
            lr = state.base_lrs[0] * factor
        skipped = 0
        if window.found_inf is not None:
            # host sync: fp16 and skip_nonfinite() must know whether to skip this update.
            skipped = int(bool(window.found_inf.item()))
            if not skipped:
                optimizer.step()
            precision = state.precision
            if state.loss_scale is not None:
                torch._amp_update_scale_(
                    state.loss_scale,
                    state.growth_tracker,  # type: ignore[arg-type]  # set with loss_scale
                    window.found_inf,
                    precision.growth_factor,
                    precision.backoff_factor,
                    precision.growth_interval,
                )
        else:
            optimizer.step()
        if isinstance(schedule, LRScheduler):
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return {
            "step": state.step + 1,
            "micro_step": 0,
            "skipped_steps": state.skipped_steps + skipped,
            "window": _empty_window(window.size),
            "metrics": {**state.metrics, "train/lr": lr},
        }

    def __repr__(self) -> str:
        return "optimizer_step()"


@dataclass(frozen=True, slots=True)
class _SkipNonfinite:
    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return apply_staged(self, state, batch)

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None:
        window = state.window
        loss = state.metrics.get("train/loss")
        if not window.closed or not isinstance(loss, torch.Tensor):
            return None
        bad = ~torch.isfinite(loss)
        norm = state.metrics.get("train/grad_norm")
        if isinstance(norm, torch.Tensor):
            bad = bad | ~torch.isfinite(norm)
        found = bad.float()
        if window.found_inf is not None:
            found = torch.maximum(found, window.found_inf)
        if state.strategy.world_size > 1:
            # Each rank holds only its share of the loss: every rank must skip if any
            # rank's is bad, or their weights would part ways. One tiny all-reduce.
            found = (torch.as_tensor(state.strategy.reduce_count(found)) > 0).float()
        return {"window": replace(window, found_inf=found)}

    def __repr__(self) -> str:
        return "skip_nonfinite()"


def skip_nonfinite() -> Transform:
    """Mark a closed window whose loss (or recorded grad norm) is NaN/inf to be skipped.

    Put it after `accumulate` (and after `clip`, to check the gradient norm too).
    `optimizer_step` then drops that update, zeroes the gradients and counts it in
    `skipped_steps`. Deciding costs one host sync per optimizer step, as fp16 does.
    """
    return _SkipNonfinite()


def forward(loss_fn: LossFn, *, seed_rng: bool = True) -> Transform:
    """Run forward and backward of one micro-batch and add it to the open gradient window.

    The forward runs under the state's autocast policy; randomness (dropout) is seeded from
    (seed, step, micro_step, rank), so a run is reproducible whatever ran before it.

    Args:
        loss_fn: `loss_fn(model, batch)` returning `Loss(sum, count)` or a scalar mean
            (whose count is then the batch's leading dimension).
        seed_rng: False skips seeding torch's default generators before each micro-batch
            (~1 % of a tiny CPU model's step). Only for runs that draw no random numbers
            from them: not in the model (dropout, noise), not in loss_fn, and not between
            steps (e.g. data augmentation in the main process); whatever draws then gets
            numbers that depend on what ran before, so resumed runs differ. loopkit cannot
            check this for you (any code may call torch.rand), which is why it is not
            decided automatically.

    Raises:
        TypeError: loss_fn is not callable (when built), or returns something other than a
            scalar tensor or Loss (when called).
        ValueError: an empty batch, a non-scalar loss, or an item count that is not > 0.

    Example:
        >>> step = forward(lambda model, batch: model(batch[0]).pow(2).mean())
    """
    return _Forward(loss_fn, seed_rng)


def accumulate(k: int) -> Transform:
    """Close the gradient window every k micro-batches, normalising it by its item count.

    After closing, gradients are those of the mean loss over every item of the k
    micro-batches, and `metrics["train/loss"]` is that mean (on device). With fp16 it also
    unscales the gradients and records whether they overflowed.

    Raises:
        ValueError: k is not an int >= 1.
    """
    return _Accumulate(k)


def clip(max_norm: float, norm_type: float = 2.0) -> Transform:
    """Clip the closed window's gradients to a global norm of at most `max_norm`.

    Records the norm before clipping as `metrics["train/grad_norm"]` (on device). Open
    windows pass through untouched.

    Raises:
        ValueError: max_norm is not a positive finite float, or norm_type <= 0.
    """
    return _Clip(max_norm, norm_type)


def optimizer_step() -> Transform:
    """Apply a closed window: set the lr from the schedule, step, zero the gradients.

    `step` counts closed windows, including fp16 windows skipped on overflow (those are
    counted in `skipped_steps` and shrink the loss scale instead). Open windows pass through.
    """
    return _OptimizerStep()


_BUILT_IN = (_Forward, _Accumulate, _Clip, _OptimizerStep, _SkipNonfinite)


def window_size_of(step: Transform, *, where: str = "fit") -> int | None:
    """Check that a step made of loopkit's transforms can train; return its accumulate(k).

    A chain of built-in transforms that never closes a window (no `accumulate`) or never
    applies one (no `optimizer_step` after it) would run forever without an update: that
    is an error before any work. A step with parts of the user's own (or conditionals)
    cannot be read this way; it returns the `accumulate(k)` it holds at the top level, if
    any, and the loop checks at run time instead.

    Raises:
        ValueError: naming what the chain lacks and the chain that fixes it.
    """
    parts = parts_of(step)
    ks = [p.k for p in parts if isinstance(p, _Accumulate)]
    if not parts or not all(isinstance(p, _BUILT_IN) for p in parts):
        return ks[0] if ks else None
    names = [type(p) for p in parts]
    fix = "e.g. chain(forward(loss_fn), accumulate(1), clip(1.0), optimizer_step())"
    if _Forward in names and _Accumulate not in names:
        raise ValueError(
            f"{where}(step={step!r}): the chain never closes a gradient window (no accumulate(k)), "
            f"so the optimizer would never step and nothing would train. Add it: {fix}."
        )
    if _Accumulate in names and (
        _OptimizerStep not in names or names.index(_OptimizerStep) < names.index(_Accumulate)
    ):
        raise ValueError(
            f"{where}(step={step!r}): the chain closes gradient windows but never applies them "
            f"(no optimizer_step() after accumulate), so nothing would train. {fix}."
        )
    return ks[0] if ks else None


__all__ = [
    "accumulate",
    "clip",
    "forward",
    "optimizer_step",
    "skip_nonfinite",
    "window_size_of",
]
