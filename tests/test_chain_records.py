"""chain gives a run of built-in (staged) parts one record per call, with the same result.

The built-in transforms are `StagedTransform`s: a chain applies their changes to one record it
made itself instead of making a record per part (issue 17: fewer records per window). These
tests pin what must not change with that: the result equals the parts applied one by one, the
input record is consumed by the first part that changes something, a record handed to a part
of the user's own is never changed afterwards, and a stale input is refused before any work.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import classification_loss, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import loopkit as lk
from loopkit.state import StagedTransform, TrainState

FORWARD = lk.forward(classification_loss)


def make_batch(seed: int = 0, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


def make_state(dropout: float = 0.0) -> lk.TrainState:
    return lk.TrainState.create(
        mlp(dropout=dropout),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        strategy=lk.SingleDevice("cpu"),
        seed=3,
    )


def fields_of(state: lk.TrainState) -> dict[str, Any]:
    """The record's host-side fields and its tensors' values, for comparing two runs."""
    window = state.window
    return {
        "step": state.step,
        "micro_step": state.micro_step,
        "samples_seen": state.samples_seen,
        "tokens_seen": float(state.tokens_seen),
        "skipped_steps": state.skipped_steps,
        "window": (
            float(window.loss),
            float(window.count),
            None if window.ref_count is None else float(window.ref_count),
            window.size,
            window.closed,
        ),
        "metrics": {k: float(v) for k, v in state.metrics.items()},
        "params": [p.detach().clone() for p in state.model.parameters()],
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    params_a, params_b = a.pop("params"), b.pop("params")
    assert a == b
    for x, y in zip(params_a, params_b, strict=True):
        assert torch.equal(x, y)


def test_built_in_transforms_are_staged() -> None:
    for part in (FORWARD, lk.accumulate(2), lk.clip(1.0), lk.optimizer_step()):
        assert isinstance(part, StagedTransform), part
    assert isinstance(lk.skip_nonfinite(), StagedTransform)


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 3),
    with_clip=st.booleans(),
    with_skip=st.booleans(),
    dropout=st.sampled_from([0.0, 0.5]),
    n_micro=st.integers(1, 7),
)
def test_a_chain_gives_the_result_of_its_parts_one_by_one(
    k: int, with_clip: bool, with_skip: bool, dropout: float, n_micro: int
) -> None:
    parts = [
        FORWARD,
        lk.accumulate(k),
        *([lk.clip(0.5)] if with_clip else []),
        *([lk.skip_nonfinite()] if with_skip else []),
        lk.optimizer_step(),
    ]
    step = lk.chain(*parts)
    chained, one_by_one = make_state(dropout), make_state(dropout)
    for i in range(n_micro):
        batch = make_batch(i)
        chained = step(chained, batch)
        for part in parts:
            one_by_one = part(one_by_one, batch)
        assert_same(fields_of(chained), fields_of(one_by_one))


def test_a_window_makes_one_record_per_chain_call(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    advance = TrainState._advance

    def counting(self: TrainState, by: object, changes: Any) -> TrainState:
        made.append(by)
        return advance(self, by, changes)

    monkeypatch.setattr(TrainState, "_advance", counting)
    step = lk.chain(FORWARD, lk.accumulate(1), lk.clip(1.0), lk.optimizer_step())
    state = make_state()
    for i in range(3):
        state = step(state, make_batch(i))
    assert made == [FORWARD] * 3  # one record per call, made on forward's behalf
    assert state.step == 3 and set(state.metrics) == {"train/loss", "train/grad_norm", "train/lr"}


def test_the_input_record_is_consumed_by_the_first_part_that_changes_it() -> None:
    step = lk.chain(lk.optimizer_step(), FORWARD, lk.accumulate(1), lk.optimizer_step())
    s0 = make_state()
    s1 = step(s0, make_batch())
    assert s1.step == 1
    with pytest.raises(lk.StaleStateError, match=r"by forward\(classification_loss\) at step 0"):
        s0.check_fresh()
    s1.check_fresh()


def test_parts_that_pass_through_return_the_same_record_unconsumed() -> None:
    s1 = FORWARD(make_state(), make_batch())  # an open window of size unknown... then k=2
    s2 = lk.accumulate(2)(s1, make_batch())
    assert lk.chain(lk.accumulate(2), lk.clip(1.0), lk.optimizer_step())(s2, make_batch()) is s2
    s2.check_fresh()


class Keep:
    """A part of the user's own that keeps every record it is given."""

    def __init__(self) -> None:
        self.seen: list[lk.TrainState] = []

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        self.seen.append(state)
        return state


def test_a_record_given_to_a_users_part_is_never_changed_after() -> None:
    keep = Keep()
    step = lk.chain(FORWARD, keep, lk.accumulate(1), lk.optimizer_step())
    state = step(make_state(), make_batch())
    (kept,) = keep.seen
    assert kept is not state
    # what forward made, as the user's part saw it: the window open, nothing stepped
    assert (kept.step, kept.micro_step, kept.window.closed) == (0, 1, False)
    assert "train/loss" not in kept.metrics
    with pytest.raises(lk.StaleStateError, match=r"by accumulate\(1\)"):
        kept.check_fresh()
    assert (state.step, state.micro_step, state.window.closed) == (1, 0, False)


def test_a_stale_record_is_refused_before_any_work() -> None:
    step = lk.chain(FORWARD, lk.accumulate(1), lk.optimizer_step())
    s0 = make_state()
    s1 = step(s0, make_batch())
    before = [p.detach().clone() for p in s1.model.parameters()]
    with pytest.raises(lk.StaleStateError, match=r"by forward\(classification_loss\)"):
        step(s0, make_batch(1))
    for p, b in zip(s1.model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None
    s1.check_fresh()


def test_a_chain_prints_and_compares_by_its_parts_only() -> None:
    a = lk.chain(FORWARD, lk.accumulate(2), lk.optimizer_step())
    b = lk.chain(FORWARD, lk.chain(lk.accumulate(2), lk.optimizer_step()))
    assert a == b and hash(a) == hash(b)
    assert repr(a) == "chain(forward(classification_loss), accumulate(2), optimizer_step())"
