"""Hypothesis search strategies for property-testing training steps: splits, batches, models.

(A *search strategy* is hypothesis' word for a generator of test inputs; loopkit's
distribution strategies are in loopkit.strategies.) Hypothesis is imported when a search
strategy is *built*, never when this module is imported, so `import loopkit.testing` works
without it. Every argument is keyword-only. `loopkit.testing.strategies` is the old name of
this module and still works.

Example:
    >>> from hypothesis import given
    >>> from loopkit.testing import search
    >>> @given(split=search.splits(total=8, max_parts=4), seed=search.seeds())
    ... def test_split(split, seed):
    ...     assert sum(split) == 8 and 1 <= len(split) <= 4
    >>> test_split()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .. import schedules as lk_schedules
from ..precision import Precision
from .tiny_models import MLPFactory, TransformerFactory
from .tiny_models import TinyTransformer as TinyTransformer
from .tiny_models import TransformerBlock as TransformerBlock

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy


def _st() -> Any:
    try:
        import hypothesis.strategies as st
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loopkit.testing.search needs hypothesis: pip install hypothesis (or loopkit[dev])."
        ) from error
    return st


def _check_int(call: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{call}({name}={value!r}): must be an int >= {minimum}.")
    return value


# --- how a batch is cut -------------------------------------------------------------------


def splits(*, total: int, max_parts: int | None = None) -> SearchStrategy[list[int]]:
    """Micro-batch sizes (each >= 1) that sum to `total`: how one window is cut.

    Shrinks towards fewer parts, so a failure is reported with the simplest split.

    Args:
        total: items in the full batch.
        max_parts: at most this many micro-batches (default `total`).

    Raises:
        ValueError: total < 1 or max_parts < 1.
    """
    _check_int("splits", "total", total, 1)
    parts = total if max_parts is None else _check_int("splits", "max_parts", max_parts, 1)
    parts = min(parts, total)
    st = _st()

    @st.composite
    def draw_split(draw: Any) -> list[int]:
        k = draw(st.integers(1, parts), label="micro_batches")
        if k == 1:
            return [total]
        cuts = sorted(
            draw(st.sets(st.integers(1, total - 1), min_size=k - 1, max_size=k - 1), label="cuts")
        )
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    return draw_split()


def rank_splits(*, total: int, world_size: int) -> SearchStrategy[list[int]]:
    """Items per rank (each >= 1, summing to `total`): how one window is spread over ranks.

    Raises:
        ValueError: world_size < 1, or total < world_size (every rank needs an item).
    """
    _check_int("rank_splits", "world_size", world_size, 1)
    _check_int("rank_splits", "total", total, 1)
    if total < world_size:
        raise ValueError(
            f"rank_splits(total={total}, world_size={world_size}): every rank needs at least "
            "one item, so total must be >= world_size."
        )
    st = _st()

    @st.composite
    def draw_split(draw: Any) -> list[int]:
        if world_size == 1:
            return [total]
        cuts = sorted(
            draw(
                st.sets(st.integers(1, total - 1), min_size=world_size - 1, max_size=world_size - 1)
            )
        )
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    return draw_split()


# --- data ---------------------------------------------------------------------------------


def padded_token_batches(
    *,
    batch_size: int,
    max_len: int,
    vocab_size: int,
    pad_id: int = -100,
    pad_token: int = 0,
    min_len: int = 1,
) -> SearchStrategy[dict[str, torch.Tensor]]:
    """Right-padded variable-length token batches: `{"tokens", "targets", "mask"}`.

    Each row has its own length in `[min_len, max_len]`; the batch is padded to its longest
    row plus a drawn amount of extra padding (never past `max_len`). Padded positions hold
    `pad_token` in `tokens`, `pad_id` (the loss's ignore_index) in `targets` and False in
    `mask`. Targets are the next token, so a causal model has a real task. Token values
    come from a drawn seed, so drawing is fast and the example still reproduces exactly.

    Args:
        batch_size: rows per batch.
        max_len: the widest a batch gets (sequence length).
        vocab_size: token ids are drawn from `[0, vocab_size)`.
        pad_id: the value of padded targets (cross_entropy's ignore_index, -100 by default).
        pad_token: the value of padded tokens.
        min_len: the shortest row.

    Raises:
        ValueError: a size below 1, or min_len > max_len.
    """
    _check_int("padded_token_batches", "batch_size", batch_size, 1)
    _check_int("padded_token_batches", "max_len", max_len, 1)
    _check_int("padded_token_batches", "vocab_size", vocab_size, 1)
    _check_int("padded_token_batches", "min_len", min_len, 1)
    if min_len > max_len:
        raise ValueError(
            f"padded_token_batches(min_len={min_len}, max_len={max_len}): min_len must be "
            "<= max_len."
        )
    st = _st()

    @st.composite
    def draw_batch(draw: Any) -> dict[str, torch.Tensor]:
        lengths = draw(
            st.lists(st.integers(min_len, max_len), min_size=batch_size, max_size=batch_size),
            label="lengths",
        )
        width = max(lengths) + draw(st.integers(0, max_len - max(lengths)), label="extra_pad")
        seed = draw(st.integers(0, 2**31 - 1), label="token_seed")
        return make_token_batch(
            lengths,
            width=width,
            vocab_size=vocab_size,
            seed=seed,
            pad_id=pad_id,
            pad_token=pad_token,
        )

    return draw_batch()


def make_token_batch(
    lengths: Sequence[int],
    *,
    width: int,
    vocab_size: int,
    seed: int,
    pad_id: int = -100,
    pad_token: int = 0,
) -> dict[str, torch.Tensor]:
    """The batch `padded_token_batches` draws, built from its parts (to reproduce one).

    Example:
        >>> batch = make_token_batch([3, 1], width=4, vocab_size=7, seed=0)
        >>> batch["mask"].sum(dim=1).tolist(), (batch["targets"][1] == -100).tolist()
        ([3, 1], [False, True, True, True])
    """
    gen = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    stream = torch.randint(0, vocab_size, (rows, width + 1), generator=gen)
    positions = torch.arange(width).expand(rows, width)
    lengths_t = torch.tensor(list(lengths)).unsqueeze(1)
    mask = positions < lengths_t
    tokens = torch.where(mask, stream[:, :-1], torch.full_like(stream[:, :-1], pad_token))
    # Every real position predicts the stream's next token (the last one predicts the token
    # that would follow), so each row has `length` items and no micro-batch counts zero.
    targets = torch.where(mask, stream[:, 1:], torch.full_like(stream[:, 1:], pad_id))
    return {"tokens": tokens, "targets": targets, "mask": mask}


def classification_batches(
    *, batch_size: int, d_in: int, n_classes: int, dtype: torch.dtype = torch.float64
) -> SearchStrategy[tuple[torch.Tensor, torch.Tensor]]:
    """`(x, y)` batches: `x` of shape (batch_size, d_in), `y` class ids in [0, n_classes).

    Values come from a drawn seed (fast to draw, exact to reproduce).
    """
    _check_int("classification_batches", "batch_size", batch_size, 1)
    _check_int("classification_batches", "d_in", d_in, 1)
    _check_int("classification_batches", "n_classes", n_classes, 1)
    st = _st()

    def build(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, d_in, generator=gen, dtype=dtype)
        return x, torch.randint(0, n_classes, (batch_size,), generator=gen)

    return st.integers(0, 2**31 - 1).map(build)


# --- models -------------------------------------------------------------------------------


def small_mlps(
    *,
    d_in: int,
    d_out: int,
    max_hidden: int = 16,
    max_layers: int = 2,
    dropout: float | None = 0.0,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy[MLPFactory]:
    """Model factories (`make_model() -> nn.Module`) for small random MLPs.

    Args:
        d_in: input features.
        d_out: outputs (classes).
        max_hidden: the widest hidden layer.
        max_layers: at most this many hidden layers (at least one).
        dropout: a fixed dropout rate, or None to draw one of 0.0, 0.1, 0.5.
        dtype: parameter dtype (float64 by default: comparisons can then be tight).
    """
    _check_int("small_mlps", "d_in", d_in, 1)
    _check_int("small_mlps", "d_out", d_out, 1)
    _check_int("small_mlps", "max_hidden", max_hidden, 1)
    _check_int("small_mlps", "max_layers", max_layers, 1)
    st = _st()
    rates = st.sampled_from([0.0, 0.1, 0.5]) if dropout is None else st.just(dropout)
    return st.builds(
        MLPFactory,
        d_in=st.just(d_in),
        hidden=st.lists(st.integers(1, max_hidden), min_size=1, max_size=max_layers).map(tuple),
        d_out=st.just(d_out),
        dropout=rates,
        seed=st.integers(0, 2**16),
        dtype=st.just(dtype),
    )


def tiny_transformers(
    *,
    vocab_size: int,
    max_len: int,
    max_layers: int = 2,
    dropout: float | None = 0.0,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy[TransformerFactory]:
    """Model factories for tiny causal transformers (`model(tokens) -> logits`).

    Widths are drawn from (4, 8) with 1 or 2 heads; layers from 1 to `max_layers`.
    """
    _check_int("tiny_transformers", "vocab_size", vocab_size, 1)
    _check_int("tiny_transformers", "max_len", max_len, 1)
    _check_int("tiny_transformers", "max_layers", max_layers, 1)
    st = _st()
    rates = st.sampled_from([0.0, 0.1]) if dropout is None else st.just(dropout)
    return st.builds(
        TransformerFactory,
        vocab_size=st.just(vocab_size),
        max_len=st.just(max_len),
        d_model=st.sampled_from([4, 8]),
        n_heads=st.sampled_from([1, 2]),
        n_layers=st.integers(1, max_layers),
        dropout=rates,
        seed=st.integers(0, 2**16),
        dtype=st.just(dtype),
    )


# --- run settings -------------------------------------------------------------------------


def seeds() -> SearchStrategy[int]:
    """Run seeds for `TrainState.create(seed=...)` (shrink towards 0)."""
    return _st().integers(0, 2**31 - 1)  # type: ignore[no-any-return]


def schedules(*, total_steps: int) -> SearchStrategy[Any]:
    """loopkit.schedules instances whose warmup and decay fit in `total_steps`.

    Draws constant, linear, cosine, cosine_with_restarts, polynomial and inverse_sqrt, with
    a warmup in `[0, total_steps]` and a floor (`min_factor`) in {0, 0.1}.
    """
    _check_int("schedules", "total_steps", total_steps, 0)
    st = _st()
    warmups = st.integers(0, total_steps)
    floors = st.sampled_from([0.0, 0.1])

    def decays(cls: Any, **extra: Any) -> Any:
        return warmups.flatmap(
            lambda w: st.builds(
                cls,
                warmup_steps=st.just(w),
                total_steps=st.integers(w, max(w, total_steps)),
                min_factor=floors,
                **extra,
            )
        )

    return st.one_of(  # type: ignore[no-any-return]
        st.builds(lk_schedules.constant, warmup_steps=warmups),
        decays(lk_schedules.linear),
        decays(lk_schedules.cosine),
        decays(lk_schedules.cosine_with_restarts, cycles=st.integers(1, 3)),
        decays(lk_schedules.polynomial, power=st.sampled_from([0.5, 1.0, 2.0])),
        st.builds(lk_schedules.inverse_sqrt, warmup_steps=warmups),
    )


def precisions(*, device: str | torch.device = "cpu") -> SearchStrategy[Precision]:
    """Precision policies that `device` runs: fp32 always, bf16 and fp16 where supported.

    fp16 policies start at a small loss scale that grows every window, so the scaler state
    actually changes within a short test (what a resume check needs to see).
    """
    device = torch.device(device)
    options = [Precision("fp32")]
    bf16 = device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    if bf16:
        options.append(Precision("bf16"))
    if device.type in ("cpu", "cuda", "mps"):
        options.append(Precision("fp16", init_scale=2.0**8, growth_interval=1))
    return _st().sampled_from(options)  # type: ignore[no-any-return]


__all__ = [
    "MLPFactory",
    "TinyTransformer",
    "TransformerBlock",
    "TransformerFactory",
    "classification_batches",
    "make_token_batch",
    "padded_token_batches",
    "precisions",
    "rank_splits",
    "schedules",
    "seeds",
    "small_mlps",
    "splits",
    "tiny_transformers",
]
