"""Pick the learning rate with the LR range test, then train with it.

`lk.find_lr` sweeps the lr from 1e-5 to 10 over 100 steps, leaves the model as it was and
suggests the lr where the smoothed loss fell fastest; fit() then trains the blobs
classifier of classifier.py with it.

Run: python examples/find_lr.py [--steps 100] [--plot lr.png]
"""

from __future__ import annotations

import argparse

import torch
from classifier import loss_fn, make_blobs

import loopkit as lk


def main(steps: int = 100, plot: str | None = None) -> tuple[float, float]:
    """Return the suggested lr and the eval accuracy fit() reaches with it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 128), torch.nn.ReLU(), torch.nn.Linear(128, 5))
    train, test = make_blobs(4096), make_blobs(1024, seed=1)

    found = lk.find_lr(
        model,
        train,
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),  # lr: set by the sweep
        batch_size=64,
        min_lr=1e-5,
        max_lr=10.0,
        num_steps=100,
        plot_path=plot,
    )
    print(found)
    assert found.suggestion is not None, found.reason
    result = lk.fit(
        model,  # as it was before find_lr: the sweep's updates were undone
        train,
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=found.suggestion),
        max_steps=steps,
        batch_size=64,
        eval_data=test,
        metrics=["accuracy"],
        log_every=None,
        progress=False,
    )
    print(result)
    return found.suggestion, result.history[-1]["eval/accuracy"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--plot", default=None, help="write the lr curve to this PNG")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.plot)
