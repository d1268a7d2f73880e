"""The combinator algebra: identity, chain (flattening, associative), every, when.

Several tests run the combinators over toy states (tuples, ints): the algebra never looks at
the state, but `Transform`'s type says TrainState, hence their `type: ignore[arg-type]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import classification_loss, mlp
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk


@dataclass(frozen=True)
class Rec:
    """A pure recording transform: appends (its name, the batch it saw) to a tuple 'state'."""

    name: str

    def __call__(self, state: Any, batch: Any, /) -> Any:  # a tuple: a toy state
        return (*state, (self.name, batch))

    def __repr__(self) -> str:
        return f"Rec({self.name!r})"


# A tree is a transform leaf (Rec or identity()) or a list of trees (built as chain(*trees)).
leaves = st.sampled_from("abcde").map(Rec) | st.builds(lk.identity)
trees = st.recursive(leaves, lambda children: st.lists(children, max_size=4), max_leaves=12)


def build(tree: Any) -> Any:
    return lk.chain(*map(build, tree)) if isinstance(tree, list) else tree


def flat(tree: Any) -> list[Rec]:
    """The tree's recording leaves in left-to-right order (identities dropped)."""
    if isinstance(tree, list):
        return [leaf for sub in tree for leaf in flat(sub)]
    return [tree] if isinstance(tree, Rec) else []


def expected_log(parts: list[Rec], batch: Any) -> tuple:
    return tuple((p.name, batch) for p in parts)


def test_empty_chain_is_identity() -> None:
    assert lk.chain() == lk.identity()
    assert repr(lk.chain()) == "identity()"
    assert lk.chain(lk.identity(), lk.chain(), lk.identity()) == lk.identity()
    assert lk.chain()((1, 2), "b") == (1, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "transform",
    [Rec("a"), lk.accumulate(2), lk.optimizer_step(), lambda state, batch: state],
    ids=["record", "accumulate", "optimizer_step", "function"],
)
def test_chain_of_one_is_that_transform(transform: Any) -> None:
    assert lk.chain(transform) is transform
    assert lk.chain(lk.identity(), transform, lk.chain()) is transform


@given(tree=trees)
def test_chain_flattens_drops_identities_and_runs_left_to_right(tree: Any) -> None:
    transform, parts = build(tree), flat(tree)
    if not parts:
        assert transform == lk.identity()
    elif len(parts) == 1:
        assert transform is parts[0]
    else:
        assert transform == lk.chain(*parts)  # equal to the flat chain: no nesting left
        assert repr(transform) == f"chain({', '.join(map(repr, parts))})"
    assert transform((), "batch") == expected_log(parts, "batch")


@given(a=trees, b=trees, c=trees)
def test_chain_is_associative(a: Any, b: Any, c: Any) -> None:
    ta, tb, tc = build(a), build(b), build(c)
    right = lk.chain(ta, lk.chain(tb, tc))
    left = lk.chain(lk.chain(ta, tb), tc)
    assert right == left
    assert repr(right) == repr(left)
    expected = expected_log(flat(a) + flat(b) + flat(c), 7)
    assert right((), 7) == expected  # type: ignore[arg-type]
    assert left((), 7) == expected  # type: ignore[arg-type]


def test_chain_threads_the_state_through_plain_functions() -> None:
    def double(state: int, batch: int) -> int:
        return 2 * state

    def add_batch(state: int, batch: int) -> int:
        return state + batch

    assert lk.chain(double, add_batch)(3, 1) == 7  # type: ignore[arg-type]  # add_batch(double(3))
    assert lk.chain(add_batch, double)(3, 1) == 8  # type: ignore[arg-type]  # double(add_batch(3))


def test_chains_of_equal_parts_compare_equal() -> None:
    assert lk.chain(lk.accumulate(2), lk.clip(1.0)) == lk.chain(lk.accumulate(2), lk.clip(1.0))
    assert lk.chain(lk.accumulate(2), lk.clip(1.0)) != lk.chain(lk.accumulate(3), lk.clip(1.0))
    assert lk.chain(lk.accumulate(2), lk.clip(1.0)) != lk.chain(lk.clip(1.0), lk.accumulate(2))


# --- with real training states -------------------------------------------------------------

FORWARD = lk.forward(classification_loss)


def make_state() -> lk.TrainState:
    return lk.TrainState.create(
        mlp(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), strategy=lk.SingleDevice("cpu")
    )


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (2,), generator=gen
    )


@pytest.mark.parametrize("transform", [lk.identity(), lk.chain()], ids=["identity", "chain()"])
def test_identity_does_not_consume_the_state(transform: Any) -> None:
    state = make_state()
    assert transform(state, make_batch()) is state
    state.check_fresh()
    state = FORWARD(state, make_batch())  # still the live record
    assert state.micro_step == 1


class Recorder:
    """A transform that records (step, micro_step, closed) of each state it sees."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        self.calls.append((state.step, state.micro_step, state.window.closed))
        return state


@pytest.mark.parametrize("where", ["before-forward", "after-accumulate", "after-optimizer-step"])
@given(n=st.integers(1, 4), k=st.integers(1, 3), windows=st.integers(1, 6))
def test_every_fires_at_window_boundaries_where_step_is_a_multiple_of_n(
    where: str, n: int, k: int, windows: int
) -> None:
    recorder = Recorder()
    every = lk.every(n, recorder)
    parts = [FORWARD, lk.accumulate(k), lk.optimizer_step()]
    position = {"before-forward": 0, "after-accumulate": 2, "after-optimizer-step": 3}[where]
    step = lk.chain(*parts[:position], every, *parts[position:])
    state = make_state()
    for micro in range(windows * k):
        state = step(state, make_batch(micro))
    assert state.step == windows
    # Boundaries this position sees, from the definition: the start of each window
    # (step s, nothing open), each closed window (step s, k micro-batches), or just after
    # each optimizer step (step s + 1, nothing open).
    if where == "before-forward":
        seen = [(s, 0, False) for s in range(windows)]
    elif where == "after-accumulate":
        seen = [(s, k, True) for s in range(windows)]
    else:
        seen = [(s + 1, 0, False) for s in range(windows)]
    assert recorder.calls == [b for b in seen if b[0] % n == 0]


def late(state: lk.TrainState) -> bool:
    return state.step >= 2


def test_when_applies_the_transform_only_where_the_predicate_holds() -> None:
    recorder = Recorder()
    predicate_saw: list[int] = []

    def predicate(state: lk.TrainState) -> bool:
        predicate_saw.append(state.step)
        return late(state)

    step = lk.chain(FORWARD, lk.accumulate(1), lk.when(predicate, recorder), lk.optimizer_step())
    state = make_state()
    for i in range(5):
        state = step(state, make_batch(i))
    assert predicate_saw == [0, 1, 2, 3, 4]
    assert recorder.calls == [(2, 1, True), (3, 1, True), (4, 1, True)]


def test_when_false_passes_the_same_record_through_and_true_applies_it() -> None:
    state = make_state()
    batch = make_batch()
    assert lk.when(late, FORWARD)(state, batch) is state
    state.check_fresh()
    after = lk.when(lambda s: True, FORWARD)(state, batch)
    assert after.micro_step == 1
    with pytest.raises(lk.StaleStateError):
        state.check_fresh()


def test_wrappers_print_like_their_call_and_compare_equal() -> None:
    assert repr(lk.every(2, lk.optimizer_step())) == "every(2, optimizer_step())"
    assert repr(lk.when(late, lk.clip(1.0))) == "when(late, clip(1.0))"
    assert lk.every(2, lk.clip(1.0)) == lk.every(2, lk.clip(1.0))
    assert lk.every(2, lk.clip(1.0)) != lk.every(3, lk.clip(1.0))
    assert lk.when(late, lk.clip(1.0)) == lk.when(late, lk.clip(1.0))
