"""A character-level GPT on the Python standard library's own source: data, model, sampling.

Everything here is plain PyTorch (plus einops); loopkit appears only in `loss_fn`, which
returns `loopkit.Loss(sum, count)` so that gradient windows are normalised per character.
`examples/demo.py` trains it with `loopkit.fit`; `tests/test_demo.py` imports it.

The text is real and needs no download: every Python installation ships its standard
library as `.py` files, so `load_stdlib_text` gives the same corpus on every machine that
runs the same Python version.
"""

from __future__ import annotations

import math
import os
import random
import sysconfig
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from torch import nn

import loopkit

# Folders of the stdlib that are not representative library code (or not stdlib at all).
# `encodings` holds generated charmap tables (data, not code).
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
)


# --------------------------------------------------------------------------------- data


def stdlib_files(seed: int = 0) -> list[str]:
    """List the stdlib's `.py` files: sorted by path, then shuffled by `random.Random(seed)`.

    Sorting first makes the order independent of the file system; the seeded shuffle mixes
    packages so that a prefix of the corpus is not all `asyncio` or all `email`.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test_"))
        paths.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))
    paths.sort()
    random.Random(seed).shuffle(paths)
    return paths


def load_stdlib_text(max_chars: int, seed: int = 0) -> str:
    """Concatenate the stdlib's `.py` sources (in `stdlib_files(seed)` order) up to `max_chars`.

    Only ASCII files are used (nearly all of the stdlib), which keeps the vocabulary to
    about 100 characters; the last file is cut at `max_chars`.

    Args:
        max_chars: how many characters to return at most (the stdlib holds about 12 M).
        seed: which deterministic file order to use.

    Raises:
        ValueError: `max_chars` is not a positive int.
        FileNotFoundError: the stdlib has no `.py` sources (some minimal installs).
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"load_stdlib_text(max_chars={max_chars!r}): must be an int > 0.")
    parts: list[str] = []
    total = 0
    for path in stdlib_files(seed):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):  # a few files hold non-ASCII text
            continue
        parts.append(text[: max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    if not total:
        raise FileNotFoundError(
            f"load_stdlib_text: no ASCII .py files under {sysconfig.get_paths()['stdlib']!r}; "
            "this Python ships its standard library without sources."
        )
    return "".join(parts)


class CharTokenizer:
    """Characters <-> ids; the vocabulary is the sorted set of characters of `text`."""

    def __init__(self, text: str) -> None:
        if not text:
            raise ValueError("CharTokenizer(text=''): needs a non-empty text for the vocabulary.")
        self.chars: tuple[str, ...] = tuple(sorted(set(text)))
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Return the ids of `text` as a 1-D LongTensor.

        Raises:
            KeyError: a character of `text` is not in the vocabulary.
        """
        try:
            return torch.tensor([self._ids[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise KeyError(
                f"CharTokenizer.encode: character {err.args[0]!r} is not in the vocabulary "
                f"({self.vocab_size} characters). Build the tokenizer from a text containing it."
            ) from None

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Return the text of `ids` (a 1-D tensor or a sequence of ints)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def split(ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D id tensor into (train, val): the last `val_fraction` of it is validation.

    A contiguous tail (not random windows) keeps validation text unseen in training.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"split(val_fraction={val_fraction!r}): must be in (0, 1), e.g. 0.1.")
    n_val = max(1, int(len(ids) * val_fraction))
    return ids[:-n_val], ids[-n_val:]


class CharDataset(torch.utils.data.Dataset):
    """Windows of `block_size` ids: item i is `(ids[s:s+T], ids[s+1:s+T+1])`, s = i * stride.

    `stride=1` (training) gives every window; `stride=block_size` (evaluation) gives
    non-overlapping windows, so a few eval batches cover distinct text.
    """

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int = 1) -> None:
        if ids.ndim != 1 or ids.dtype != torch.long:
            raise ValueError(
                f"CharDataset(ids=...): expected a 1-D LongTensor, got {ids.dtype} of shape "
                f"{tuple(ids.shape)}."
            )
        if block_size < 1 or stride < 1:
            raise ValueError(
                f"CharDataset(block_size={block_size!r}, stride={stride!r}): both must be >= 1."
            )
        if len(ids) < block_size + 1:
            raise ValueError(
                f"CharDataset: {len(ids)} ids are too few for one window of block_size="
                f"{block_size} (needs block_size + 1). Use more text or a smaller block_size."
            )
        self.ids = ids
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.ids) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"CharDataset index {index} out of range [0, {len(self)}).")
        start = index * self.stride
        chunk = self.ids[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def unigram_baseline(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/char) of `val_ids` under the add-one-smoothed unigram of `train_ids`.

    This is the best loss a model can reach without looking at context: a GPT that does
    not beat it by a wide margin has learned nothing beyond character frequencies.
    """
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # Laplace
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[val_ids].mean())


# -------------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (qkv h d) -> qkv b h t d", qkv=3, h=self.n_heads)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.proj(rearrange(y, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Pre-LN transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """A small decoder-only transformer over characters.

    Args:
        vocab_size: number of distinct tokens.
        block_size: longest context (positions have learned embeddings up to it).
        d_model: width of the residual stream; must be divisible by `n_heads`.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block.
        dropout: dropout on embeddings, attention and residual branches (0 for short runs).
        tie_weights: share the token embedding with the output head (fewer parameters).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(
                f"GPT(d_model={d_model}, n_heads={n_heads}): d_model must be divisible by n_heads."
            )
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        # GPT-2: scale residual output projections by 1/sqrt(2 * n_layers).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Return next-token logits `(B, T, vocab)` for ids `idx` of shape `(B, T)`."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(
                f"GPT.forward: sequence length {t} exceeds block_size={self.block_size}."
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample `max_new_tokens` ids after `prompt_ids`; return prompt + sample as a 1-D tensor.

    Sampling draws only from `generator`, so a generator seeded the same way gives the same
    text. The model runs in eval mode (no dropout) and is put back in its previous mode.
    Each new token costs one host sync (`multinomial` on the generator's device).
    """
    if temperature <= 0:
        raise ValueError(f"generate(temperature={temperature!r}): must be > 0.")
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("generate(prompt_ids=[]): give at least one prompt token.")
    sample_device = generator.device if generator is not None else device
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -model.block_size :])[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1).to(sample_device)
            next_id = torch.multinomial(probs, 1, generator=generator).to(device)
            ids = torch.cat([ids, next_id], dim=1)
    finally:
        model.train(was_training)
    return ids[0].cpu()


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> loopkit.Loss:
    """Cross-entropy summed over every predicted character, and their count."""
    x, y = batch
    return loopkit.cross_entropy(model(x), y)
