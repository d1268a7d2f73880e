"""Combinators that build one transform from others: identity, chain, every, when."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._types import Batch, Transform
from .state import StagedTransform, TrainState

_Changes = Callable[[TrainState, Batch], "dict[str, Any] | None"]


def _check_transform(call: str, value: object) -> None:
    if not callable(value):
        raise TypeError(
            f"{call}: {value!r} is not a transform; expected a callable "
            "`(state, batch) -> TrainState` such as forward(loss_fn) or optimizer_step()."
        )


@dataclass(frozen=True, slots=True)
class _Identity:
    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return state

    def __repr__(self) -> str:
        return "identity()"


@dataclass(frozen=True, slots=True)
class _Chain:
    parts: tuple[Transform, ...]
    # Each part's `_changes` where it is a StagedTransform, else None: read once, here.
    _staged: tuple[_Changes | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        staged = tuple(p._changes if isinstance(p, StagedTransform) else None for p in self.parts)
        object.__setattr__(self, "_staged", staged)

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        # Same result as `for part in parts: state = part(state, batch)`, with one record
        # for a run of staged parts instead of one per part: the first part that changes
        # something makes the new record (consuming `state` on its behalf) and the next
        # staged parts' changes go into that record, which no one else has seen yet. A part
        # of the user's own gets the record and may keep it, so after one the next staged
        # part makes a new record again.
        made = False  # `state` is a record this call made and no one else has seen
        for part, changes_of in zip(self.parts, self._staged, strict=True):
            if changes_of is None:
                state = part(state, batch)
                made = False
                continue
            if not made and state._consumption.consumed:
                state.check_fresh()  # raises StaleStateError, naming the consumer
            changes = changes_of(state, batch)
            if changes is None:  # the part passes the record through
                continue
            if made:
                state._update_(changes)
            else:
                state = state._advance(part, changes)
                made = True
        return state

    def __repr__(self) -> str:
        return f"chain({', '.join(repr(p) for p in self.parts)})"


@dataclass(frozen=True, slots=True)
class _Every:
    n: int
    transform: Transform

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"every(n={self.n!r}, ...): n must be an int >= 1.")
        _check_transform(f"every({self.n}, transform=...)", self.transform)

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        at_boundary = state.micro_step == 0 or state.window.closed
        if at_boundary and state.step % self.n == 0:
            return self.transform(state, batch)
        return state

    def __repr__(self) -> str:
        return f"every({self.n}, {self.transform!r})"


@dataclass(frozen=True, slots=True)
class _When:
    predicate: Callable[[TrainState], bool]
    transform: Transform

    def __post_init__(self) -> None:
        if not callable(self.predicate):
            raise TypeError(
                f"when(predicate={self.predicate!r}, ...): expected a callable "
                "`state -> bool`, e.g. `lambda s: s.step >= 100`."
            )
        _check_transform("when(..., transform=...)", self.transform)

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return self.transform(state, batch) if self.predicate(state) else state

    def __repr__(self) -> str:
        name = getattr(self.predicate, "__qualname__", repr(self.predicate))
        return f"when({name}, {self.transform!r})"


def identity() -> Transform:
    """The transform that returns its state unchanged (and does not consume it)."""
    return _Identity()


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right into one: `chain(a, b)(s, x) == b(a(s, x), x)`.

    Nested chains are flattened and identities dropped, so `chain` is associative,
    `chain()` is `identity()` and `chain(t)` is `t`.

    Raises:
        TypeError: an argument is not callable.

    Example:
        >>> from loopkit import accumulate, optimizer_step
        >>> chain(accumulate(2), chain(identity(), optimizer_step()))
        chain(accumulate(2), optimizer_step())
    """
    parts: list[Transform] = []
    for index, transform in enumerate(transforms):
        _check_transform(f"chain(argument {index})", transform)
        if isinstance(transform, _Chain):
            parts.extend(transform.parts)
        elif not isinstance(transform, _Identity):
            parts.append(transform)
    if not parts:
        return _Identity()
    if len(parts) == 1:
        return parts[0]
    return _Chain(tuple(parts))


def every(n: int, transform: Transform) -> Transform:
    """Apply `transform` at window boundaries where `state.step % n == 0`.

    A boundary is a record with no open micro-batches (`micro_step == 0`, e.g. right after
    `optimizer_step`) or a closed window. Elsewhere the state passes through.

    Raises:
        ValueError: n is not an int >= 1.
        TypeError: transform is not callable.
    """
    return _Every(n, transform)


def when(predicate: Callable[[TrainState], bool], transform: Transform) -> Transform:
    """Apply `transform` when `predicate(state)` is true; otherwise pass the state through.

    Raises:
        TypeError: predicate or transform is not callable.
    """
    return _When(predicate, transform)


def parts_of(transform: Transform) -> tuple[Transform, ...]:
    """The parts a transform runs, in order: a chain's parts, or the transform itself.

    Conditionals (`every`, `when`) count as one part each; `identity()` has no parts.

    Example:
        >>> from loopkit import accumulate, optimizer_step
        >>> parts_of(chain(accumulate(2), optimizer_step()))
        (accumulate(2), optimizer_step())
    """
    if isinstance(transform, _Chain):
        return transform.parts
    if isinstance(transform, _Identity):
        return ()
    return (transform,)


def inner_of(transform: Transform) -> Transform | None:
    """The transform a conditional (`every`, `when`) wraps; None for anything else."""
    if isinstance(transform, (_Every, _When)):
        return transform.transform
    return None


__all__ = [
    "chain",
    "inner_of",
    "parts_of",
    "every",
    "identity",
    "when",
]
