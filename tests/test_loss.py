"""Loss(sum, count) losses against torch's mean-reduced functional losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk


@st.composite
def token_batches(draw: st.DrawFn):
    """Logits (*lead, classes), targets with some positions padded, and the padded count."""
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    classes = draw(st.integers(2, 6))
    ignore_index = draw(st.sampled_from([-100, -1, classes + 5]))
    n = 1
    for size in lead:
        n *= size
    padded = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = torch.randn(*lead, classes, generator=gen, dtype=torch.float64) * 3
    targets = torch.tensor(
        [ignore_index if pad else label for pad, label in zip(padded, labels, strict=True)]
    ).reshape(lead)
    return logits, targets, ignore_index, n - sum(padded)


@given(batch=token_batches(), label_smoothing=st.sampled_from([0.0, 0.1]))
def test_cross_entropy_sum_over_count_is_torch_mean(batch, label_smoothing: float) -> None:
    logits, targets, ignore_index, n_real = batch
    loss = lk.cross_entropy(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    assert isinstance(loss, lk.Loss)
    assert loss.sum.ndim == 0
    assert int(loss.count) == n_real
    if n_real == 0:
        assert float(loss.sum) == 0.0
        return
    classes = logits.shape[-1]
    mean = F.cross_entropy(
        logits.reshape(-1, classes),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    torch.testing.assert_close(loss.sum / loss.count, mean, rtol=1e-12, atol=1e-12)


@given(batch=token_batches())
def test_cross_entropy_gradient_matches_per_item_sum(batch) -> None:
    logits, targets, ignore_index, n_real = batch
    mask = targets != ignore_index
    a = logits.clone().requires_grad_(True)
    lk.cross_entropy(a, targets, ignore_index=ignore_index).sum.backward()
    b = logits.clone().requires_grad_(True)
    log_probs = b.log_softmax(-1)
    picked = log_probs.gather(-1, targets.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    (-(picked * mask)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_cross_entropy_default_ignore_index_is_minus_100() -> None:
    logits = torch.zeros(2, 3, 5, dtype=torch.float64)
    targets = torch.tensor([[1, 2, -100], [0, -100, -100]])
    loss = lk.cross_entropy(logits, targets)
    assert int(loss.count) == 3
    torch.testing.assert_close(
        loss.sum, torch.tensor(3 * torch.log(torch.tensor(5.0)).item(), dtype=torch.float64)
    )


@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_mse_sum_over_count_is_torch_mean(shape: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    predictions = torch.randn(shape, generator=gen, dtype=torch.float64)
    targets = torch.randn(shape, generator=gen, dtype=torch.float64)
    loss = lk.mse(predictions, targets)
    assert int(loss.count) == predictions.numel()
    torch.testing.assert_close(loss.sum, ((predictions - targets) ** 2).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        loss.sum / loss.count, F.mse_loss(predictions, targets), rtol=1e-12, atol=0
    )


def test_cross_entropy_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError) as info:
        lk.cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    assert "(2, 3, 5)" in str(info.value) and "(2, 4)" in str(info.value)


def test_mse_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError) as info:
        lk.mse(torch.zeros(2, 3), torch.zeros(3, 2))
    assert "(2, 3)" in str(info.value) and "(3, 2)" in str(info.value)


def test_loss_is_a_named_pair() -> None:
    loss = lk.Loss(torch.tensor(2.0), 4)
    total, count = loss
    assert loss.sum is total and loss.count == count == 4
