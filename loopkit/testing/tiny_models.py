"""Tiny models for property tests, and factories that build the same fresh model every call.

A factory (`MLPFactory`, `TransformerFactory`) is a frozen record: it prints like the call
that reproduces it and pickles into the processes check_strategy_equivalence starts. The
search strategies `small_mlps` and `tiny_transformers` (loopkit.testing.search) draw them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["MLPFactory", "TinyTransformer", "TransformerBlock", "TransformerFactory"]


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module from `seed` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class MLPFactory:
    """`make_model` for a small MLP: every call returns the same fresh model.

    A frozen record, so it prints like the call that reproduces it and pickles into
    spawned processes.
    """

    d_in: int
    hidden: tuple[int, ...]
    d_out: int
    dropout: float = 0.0
    seed: int = 0
    dtype: torch.dtype = torch.float64

    def __call__(self) -> torch.nn.Module:
        def build() -> torch.nn.Module:
            layers: list[torch.nn.Module] = []
            width = self.d_in
            for h in self.hidden:
                layers += [torch.nn.Linear(width, h), torch.nn.Tanh()]
                if self.dropout:
                    layers.append(torch.nn.Dropout(self.dropout))
                width = h
            layers.append(torch.nn.Linear(width, self.d_out))
            return torch.nn.Sequential(*layers).to(self.dtype)

        return _seeded(self.seed, build)


class TransformerBlock(torch.nn.Module):
    """Pre-norm causal self-attention plus an MLP, written out (no fused kernels)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.norm2 = torch.nn.LayerNorm(d_model)
        self.up = torch.nn.Linear(d_model, 2 * d_model)
        self.down = torch.nn.Linear(2 * d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.n_heads, -1).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        h = h + self.proj((attn @ v).transpose(1, 2).reshape(b, t, -1))
        return h + self.down(torch.tanh(self.up(self.norm2(h))))


class TinyTransformer(torch.nn.Module):
    """A causal transformer small enough for property tests: `model(tokens) -> logits`."""

    def __init__(
        self,
        *,
        vocab_size: int,
        max_len: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, d_model)
        self.position = torch.nn.Embedding(max_len, d_model)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(d_model, n_heads, dropout) for _ in range(n_layers)
        )
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class TransformerFactory:
    """`make_model` for a TinyTransformer: every call returns the same fresh model."""

    vocab_size: int
    max_len: int
    d_model: int = 8
    n_heads: int = 2
    n_layers: int = 1
    dropout: float = 0.0
    seed: int = 0
    dtype: torch.dtype = torch.float64

    def __call__(self) -> torch.nn.Module:
        def build() -> torch.nn.Module:
            return TinyTransformer(
                vocab_size=self.vocab_size,
                max_len=self.max_len,
                d_model=self.d_model,
                n_heads=self.n_heads,
                n_layers=self.n_layers,
                dropout=self.dropout,
            ).to(self.dtype)

        return _seeded(self.seed, build)
