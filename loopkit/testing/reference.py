"""check_matches_reference: a step chain against the hand-written PyTorch loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._batch import move
from .._rng import micro_step_seed, seed_devices_
from .._types import Strategy
from ..loss import as_loss
from .assertions import Tolerance
from .batches import (
    batch_windows,
    describe_batches,
    leading_size,
    micro_batches,
    micro_batches_per_window,
)
from .drawn import accepts_search_strategies
from .failures import raise_if_different, reproduce
from .global_rng import global_rng_guard
from .result import CheckResult
from .runs import params_tree, run_window
from .setup import CheckSetup, Device, MakeModel, MakeStep

__all__ = ["check_matches_reference", "reference_params"]

_WHY = (
    "Usual causes: clipping per parameter instead of by the global norm, a missing "
    "zero_grad, a loss normalised per micro-batch, or an lr that does not follow "
    "schedule(step)."
)


def reference_params(
    setup: CheckSetup, windows: Sequence[Any], max_norm: float | None
) -> list[dict[str, Any]]:
    """The hand-written loop, one full batch per optimizer step: `{"model": parameters}`
    after each step.

    Per batch: lr = base_lr * schedule(step), zero_grad, backward of the mean loss over the
    batch's items, clip_grad_norm_ over all trainable parameters (if max_norm), step.
    Dropout is seeded as loopkit's forward seeds a one-micro-batch window.
    """
    dev = torch.device(setup.device)
    model = setup.make_model().to(dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = setup.optimizer(trainable)
    base_lrs = [group["lr"] for group in opt.param_groups]
    out = []
    for i, window in enumerate(windows):
        factor = 1.0 if setup.schedule is None else setup.schedule(i)
        for group, base in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
        opt.zero_grad(set_to_none=True)
        seed_devices_(micro_step_seed(setup.seed, i, 0, 0), dev)
        batch = move(window, dev, False)
        value, count, is_mean = as_loss(
            setup.loss_fn(model, batch), leading_size(batch, setup.check), setup.check
        )
        (value if is_mean else value / count).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        opt.step()
        out.append({"model": {n: p.detach().clone() for n, p in model.named_parameters()}})
    return out


@accepts_search_strategies("batches", "seed")
def check_matches_reference(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    split: Sequence[int] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    max_norm: float | None = None,
    schedule: Callable[[int], float] | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: Device = "cpu",
    strategy: Strategy | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check a step chain against a hand-written PyTorch loop, optimizer step by step.

    The reference, per full batch: set each group's lr to `base_lr * schedule(step)`,
    `zero_grad`, backward of the mean loss over the batch's items, `clip_grad_norm_` over
    all trainable parameters (if `max_norm`), `optimizer.step()`. Dropout is seeded as
    loopkit's forward seeds a one-micro-batch window. Catches a clip with per-parameter
    norms, a forgotten zero_grad, a wrong loss normalisation or lr.

    Arguments not listed here are as in check_accumulation_invariance.

    Args:
        max_norm: global gradient-norm clipping in the reference (and in the default chain).
        schedule: lr factor per step (a loopkit.schedules instance or function), used by both.
        split: cut each batch into these micro-batch sizes for the chain (the reference always
            sees the whole batch).

    Raises:
        AssertionError: the parameters after some optimizer step differ from the reference.
    """
    setup = CheckSetup.from_arguments("check_matches_reference", locals())  # fp32, like the loop
    setup.check_same_init()
    windows = batch_windows(batches, steps, setup.check)
    k = micro_batches_per_window(split, windows, setup.check)
    tol = setup.tolerance(rtol, atol)
    with global_rng_guard():
        state, step = setup.new_state(), setup.step(k, max_norm=max_norm)
        actual = []
        for window in windows:
            state = run_window(state, step, micro_batches(window, split, setup.check), setup.check)
            actual.append({"model": params_tree(state)["model"]})
        expected = reference_params(setup, windows, max_norm)
    _compare(setup, actual, expected, tol, windows, split, k, max_norm)
    return CheckResult(
        setup.check,
        tol,
        len(windows),
        f"{len(windows)} optimizer step(s) matched the reference loop.",
    )


def _compare(
    setup: CheckSetup,
    actual: list[Any],
    expected: list[Any],
    tol: Tolerance,
    windows: list[Any],
    split: Sequence[int] | None,
    k: int,
    max_norm: float | None,
) -> None:
    """Fail at the first optimizer step where the chain and the reference differ."""
    clip_text = f", clip_grad_norm_(max_norm={max_norm})" if max_norm else ""
    repro = reproduce(
        setup.check,
        make_step=setup.step_name,
        batches=describe_batches(windows),
        split=split,
        max_norm=max_norm,
        schedule=setup.schedule,
        seed=setup.seed,
    )
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        raise_if_different(
            got,
            want,
            tol,
            names=("step chain", "reference"),
            header=f"{setup.check} failed: after optimizer step {i + 1} of {len(windows)}, "
            f"make_step({k}) differs from the hand-written loop (zero_grad, backward "
            f"of the mean loss{clip_text}, step).",
            explanation=_WHY,
            repro=repro,
        )
