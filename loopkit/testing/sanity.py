"""Training sanity: the loss on one batch falls, and every trainable parameter gets a gradient."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .._types import Strategy, Transform
from ..loss import as_loss
from ..precision import Precision, PrecisionName
from ..state import TrainState
from ..strategies import unwrap
from .batches import describe_batches, leading_size
from .drawn import accepts_search_strategies
from .failures import detached_graph_error, failure, name_of, reproduce
from .global_rng import global_rng_guard
from .result import CheckResult
from .setup import CheckSetup, Device, MakeModel, MakeStep

__all__ = ["check_gradient_flow", "check_loss_decreases"]


def _mean_loss(state: TrainState, loss_fn: Any, batch: Any, where: str) -> float:
    """The loss on `batch` in eval mode, no grad: a mean over its items (host sync)."""
    model = state.model
    was_training = model.training
    model.eval()
    try:
        batch = state.strategy.to_device(batch)
        n = leading_size(batch, where)
        with torch.no_grad(), state.precision.autocast(state.strategy.device):
            value, count, is_mean = as_loss(loss_fn(model, batch), n, where)
            mean = value if is_mean else value / count
        return float(mean)  # host sync: the check reads the loss
    finally:
        model.train(was_training)


def _run_steps(state: TrainState, step: Transform, batch: Any, steps: int, where: str) -> Any:
    """`steps` windows of one micro-batch; a backward on a detached graph becomes a clear
    AssertionError."""
    try:
        for _ in range(steps):
            state = step(state, batch)
    except RuntimeError as error:
        detached = detached_graph_error(where, error)
        if detached is not None:
            raise detached from error
        raise
    return state


def _diagnose(state: TrainState, moved: float, final: float) -> str:
    """Why the loss did not fall: no step taken, parameters unchanged, non-finite, or else."""
    if state.step == 0:
        return (
            "No optimizer step was taken: make_step(1) must close the window and step "
            "(accumulate(1) and optimizer_step() in the chain)."
        )
    if moved == 0.0:
        return (
            f"{state.step} optimizer steps left every parameter unchanged: a dead optimizer "
            "(lr 0, a schedule at 0, an optimizer over other tensors, or a step that never "
            "calls optimizer.step())."
        )
    if not math.isfinite(final):
        return "The loss became non-finite: the lr is too high or the loss overflows."
    return (
        f"Parameters moved (max |change| {moved:.3g}) but the loss did not fall: a wrong "
        "sign, an lr far too small or too large, or gradients that reach only part of the "
        "model (run check_gradient_flow)."
    )


@accepts_search_strategies("batch", "seed")
def check_loss_decreases(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batch: Any,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int = 20,
    min_decrease: float = 0.1,
    precision: Precision | PrecisionName = "fp32",
    schedule: Any = None,
    seed: int = 0,
    device: Device = "cpu",
    strategy: Strategy | None = None,
) -> CheckResult:
    """Check that `steps` optimizer steps on one fixed batch lower its loss (overfit it).

    The loss is measured in eval mode without gradients before and after; it must fall by
    at least `min_decrease` of its initial magnitude. Catches a dead optimizer (lr 0, a
    chain without optimizer_step, parameters missing from the optimizer) and a detached
    graph.

    Arguments not listed here are as in check_accumulation_invariance.

    Args:
        batch: the batch to overfit (each step is one window of one micro-batch).
        steps: optimizer steps to take.
        min_decrease: the fraction the loss must fall by (0.1: to 90% of its start).

    Raises:
        AssertionError: the loss did not fall enough (with a diagnosis), or backward failed
            on a detached graph.
    """
    if not (isinstance(min_decrease, (int, float)) and 0 <= min_decrease < 1):
        raise ValueError(
            f"check_loss_decreases(min_decrease={min_decrease!r}): must be a float in [0, 1)."
        )
    setup = CheckSetup.from_arguments("check_loss_decreases", locals())
    where = setup.check
    with global_rng_guard():
        state, step = setup.new_state(), setup.step(1)
        initial = _mean_loss(state, loss_fn, batch, where)
        before = [p.detach().clone() for p in unwrap(state.model).parameters()]
        state = _run_steps(state, step, batch, steps, where)
        final = _mean_loss(state, loss_fn, batch, where)
        after = [p.detach() for p in unwrap(state.model).parameters()]
    target = initial - min_decrease * abs(initial)
    if math.isfinite(final) and final <= target:
        return CheckResult(
            where,
            None,
            1,
            f"loss {initial:.4g} -> {final:.4g} in {steps} steps (needed <= {target:.4g}).",
        )
    moved = max(
        (float((a - b).abs().max()) for a, b in zip(after, before, strict=True)), default=0.0
    )
    raise failure(
        f"{where} failed: the loss on a fixed batch went from {initial:.6g} to {final:.6g} "
        f"over {steps} optimizer steps; expected at most {target:.6g} "
        f"(a {min_decrease:.0%} decrease).",
        _diagnose(state, moved, final),
        "Overfitting one small batch is the cheapest sign that training works at all.",
        reproduce(
            where,
            make_step=setup.step_name,
            batch=describe_batches([batch]),
            steps=steps,
            schedule=None if schedule is None else name_of(schedule),
            seed=seed,
        ),
    )


def _captured_grads(
    state: TrainState, step: Transform, batch: Any, where: str
) -> tuple[TrainState, dict[str, torch.Tensor | None]]:
    """Run one window; return the record and the gradients as the optimizer saw them
    (copied when the chain calls `optimizer.step()`: after normalisation and clipping)."""
    named = list(unwrap(state.model).named_parameters())
    captured: dict[str, torch.Tensor | None] = {}
    opt = state.optimizer
    original_step = opt.step

    def capturing_step(*args: Any, **kwargs: Any) -> Any:
        if not captured:
            for name, p in named:
                captured[name] = None if p.grad is None else p.grad.detach().clone()
        return original_step(*args, **kwargs)

    opt.step = capturing_step  # type: ignore[method-assign]
    try:
        state = _run_steps(state, step, batch, 1, where)
    finally:
        del opt.step  # back to the class's method
    return state, captured


def _gradient_problems(
    state: TrainState, captured: dict[str, torch.Tensor | None], exempt: tuple[str, ...]
) -> list[str]:
    """One line per parameter that breaks a gradient rule."""
    in_optimizer = {id(p) for p in state.params}
    problems: list[str] = []
    for name, p in unwrap(state.model).named_parameters():
        grad = captured[name]
        if not p.requires_grad:
            if grad is not None:
                problems.append(f"{name}: frozen (requires_grad=False) but has a gradient")
            continue
        if name.startswith(exempt) and exempt:
            continue
        if id(p) not in in_optimizer:
            problems.append(f"{name}: trainable but not in the optimizer, so never updated")
        if grad is None:
            problems.append(
                f"{name}: no gradient (not connected to the loss: an unused module, or a "
                ".detach() / no_grad between it and the loss)"
            )
        elif not bool(torch.isfinite(grad).all()):
            bad = int((~torch.isfinite(grad)).sum())
            problems.append(f"{name}: {bad} of {grad.numel()} gradient elements are not finite")
        elif not bool(grad.any()):
            problems.append(f"{name}: gradient is all zeros")
    return problems


@accepts_search_strategies("batch", "seed")
def check_gradient_flow(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batch: Any,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    precision: Precision | PrecisionName = "fp32",
    seed: int = 0,
    device: Device = "cpu",
    strategy: Strategy | None = None,
    allow_no_grad: Iterable[str] = (),
) -> CheckResult:
    """Check that every trainable parameter gets a finite, non-zero gradient.

    Runs one window of `make_step(1)` on `batch` and reads the gradients the optimizer sees
    (captured when the chain calls `optimizer.step()`, so after normalisation and clipping).
    Every trainable parameter must be in the optimizer and get a finite gradient that is not
    all zeros; frozen parameters (requires_grad=False) must get none.

    Arguments not listed here are as in check_accumulation_invariance.

    Args:
        batch: one batch.
        allow_no_grad: parameter-name prefixes exempt from the trainable rules (e.g. an
            embedding table whose rows the batch does not use, or a head trained elsewhere).

    Raises:
        AssertionError: listing every parameter that breaks a rule, by name.
    """
    setup = CheckSetup.from_arguments("check_gradient_flow", locals())
    where = setup.check
    exempt = tuple(allow_no_grad)
    with global_rng_guard():
        state, step = setup.new_state(), setup.step(1)
        state, captured = _captured_grads(state, step, batch, where)
    repro = reproduce(where, make_step=setup.step_name, batch=describe_batches([batch]), seed=seed)
    if not captured:
        cause = (
            "the fp16 window overflowed, so the step was skipped"
            if state.skipped_steps
            else "make_step(1) never called optimizer.step() (is optimizer_step() in the chain?)"
        )
        raise AssertionError(
            f"{where} failed: no gradients reached the optimizer: {cause}.\n  {repro}"
        )
    problems = _gradient_problems(state, captured, exempt)
    if problems:
        raise AssertionError(
            f"{where} failed: {len(problems)} parameter(s) break the gradient rules after one "
            "step:\n    " + "\n    ".join(problems) + "\n  Pass allow_no_grad=('name.prefix',) for "
            f"parameters that are meant to get none.\n  {repro}"
        )
    named = list(unwrap(state.model).named_parameters())
    trainable = sum(1 for _, p in named if p.requires_grad)
    return CheckResult(
        where,
        None,
        len(named),
        f"{trainable} trainable parameter(s) got finite non-zero gradients; "
        f"{len(named) - trainable} frozen got none.",
    )
