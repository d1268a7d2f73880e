"""Models, data and helpers shared by the 2-process tests."""

from __future__ import annotations

from typing import Any

import torch

import loopkit as lk

TIMEOUT_S = 30.0  # a collective that waits longer than this fails the check instead of hanging


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h))


class BlockLM(torch.nn.Module):
    """A tiny causal LM with a ModuleList of blocks: FSDP shards each block separately."""

    def __init__(self, vocab: int = 11, d: int = 6, n_blocks: int = 2, seed: int = 0) -> None:
        super().__init__()
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = torch.nn.Linear(d, vocab)
        self.double()
        torch.random.set_rng_state(state)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).cumsum(dim=1)  # causal mixing: position t sees tokens <= t
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> lk.Loss:
    return lk.cross_entropy(model(batch["tokens"]), batch["targets"])


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-2, weight_decay=0.01)


def token_micro_batch(seed: int, lengths: list[int], vocab: int = 11, t: int = 7) -> dict:
    """Padded token rows: row i has lengths[i] real targets, the rest is ignore_index."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (len(lengths), t), generator=g)
    targets = torch.randint(0, vocab, (len(lengths), t), generator=g)
    for i, n in enumerate(lengths):
        targets[i, n:] = -100
    return {"tokens": tokens, "targets": targets}


def full_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter as a whole tensor (FSDP's DTensor shards are gathered: a collective)."""
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out
