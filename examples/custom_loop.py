"""A training loop written by hand from loopkit's transforms: a chain and a plain for loop.

Run: python examples/custom_loop.py [--steps 200]
"""

from __future__ import annotations

import argparse

import torch

import loopkit as lk


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals: a small task an MLP must actually learn."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    sign = label * 2 - 1
    x = torch.stack([t * torch.cos(t) * sign, t * torch.sin(t) * sign], dim=1) / 5
    return x + 0.05 * torch.randn(n, 2, generator=g), label


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def main(steps: int = 300, micro_batch: int = 32, k: int = 2) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    )
    state = lk.TrainState.create(
        model,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-2),
        schedule=lk.schedules.cosine(warmup_steps=20, total_steps=steps),
        seed=0,
    )
    # One optimizer step = k micro-batches: forward+backward each, close the window, clip, step.
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(k), lk.clip(1.0), lk.optimizer_step())
    print(step)

    x, y = make_data(steps * k * micro_batch)
    for i in range(steps * k):
        batch = (x[i * micro_batch : (i + 1) * micro_batch], y[i * micro_batch : (i + 1) * micro_batch])
        state = step(state, batch)  # the old record is consumed; keep the new one
        if state.micro_step == 0 and state.step % 50 == 0:
            # host sync: metrics stay on the device until we choose to print them
            print(f"step {state.step:4d}  loss {float(state.metrics['train/loss']):.4f}  "
                  f"lr {state.metrics['train/lr']:.2e}  grad_norm {float(state.metrics['train/grad_norm']):.3f}")

    x_test, y_test = make_data(2000, seed=1)
    with torch.no_grad():
        accuracy = (state.model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
