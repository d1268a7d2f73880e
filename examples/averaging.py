"""Weight averaging: an EMA of noisy SGD weights evaluates better than the last weights.

A linear regression trained by SGD with a large step on small batches: the weights keep
bouncing around the optimum, and their exponential moving average sits closer to it.
fit keeps the average (`average=lk.ema(...)`), evaluates with it (`eval_weights="ema"`),
and save_model writes it as a plain model.safetensors.

    python examples/averaging.py
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

import loopkit as lk


def data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.linspace(-1.0, 1.0, 8)
    y = x @ w + 0.5 * torch.randn(n, generator=g)
    return torch.utils.data.TensorDataset(x, y[:, None])


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def main(steps: int = 400, out_dir: str = "averaging_out") -> dict[str, float]:
    """Train, then compare the eval loss of the last weights and of their EMA."""
    torch.manual_seed(0)
    eval_data = data(512, seed=1)
    result = lk.fit(
        torch.nn.Linear(8, 1),
        data(2048, seed=0),
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.2),
        batch_size=4,
        max_steps=steps,
        average=lk.ema(0.98, start=steps // 4),  # appended after fit's optimizer step
        eval_data=eval_data,
        eval_batch_size=512,
        eval_weights="ema",  # fit's evaluations (and result.best) use the average
        progress=False,
        log_every=None,
    )
    state = result.state
    batches = [eval_data[:]]
    losses = {
        weights: lk.evaluate(state, batches, loss_fn=loss_fn, weights=weights)["eval/loss"]
        for weights in ("model", "ema")
    }
    path = lk.save_model(state, Path(out_dir), weights="ema")  # the averaged weights
    saved = safetensors.torch.load_file(path)
    assert torch.equal(saved["weight"], state.averages["ema"].tensors[0])
    print(f"eval loss: last weights {losses['model']:.4f}, EMA {losses['ema']:.4f}")
    return losses


if __name__ == "__main__":
    main()
