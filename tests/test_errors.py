"""Every documented bad input: its error type, and a message naming the argument and value.

Errors must come before any work: a failed transform leaves the parameters, the gradients
and the record itself (still fresh) as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import classification_loss, mlp

import loopkit as lk


def make_batch(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def create(model: torch.nn.Module | None = None, **kwargs: Any) -> lk.TrainState:
    kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, lr=0.1))
    kwargs.setdefault("strategy", lk.SingleDevice("cpu"))
    return lk.TrainState.create(mlp() if model is None else model, **kwargs)


def raises(kind: type[Exception], call: Callable[[], object], *parts: str) -> str:
    """Run `call`, expect exactly `kind`, and check that the message holds every part."""
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is kind, f"expected {kind.__name__}, got {info.value!r}"
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --- built transforms and combinators ------------------------------------------------------

T = lk.optimizer_step()

CONSTRUCTION_CASES = [
    ("accumulate(0)", ValueError, lambda: lk.accumulate(0), ["accumulate(k=0)", ">= 1"]),
    (
        "accumulate(1.5)",
        ValueError,
        lambda: lk.accumulate(1.5),  # type: ignore[arg-type]
        ["accumulate(k=1.5)", "int"],
    ),
    ("accumulate(True)", ValueError, lambda: lk.accumulate(True), ["accumulate(k=True)", "int"]),
    ("clip(0)", ValueError, lambda: lk.clip(0), ["clip(max_norm=0)", "positive"]),
    ("clip(-1)", ValueError, lambda: lk.clip(-1), ["clip(max_norm=-1)", "positive"]),
    ("clip(nan)", ValueError, lambda: lk.clip(float("nan")), ["clip(max_norm=nan)", "finite"]),
    (
        "clip('1')",
        TypeError,
        lambda: lk.clip("1"),  # type: ignore[arg-type]
        ["clip(max_norm='1')", "float"],
    ),
    ("clip(norm_type=0)", ValueError, lambda: lk.clip(1.0, 0.0), ["norm_type=0.0"]),
    (
        "forward(None)",
        TypeError,
        lambda: lk.forward(loss_fn=None),  # type: ignore[arg-type]
        ["forward(loss_fn=None)", "callable"],
    ),
    (
        "chain(1)",
        TypeError,
        lambda: lk.chain(T, 1),  # type: ignore[arg-type]
        ["chain(argument 1)", "1 is not a transform"],
    ),
    ("every(0)", ValueError, lambda: lk.every(0, T), ["every(n=0", ">= 1"]),
    (
        "every(1.0)",
        ValueError,
        lambda: lk.every(1.0, T),  # type: ignore[arg-type]
        ["every(n=1.0"],
    ),
    (
        "every(2, 'x')",
        TypeError,
        lambda: lk.every(2, "x"),  # type: ignore[arg-type]
        ["every(2, transform=...)", "'x'"],
    ),
    (
        "when(1)",
        TypeError,
        lambda: lk.when(1, T),  # type: ignore[arg-type]
        ["when(predicate=1", "callable"],
    ),
    (
        "when(f, 1)",
        TypeError,
        lambda: lk.when(bool, 1),  # type: ignore[arg-type]
        ["when(..., transform=...)", "1 is not"],
    ),
    (
        "Precision('fp8')",
        ValueError,
        lambda: lk.Precision("fp8"),  # type: ignore[arg-type]
        ["name='fp8'", "'bf16'"],
    ),
    (
        "param_groups(weight_decay=-1)",
        ValueError,
        lambda: lk.param_groups(mlp(), weight_decay=-1),
        ["param_groups(weight_decay=-1)", ">= 0"],
    ),
    (
        "freeze(nothing)",
        ValueError,
        lambda: lk.freeze(mlp(), "encoder."),
        ["freeze(which='encoder.')", "matches no parameter", "'0'"],
    ),
    (
        "SingleDevice('nonsense')",
        ValueError,
        lambda: lk.SingleDevice("nonsense"),
        ["SingleDevice(device='nonsense')", "'cpu'"],
    ),
]


@pytest.mark.parametrize(
    ("kind", "call", "parts"),
    [case[1:] for case in CONSTRUCTION_CASES],
    ids=[case[0] for case in CONSTRUCTION_CASES],
)
def test_bad_construction(
    kind: type[Exception], call: Callable[[], object], parts: list[str]
) -> None:
    raises(kind, call, *parts)


# --- TrainState.create ---------------------------------------------------------------------


def frozen_model() -> torch.nn.Module:
    model = mlp()
    lk.freeze(model, lambda name: True)
    return model


def other_model_optimizer() -> None:
    other = mlp(seed=1)
    create(optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


def scheduler_of_another_optimizer() -> None:
    model = mlp()
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = torch.optim.SGD(model.parameters(), lr=0.1)
    create(model, optimizer=mine, schedule=torch.optim.lr_scheduler.LambdaLR(theirs, lambda s: 1.0))


def nan_schedule(step: int) -> float:
    return float("nan")


def all_frozen_built() -> None:
    model = frozen_model()
    create(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


CREATE_CASES = [
    ("precision='fp8'", ValueError, lambda: create(precision="fp8"), ["'fp8'", "recision"]),
    ("precision=16", TypeError, lambda: create(precision=16), ["precision=16"]),
    (
        "all frozen, factory",
        ValueError,
        lambda: create(frozen_model()),
        ["TrainState.create(optimizer=", "frozen"],
    ),
    (
        "all frozen, built",
        ValueError,
        all_frozen_built,
        ["TrainState.create(optimizer=SGD)", "frozen"],
    ),
    (
        "foreign optimizer",
        ValueError,
        other_model_optimizer,
        ["TrainState.create(optimizer=SGD)", "not parameters of the model"],
    ),
    (
        "optimizer=42",
        TypeError,
        lambda: create(optimizer=42),
        ["TrainState.create(optimizer=42)", "factory"],
    ),
    ("seed='0'", TypeError, lambda: create(seed="0"), ["TrainState.create(seed='0')", "int"]),
    ("seed=True", TypeError, lambda: create(seed=True), ["TrainState.create(seed=True)"]),
    (
        "model=None",
        TypeError,
        lambda: lk.TrainState.create(None, optimizer=T),  # type: ignore[arg-type]
        ["TrainState.create(model=NoneType)"],
    ),
    (
        "strategy=object()",
        TypeError,
        lambda: create(strategy=object()),
        ["strategy=<object object", "SingleDevice()"],
    ),
    (
        "schedule NaN",
        ValueError,
        lambda: create(schedule=nan_schedule),
        ["schedule=<function nan_schedule", "returned nan"],
    ),
    ("schedule=3", TypeError, lambda: create(schedule=3), ["schedule=3"]),
    (
        "scheduler of another optimizer",
        ValueError,
        scheduler_of_another_optimizer,
        ["schedule=LambdaLR", "another optimizer"],
    ),
]


@pytest.mark.parametrize(
    ("kind", "call", "parts"),
    [case[1:] for case in CREATE_CASES],
    ids=[case[0] for case in CREATE_CASES],
)
def test_bad_create_arguments(
    kind: type[Exception], call: Callable[[], object], parts: list[str]
) -> None:
    raises(kind, call, *parts)


# --- bad loss functions and batches: raised in forward, before backward -------------------


def non_scalar_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def nan_count_loss(model: torch.nn.Module, batch: Any) -> lk.Loss:
    loss = classification_loss(model, batch)
    return lk.Loss(loss.sum, torch.tensor(float("nan")))


def zero_tensor_count_loss(model: torch.nn.Module, batch: Any) -> lk.Loss:
    return lk.Loss(classification_loss(model, batch).sum, torch.tensor(0))


def zero_int_count_loss(model: torch.nn.Module, batch: Any) -> lk.Loss:
    return lk.Loss(classification_loss(model, batch).sum, 0)


def string_loss(model: torch.nn.Module, batch: Any) -> str:
    model(batch[0])
    return "loss"


x, y = make_batch()
FORWARD_CASES = [
    (
        "non-scalar loss",
        ValueError,
        non_scalar_loss,
        (x, y),
        ["forward(non_scalar_loss)", "shape (3,)", "scalar"],
    ),
    (
        "NaN count",
        ValueError,
        nan_count_loss,
        (x, y),
        ["forward(nan_count_loss)", "Loss.count=nan", "> 0"],
    ),
    (
        "zero tensor count",
        ValueError,
        zero_tensor_count_loss,
        (x, y),
        ["forward(zero_tensor_count_loss)", "Loss.count=0", "> 0"],
    ),
    (
        "zero int count",
        ValueError,
        zero_int_count_loss,
        (x, y),
        ["forward(zero_int_count_loss)", "Loss.count=0", "> 0"],
    ),
    ("string", TypeError, string_loss, (x, y), ["forward(string_loss)", "returned str"]),
    (
        "empty batch",
        ValueError,
        classification_loss,
        (x[:0], y[:0]),
        ["forward(classification_loss)", "empty batch", "(0, 4)"],
    ),
    (
        "no tensor",
        ValueError,
        classification_loss,
        {"x": [1.0, 2.0]},
        ["forward(classification_loss)", "(dict) has no tensor"],
    ),
    (
        "0-d tensor",
        ValueError,
        classification_loss,
        torch.tensor(1.0),
        ["forward(classification_loss)", "(Tensor) has no tensor with a batch"],
    ),
]


def snapshot_values(state: lk.TrainState) -> list[torch.Tensor | None]:
    return [p.detach().clone() for p in state.params] + [
        None if p.grad is None else p.grad.clone() for p in state.params
    ]


def assert_unchanged(state: lk.TrainState, before: list[torch.Tensor | None]) -> None:
    after = snapshot_values(state)
    for a, b in zip(after, before, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    state.check_fresh()  # a failed transform does not consume its record


@pytest.mark.parametrize(
    ("kind", "loss_fn", "batch", "parts"),
    [case[1:] for case in FORWARD_CASES],
    ids=[case[0] for case in FORWARD_CASES],
)
def test_bad_loss_or_batch_fails_before_backward(
    kind: type[Exception], loss_fn: Callable[..., Any], batch: Any, parts: list[str]
) -> None:
    state = create()
    before = snapshot_values(state)
    raises(kind, lambda: lk.forward(loss_fn)(state, batch), *parts)
    assert_unchanged(state, before)
    assert all(p.grad is None for p in state.params)


def test_forward_on_a_closed_window_without_optimizer_step() -> None:
    state = create()
    state = lk.chain(lk.forward(classification_loss), lk.accumulate(1))(state, make_batch())
    assert state.window.closed
    before = snapshot_values(state)
    raises(
        RuntimeError,
        lambda: lk.forward(classification_loss)(state, make_batch()),
        "forward(classification_loss)",
        "closed at step 0",
        "optimizer_step()",
    )
    assert_unchanged(state, before)


def test_schedule_turning_nan_later_fails_before_the_update() -> None:
    def nan_from_step_1(step: int) -> float:
        return 1.0 if step == 0 else float("nan")

    step = lk.chain(lk.forward(classification_loss), lk.accumulate(1), lk.optimizer_step())
    state = step(create(schedule=nan_from_step_1), make_batch())
    state = lk.chain(lk.forward(classification_loss), lk.accumulate(1))(state, make_batch())
    before = snapshot_values(state)
    raises(
        ValueError,
        lambda: lk.optimizer_step()(state, make_batch()),
        "optimizer_step()",
        "nan_from_step_1",
        "returned nan",
        "step 1",
    )
    assert_unchanged(state, before)
