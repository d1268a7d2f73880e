"""check_accumulation_invariance: cutting a batch into micro-batches changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._types import Strategy
from ..precision import Precision, PrecisionName
from .assertions import Tolerance
from .batches import batch_windows, common_batch_size, describe_batches, split_batch
from .drawn import accepts_search_strategies
from .failures import raise_if_different, reproduce
from .global_rng import global_rng_guard
from .result import CheckResult
from .runs import params_tree, run_window
from .setup import CheckSetup, Device, MakeModel, MakeStep

__all__ = ["check_accumulation_invariance", "resolve_splits"]

_WHY = (
    "A window's gradients must be those of the mean loss over every item in it, whatever "
    "the split. Usual causes: a loss averaged per micro-batch (a mean of means), a missing "
    "zero_grad, or a transform that acts on every micro-batch instead of once per closed "
    "window."
)


def resolve_splits(splits: Any, n: int, where: str) -> list[list[int]]:
    """The splits to try for batches of `n` items: the given ones (one or several), checked,
    or by default `[1, n-1]`, `[n-1, 1]` and an uneven three-way split."""
    if splits is None:
        if n < 2:
            raise ValueError(
                f"{where}: the full batch has {n} item; accumulation invariance needs at least "
                "2 items per batch to split."
            )
        chosen = [[1, n - 1]]
        if n > 2:
            chosen.append([n - 1, 1])
            half = (n - 1) // 2
            chosen.append([1, half, n - 1 - half])
        return [s for s in chosen if all(x >= 1 for x in s)]
    if isinstance(splits, Sequence) and splits and all(isinstance(s, int) for s in splits):
        splits = [splits]
    resolved = [[int(x) for x in s] for s in splits]
    for s in resolved:
        if sum(s) != n or any(x < 1 for x in s):
            raise ValueError(
                f"{where}(splits=[..., {s}, ...]): each split lists micro-batch sizes >= 1 that "
                f"sum to the batch size, {n}; e.g. [1, {n - 1}]."
            )
    if not resolved:
        raise ValueError(f"{where}(splits=[]): pass at least one split, e.g. [[1, {n - 1}]].")
    return resolved


@accepts_search_strategies("batches", "splits")
def check_accumulation_invariance(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    splits: Sequence[int] | Sequence[Sequence[int]] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int | None = None,
    precision: Precision | PrecisionName = "fp32",
    schedule: Any = None,
    seed: int = 0,
    device: Device = "cpu",
    strategy: Strategy | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check that splitting each batch into micro-batches leaves training unchanged.

    Runs `make_step(1)` on the full batches, then `make_step(len(split))` on each batch cut
    by every split, and compares the parameters (and `train/loss`) after every optimizer
    step. Catches a loss averaged per micro-batch instead of per item, a forgotten zero_grad
    and transforms that act per micro-batch instead of per window.

    Args:
        make_model: factory of identical fresh models.
        loss_fn: `loss_fn(model, batch)` -> Loss or scalar mean.
        batches: a full batch, or a list of them (one per optimizer step).
        splits: one split (`[3, 5]`) or several (`[[1, 7], [4, 4]]`) of the batch size into
            micro-batch sizes; default `[1, n-1]`, `[n-1, 1]` and an uneven three-way split.
        make_step: `k -> transform`; default loopkit's forward/accumulate/optimizer_step.
        optimizer: optimizer factory; default SGD(lr=0.05, momentum=0.9).
        steps: optimizer steps (default: one per batch in the list, or 2 for one batch).
        precision: "fp32", "bf16", "fp16" or a Precision.
        schedule: lr schedule, as TrainState.create takes it.
        seed: the run seed.
        device: where to run.
        strategy: the Strategy to run on (default SingleDevice(device)); one of your own
            is checked like the built-in ones.
        rtol: relative tolerance (default by dtype and precision, see tolerance_for).
        atol: absolute tolerance.

    Returns:
        CheckResult with the tolerance used.

    Raises:
        AssertionError: a split changed the parameters beyond the tolerance.
        ValueError: a split does not fit the batch, or make_model is not reproducible.
    """
    setup = CheckSetup.from_arguments("check_accumulation_invariance", locals())
    setup.check_same_init()
    windows = batch_windows(batches, steps, setup.check)
    n = common_batch_size(windows, setup.check)
    chosen = resolve_splits(splits, n, setup.check)
    tol = setup.tolerance(rtol, atol)
    _compare_splits(setup, windows, chosen, tol)
    return CheckResult(
        setup.check,
        tol,
        len(chosen) * len(windows),
        f"splits {chosen} of {len(windows)} batch(es) of {n} items matched the full batch.",
    )


def _compare_splits(
    setup: CheckSetup, windows: list[Any], chosen: list[list[int]], tol: Tolerance
) -> None:
    """Train on the full batches, then on each split of them; fail at the first difference."""
    where = setup.check
    with global_rng_guard():
        state, step = setup.new_state(), setup.step(1)
        expected = []
        for window in windows:
            state = run_window(state, step, [window], where)
            expected.append(params_tree(state))
        for split in chosen:
            state, step = setup.new_state(), setup.step(len(split))
            repro = reproduce(
                where,
                make_step=setup.step_name,
                batches=describe_batches(windows),
                splits=[split],
                steps=len(windows),
                precision=repr(setup.precision.name),
                seed=setup.seed,
            )
            for i, window in enumerate(windows):
                state = run_window(state, step, split_batch(window, split, where), where)
                raise_if_different(
                    params_tree(state),
                    expected[i],
                    tol,
                    names=(f"split {split}", "full batch"),
                    header=f"{where} failed: cutting each batch of {sum(split)} items into "
                    f"micro-batches {split} (make_step({len(split)})) changed training at "
                    f"optimizer step {i + 1} of {len(windows)}.",
                    explanation=_WHY,
                    repro=repro,
                )
