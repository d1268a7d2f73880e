"""TrainState: immutability, replace, consumption (StaleStateError), snapshot, create."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    assert_params_close,
    classification_loss,
    grad,
    mlp,
    reference_train,
    window_cross_entropy,
)
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk


def make_batch(seed: int = 0, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def make_state(model: torch.nn.Module | None = None, optimizer=None, **kwargs) -> lk.TrainState:
    return lk.TrainState.create(
        mlp() if model is None else model,
        optimizer=optimizer or (lambda params: torch.optim.SGD(params, lr=0.1)),
        strategy=lk.SingleDevice("cpu"),
        **kwargs,
    )


def clone_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_values(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


FORWARD = lk.forward(classification_loss)


# --- immutability and replace -------------------------------------------------------------


@pytest.mark.parametrize("name", ["step", "micro_step", "model", "metrics", "window", "seed"])
def test_fields_cannot_be_assigned(name: str) -> None:
    state = make_state()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(state, name, getattr(state, name))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.window.closed = True  # type: ignore[misc]  # the window record is frozen too


def test_replace_returns_a_new_record_and_makes_the_old_one_stale() -> None:
    old = make_state()
    new = old.replace(epoch=3, samples_seen=7)
    assert new is not old
    assert (new.epoch, new.samples_seen, new.step) == (3, 7, 0)
    assert (old.epoch, old.samples_seen) == (0, 0)  # the old record's fields did not change
    assert new.model is old.model and new.optimizer is old.optimizer  # donated, not copied
    with pytest.raises(lk.StaleStateError):
        old.replace(epoch=4)
    with pytest.raises(lk.StaleStateError):
        FORWARD(old, make_batch())
    with pytest.raises(lk.StaleStateError):
        old.snapshot()
    newer = new.replace(epoch=5)  # the returned record is the live one
    assert newer.epoch == 5


def test_replace_with_an_unknown_field_raises_and_does_not_consume() -> None:
    state = make_state()
    with pytest.raises(TypeError, match=r"replace\(stepp=\.\.\.\): not a field") as info:
        state.replace(stepp=1)
    assert "step" in str(info.value)  # lists the real fields
    state.check_fresh()  # still usable
    assert state.replace(step=2).step == 2


def test_stale_message_names_the_transform_that_consumed_this_record() -> None:
    batch = make_batch()
    s0 = make_state()
    s1 = FORWARD(s0, batch)
    s2 = lk.accumulate(1)(s1, batch)
    s3 = lk.optimizer_step()(s2, batch)
    s4 = s3.replace(epoch=1)
    expected = [
        (s0, "forward(classification_loss)", 0, 0),
        (s1, "accumulate(1)", 0, 1),
        (s2, "optimizer_step()", 0, 1),
        (s3, "replace()", 1, 0),
    ]
    for record, consumer, step, micro_step in expected:
        with pytest.raises(lk.StaleStateError) as info:
            record.check_fresh()
        message = str(info.value)
        assert f"by {consumer} " in message, message
        assert f"(step={step}, micro_step={micro_step})" in message, message
        assert f"at step {step}" in message, message
    s4.check_fresh()


# Each op: apply one micro-batch through the standard chain, one part at a time, or replace().
@given(
    k=st.integers(1, 3),
    with_clip=st.booleans(),
    ops=st.lists(st.sampled_from(["micro", "replace"]), min_size=1, max_size=7),
    data=st.data(),
)
def test_reusing_any_consumed_record_raises_and_names_the_consumer(k, with_clip, ops, data) -> None:
    parts = [FORWARD, lk.accumulate(k), *([lk.clip(1.0)] if with_clip else []), lk.optimizer_step()]
    state = make_state()
    consumed: list[tuple[lk.TrainState, str]] = []  # (record, what consumed it)
    for index, op in enumerate(ops):
        batch = make_batch(index)
        if op == "replace":
            new = state.replace(epoch=state.epoch + 1)
            consumed.append((state, "replace()"))
            state = new
            continue
        for part in parts:
            new = part(state, batch)
            if new is not state:  # pass-through transforms (open window) do not consume
                consumed.append((state, repr(part)))
            state = new
    assert consumed
    record, consumer = data.draw(st.sampled_from(consumed), label="stale record")
    reuse = data.draw(
        st.sampled_from(
            [
                *(lambda s, p=p: p(s, make_batch(99)) for p in parts),
                lambda s: s.replace(epoch=0),
                lambda s: s.snapshot(),
            ]
        ),
        label="reuse",
    )
    before = clone_params(state.model)
    with pytest.raises(lk.StaleStateError) as info:
        reuse(record)
    message = str(info.value)
    assert f"by {consumer} " in message, message
    assert f"step={record.step}" in message and f"at step {record.step}" in message, message
    assert "returned" in message and "state.snapshot()" in message, message
    assert_same_values(clone_params(state.model), before)  # nothing ran
    state.check_fresh()  # the live record is unaffected


# --- snapshot -----------------------------------------------------------------------------

STEP = lk.chain(FORWARD, lk.accumulate(1), lk.optimizer_step())


def test_snapshot_copies_model_and_optimizer_state() -> None:
    state = make_state(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    state = STEP(state, make_batch(0))
    snap = state.snapshot()
    state.check_fresh()  # taking a snapshot does not consume
    params_before = clone_params(snap.model)
    opt_before = [{k: v.clone() for k, v in snap.optimizer.state[p].items()} for p in snap.params]
    assert all(a is not b for a, b in zip(snap.params, state.params, strict=True))
    # the copied optimizer drives the copied model's parameters
    assert snap.params == tuple(snap.model.parameters())
    assert [p for g in snap.optimizer.param_groups for p in g["params"]] == list(snap.params)

    for i in range(2):
        state = STEP(state, make_batch(i + 1))
    assert_same_values(clone_params(snap.model), params_before)
    for p, saved in zip(snap.params, opt_before, strict=True):
        for key, value in saved.items():
            torch.testing.assert_close(snap.optimizer.state[p][key], value, rtol=0, atol=0)
    assert snap.step == 1 and state.step == 3

    # separate lineages: stepping the snapshot never makes the original stale, and back
    snap = STEP(snap, make_batch(1))
    state.check_fresh()
    state = STEP(state, make_batch(3))
    snap.check_fresh()


def test_snapshot_mid_window_keeps_gradients_and_both_branches_finish_alike() -> None:
    step = lk.chain(FORWARD, lk.accumulate(2), lk.optimizer_step())
    b1, b2 = make_batch(1), make_batch(2)
    state = step(make_state(), b1)
    assert state.micro_step == 1
    snap = state.snapshot()
    grads = {n: grad(p).clone() for n, p in snap.model.named_parameters()}
    for (name, p), (_, q) in zip(
        state.model.named_parameters(), snap.model.named_parameters(), strict=True
    ):
        assert q.grad is not None and q.grad.data_ptr() != grad(p).data_ptr(), name
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)

    state = step(state, b2)  # closes and applies the window on the original only
    assert state.step == 1 and snap.step == 0 and snap.micro_step == 1
    assert_same_values({n: grad(p) for n, p in snap.model.named_parameters()}, grads)

    snap = step(snap, b2)
    assert_params_close(snap.model, state.model, rtol=0, atol=0)
    reference = reference_train(
        mlp(),
        [[b1, b2]],
        window_cross_entropy,
        make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert_params_close(snap.model, reference)


def inf_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, _ = batch
    return model(x).float().pow(2).mean() * float("inf")


def test_snapshot_copies_the_fp16_loss_scale() -> None:
    init_scale = 2.0**10
    state = make_state(
        mlp(dtype=torch.float32), precision=lk.Precision("fp16", init_scale=init_scale)
    )
    snap = state.snapshot()
    assert state.loss_scale is not None and state.growth_tracker is not None
    assert snap.loss_scale is not None and snap.loss_scale.data_ptr() != state.loss_scale.data_ptr()
    assert snap.growth_tracker is not None
    assert snap.growth_tracker.data_ptr() != state.growth_tracker.data_ptr()
    overflow = lk.chain(lk.forward(inf_loss), lk.accumulate(1), lk.optimizer_step())
    x, y = make_batch()
    state = overflow(state, (x.float(), y))
    assert state.skipped_steps == 1
    assert state.loss_scale is not None
    assert float(state.loss_scale) == init_scale * 0.5  # the original backed off ...
    assert float(snap.loss_scale) == init_scale  # ... the snapshot did not
    assert int(snap.growth_tracker) == 0


# --- create ---------------------------------------------------------------------------------


def test_create_with_a_built_optimizer() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    state = make_state(model, opt)
    assert state.optimizer is opt and state.model is model
    assert state.params == tuple(model.parameters())
    assert state.base_lrs == (0.25,)
    assert (state.step, state.micro_step, state.epoch, state.samples_seen) == (0, 0, 0, 0)
    assert state.loss_scale is None and state.metrics == {}


def test_create_with_a_factory_gets_the_trainable_parameters() -> None:
    model = mlp()
    seen: list[list[torch.nn.Parameter]] = []

    def factory(params):
        params = list(params)
        seen.append(params)
        return torch.optim.AdamW(lk.param_groups(params, weight_decay=0.1), lr=3e-3)

    state = make_state(model, factory)
    assert len(seen) == 1
    assert seen[0] == list(model.parameters())
    assert set(map(id, state.params)) == set(map(id, model.parameters()))
    assert state.base_lrs == (3e-3, 3e-3)  # one per group (decay, no decay)


@pytest.mark.parametrize("how", ["factory", "built"])
def test_frozen_parameters_are_excluded_and_never_change(how: str) -> None:
    model = mlp()
    names = lk.freeze(model, "0.")
    assert names == ["0.weight", "0.bias"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        (lambda params: torch.optim.SGD(params, lr=0.1))
        if how == "factory"
        else torch.optim.SGD(trainable, lr=0.1)
    )
    state = make_state(model, optimizer)
    frozen = dict(model.named_parameters())
    assert not {id(frozen[n]) for n in names} & set(map(id, state.params))
    assert set(map(id, state.params)) == set(map(id, trainable))
    before = clone_params(model)
    state = STEP(state, make_batch())
    after = clone_params(state.model)
    for name in before:
        if name in names:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
            assert frozen[name].grad is None
        else:
            assert not torch.equal(after[name], before[name]), name


def test_create_with_an_lr_scheduler_steps_it_once_per_optimizer_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    state = make_state(model, opt, schedule=scheduler)
    assert state.schedule is scheduler
    step = lk.chain(FORWARD, lk.accumulate(2), lk.optimizer_step())
    windows = [[make_batch(2 * w), make_batch(2 * w + 1)] for w in range(3)]
    lrs = []
    for window in windows:
        for batch in window:
            state = step(state, batch)
        lrs.append(state.metrics["train/lr"])
        assert scheduler.last_epoch == state.step  # once per optimizer step, not per micro-batch
    assert lrs == pytest.approx([0.1, 0.05, 0.025], rel=1e-12)
    reference = reference_train(
        mlp(),
        windows,
        window_cross_entropy,
        make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_factor=lambda s: 0.5**s,
    )
    assert_params_close(state.model, reference)
