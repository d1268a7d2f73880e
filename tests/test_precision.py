"""Precision policies: validation, autocast dtypes, fp16 loss-scale bookkeeping."""

from __future__ import annotations

import pytest
import torch
from helpers import classification_loss, loss_scale, mlp

import loopkit as lk
from loopkit.precision import PrecisionName

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "dtype", "scales_loss"),
    [("fp32", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)],
)
def test_names(name: PrecisionName, dtype: torch.dtype | None, scales_loss: bool) -> None:
    precision = lk.Precision(name)
    assert precision.dtype == dtype
    assert precision.scales_loss is scales_loss
    assert repr(precision) == f"Precision({name!r})"
    assert precision == lk.Precision(name)
    assert lk.Precision() == lk.Precision("fp32")


BAD = [
    ({"name": "fp8"}, "name='fp8'"),
    ({"name": "float16"}, "name='float16'"),
    ({"init_scale": 0.0}, "init_scale=0.0"),
    ({"init_scale": -1.0}, "init_scale=-1.0"),
    ({"init_scale": float("inf")}, "init_scale=inf"),
    ({"growth_factor": 0.5}, "growth_factor=0.5"),
    ({"growth_factor": float("nan")}, "growth_factor=nan"),
    ({"backoff_factor": 0.0}, "backoff_factor=0.0"),
    ({"backoff_factor": 1.0}, "backoff_factor=1.0"),
    ({"growth_interval": 0}, "growth_interval=0"),
    ({"growth_interval": 1.5}, "growth_interval=1.5"),
]


@pytest.mark.parametrize(("kwargs", "part"), BAD, ids=[b[1] for b in BAD])
def test_bad_values_raise_value_error_naming_them(kwargs: dict, part: str) -> None:
    with pytest.raises(ValueError) as info:
        lk.Precision(**kwargs)
    assert f"Precision({part})" in str(info.value)


def test_cpu_bf16_autocast_runs_matmuls_in_bf16() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with lk.Precision("bf16").autocast(CPU):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside the context
    with lk.Precision("fp32").autocast(CPU):
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize(("name", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_forward_runs_the_loss_fn_under_the_state_precision(
    name: PrecisionName, dtype: torch.dtype
) -> None:
    seen: list[torch.dtype] = []

    def loss_fn(model: torch.nn.Module, batch) -> lk.Loss:
        logits = model(batch[0])
        seen.append(logits.dtype)
        return lk.cross_entropy(logits.float(), batch[1])

    state = lk.TrainState.create(
        mlp(dtype=torch.float32),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        precision=name,
        strategy=lk.SingleDevice("cpu"),
    )
    assert state.precision == lk.Precision(name)
    state = lk.forward(loss_fn)(state, (torch.randn(3, 4), torch.tensor([0, 1, 2])))
    assert seen == [dtype]
    assert all(
        p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        for p in state.params
    )


def test_only_fp16_carries_a_loss_scale() -> None:
    def create(precision):
        return lk.TrainState.create(
            mlp(dtype=torch.float32),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            precision=precision,
            strategy=lk.SingleDevice("cpu"),
        )

    assert create("fp32").loss_scale is None and create("bf16").loss_scale is None
    state = create(lk.Precision("fp16", init_scale=512.0))
    assert state.loss_scale.dtype == torch.float32 and float(state.loss_scale) == 512.0
    assert int(state.growth_tracker) == 0


def test_fp16_scale_grows_after_clean_windows_and_backs_off_on_overflow() -> None:
    precision = lk.Precision(
        "fp16", init_scale=256.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=2
    )
    state = lk.TrainState.create(
        mlp(dtype=torch.float32),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        precision=precision,
        strategy=lk.SingleDevice("cpu"),
    )
    batch = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
    clean = lk.chain(lk.forward(classification_loss), lk.accumulate(1), lk.optimizer_step())
    scales = []
    for _ in range(2):
        before = [p.detach().clone() for p in state.params]
        state = clean(state, batch)
        assert any(
            not torch.equal(p, q) for p, q in zip(state.params, before, strict=True)
        )  # applied
        scales.append(loss_scale(state))
    assert scales == [256.0, 256.0 * 4.0]  # grows once growth_interval clean windows passed

    def overflow(model, batch):
        return classification_loss(model, batch).sum * float("inf")

    before = [p.detach().clone() for p in state.params]
    state = lk.chain(lk.forward(overflow), lk.accumulate(1), lk.optimizer_step())(state, batch)
    assert all(torch.equal(p, q) for p, q in zip(state.params, before, strict=True))  # skipped
    assert (state.step, state.skipped_steps) == (3, 1)
    assert loss_scale(state) == 256.0 * 4.0 * 0.25
    assert all(p.grad is None for p in state.params)
