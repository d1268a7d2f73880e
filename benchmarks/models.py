"""Benchmark models shared by the scripts in benchmarks/: a tiny MLP and a small causal LM.

Both are deterministic functions of a seed (the global RNG is restored afterwards), so two
copies built with the same seed start from identical weights, which lets a benchmark
check that a loopkit run and a hand-written run end with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from torch import nn


def _seeded(seed: int, build):  # type: ignore[no-untyped-def]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def tiny_mlp(seed: int = 0, d_in: int = 32, d_hidden: int = 64, n_classes: int = 10) -> nn.Module:
    """`d_in -> d_hidden -> n_classes` with a ReLU: a step here is almost all overhead."""
    return _seeded(
        seed,
        lambda: nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, n_classes)),
    )


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of `CausalTransformer`; the defaults are the step benchmark's model."""

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig(d_model={self.d_model}, n_heads={self.n_heads}): "
                "d_model must be a multiple of n_heads."
            )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a GELU MLP, each with a residual."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class CausalTransformer(nn.Module):
    """A GPT-style language model: token + learned position embeddings, blocks, LM head.

    `forward(tokens)` maps `(batch, seq)` token ids to `(batch, seq, vocab_size)` logits.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_len = tokens.shape[1]
        if seq_len > self.cfg.seq_len:
            raise ValueError(
                f"CausalTransformer: sequence length {seq_len} exceeds "
                f"cfg.seq_len={self.cfg.seq_len}."
            )
        positions = torch.arange(seq_len, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def causal_transformer(seed: int = 0, cfg: TransformerConfig | None = None) -> CausalTransformer:
    """A `CausalTransformer` with weights drawn from `seed` (default: the benchmark shape)."""
    return _seeded(seed, lambda: CausalTransformer(cfg or TransformerConfig()))


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
