"""Schedules against the HF formulas, written out here and driven through torch's LambdaLR."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loopkit import Schedule, schedules

# --- the reference formulas (transformers.optimization, written out) ------------------------


def hf_constant(warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        return 1.0

    return f


def hf_linear(warmup: int, total: int, min_rate: float = 0.0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        decay = max(0.0, float(total - step) / float(max(1, total - warmup)))
        return decay * (1 - min_rate) + min_rate  # HF has no floor for linear; this adds one

    return f


def hf_cosine(warmup: int, total: int, min_rate: float = 0.0, num_cycles: float = 0.5):
    def f(step: int) -> float:  # get_cosine_with_min_lr_schedule_with_warmup
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        return max(0, factor * (1 - min_rate) + min_rate)

    return f


def hf_hard_restarts(warmup: int, total: int, cycles: int, min_rate: float = 0.0):
    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        if progress >= 1.0:
            return min_rate
        factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
        return factor * (1 - min_rate) + min_rate

    return f


def hf_polynomial(warmup: int, total: int, lr_end_rate: float, power: float):
    lr_init = 1.0
    lr_end = lr_end_rate * lr_init

    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if step > total:
            return lr_end / lr_init
        lr_range = lr_init - lr_end
        decay_steps = total - warmup
        pct_remaining = 1 - (step - warmup) / decay_steps
        return (lr_range * pct_remaining**power + lr_end) / lr_init

    return f


def hf_inverse_sqrt(warmup: int, timescale: int | None = None):
    if timescale is None:
        timescale = warmup or 10_000

    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        shift = timescale - warmup
        return 1.0 / math.sqrt((step + shift) / timescale)

    return f


def lambda_lr_factors(lr_lambda: Callable[[int], float], n_steps: int) -> list[float]:
    """The lr factor torch's LambdaLR gives at steps 0..n_steps-1 (stepped after each step)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    factors = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(n_steps):
            factors.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
    return factors


def assert_factors(
    schedule: Callable[[int], float], reference: Callable[[int], float], n: int
) -> None:
    expected = lambda_lr_factors(reference, n)
    actual = [schedule(step) for step in range(n)]
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert isinstance(a, float), (step, a)
        assert a == pytest.approx(e, rel=1e-12, abs=1e-12), f"step {step}: {a} != {e}"


warmups = st.integers(0, 12)
spans = st.integers(0, 40)
min_factors = st.sampled_from([0.0, 0.1, 0.5]) | st.floats(0.0, 1.0)


@given(warmup=warmups)
def test_constant(warmup: int) -> None:
    assert_factors(schedules.constant(warmup), hf_constant(warmup), warmup + 10)
    assert_factors(schedules.constant(warmup_steps=warmup), hf_constant(warmup), warmup + 10)


@given(warmup=warmups, span=spans, min_factor=min_factors)
def test_linear(warmup: int, span: int, min_factor: float) -> None:
    total = warmup + span
    assert_factors(
        schedules.linear(warmup, total, min_factor), hf_linear(warmup, total, min_factor), total + 5
    )


@given(warmup=warmups, span=spans, min_factor=min_factors)
def test_cosine(warmup: int, span: int, min_factor: float) -> None:
    total = warmup + span
    schedule = schedules.cosine(warmup, total, min_factor=min_factor)
    # HF's cosine rises again after total_steps; compare up to the end, then check the floor.
    assert_factors(schedule, hf_cosine(warmup, total, min_factor), total + 1)
    # (with no decay phase, span == 0, HF gives 1.0 at step total_steps itself)
    floor_from = total if span else total + 1
    assert all(
        schedule(s) == pytest.approx(min_factor, abs=1e-12) for s in range(floor_from, total + 5)
    )


@given(warmup=warmups, span=spans, min_factor=min_factors, cycles=st.integers(1, 4))
def test_cosine_with_restarts(warmup: int, span: int, min_factor: float, cycles: int) -> None:
    total = warmup + span
    assert_factors(
        schedules.cosine_with_restarts(warmup, total, min_factor, cycles=cycles),
        hf_hard_restarts(warmup, total, cycles, min_factor),
        total + 5,
    )


@given(
    warmup=warmups,
    span=st.integers(1, 40),  # HF divides by total - warmup
    min_factor=min_factors,
    power=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
)
def test_polynomial(warmup: int, span: int, min_factor: float, power: float) -> None:
    total = warmup + span
    assert_factors(
        schedules.polynomial(warmup, total, min_factor, power=power),
        hf_polynomial(warmup, total, min_factor, power),
        total + 5,
    )


@given(warmup=warmups, span=spans, min_factor=min_factors)
def test_polynomial_of_power_one_is_linear(warmup: int, span: int, min_factor: float) -> None:
    total = warmup + span
    poly = schedules.polynomial(warmup, total, min_factor, power=1.0)
    lin = schedules.linear(warmup, total, min_factor)
    for step in range(total + 5):
        assert poly(step) == pytest.approx(lin(step), rel=1e-12, abs=1e-12), step


@given(warmup=warmups, timescale=st.none() | st.integers(1, 50))
def test_inverse_sqrt(warmup: int, timescale: int | None) -> None:
    assert_factors(
        schedules.inverse_sqrt(warmup, timescale), hf_inverse_sqrt(warmup, timescale), warmup + 30
    )


@given(warmup=warmups, span=st.integers(1, 60), min_factor=min_factors)
def test_cosine_is_monotone_after_warmup_and_ends_at_min_factor(
    warmup: int, span: int, min_factor: float
) -> None:
    total = warmup + span
    schedule = schedules.cosine(warmup, total, min_factor=min_factor)
    after = [schedule(s) for s in range(warmup, total + 10)]
    assert after[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:], strict=False))
    assert schedule(total) == pytest.approx(min_factor, abs=1e-12)
    assert min(after) >= min_factor - 1e-12


def test_warmup_rises_linearly_from_zero() -> None:
    every_schedule: list[Schedule] = [
        schedules.constant(4),
        schedules.linear(4, 10),
        schedules.cosine(4, 10, 0.2),
        schedules.cosine_with_restarts(4, 10, cycles=2),
        schedules.polynomial(4, 10, power=2.0),
        schedules.inverse_sqrt(4),
    ]
    for schedule in every_schedule:
        assert [schedule(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0], schedule


BAD = [
    ("constant(-1)", lambda: schedules.constant(-1), "warmup_steps=-1"),
    (
        "constant(1.5)",
        lambda: schedules.constant(1.5),  # type: ignore[arg-type]
        "warmup_steps=1.5",
    ),
    ("constant(True)", lambda: schedules.constant(True), "warmup_steps=True"),
    ("linear(total<warmup)", lambda: schedules.linear(10, 5), "total_steps=5"),
    ("linear(-1)", lambda: schedules.linear(-1, 5), "warmup_steps=-1"),
    ("cosine(total=-1)", lambda: schedules.cosine(0, -1), "total_steps=-1"),
    ("cosine(min_factor=-0.1)", lambda: schedules.cosine(0, 10, -0.1), "min_factor=-0.1"),
    ("cosine(min_factor=nan)", lambda: schedules.cosine(0, 10, float("nan")), "min_factor=nan"),
    ("cosine(min_factor=1.5)", lambda: schedules.cosine(0, 10, 1.5), "min_factor=1.5"),
    (
        "cosine(min_factor='0')",
        lambda: schedules.cosine(0, 10, "0"),  # type: ignore[arg-type]
        "min_factor='0'",
    ),
    ("restarts(cycles=0)", lambda: schedules.cosine_with_restarts(0, 10, cycles=0), "cycles=0"),
    (
        "restarts(cycles=1.5)",
        lambda: schedules.cosine_with_restarts(0, 10, cycles=1.5),  # type: ignore[arg-type]
        "cycles=1.5",
    ),
    ("polynomial(power=0)", lambda: schedules.polynomial(0, 10, power=0), "power=0"),
    ("polynomial(power=nan)", lambda: schedules.polynomial(0, 10, power=float("nan")), "power=nan"),
    ("inverse_sqrt(-1)", lambda: schedules.inverse_sqrt(-1), "warmup_steps=-1"),
    ("inverse_sqrt(timescale=0)", lambda: schedules.inverse_sqrt(4, 0), "timescale=0"),
    ("inverse_sqrt(timescale=-3)", lambda: schedules.inverse_sqrt(4, -3), "timescale=-3"),
]


@pytest.mark.parametrize(("call", "part"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise_value_error(call: Callable[[], object], part: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert part in str(info.value)


def test_schedules_print_like_their_call_and_compare_equal() -> None:
    for schedule in [
        schedules.constant(3),
        schedules.linear(2, 10, 0.1),
        schedules.cosine(2, 10),
        schedules.cosine_with_restarts(2, 10, cycles=3),
        schedules.polynomial(2, 10, power=2.0),
        schedules.inverse_sqrt(4, timescale=8),
    ]:
        rebuilt = eval(repr(schedule), vars(schedules))  # noqa: S307 - our own repr
        assert rebuilt == schedule and rebuilt is not schedule
    assert schedules.cosine(2, 10) != schedules.cosine(2, 11)
