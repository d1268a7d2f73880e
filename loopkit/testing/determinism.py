"""check_determinism: a run is a function of (seed, data) alone, whatever the global RNGs hold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._types import Strategy
from ..precision import Precision, PrecisionName
from .assertions import Tolerance
from .batches import batch_windows, describe_batches, micro_batches, micro_batches_per_window
from .drawn import accepts_search_strategies
from .failures import raise_if_different, reproduce
from .global_rng import global_rng_guard, seed_globals
from .result import CheckResult
from .runs import clone_tree
from .setup import CheckSetup, Device, MakeModel, MakeStep
from .trees import state_tree

__all__ = ["check_determinism"]

# (what differed, why): the plain rerun, then the run with scrambled global generators.
_RERUN = (
    "two runs with the same seed, data and global RNG state differ",
    "The step depends on something besides (seed, step, micro_step, rank) and the data: "
    "the clock, os.urandom, a counter kept in a transform or a global, or a "
    "non-deterministic kernel (torch.use_deterministic_algorithms(True) finds those).",
)
_SCRAMBLED = (
    "a run whose global torch/random/numpy generators were re-seeded before every "
    "micro-batch differs from an undisturbed run with the same seed",
    "Something in the step draws from a global generator loopkit did not seed for it: "
    "dropout in a custom forward that skips loopkit's seeding, "
    "torch.manual_seed(<random>), random.random() or np.random in a transform. "
    "Derive randomness from (state.seed, state.step, state.micro_step, rank), "
    "e.g. a torch.Generator seeded from them.",
)


@accepts_search_strategies("batches", "seed")
def check_determinism(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    split: Sequence[int] | None = None,
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
    """Check that a run is a function of (seed, data) alone: bitwise on CPU.

    Trains three times with the same seed and data: twice from the same global RNG state,
    and once with torch's, Python's and numpy's global generators re-seeded before every
    micro-batch. Every record after every optimizer step (parameters, gradients, optimizer
    state, counters, metrics) must match. Catches randomness drawn from a global generator
    loopkit did not seed for the step (dropout in a custom forward, `torch.manual_seed`
    with a random value, `random.random()` in a transform) and state kept outside the record.
    The caller's global RNG state is restored afterwards.

    Arguments not listed here are as in check_accumulation_invariance.

    Args:
        split: cut each batch into these micro-batch sizes (default: one micro-batch).
        rtol: relative tolerance; default bitwise on CPU, by dtype elsewhere.
        atol: absolute tolerance; default bitwise on CPU, by dtype elsewhere.

    Raises:
        AssertionError: two runs differ.
    """
    setup = CheckSetup.from_arguments("check_determinism", locals())
    setup.check_same_init()
    windows = batch_windows(batches, steps, setup.check)
    k = micro_batches_per_window(split, windows, setup.check)
    tol = setup.tolerance(rtol, atol, bitwise=True)
    with global_rng_guard():
        first = _run(setup, windows, split, k, global_seed=1, scramble=False)
        again = _run(setup, windows, split, k, global_seed=1, scramble=False)
        scrambled = _run(setup, windows, split, k, global_seed=2, scramble=True)
    for other, (header, why) in ((again, _RERUN), (scrambled, _SCRAMBLED)):
        _compare_runs(setup, windows, split, other, first, tol, header, why)
    return CheckResult(
        setup.check,
        tol,
        2 * len(windows),
        f"3 runs of {len(windows)} step(s) x {k} micro-batch(es) matched, one with scrambled "
        "global generators.",
    )


def _compare_runs(
    setup: CheckSetup,
    windows: list[Any],
    split: Sequence[int] | None,
    other: list[Any],
    first: list[Any],
    tol: Tolerance,
    header: str,
    why: str,
) -> None:
    """Fail at the first optimizer step where `other` differs from the first run."""
    repro = reproduce(
        setup.check,
        make_step=setup.step_name,
        batches=describe_batches(windows),
        split=split,
        steps=len(windows),
        precision=repr(setup.precision.name),
        seed=setup.seed,
    )
    for i, (a, b) in enumerate(zip(other, first, strict=True)):
        raise_if_different(
            a,
            b,
            tol,
            names=("rerun", "first run"),
            header=f"{setup.check} failed: {header}, after optimizer step {i + 1} of "
            f"{len(windows)}.",
            explanation=why,
            repro=repro,
        )


def _run(
    setup: CheckSetup,
    windows: list[Any],
    split: Sequence[int] | None,
    k: int,
    *,
    global_seed: int,
    scramble: bool,
) -> list[Any]:
    """One run from globals seeded with `global_seed`: a copy of the record after each step.

    `scramble`: re-seed the global generators (differently) before every micro-batch.
    """
    seed_globals(global_seed)
    state = setup.new_state()
    step = setup.step(k)
    trees = []
    draws = 0
    for window in windows:
        before = state.step
        for micro_batch in micro_batches(window, split, setup.check):
            if scramble:
                draws += 1
                seed_globals(7919 * draws + 104729)
            state = step(state, micro_batch)
        if state.step != before + 1:
            raise AssertionError(
                f"{setup.check}: make_step({k}) did not take one optimizer step per window of "
                f"{k} micro-batch(es); build the chain with accumulate(k) and optimizer_step()."
            )
        trees.append(clone_tree(state_tree(state)))
    return trees
