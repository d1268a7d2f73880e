"""Builders for spirals.toml: the task of examples/custom_loop.py as a `loopkit fit` run config.

`loopkit fit examples/configs/spirals.toml` puts this directory on sys.path (it holds the
config), and the config's `python_path = [".."]` adds examples/, so `custom_loop` imports.
"""

from __future__ import annotations

import torch
from custom_loop import make_data


def build_model(hidden: int = 64) -> torch.nn.Module:
    """The MLP of custom_loop.py: 2 -> hidden -> hidden -> 2, tanh."""
    return torch.nn.Sequential(
        torch.nn.Linear(2, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 2),
    )


def build_data(n: int = 9600, seed: int = 0) -> torch.utils.data.TensorDataset:
    """`n` points of the two spirals (custom_loop.make_data) as a dataset."""
    return torch.utils.data.TensorDataset(*make_data(n, seed=seed))
