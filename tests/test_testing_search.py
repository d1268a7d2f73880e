"""loopkit.testing.search: what each search strategy draws, lazily imported hypothesis."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk
from loopkit.testing import search


def test_importing_loopkit_testing_does_not_import_hypothesis() -> None:
    code = (
        "import sys, loopkit.testing, loopkit.testing.search, loopkit.testing.pytest_plugin\n"
        "import loopkit.testing.strategies\n"
        "assert 'hypothesis' not in sys.modules, 'hypothesis imported'\n"
        "loopkit.testing.search.seeds()\n"
        "assert 'hypothesis' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_old_module_name_strategies_re_exports_search() -> None:
    from loopkit.testing import strategies

    assert strategies.__all__ == search.__all__
    for name in search.__all__:
        assert getattr(strategies, name) is getattr(search, name), name


def test_search_strategy_arguments_are_keyword_only_and_validated() -> None:
    with pytest.raises(TypeError):
        search.splits(8)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"splits\(total=0\): must be an int >= 1"):
        search.splits(total=0)
    with pytest.raises(ValueError, match="every rank needs at least one item"):
        search.rank_splits(total=1, world_size=2)
    with pytest.raises(ValueError, match="min_len must be <= max_len"):
        search.padded_token_batches(batch_size=2, max_len=3, vocab_size=5, min_len=4)


@given(data=st.data(), total=st.integers(1, 12), max_parts=st.integers(1, 5))
def test_splits_are_positive_and_sum_to_total(data, total, max_parts) -> None:
    split = data.draw(search.splits(total=total, max_parts=max_parts))
    assert sum(split) == total and min(split) >= 1 and len(split) <= max_parts


@given(data=st.data(), world_size=st.integers(1, 4))
def test_rank_splits_give_every_rank_an_item(data, world_size) -> None:
    sizes = data.draw(search.rank_splits(total=world_size + 3, world_size=world_size))
    assert len(sizes) == world_size and sum(sizes) == world_size + 3 and min(sizes) >= 1


@given(batch=search.padded_token_batches(batch_size=3, max_len=7, vocab_size=5, pad_id=-1))
def test_padded_token_batches_mark_padding_in_targets_and_mask(batch) -> None:
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["mask"]
    assert tokens.shape == targets.shape == mask.shape and tokens.shape[0] == 3
    assert tokens.shape[1] <= 7
    assert bool(((targets == -1) == ~mask).all())  # every real position has a target
    assert bool((tokens[~mask] == 0).all()) and bool((mask.sum(dim=1) >= 1).all())
    # a row's real tokens come first (right padding)
    assert bool((mask.int().diff(dim=1) <= 0).all())


@given(factory=search.small_mlps(d_in=3, d_out=2, dropout=None))
def test_model_factories_build_identical_fresh_models(factory) -> None:
    a, b = factory(), factory()
    assert a is not b
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert a(torch.zeros(5, 3, dtype=torch.float64)).shape == (5, 2)


def test_model_factories_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    search.TransformerFactory(vocab_size=7, max_len=4)()
    assert torch.equal(torch.rand(3), expected)


@given(factory=search.tiny_transformers(vocab_size=7, max_len=5, max_layers=2))
def test_tiny_transformers_are_causal(factory) -> None:
    model = factory()
    tokens = torch.randint(0, 7, (2, 5))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 7
    out_a, out_b = model(tokens), model(changed)
    assert out_a.shape == (2, 5, 7)
    torch.testing.assert_close(out_a[:, :-1], out_b[:, :-1])  # the future does not leak back


@given(schedule=search.schedules(total_steps=5))
def test_schedules_are_loopkit_schedules_with_finite_factors(schedule) -> None:
    assert type(schedule).__module__ == "loopkit.schedules"
    assert all(math.isfinite(schedule(s)) and schedule(s) >= 0 for s in range(8))


def test_precisions_on_cpu_cover_fp32_bf16_and_a_growing_fp16_scale() -> None:
    drawn = set()

    @given(precision=search.precisions(device="cpu"))
    def collect(precision) -> None:
        assert isinstance(precision, lk.Precision)
        drawn.add(precision.name)
        if precision.name == "fp16":
            assert precision.growth_interval == 1

    collect()
    assert drawn == {"fp32", "bf16", "fp16"}


def classification_loss(model: torch.nn.Module, batch) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def test_a_check_given_a_search_strategy_runs_as_its_own_property_test() -> None:
    from loopkit.testing import check_accumulation_invariance, check_determinism

    make_model = search.MLPFactory(d_in=4, hidden=(8,), d_out=3, dropout=0.5)
    # The checks' signatures do not (yet) say that `accepts_search_strategies` lets them take
    # a search strategy for a value and `max_examples=`; hence the ignores below.
    result = check_determinism(  # type: ignore[call-arg]
        make_model,
        classification_loss,
        batches=search.classification_batches(batch_size=6, d_in=4, n_classes=3),
        seed=search.seeds(),  # type: ignore[arg-type]
        max_examples=3,
    )
    assert "ran over drawn batches, seed" in result.details
    # dropout masks depend on the micro-batch, so the split check finds a failing case
    with pytest.raises(AssertionError, match="changed training"):
        check_accumulation_invariance(  # type: ignore[call-arg]
            make_model,
            classification_loss,
            batches=classification_batch_for_failure(),
            # few values: shrinking is quick
            splits=st.sampled_from([[1, 5], [2, 4]]),  # type: ignore[arg-type]
            max_examples=5,
        )


def classification_batch_for_failure():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.arange(6) % 3
