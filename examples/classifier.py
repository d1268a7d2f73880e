"""A classifier with eval metrics, early stopping and best-model tracking, via fit().

Run: python examples/classifier.py [--epochs 30] [--log-dir runs/classifier]
"""

from __future__ import annotations

import argparse

import torch

import loopkit as lk


def make_blobs(n: int, classes: int = 5, dim: int = 10, seed: int = 0):
    """Gaussian blobs with overlapping classes: accuracy saturates, so early stopping fires."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.utils.data.TensorDataset(centers[y] + torch.randn(n, dim, generator=g), y)


def loss_fn(model, batch):
    x, y = batch
    return lk.cross_entropy(model(x), y)


def main(epochs: int = 30, log_dir: str | None = None, patience: int = 3) -> lk.FitResult:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 128), torch.nn.ReLU(), torch.nn.Linear(128, 5))
    best = lk.BestModel(monitor="eval/loss")
    result = lk.fit(
        model,
        make_blobs(4096),
        loss_fn=loss_fn,
        optimizer={"name": "AdamW", "lr": 1e-2, "weight_decay": 0.01},
        epochs=epochs,
        batch_size=64,
        eval_data=make_blobs(1024, seed=1),
        metrics=["accuracy", "top2_accuracy"],
        callbacks=[lk.EarlyStopping(monitor="eval/loss", patience=patience), best],
        log_every=20,
        log_dir=log_dir,
        progress=False,
    )
    print(result)
    best.restore(result.state.model)
    print(f"restored the weights of step {best.best_step} (eval/loss {best.best_value:.4f})")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--log-dir", default=None)
    args = parser.parse_args()
    main(args.epochs, args.log_dir)
