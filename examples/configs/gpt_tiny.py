"""Builders for gpt_tiny.toml: a tiny version of the demo's GPT (examples/demo.py) as a run config.

The text, the tokenizer and the model come from examples/gpt.py (the config's
`python_path = [".."]` puts examples/ on sys.path). The model's vocabulary is the text's,
so both builders read the same text (cached).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from gpt import GPT, CharDataset, CharTokenizer, load_stdlib_text, split

import loopkit


@functools.cache
def _ids(text_chars: int, seed: int) -> tuple[int, torch.Tensor]:
    text = load_stdlib_text(text_chars, seed=seed)
    tokenizer = CharTokenizer(text)
    return tokenizer.vocab_size, tokenizer.encode(text)


def build_model(
    *,
    text_chars: int,
    block_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    dropout: float = 0.0,
    seed: int = 0,
) -> GPT:
    """The demo's GPT over the vocabulary of the first `text_chars` characters of stdlib text."""
    vocab_size, _ = _ids(text_chars, seed)
    return GPT(vocab_size, block_size, d_model, n_layers, n_heads, dropout)


def build_data(
    *,
    text_chars: int,
    block_size: int,
    split_part: str = "train",
    val_fraction: float = 0.1,
    stride: int = 1,
    seed: int = 0,
) -> CharDataset:
    """Windows of `block_size` characters of the train (or "val") part of the text."""
    _, ids = _ids(text_chars, seed)
    train_ids, val_ids = split(ids, val_fraction)
    return CharDataset(train_ids if split_part == "train" else val_ids, block_size, stride=stride)


def adamw(*, lr: float, weight_decay: float) -> Any:
    """The demo's optimizer factory: AdamW, no weight decay on biases and LayerNorm gains."""

    def factory(params: Any) -> torch.optim.Optimizer:
        groups = loopkit.param_groups(params, weight_decay=weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))

    return factory
