"""Tiny models and hand-written PyTorch reference loops (the oracle for property tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import loopkit as lk


def mlp(seed: int = 0, d_in: int = 4, d_hidden: int = 8, d_out: int = 3,
        dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A small MLP with deterministic initial weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden),
        torch.nn.Tanh(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(d_hidden, d_out),
    ).to(dtype)
    torch.random.set_rng_state(gen_state)
    return model


class TinyLM(torch.nn.Module):
    """Embedding + GRU-free causal mixer: enough to exercise padded token losses."""

    def __init__(self, vocab: int = 11, d: int = 8, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)
        self.to(dtype)
        torch.random.set_rng_state(gen_state)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = torch.tanh(self.mix(h.cumsum(dim=1)))  # causal: position t sees tokens <= t
        return self.head(h)


def classification_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> lk.Loss:
    return lk.cross_entropy(model(batch["tokens"]), batch["targets"], ignore_index=-100)


def reference_train(
    model: torch.nn.Module,
    windows: Sequence[Sequence[object]],
    mean_loss: Callable[[torch.nn.Module, object], torch.Tensor],
    *,
    lr: float = 1e-2,
    max_norm: float | None = None,
    make_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    lr_factor: Callable[[int], float] = lambda step: 1.0,
) -> torch.nn.Module:
    """The hand-written loop: per window, backward of the mean loss over the whole window."""
    opt = (make_optimizer or (lambda p: torch.optim.AdamW(p, lr=lr)))(model.parameters())
    base_lrs = [g["lr"] for g in opt.param_groups]
    for step, window in enumerate(windows):
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_factor(step)
        opt.zero_grad()
        mean_loss(model, window).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    return model


def assert_params_close(actual: torch.nn.Module, expected: torch.nn.Module,
                        rtol: float = 1e-9, atol: float = 1e-11) -> None:
    """Compare parameters by name; the message names the first one that differs."""
    a, e = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert a.keys() == e.keys(), f"parameter names differ: {sorted(a.keys() ^ e.keys())}"
    for name in a:
        torch.testing.assert_close(a[name], e[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def window_cross_entropy(model: torch.nn.Module, window: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean cross-entropy over every sample of a window given as (x, y) micro-batches."""
    x = torch.cat([b[0] for b in window])
    y = torch.cat([b[1] for b in window])
    return F.cross_entropy(model(x), y)
