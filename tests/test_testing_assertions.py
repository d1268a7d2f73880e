"""loopkit.testing assertions: structure first, then values, naming the first leaf by path."""

from __future__ import annotations

import pytest
import torch

import loopkit as lk
from loopkit.testing import assert_states_close, assert_trees_close, tolerance_for
from loopkit.testing.search import MLPFactory


def test_structure_is_compared_before_values() -> None:
    a = {"model": {"w": torch.ones(2), "b": torch.zeros(1)}, "step": 1}
    e = {"model": {"w": torch.full((2,), 5.0), "c": torch.zeros(1)}, "step": 1}
    with pytest.raises(AssertionError) as info:
        assert_trees_close(a, e)
    message = str(info.value)
    assert message.startswith("structures differ")
    assert "in expected only: model.c" in message and "in actual only: model.b" in message
    assert "model.w" not in message  # values are not compared until the structures match


def test_shape_and_dtype_mismatches_are_structural_and_show_both_sides() -> None:
    with pytest.raises(
        AssertionError,
        match=r"w: actual tensor\(2,\) torch.float32, "
        r"expected tensor\(3,\) torch.float32",
    ):
        assert_trees_close({"w": torch.ones(2)}, {"w": torch.ones(3)})
    with pytest.raises(AssertionError, match="torch.float64"):
        assert_trees_close({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)})


def test_the_first_differing_leaf_is_named_with_index_size_and_tolerance() -> None:
    e = {"layers": [{"w": torch.zeros(2, 3)}, {"w": torch.zeros(4)}], "lr": 0.1}
    a = {"layers": [{"w": torch.zeros(2, 3)}, {"w": torch.tensor([0.0, 0.0, 0.5, 0.0])}], "lr": 0.2}
    with pytest.raises(AssertionError) as info:
        assert_trees_close(a, e)
    message = str(info.value)
    assert "2 of 3 leaves differ; first layers[1].w" in message
    assert "max |diff| 0.5" in message and "at index (2,)" in message
    assert "1 of 4 elements outside rtol=0.0001, atol=1e-05 (default for torch.float32)" in message
    assert "(also: lr)" in message


def test_tolerances_default_by_dtype_and_can_be_given() -> None:
    assert_trees_close({"w": torch.tensor([1.0 + 1e-6])}, {"w": torch.tensor([1.0])})
    with pytest.raises(AssertionError, match="default for torch.float64"):
        assert_trees_close(
            {"w": torch.tensor([1.0 + 1e-6], dtype=torch.float64)},
            {"w": torch.tensor([1.0], dtype=torch.float64)},
        )
    with pytest.raises(AssertionError, match=r"bitwise equality \(given\)"):
        assert_trees_close(
            {"w": torch.tensor([1.0 + 1e-7])}, {"w": torch.tensor([1.0])}, rtol=0, atol=0
        )
    with pytest.raises(AssertionError, match="exact for torch.int64"):
        assert_trees_close({"n": torch.tensor([3])}, {"n": torch.tensor([4])}, rtol=1, atol=1)
    assert_trees_close({"w": torch.tensor([float("nan")])}, {"w": torch.tensor([float("nan")])})
    assert (
        str(tolerance_for(torch.bfloat16)) == "rtol=0.02, atol=0.002 (default for torch.bfloat16)"
    )
    assert "under fp16 autocast" in str(tolerance_for(torch.float32, "fp16"))
    assert str(tolerance_for(torch.float64, rtol=1e-3)).endswith(
        "(given, else default for torch.float64)"
    )


def new_state(lr: float = 0.1) -> lk.TrainState:
    return lk.TrainState.create(
        MLPFactory(d_in=4, hidden=(8,), d_out=3)(),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
        strategy=lk.SingleDevice("cpu"),
    )


def trained(lr: float) -> lk.TrainState:
    step = lk.chain(
        lk.forward(lambda m, b: lk.cross_entropy(m(b[0]), b[1])),
        lk.accumulate(1),
        lk.optimizer_step(),
    )
    state = new_state(lr)
    batch = (
        torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        torch.arange(5) % 3,
    )
    return step(step(state, batch), batch)


def test_states_compare_model_optimizer_and_counters_by_path() -> None:
    a, b = trained(0.1), trained(0.1)
    assert_states_close(a, b, rtol=0, atol=0)
    c = trained(0.2)
    with pytest.raises(AssertionError, match=r"first model\.0\.weight: max \|diff\|"):
        assert_states_close(c, a)
    with pytest.raises(
        AssertionError,
        match=r"first optimizer\.state\[0\]\.momentum_buffer \(parameter '0\.weight'\)",
    ):
        assert_states_close(c, a, include=("optimizer",))
    with pytest.raises(AssertionError, match=r"counters\.step: actual 0, expected 2"):
        assert_states_close(new_state(), a, include=("counters",))
    assert a.step == 2  # reading records never consumes them
    a.check_fresh()
