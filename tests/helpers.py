"""Tiny models and hand-written PyTorch reference loops (the oracle for property tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, overload

import torch
import torch.nn.functional as F

import loopkit as lk

W = TypeVar("W")  # one window, as the reference loops hand it to `mean_loss`


def mlp(
    seed: int = 0,
    d_in: int = 4,
    d_hidden: int = 8,
    d_out: int = 3,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> torch.nn.Module:
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

    def __init__(
        self, vocab: int = 11, d: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64
    ) -> None:
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


def classification_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> lk.Loss:
    return lk.cross_entropy(model(batch["tokens"]), batch["targets"], ignore_index=-100)


def reference_train(
    model: torch.nn.Module,
    windows: Sequence[W],
    mean_loss: Callable[[torch.nn.Module, W], torch.Tensor],
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


def assert_params_close(
    actual: torch.nn.Module, expected: torch.nn.Module, rtol: float = 1e-9, atol: float = 1e-11
) -> None:
    """Compare parameters by name; the message names the first one that differs."""
    a, e = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert a.keys() == e.keys(), f"parameter names differ: {sorted(a.keys() ^ e.keys())}"
    for name in a:
        torch.testing.assert_close(a[name], e[name], rtol=rtol, atol=atol, msg=prefixed(name))


def grad(p: torch.Tensor) -> torch.Tensor:
    """`p.grad`, where the caller knows it is set (fails loudly if not)."""
    assert p.grad is not None, "no gradient"
    return p.grad


def loss_scale(state: lk.TrainState) -> float:
    """The record's fp16 loss scale (fails loudly if it has none)."""
    assert state.loss_scale is not None, "no loss scale"
    return float(state.loss_scale)


def prefixed(where: str) -> Callable[[str], str]:
    """An `assert_close` message callback that puts `where` before the message."""
    return lambda message: f"{where}: {message}"


def window_cross_entropy(
    model: torch.nn.Module, window: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Mean cross-entropy over every sample of a window given as (x, y) micro-batches."""
    x = torch.cat([b[0] for b in window])
    y = torch.cat([b[1] for b in window])
    return F.cross_entropy(model(x), y)


# --- property-test helpers: observe a run without consuming it, trace a reference run ---


@overload
def clone_all(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]: ...
@overload
def clone_all(tensors: Iterable[torch.Tensor | None]) -> list[torch.Tensor | None]: ...
def clone_all(
    tensors: Iterable[torch.Tensor | None],
) -> list[torch.Tensor] | list[torch.Tensor | None]:
    """Detached copies of `tensors` (None stays None)."""
    return [None if t is None else t.detach().clone() for t in tensors]


class WindowProbe:
    """A test transform: at a closed window, record its gradients and metrics.

    It returns the record it receives without consuming it (like `identity()`), so it can
    sit anywhere in a chain, e.g. `chain(forward(f), accumulate(k), WindowProbe(), ...)`.
    """

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor | None]] = []
        self.metrics: list[dict[str, object]] = []

    def __call__(self, state: lk.TrainState, batch: object, /) -> lk.TrainState:
        if state.window.closed:
            self.grads.append(clone_all(p.grad for p in state.params))
            self.metrics.append(
                {
                    k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for k, v in state.metrics.items()
                }
            )
        return state

    def __repr__(self) -> str:
        return "WindowProbe()"


def run_windows(
    state: lk.TrainState, step: lk.Transform, windows: Sequence[Sequence[object]]
) -> tuple[lk.TrainState, list[list[torch.Tensor]]]:
    """Apply `step` to every micro-batch; return the last record and params after each window."""
    params_after: list[list[torch.Tensor]] = []
    for window in windows:
        for micro_batch in window:
            state = step(state, micro_batch)
        params_after.append(clone_all(state.params))
    return state, params_after


@dataclass
class ReferenceTrace:
    """What a hand-written loop saw at each optimizer step."""

    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)  # before clipping
    grads: list[list[torch.Tensor | None]] = field(default_factory=list)  # as opt.step saw them
    lrs: list[float] = field(default_factory=list)
    params: list[list[torch.Tensor]] = field(default_factory=list)  # after the step


def reference_trace(
    model: torch.nn.Module,
    windows: Sequence[W],
    mean_loss: Callable[[torch.nn.Module, W], torch.Tensor],
    *,
    make_optimizer: Callable[..., torch.optim.Optimizer],
    lr_factor: Callable[[int], float] = lambda step: 1.0,
    max_norm: float | None = None,
) -> ReferenceTrace:
    """The hand-written loop (zero_grad, backward of the window's mean loss, clip, step), traced."""
    opt = make_optimizer(list(model.parameters()))
    base_lrs = [g["lr"] for g in opt.param_groups]
    trace = ReferenceTrace()
    for step, window in enumerate(windows):
        for group, base in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_factor(step)
        opt.zero_grad()
        loss = mean_loss(model, window)
        loss.backward()
        if max_norm is not None:
            trace.grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        opt.step()
        trace.losses.append(loss.detach())
        trace.grads.append(clone_all(p.grad for p in model.parameters()))
        trace.lrs.append(opt.param_groups[0]["lr"])
        trace.params.append(clone_all(model.parameters()))
    return trace


def assert_tensors_close(
    actual: Sequence[torch.Tensor | None],
    expected: Sequence[torch.Tensor | None],
    *,
    rtol: float,
    atol: float,
    what: str = "tensor",
) -> None:
    """Compare two lists of tensors; the message names the first index that differs."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a is None or e is None:
            assert a is None and e is None, f"{what}[{i}]: {a} vs {e}"
            continue
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=prefixed(f"{what}[{i}]"))
