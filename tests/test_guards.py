"""zero_nonfinite() and the non-finite watch's agreement over ranks, on one process.

The guard: a closed window whose gradients hold a NaN or an inf anywhere (drawn: which
tensor, which element, which value; with and without clip's norm) has all its gradients
zeroed and the flag set, so the update leaves the weights finite; a finite window's
gradients are left bit for bit. The watch: with a stand-in second rank (a strategy whose
`reduce_count` adds that rank's column), every rank's check names the same step and ranks.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import mlp
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk
from loopkit._nonfinite_watch import NonfiniteWatch
from loopkit.guards import NONFINITE_METRIC, zero_nonfinite

BAD_VALUES = [math.nan, math.inf, -math.inf]


class Params(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.used = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in shapes]
        )


def closed_with_grads(grads: list[torch.Tensor], *, clip: float | None) -> lk.TrainState:
    """A record whose closed window holds exactly `grads` (set directly, as a backward would)."""
    state = lk.TrainState.create(
        Params([tuple(g.shape) for g in grads]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.1),
        strategy=lk.SingleDevice("cpu"),
    )
    for p, g in zip(state.params, grads, strict=True):
        p.grad = g.clone()
    state = state.replace(
        window=lk.Window(loss=torch.zeros(()), count=1, ref_count=1, size=1, closed=True),
        metrics={"train/loss": torch.zeros((), dtype=torch.float64)},
    )
    return lk.clip(clip)(state, None) if clip is not None else state


def grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


@st.composite
def window_grads(draw: st.DrawFn) -> tuple[list[torch.Tensor], bool]:
    """1-4 gradient tensors; sometimes one element of one of them NaN, inf or -inf."""
    shapes = draw(
        st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=2), min_size=1, max_size=4)
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    grads = [torch.randn(tuple(s), generator=gen, dtype=torch.float64) for s in shapes]
    bad = draw(st.booleans())
    if bad:
        which = draw(st.integers(0, len(grads) - 1))
        index = draw(st.integers(0, grads[which].numel() - 1))
        grads[which].view(-1)[index] = draw(st.sampled_from(BAD_VALUES))
    return grads, bad


@given(drawn=window_grads(), clip=st.sampled_from([None, 1.0]))
def test_zero_nonfinite_zeroes_bad_windows_and_leaves_finite_ones(drawn, clip) -> None:
    grads, bad = drawn
    state = closed_with_grads(grads, clip=clip)
    before = [grad(p).clone() for p in state.params]
    state = zero_nonfinite()(state, None)
    assert bool(state.metrics[NONFINITE_METRIC]) is bad
    for p, g in zip(state.params, before, strict=True):
        if bad:
            assert torch.equal(grad(p), torch.zeros_like(g))
        else:
            assert torch.equal(grad(p), g)  # bit for bit: clip's result, or the gradients
    state = lk.optimizer_step()(state, None)
    assert all(bool(torch.isfinite(p).all()) for p in state.params)


def test_zero_nonfinite_reads_clips_norm_when_there_is_one() -> None:
    # A norm recorded as NaN (by clip, from any rank's or stage's shard) zeroes finite ones.
    state = closed_with_grads([torch.ones(3, dtype=torch.float64)], clip=None)
    state = state.replace(metrics={**state.metrics, "train/grad_norm": torch.tensor(math.nan)})
    state = zero_nonfinite()(state, None)
    assert bool(state.metrics[NONFINITE_METRIC])
    assert torch.equal(grad(state.params[0]), torch.zeros(3, dtype=torch.float64))


def test_zero_nonfinite_passes_open_and_fp16_skipped_windows_through() -> None:
    nan = [torch.full((2,), math.nan, dtype=torch.float64)]
    opened = closed_with_grads(nan, clip=None).replace(window=lk.Window(size=2))
    assert zero_nonfinite()(opened, None) is opened  # nothing to do: the record itself
    assert bool(torch.isnan(grad(opened.params[0])).all())
    skipped = closed_with_grads(nan, clip=None).replace(
        window=lk.Window(
            loss=0.0, count=1, ref_count=1, size=1, closed=True, found_inf=torch.ones(())
        )
    )
    out = zero_nonfinite()(skipped, None)
    assert NONFINITE_METRIC not in out.metrics  # fp16's overflow skip decides instead
    assert bool(torch.isnan(grad(out.params[0])).all())


def test_zero_nonfinite_is_a_comparable_transform() -> None:
    assert repr(zero_nonfinite()) == "zero_nonfinite()"
    assert zero_nonfinite() == zero_nonfinite()
    assert "zero_nonfinite()" in repr(lk.chain(lk.accumulate(1), zero_nonfinite()))


def nan_grads_finite_loss(at_step: int):
    """loss_fn whose gradients are NaN at call `at_step` while its value stays finite."""
    calls = 0

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        if calls == at_step:  # sqrt(|0|) = 0, but its backward is 0 * inf = NaN
            loss = loss + (next(model.parameters()) * 0).abs().sqrt().sum()
        calls += 1
        return loss

    return loss_fn


def test_fit_raises_on_guarded_nonfinite_gradients_and_keeps_weights_finite() -> None:
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    model = mlp(seed=1)
    loss_fn = nan_grads_finite_loss(3)
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), zero_nonfinite(), lk.optimizer_step())
    with pytest.raises(FloatingPointError, match=r"gradients became NaN or infinite at step 3 "):
        lk.fit(model, data, step=step, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
               batch_size=8, max_steps=6, progress=False)  # fmt: skip
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class StandIn:
    """Rank `rank` of 2: `reduce_count` adds the other rank's column of the watch's table."""

    def __init__(self, rank: int, other: tuple[int, int]) -> None:
        self.device, self.rank, self.world_size = torch.device("cpu"), rank, 2
        self.other = other  # the other rank's (first bad loss step, first guarded step)

    def reduce_count(self, table: torch.Tensor) -> torch.Tensor:
        other = torch.zeros_like(table)
        other[:, 1 - self.rank] = torch.tensor(self.other, dtype=table.dtype) + 1
        return table + other


def flags_of(losses: list[float], grads_bad_from: int) -> list[bool]:
    """The guard's flag per step: the loss was not finite, or the gradients went bad."""
    return [not math.isfinite(v) or step >= grads_bad_from for step, v in enumerate(losses)]


def first(bad: list[bool]) -> int:
    return next((step for step, b in enumerate(bad) if b), -1)


def watched(rank: int, losses: list[list[float]], grads_bad_from: int) -> NonfiniteWatch:
    """Rank `rank`'s watch after its steps; the stand-in holds the other rank's records."""
    mine, theirs = losses[rank], losses[1 - rank]
    other = (first([not math.isfinite(v) for v in theirs]), first(flags_of(theirs, grads_bad_from)))
    strategy: Any = StandIn(rank, other)
    watch = NonfiniteWatch("raise", strategy, deferred=True, chunk=4, max_skips=1)
    for step, (loss, flag) in enumerate(zip(mine, flags_of(mine, grads_bad_from), strict=True)):
        metrics = {"train/loss": torch.tensor(loss), NONFINITE_METRIC: torch.tensor(flag)}
        state: Any = type("Record", (), {"metrics": metrics})
        watch.after_step(state, step, 0)
    return watch


OK, NAN, INF = 1.0, math.nan, math.inf


@pytest.mark.parametrize(
    ("losses", "grads_bad_from", "expected"),
    [
        pytest.param([[OK] * 3 + [NAN] + [OK] * 3, [OK] * 7], 99,
                     "at step 3 on rank 0 (of 2 ranks).", id="rank(0)"),
        pytest.param([[OK] * 7, [OK, OK, NAN] + [OK] * 4], 99,
                     "at step 2 on rank 1 (of 2 ranks).", id="rank(1)-after-2-chunks"),
        pytest.param([[OK, INF] + [OK] * 5, [OK, NAN] + [OK] * 5], 99,
                     "at step 1 on ranks 0, 1 (of 2 ranks).", id="both-ranks"),
        pytest.param([[OK, OK, INF] + [OK] * 4, [OK] * 6 + [NAN]], 99,
                     "at step 2 on rank 0 (of 2 ranks).", id="first-step-wins"),
        pytest.param([[OK] * 7, [OK] * 7], 5, "gradients became NaN or infinite at step 5 "
                     "while the training loss was finite on every rank.", id="gradients-only"),
    ],
)  # fmt: skip
def test_every_rank_raises_the_same_error_naming_step_and_ranks(
    losses, grads_bad_from, expected
) -> None:
    messages = []
    for rank in (0, 1):
        with pytest.raises(FloatingPointError, match=r"NaN or infinite") as raised:
            watched(rank, losses, grads_bad_from).check()
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert expected in messages[0]


def test_a_clean_check_on_every_rank_raises_nothing() -> None:
    for rank in (0, 1):
        watched(rank, [[OK] * 4, [OK] * 4], 99).check()
