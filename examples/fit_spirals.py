"""The task of custom_loop.py, trained with fit() instead of a hand-written loop.

Run: python examples/fit_spirals.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
from custom_loop import loss_fn, make_data

import loopkit as lk


def main(steps: int = 300) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    )
    train = torch.utils.data.TensorDataset(*make_data(steps * 64))
    test = torch.utils.data.TensorDataset(*make_data(2000, seed=1))
    result = lk.fit(
        model,
        train,
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-2),
        schedule=lk.schedules.cosine(warmup_steps=20, total_steps=steps),
        max_steps=steps,
        batch_size=32,
        accumulate=2,
        clip=1.0,
        eval_data=test,
        eval_every=100,
        metrics=["accuracy"],
        log_every=50,
        progress=False,
    )
    print(result)
    return result.history[-1]["eval/accuracy"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
