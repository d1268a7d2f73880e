"""Accumulation invariance: however a window is split into micro-batches, the update is the
full-batch update of the mean loss over every item in the window.

The oracle is a hand-written float64 PyTorch loop that sees each window as one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypedDict

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from helpers import (
    TinyLM,
    WindowProbe,
    assert_tensors_close,
    classification_loss,
    mlp,
    prefixed,
    reference_trace,
    run_windows,
    token_loss,
    window_cross_entropy,
)
from hypothesis import assume, given
from hypothesis import strategies as st

import loopkit as lk

VOCAB = 11
PAD_TOKEN = 0
# float64 end to end: only summation order differs from the reference.


class Tol(TypedDict):
    rtol: float
    atol: float


GRAD_TOL: Tol = {"rtol": 1e-12, "atol": 1e-14}
PARAM_TOL: Tol = {"rtol": 1e-9, "atol": 1e-11}


def sgd(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # plain SGD + momentum: a gradient error carries into the parameters linearly.
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


@st.composite
def window_splits(draw: st.DrawFn, *, min_k: int = 1, max_k: int = 4, max_total: int = 12):
    """k, then 1-3 windows: each a batch size >= k split into k micro-batch sizes >= 1."""
    k = draw(st.integers(min_k, max_k), label="k")
    windows = []
    for _ in range(draw(st.integers(1, 3), label="steps")):
        total = draw(st.integers(k, max_total))
        cuts = []
        if k > 1:
            cuts = sorted(draw(st.sets(st.integers(1, total - 1), min_size=k - 1, max_size=k - 1)))
        bounds = [0, *cuts, total]
        windows.append([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return k, windows


def classification_windows(
    sizes: Sequence[Sequence[int]], seed: int
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for split in sizes:
        x = torch.randn(sum(split), 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (sum(split),), generator=gen)
        windows.append(list(zip(x.split(list(split)), y.split(list(split)), strict=True)))
    return windows


def run_loopkit(model: torch.nn.Module, windows: list, loss_fn, k: int):
    probe = WindowProbe()
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(k), probe, lk.optimizer_step())
    state = lk.TrainState.create(model, optimizer=sgd, strategy=lk.SingleDevice("cpu"))
    state, params_after = run_windows(state, step, windows)
    return state, probe, params_after


def assert_same_run(probe: WindowProbe, params_after: list, ref, *, loss_tol=GRAD_TOL) -> None:
    assert len(probe.grads) == len(ref.grads) == len(params_after)
    for i in range(len(ref.grads)):
        assert_tensors_close(probe.grads[i], ref.grads[i], **GRAD_TOL, what=f"step {i} grad")
        torch.testing.assert_close(
            probe.metrics[i]["train/loss"],
            ref.losses[i],
            **loss_tol,
            msg=prefixed(f"step {i} train/loss"),
        )
        assert_tensors_close(params_after[i], ref.params[i], **PARAM_TOL, what=f"step {i} param")


# --- (a) classification, Loss(sum, count) -----------------------------------------------


@given(split=window_splits(), seed=st.integers(0, 2**16))
def test_classification_sum_count_is_split_invariant(split, seed) -> None:
    k, sizes = split
    windows = classification_windows(sizes, seed)
    _, probe, params_after = run_loopkit(mlp(), windows, classification_loss, k)
    ref = reference_trace(mlp(), windows, window_cross_entropy, make_optimizer=sgd)
    assert_same_run(probe, params_after, ref)


# --- (b) a loss_fn returning a plain scalar mean (count = batch size) --------------------


def mean_mse(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def window_mse(model: torch.nn.Module, window) -> torch.Tensor:
    return F.mse_loss(model(torch.cat([b[0] for b in window])), torch.cat([b[1] for b in window]))


@given(split=window_splits(min_k=2), seed=st.integers(0, 2**16))
def test_scalar_mean_loss_with_uneven_micro_batches(split, seed) -> None:
    k, sizes = split
    assume(any(len(set(window)) > 1 for window in sizes))  # uneven micro-batch sizes
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for window in sizes:
        x = torch.randn(sum(window), 4, generator=gen, dtype=torch.float64)
        y = torch.randn(sum(window), 3, generator=gen, dtype=torch.float64)
        windows.append(list(zip(x.split(window), y.split(window), strict=True)))
    _, probe, params_after = run_loopkit(mlp(), windows, mean_mse, k)
    ref = reference_trace(mlp(), windows, window_mse, make_optimizer=sgd)
    assert_same_run(probe, params_after, ref)


# --- (c) variable-length padded token sequences, ignore_index=-100 -----------------------


@st.composite
def token_windows(
    draw: st.DrawFn, *, min_k: int = 1, max_k: int = 3, steps: tuple[int, int] = (1, 3)
):
    """k, then windows of k micro-batches, each micro-batch a list of sequence lengths plus
    the extra right-padding of that micro-batch."""
    k = draw(st.integers(min_k, max_k), label="k")
    windows = []
    for _ in range(draw(st.integers(*steps), label="steps")):
        window = []
        for _ in range(k):
            lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
            window.append((lengths, draw(st.integers(0, 2))))
        windows.append(window)
    return k, windows


def make_token_windows(spec, seed: int):
    """Padded micro-batches {"tokens", "targets"} and, per window, the unpadded sequences."""
    gen = torch.Generator().manual_seed(seed)
    windows, sequences = [], []
    for window_spec in spec:
        window, seqs = [], []
        for lengths, extra_pad in window_spec:
            width = max(lengths) + extra_pad
            tokens = torch.full((len(lengths), width), PAD_TOKEN, dtype=torch.long)
            targets = torch.full((len(lengths), width), -100, dtype=torch.long)
            for row, n in enumerate(lengths):
                tokens[row, :n] = torch.randint(0, VOCAB, (n,), generator=gen)
                targets[row, :n] = torch.randint(0, VOCAB, (n,), generator=gen)
                seqs.append((tokens[row, :n].clone(), targets[row, :n].clone()))
            window.append({"tokens": tokens, "targets": targets})
        windows.append(window)
        sequences.append(seqs)
    return windows, sequences


def mean_over_real_tokens(model: torch.nn.Module, seqs) -> torch.Tensor:
    """Mean CE over every real token, one unpadded sequence at a time (no padding at all)."""
    per_token = [
        F.cross_entropy(model(tokens[None])[0], targets, reduction="none")
        for tokens, targets in seqs
    ]
    return torch.cat(per_token).mean()


def real_tokens(micro_batch: dict[str, torch.Tensor]) -> int:
    return int((micro_batch["targets"] != -100).sum())


@given(spec=token_windows(), seed=st.integers(0, 2**16))
def test_padded_tokens_mean_over_real_tokens(spec, seed) -> None:
    k, window_specs = spec
    windows, sequences = make_token_windows(window_specs, seed)
    _, probe, params_after = run_loopkit(TinyLM(VOCAB), windows, token_loss, k)
    ref = reference_trace(TinyLM(VOCAB), sequences, mean_over_real_tokens, make_optimizer=sgd)
    assert_same_run(probe, params_after, ref)


def mean_of_micro_batch_means(model: torch.nn.Module, window) -> torch.Tensor:
    """The classic accumulation bug: average each micro-batch's mean loss."""
    means = [
        F.cross_entropy(model(b["tokens"]).flatten(0, 1), b["targets"].flatten()) for b in window
    ]
    return torch.stack(means).mean()


@given(spec=token_windows(min_k=2, steps=(1, 1)), seed=st.integers(0, 2**16))
def test_mean_of_means_reference_is_detected(spec, seed) -> None:
    """The comparison above can fail: with unequal token counts per micro-batch, the
    averaged-means gradient differs from loopkit's, which matches the true mean."""
    k, window_specs = spec
    windows, sequences = make_token_windows(window_specs, seed)
    assume(len({real_tokens(b) for b in windows[0]}) > 1)
    _, probe, _ = run_loopkit(TinyLM(VOCAB), windows, token_loss, k)
    right = reference_trace(TinyLM(VOCAB), sequences, mean_over_real_tokens, make_optimizer=sgd)
    wrong = reference_trace(TinyLM(VOCAB), windows, mean_of_micro_batch_means, make_optimizer=sgd)
    assert_tensors_close(probe.grads[0], right.grads[0], **GRAD_TOL, what="grad")
    with pytest.raises(AssertionError):
        assert_tensors_close(probe.grads[0], wrong.grads[0], rtol=1e-6, atol=1e-9, what="grad")
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            probe.metrics[0]["train/loss"], wrong.losses[0], rtol=1e-6, atol=0
        )


@given(spec=token_windows(), seed=st.integers(0, 2**16))
def test_train_loss_metric_is_window_mean(spec, seed) -> None:
    """After the last micro-batch, metrics["train/loss"] is the last window's mean loss."""
    k, window_specs = spec
    windows, sequences = make_token_windows(window_specs, seed)
    state, _, _ = run_loopkit(TinyLM(VOCAB), windows, token_loss, k)
    ref = reference_trace(TinyLM(VOCAB), sequences, mean_over_real_tokens, make_optimizer=sgd)
    loss = state.metrics["train/loss"]
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.losses[-1], **GRAD_TOL)
