"""find_lr: the suggestion against an analytic answer, the bitwise restore, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

import loopkit as lk
from loopkit import lr_finder
from loopkit.lr_finder import LRFinderResult, find_lr

N, D = 256, 8


def least_squares(eigenvalues: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X, y with the mse loss's Hessian 2 X^T X / N having exactly `eigenvalues`, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    z = torch.randn(N, D, generator=gen, dtype=torch.float64)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / N)).T  # z^T z / N = I
    scale = torch.tensor(eigenvalues, dtype=torch.float64).div(2).sqrt()
    x = z @ torch.diag(scale) @ q.T
    w = torch.randn(D, 1, generator=gen, dtype=torch.float64)
    y = x @ w + 0.01 * torch.randn(N, 1, generator=gen, dtype=torch.float64)
    return x, y


def mse_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> lk.Loss:
    return lk.mse(model(batch[0]), batch[1])


def linear_model() -> torch.nn.Module:
    model = torch.nn.Linear(D, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    return model


def good_range(
    hessian_eigenvalues: torch.Tensor, steps: int, reduction: float
) -> tuple[float, float]:
    """The constant lrs at which full-batch gradient descent on the quadratic cuts the
    excess loss by `reduction` within `steps` steps, whatever the start.

    Each eigen-direction's error is multiplied by (1 - lr * lam) per step, its loss by its
    square: the lr works iff max_i |1 - lr * lam_i| <= reduction ** (1 / (2 * steps)),
    i.e. (1 - rho) / lam_min <= lr <= (1 + rho) / lam_max, inside the stability limit
    lr < 2 / lam_max.
    """
    rho = reduction ** (1 / (2 * steps))
    lam_min, lam_max = float(hessian_eigenvalues.min()), float(hessian_eigenvalues.max())
    return (1 - rho) / lam_min, (1 + rho) / lam_max


@pytest.mark.parametrize(
    "eigenvalues",
    [[4.0] * D, [2.0, 2.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0], [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0]],
    ids=["kappa(1)", "kappa(2)", "kappa(4)"],
)
def test_the_suggestion_lies_in_the_analytic_good_range(eigenvalues):
    x, y = least_squares(eigenvalues)
    hessian = 2 * x.T @ x / N
    lam = torch.linalg.eigvalsh(hessian)
    assert torch.allclose(lam.sort().values, torch.tensor(sorted(eigenvalues), dtype=lam.dtype))
    lam_max = float(lam.max())
    steps = 100
    result = find_lr(
        linear_model(),
        [(x, y)],  # one full batch per step: gradient descent on the quadratic
        loss_fn=mse_loss,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        min_lr=1e-4,
        max_lr=100.0,
        num_steps=steps,
    )
    low, high = good_range(lam, steps, reduction=1e-3)
    assert result.suggestion is not None, result.reason
    assert low <= result.suggestion <= high, (low, result.suggestion, high)
    # Below 2 / lam_max every direction contracts, so the loss only falls: the sweep cannot
    # stop as diverged before it; past it the loss grows and the sweep stops soon after.
    assert result.stopped_by == "diverged"
    assert 2 / lam_max < result.lrs[-1] < 20 / lam_max
    # The suggestion trains: gradient descent at that constant lr, written by hand.
    w = torch.zeros(D, 1, dtype=torch.float64)
    start = float(((x @ w - y) ** 2).mean())
    floor = float(((x @ torch.linalg.lstsq(x, y).solution - y) ** 2).mean())
    for _ in range(steps):
        w = w - result.suggestion * 2 * x.T @ (x @ w - y) / N
    assert float(((x @ w - y) ** 2).mean()) - floor <= 1e-3 * (start - floor)


def small_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def classification_data(n: int = 96) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i], y[i]) for i in range(n)]


def ce_loss(model, batch):
    return lk.cross_entropy(model(batch[0]), batch[1])


def _everything(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Every tensor find_lr may touch, by name: weights, buffers, grads, optimizer state."""
    found = {f"model.{k}": v for k, v in model.state_dict().items()}
    found.update({f"grad.{k}": p.grad for k, p in model.named_parameters() if p.grad is not None})
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            found[f"optim.{index}.{key}"] = torch.as_tensor(value)
    found["rng"] = torch.get_rng_state()
    return {k: v.detach().clone() for k, v in found.items()}


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[str]:
    return [repr(sorted(g.items())) for g in optimizer.state_dict()["param_groups"]]


def test_model_and_adamw_are_restored_bitwise():
    model = small_net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    data = classification_data()
    for x, y in classification_data_batches()[:3]:  # AdamW gets state; BatchNorm buffers
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    before = _everything(model, optimizer)  # the last step's grads are kept too
    groups = _hyperparameters(optimizer)
    ids_before = [id(p) for p in model.parameters()]
    result = find_lr(
        model, data, loss_fn=ce_loss, optimizer=optimizer, batch_size=8, num_steps=30, skip_start=2
    )
    assert len(result.lrs) > 10
    after = _everything(model, optimizer)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert [id(p) for p in model.parameters()] == ids_before
    assert _hyperparameters(optimizer) == groups
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_a_failing_sweep_still_restores(monkeypatch):
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_that_fails(model, batch):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("boom")
        return ce_loss(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        find_lr(
            model,
            classification_data(),
            loss_fn=loss_that_fails,
            batch_size=8,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            num_steps=20,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_sweep_is_exponential_and_the_result_reads_well():
    result = find_lr(
        small_net(),
        classification_data(),
        loss_fn=ce_loss,
        batch_size=8,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        min_lr=1e-3,
        max_lr=1.0,
        num_steps=16,
        accumulate=2,
        skip_start=2,
        diverge_factor=math.inf,
    )
    assert result.stopped_by == "num_steps"
    assert len(result.lrs) == len(result.losses) == len(result.smoothed_losses) == 16
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert result.lrs[0] == pytest.approx(1e-3) and result.lrs[-1] == pytest.approx(1.0)
    assert max(ratios) == pytest.approx(min(ratios))
    assert "suggestion" in str(result) and "16 steps" in str(result)


def test_smoothing_is_a_bias_corrected_moving_average():
    curve = lr_finder._Curve(0.5, math.inf, [], [], [])
    for lr, loss in ((1.0, 4.0), (2.0, 2.0), (3.0, 1.0)):
        curve.add(lr, loss)
    # average: 2.0, 2.0, 1.5; corrected by 1 - 0.5**k: 4.0, 2.667, 1.714
    assert curve.smoothed == pytest.approx([4.0, 8 / 3, 1.5 / 0.875])
    assert curve.add(4.0, math.nan) == "nonfinite"


def test_divergence_and_a_spent_iterable_stop_the_sweep():
    curve = lr_finder._Curve(0.0, 4.0, [], [], [])
    assert [curve.add(1.0, x) for x in (1.0, 0.5, 1.9)] == [None, None, None]
    assert curve.add(1.0, 2.1) == "diverged"
    batches = iter(classification_data_batches())
    result = find_lr(
        small_net(),
        batches,
        loss_fn=ce_loss,
        num_steps=50,
        skip_start=0,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert result.stopped_by == "data" and len(result.lrs) == 6


def classification_data_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = classification_data(48)
    return [
        (torch.stack([x for x, _ in data[i : i + 8]]), torch.stack([y for _, y in data[i : i + 8]]))
        for i in range(0, 48, 8)
    ]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "lr.png"
    result = find_lr(
        small_net(),
        classification_data(),
        loss_fn=ce_loss,
        batch_size=8,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        num_steps=20,
        skip_start=2,
        plot_path=path,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(result, LRFinderResult)


def test_a_missing_matplotlib_names_the_extra_before_any_work(monkeypatch):
    real = lr_finder.importlib.util.find_spec
    monkeypatch.setattr(
        lr_finder.importlib.util,
        "find_spec",
        lambda name: None if name == "matplotlib" else real(name),
    )

    def never(model, batch):
        raise AssertionError("trained although the plot cannot be drawn")

    with pytest.raises(ModuleNotFoundError, match=r"loopkit\[plot\]"):
        find_lr(
            small_net(),
            classification_data(),
            loss_fn=never,
            batch_size=8,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            plot_path="lr.png",
        )


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


class _NotSingleDevice:
    """Stands for DDP / FSDP here: building a real one would join a process group."""


@pytest.mark.parametrize(
    ("changes", "error", "names"),
    [
        ({"min_lr": 0.0}, ValueError, "min_lr=0.0"),
        ({"max_lr": math.nan}, ValueError, "max_lr=nan"),
        ({"min_lr": 1.0, "max_lr": 0.1}, ValueError, "max_lr=0.1"),
        ({"num_steps": 1}, ValueError, "num_steps=1"),
        ({"num_steps": 10.0}, ValueError, "num_steps=10.0"),
        ({"accumulate": 0}, ValueError, "accumulate=0"),
        ({"smoothing": 1.0}, ValueError, "smoothing=1.0"),
        ({"diverge_factor": 1.0}, ValueError, "diverge_factor=1.0"),
        ({"skip_start": 99}, ValueError, "skip_start=99"),
        ({"loss_fn": "mse"}, TypeError, "loss_fn='mse'"),
        ({"optimizer": 0.1}, TypeError, "optimizer=0.1"),
        ({"strategy": _NotSingleDevice()}, TypeError, "strategy="),
        ({"plot_path": 3}, TypeError, "plot_path=3"),
        ({"model": "net"}, TypeError, "model=str"),
    ],
    ids=lambda value: str(value) if not isinstance(value, dict) else ",".join(value),
)
def test_bad_arguments_are_refused_by_name_before_any_work(changes, error, names):
    def never(model, batch):
        raise AssertionError("trained with a bad argument")

    arguments = {"model": small_net(), "loss_fn": never, "optimizer": sgd}
    arguments.update(changes)
    model = arguments.pop("model")
    with pytest.raises(error, match=rf"find_lr\({names}"):
        find_lr(model, classification_data(), batch_size=8, **arguments)
