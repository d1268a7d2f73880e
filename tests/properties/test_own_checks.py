"""loopkit's own chain, property-tested with the checks and search strategies it ships to users.

The same `loopkit.testing` functions a user calls on their step run here on loopkit's
default chain (forward, accumulate, clip, optimizer_step), with hypothesis drawing models,
splits, padded token batches, seeds, schedules and precisions.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk
from loopkit.testing import (
    check_accumulation_invariance,
    check_determinism,
    check_gradient_flow,
    check_loss_decreases,
    check_matches_reference,
    check_no_stale_reuse,
    check_resume_equivalence,
    default_step,
    search,
)

VOCAB, MAX_LEN = 11, 6


def classification_loss(model: torch.nn.Module, batch) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def mean_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)  # a scalar mean: count = batch size


def token_loss(model: torch.nn.Module, batch) -> lk.Loss:
    return lk.cross_entropy(model(batch["tokens"]), batch["targets"])


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


@given(
    make_model=search.small_mlps(d_in=4, d_out=3),
    batch=search.classification_batches(batch_size=8, d_in=4, n_classes=3),
    split=search.splits(total=8, max_parts=4),
    loss_fn=st.sampled_from([classification_loss, mean_loss]),
    max_norm=st.sampled_from([None, 0.05, 1.0]),
)
def test_default_chain_is_split_invariant(make_model, batch, split, loss_fn, max_norm) -> None:
    check_accumulation_invariance(
        make_model,
        loss_fn,
        batches=batch,
        splits=[split],
        make_step=default_step(loss_fn, max_norm),
    )


@given(
    make_model=search.tiny_transformers(vocab_size=VOCAB, max_len=MAX_LEN),
    batch=search.padded_token_batches(batch_size=4, max_len=MAX_LEN, vocab_size=VOCAB),
    split=search.splits(total=4, max_parts=3),
)
def test_padded_token_batches_are_split_invariant(make_model, batch, split) -> None:
    check_accumulation_invariance(make_model, token_loss, batches=batch, splits=[split], steps=2)


@given(
    make_model=search.small_mlps(d_in=4, d_out=3, dropout=None),
    batch=search.classification_batches(batch_size=6, d_in=4, n_classes=3),
    split=search.splits(total=6, max_parts=3),
    seed=search.seeds(),
)
def test_default_chain_is_deterministic_with_dropout(make_model, batch, split, seed) -> None:
    check_determinism(
        make_model,
        classification_loss,
        batches=batch,
        split=split,
        seed=seed,
        make_step=default_step(classification_loss, 1.0),
    )


@given(
    precision=search.precisions(),
    schedule=search.schedules(total_steps=4),
    save_at=st.integers(0, 3),
    split=search.splits(total=6, max_parts=2),
    seed=search.seeds(),
)
def test_default_chain_resumes_exactly(precision, schedule, save_at, split, seed) -> None:
    make_model = search.MLPFactory(d_in=4, hidden=(8,), d_out=3, dropout=0.1, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(4)
    ]
    check_resume_equivalence(
        make_model,
        classification_loss,
        batches=batches,
        split=split,
        save_at=save_at,
        precision=precision,
        schedule=schedule,
        seed=seed,
        optimizer=adamw,
        make_step=default_step(classification_loss, 1.0),
    )


@given(
    schedule=search.schedules(total_steps=3),
    max_norm=st.sampled_from([None, 0.05, 2.0]),
    split=search.splits(total=8, max_parts=3),
)
def test_default_chain_matches_the_reference_loop(schedule, max_norm, split) -> None:
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(3)
    ]
    check_matches_reference(
        search.MLPFactory(d_in=4, hidden=(8,), d_out=3),
        classification_loss,
        batches=batches,
        split=split,
        max_norm=max_norm,
        schedule=schedule,
        optimizer=adamw,
    )


def with_wrappers(loss_fn, k: int) -> lk.Transform:
    """The default chain with an every() and a when() in it: combinators must stay stale-safe."""
    return lk.chain(
        lk.forward(loss_fn),
        lk.accumulate(k),
        lk.every(2, lk.clip(1.0)),
        lk.when(lambda s: s.step >= 1, lk.identity()),
        lk.optimizer_step(),
    )


def test_default_chain_refuses_consumed_records() -> None:
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    make_model = search.MLPFactory(d_in=4, hidden=(8,), d_out=3)
    result = check_no_stale_reuse(
        make_model,
        classification_loss,
        batches=[batch] * 3,
        split=[2, 4],
        make_step=functools.partial(with_wrappers, classification_loss),
    )
    assert "4 of 5 part(s)" in result.details  # when(..., identity()) never consumes


def test_tiny_transformer_gets_gradients_everywhere_and_learns() -> None:
    make_model = search.TransformerFactory(vocab_size=VOCAB, max_len=MAX_LEN, n_layers=2)
    batch = search.make_token_batch([6, 3, 5, 1], width=MAX_LEN, vocab_size=VOCAB, seed=0)
    check_gradient_flow(make_model, token_loss, batch=batch)
    check_loss_decreases(make_model, token_loss, batch=batch, optimizer=adamw, steps=15)
