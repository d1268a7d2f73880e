"""The core transforms one at a time: clip's norm contract, pass-through of open windows,
when accumulate(k) closes, and the step counters.

Gradients are set exactly through the public API: a loss `sum(p * g)` with count 1 has
gradient `g` for every parameter `p`, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyLM, clone_all, mlp, token_loss
from hypothesis import event, given
from hypothesis import strategies as st

import loopkit as lk

CPU = "cpu"


class Params(torch.nn.Module):
    """Bare parameters of given shapes; the last one may be unused (gets no gradient)."""

    def __init__(self, shapes: list[tuple[int, ...]], unused: bool) -> None:
        super().__init__()
        self.used = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
        )
        self.unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)) if unused else None


def linear_in_grads(model: torch.nn.Module, grads: list[torch.Tensor]) -> lk.Loss:
    """A loss whose gradient w.r.t. parameter i is exactly grads[i]."""
    assert isinstance(model, Params)
    total = sum((p * g).sum() for p, g in zip(model.used, grads, strict=True))
    return lk.Loss(total, 1)


@st.composite
def gradients(draw: st.DrawFn) -> list[torch.Tensor]:
    """1-4 gradient tensors of drawn shapes, random directions, norms over 8 decades;
    sometimes a zero tensor among them."""
    shapes = draw(
        st.lists(
            st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple), min_size=1, max_size=4
        )
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = 10.0 ** draw(st.floats(-4, 4))
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]
    if len(grads) > 1 and draw(st.booleans()):
        grads[draw(st.integers(0, len(grads) - 1))].zero_()
    return grads


def state_with_grads(grads: list[torch.Tensor], unused: bool, k: int = 1) -> lk.TrainState:
    """A record whose window holds exactly `grads`: closed when k == 1, open when k > 1."""
    state = lk.TrainState.create(
        Params([tuple(g.shape) for g in grads], unused),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        strategy=lk.SingleDevice(CPU),
    )
    step = lk.chain(lk.forward(linear_in_grads), lk.accumulate(k))
    state = step(state, grads)
    for p, g in zip(used_params(state), grads, strict=True):
        assert torch.equal(p.grad, g)  # the premise: the loss sets the gradients exactly
    return state


def used_params(state: lk.TrainState) -> torch.nn.ParameterList:
    """The parameters of the record's `Params` model that the loss uses."""
    assert isinstance(state.model, Params)
    return state.model.used


def global_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), ord=norm_type)


@given(
    grads=gradients(),
    max_norm=st.floats(1e-3, 1e3),
    norm_type=st.sampled_from([2.0, 1.0, math.inf]),
    unused=st.booleans(),
)
def test_clip_bounds_the_global_norm_and_records_it(grads, max_norm, norm_type, unused) -> None:
    state = state_with_grads(grads, unused)
    pre = global_norm(grads, norm_type)
    state = lk.clip(max_norm, norm_type)(state, grads)

    torch.testing.assert_close(
        torch.as_tensor(state.metrics["train/grad_norm"]), pre, rtol=1e-12, atol=0
    )
    after = [p.grad for p in used_params(state)]
    assert global_norm(after, norm_type) <= max_norm * (1 + 1e-6)
    if unused:
        assert state.model.unused.grad is None
    # torch clips by max_norm / (norm + 1e-6), clamped to 1; a hair from the edge, either way
    if (pre + 1e-6) * (1 + 1e-9) < max_norm:
        event("below max_norm")
        assert all(torch.equal(a, g) for a, g in zip(after, grads, strict=True)), (
            "unclipped grads changed"
        )
    elif pre + 1e-6 > max_norm * (1 + 1e-9):  # scaled down, direction kept: one factor < 1
        event("clipped")
        factor = global_norm(after, norm_type) / pre
        assert 0 < factor < 1
        for a, g in zip(after, grads, strict=True):
            torch.testing.assert_close(a, g * factor, rtol=1e-12, atol=0)


@given(grads=gradients(), k=st.integers(2, 4), max_norm=st.floats(1e-3, 1e3))
def test_clip_and_optimizer_step_pass_open_windows_through(grads, k, max_norm) -> None:
    state = state_with_grads(grads, unused=False, k=k)
    assert not state.window.closed
    params = clone_all(state.params)
    for transform in (lk.clip(max_norm), lk.optimizer_step()):
        out = transform(state, grads)
        assert out is state, f"{transform!r} replaced an open-window record"
        state.check_fresh()  # not consumed
        assert all(torch.equal(p.grad, g) for p, g in zip(used_params(state), grads, strict=True))
        assert all(torch.equal(p, q) for p, q in zip(state.params, params, strict=True))
        assert (state.step, state.micro_step, state.metrics) == (0, 1, {})


def xy(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def mean_ce(model: torch.nn.Module, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


@given(k=st.integers(1, 5), windows=st.integers(1, 3))
def test_accumulate_closes_after_exactly_k_forwards(k, windows) -> None:
    state = lk.TrainState.create(
        mlp(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), strategy=lk.SingleDevice(CPU)
    )
    fwd, acc, opt = lk.forward(mean_ce), lk.accumulate(k), lk.optimizer_step()
    for w in range(windows):
        for i in range(1, k + 1):
            state = acc(fwd(state, xy(2, i)), xy(2, i))
            assert state.micro_step == i
            assert state.window.closed == (i == k), f"window {w}, after {i} of {k} forwards"
            if i < k:  # a second accumulate on an open window changes nothing
                assert acc(state, None) is state
        state = opt(state, None)
        assert (state.step, state.micro_step, state.window.closed) == (w + 1, 0, False)


@st.composite
def token_runs(draw: st.DrawFn):
    """k and micro-batches of padded token sequences: a list of (lengths, width) per batch."""
    k = draw(st.integers(1, 3))
    n = draw(st.integers(1, 8))
    batches = []
    for _ in range(n):
        lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
        batches.append((lengths, max(lengths) + draw(st.integers(0, 2))))
    return k, batches


@pytest.mark.parametrize("loss", ["sum_count", "scalar_mean"], ids=lambda v: f"loss({v})")
@given(run=token_runs())
def test_step_counters_count_exactly(loss, run) -> None:
    """tokens_seen counts the loss's items: real tokens for Loss(sum, count), samples for a
    scalar mean."""
    k, specs = run
    loss_fn = token_loss
    if loss == "scalar_mean":

        def loss_fn(model, batch):
            total, count = token_loss(model, batch)
            return total / count

    state = lk.TrainState.create(
        TinyLM(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), strategy=lk.SingleDevice(CPU)
    )
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(k), lk.clip(1.0), lk.optimizer_step())
    samples = tokens = 0
    for i, (lengths, width) in enumerate(specs, start=1):
        targets = torch.full((len(lengths), width), -100)
        for row, n in enumerate(lengths):
            targets[row, :n] = row + 1
        batch = {"tokens": targets.clamp(min=0), "targets": targets}
        state = step(state, batch)
        samples += len(lengths)
        tokens += sum(lengths) if loss == "sum_count" else len(lengths)
        assert state.step == i // k
        assert state.micro_step == i % k
        assert state.samples_seen == samples
        assert int(state.tokens_seen) == tokens
        assert (state.epoch, state.skipped_steps) == (0, 0)
