"""The eager step's cheaper bookkeeping (issue 17) does what the slower code did.

Each shortcut here must give the same result as the general path it skips: the CPU batch
fast path in `SingleDevice.to_device`, `new_window` against `Window(...)`, the gradient
accumulators that `SingleDevice.setup` keeps for the run, the device-kind cache in
`seed_devices_`, and `forward(loss_fn, seed_rng=False)` (the explicit opt-out of per-micro-step
seeding, which must touch no generator while seeding stays the default).
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from helpers import classification_loss, mlp

import loopkit as lk
from loopkit._batch import move
from loopkit._rng import seed_devices_
from loopkit.state import Window, new_window


def make_state(dropout: float = 0.0) -> lk.TrainState:
    return lk.TrainState.create(
        mlp(dropout=dropout),
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        strategy=lk.SingleDevice("cpu"),
        seed=3,
    )


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(5, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=gen),
        )
        for _ in range(n)
    ]


def test_the_cpu_tuple_fast_path_gives_what_move_gives():
    strategy = lk.SingleDevice("cpu")
    cpu = torch.device("cpu")
    x, y = torch.ones(2, 3), torch.zeros(2)
    param = torch.nn.Parameter(x)  # not an exact Tensor: the general path
    cases: list[Any] = [(x, y), (x,), (x, 3), (x, [y]), [x, y], {"x": x}, (x, "s"), (), (param, y)]
    for batch in cases:
        fast, general = strategy.to_device(batch), move(batch, cpu, False)
        assert type(fast) is type(general)
        assert len(fast) == len(general)
        for a, b in zip(fast, general, strict=True):
            assert a is b or a == b


def test_new_window_is_the_window_the_class_makes():
    loss, found = torch.tensor(2.0), torch.tensor(0.0)
    for args in [(loss, 3, 3, 1), (loss, 3, 3, 2, True, found), (0.0, 0, None, None)]:
        fast, made = new_window(*args), Window(*args)
        assert type(fast) is Window
        for name in ("loss", "count", "ref_count", "size", "closed", "found_inf"):
            assert getattr(fast, name) is getattr(made, name), name
        with pytest.raises(AttributeError):
            fast.size = 4  # type: ignore[misc]  # still frozen


def test_the_step_reuses_the_gradient_accumulators_and_keeps_the_result():
    state = make_state()
    kept = state.strategy._grad_accumulators  # type: ignore[attr-defined]
    assert len(kept) == len(state.params)
    reference = make_state()
    # What the step did before: nothing held the accumulators between steps.
    reference.strategy._grad_accumulators = ()  # type: ignore[attr-defined]
    step = lk.chain(lk.forward(classification_loss), lk.accumulate(1), lk.optimizer_step())
    for batch in batches(3):
        state = step(state, batch)
        reference = step(reference, batch)
    nodes = [torch.autograd.graph.get_gradient_edge(p).node for p in state.params]
    assert all(a is b for a, b in zip(nodes, kept, strict=True))  # autograd used the kept ones
    for p, q in zip(state.params, reference.params, strict=True):
        assert torch.equal(p, q)
    copy = pickle.loads(pickle.dumps(state.strategy))  # the nodes stay behind
    assert repr(copy) == repr(state.strategy)


def test_seed_devices_gives_the_seeded_stream_on_each_call():
    cpu = torch.device("cpu")
    seed_devices_(1234, cpu)
    first = torch.rand(3)
    torch.rand(5)
    seed_devices_(1234, cpu)  # the second call reads the cached device kind
    assert torch.equal(torch.rand(3), first)


def test_seed_rng_false_touches_no_generator_and_the_default_still_seeds():
    step = lk.chain(
        lk.forward(classification_loss, seed_rng=False), lk.accumulate(1), lk.optimizer_step()
    )
    assert repr(step).startswith("chain(forward(classification_loss, seed_rng=False)")
    seeded = lk.chain(lk.forward(classification_loss), lk.accumulate(1), lk.optimizer_step())
    results = []
    for transform in (step, seeded):
        state = make_state()
        torch.manual_seed(99)
        expected = torch.rand(4)
        torch.manual_seed(99)
        for batch in batches(2):
            state = transform(state, batch)
        results.append((torch.equal(torch.rand(4), expected), [p.clone() for p in state.params]))
    (untouched, weights), (seeded_untouched, seeded_weights) = results
    assert untouched and not seeded_untouched
    assert all(torch.equal(p, q) for p, q in zip(weights, seeded_weights, strict=True))


def test_seed_rng_is_checked_when_built():
    with pytest.raises(TypeError, match="forward\\(seed_rng=1\\)"):
        lk.forward(classification_loss, seed_rng=1)  # type: ignore[arg-type]
