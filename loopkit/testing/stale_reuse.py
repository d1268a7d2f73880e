"""check_no_stale_reuse: every transform of a chain refuses a record it consumed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._types import Strategy, Transform
from ..compose import parts_of
from ..precision import Precision, PrecisionName
from ..state import StaleStateError, TrainState
from .batches import batch_windows, describe_batches, micro_batches, micro_batches_per_window
from .drawn import accepts_search_strategies
from .failures import reproduce
from .global_rng import global_rng_guard
from .result import CheckResult
from .setup import CheckSetup, Device, MakeModel, MakeStep

__all__ = ["chain_parts", "check_no_stale_reuse"]


def chain_parts(step: Transform) -> tuple[Transform, ...]:
    """The parts of a chain built by `loopkit.chain`, in order; `(step,)` for anything else."""
    return parts_of(step) or (step,)


def _fingerprint(state: TrainState) -> list[torch.Tensor]:
    """Copies of every tensor a transform may change in place: parameters, gradients,
    optimizer state and the fp16 loss scale."""
    out: list[torch.Tensor] = []
    for p in state.params:
        out.append(p.detach().clone())
        if p.grad is not None:
            out.append(p.grad.detach().clone())
    for values in state.optimizer.state.values():
        out.extend(v.detach().clone() for v in values.values() if isinstance(v, torch.Tensor))
    if state.loss_scale is not None:
        out.append(state.loss_scale.detach().clone())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


def _probe(
    part: Transform, state: TrainState, micro_batch: Any, at: str, where: str, repro: str
) -> TrainState | None:
    """Apply `part`, then call it again on the record it consumed, which must raise
    StaleStateError before changing anything. Returns the new record, or None when the
    part passed the record through (unchanged)."""
    before = _fingerprint(state)
    out = part(state, micro_batch)
    if not isinstance(out, TrainState):
        raise AssertionError(
            f"{where} failed: {at} returned {type(out).__name__}; a transform "
            f"must return the new TrainState (or the one it received).\n  {repro}"
        )
    if out is state:
        if not _same(before, _fingerprint(state)):
            raise AssertionError(
                f"{where} failed: {at} changed tensors in place but returned the "
                "record it received, which so stays usable with changed tensors. "
                "Return `state.replace(...)` (the old record then goes stale).\n  " + repro
            )
        return None
    after = _fingerprint(out)
    try:
        part(state, micro_batch)
    except StaleStateError:
        if not _same(after, _fingerprint(out)):
            raise AssertionError(
                f"{where} failed: {at} raised StaleStateError on reuse only "
                "after changing tensors in place. Call state.check_fresh() "
                f"before touching anything.\n  {repro}"
            ) from None
    except Exception as error:  # noqa: BLE001 - reported as the failure
        raise AssertionError(
            f"{where} failed: {at} raised {type(error).__name__} ({error}) on "
            f"a consumed record instead of StaleStateError.\n  {repro}"
        ) from error
    else:
        raise AssertionError(
            f"{where} failed: {at} accepted the record it had already consumed "
            "(no StaleStateError): a reused record silently repeats in-place "
            "updates. Call state.check_fresh() first and return "
            f"state.replace(...) / a built-in transform's result.\n  {repro}"
        )
    return out


@accepts_search_strategies("batches")
def check_no_stale_reuse(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    split: Sequence[int] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int | None = None,
    precision: Precision | PrecisionName = "fp32",
    seed: int = 0,
    device: Device = "cpu",
    strategy: Strategy | None = None,
) -> CheckResult:
    """Check that every transform of the chain refuses a record it (or another) consumed.

    Walks the chain part by part over every micro-batch. Whenever a part returns a new
    record, calling it again on the record it consumed must raise StaleStateError *before*
    changing any tensor. A part that returns the record it received must not have changed
    its tensors in place (it has to return `state.replace(...)` so the old record goes
    stale). Parts must return a TrainState.

    Arguments not listed here are as in check_accumulation_invariance.

    Args:
        split: cut each batch into these micro-batch sizes (default: one micro-batch).

    Raises:
        AssertionError: naming the part, the step and the micro-step.
    """
    setup = CheckSetup.from_arguments("check_no_stale_reuse", locals())
    where = setup.check
    windows = batch_windows(batches, steps, where)
    k = micro_batches_per_window(split, windows, where)
    repro = reproduce(
        where,
        make_step=setup.step_name,
        batches=describe_batches(windows),
        split=split,
        seed=seed,
    )
    acted: set[int] = set()
    with global_rng_guard():
        state = setup.new_state()
        parts = chain_parts(setup.step(k))
        for window in windows:
            for micro_batch in micro_batches(window, split, where):
                for index, part in enumerate(parts):
                    at = (
                        f"part {index} of the chain, {part!r}, at step {state.step}, "
                        f"micro_step {state.micro_step}"
                    )
                    out = _probe(part, state, micro_batch, at, where, repro)
                    if out is not None:
                        acted.add(index)
                        state = out
    idle = [repr(p) for i, p in enumerate(parts) if i not in acted]
    note = f" Never acted (passed the record through): {', '.join(idle)}." if idle else ""
    return CheckResult(
        where,
        None,
        len(acted),
        f"{len(acted)} of {len(parts)} part(s) refused a consumed record.{note}",
    )
