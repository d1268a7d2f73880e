"""Pieces every strategy shares: building the optimizer after the model is prepared."""

from __future__ import annotations

from typing import Union

import torch

from .._types import OptimizerFactory


def build_optimizer(
    model: torch.nn.Module, optimizer: Union[torch.optim.Optimizer, OptimizerFactory]
) -> torch.optim.Optimizer:
    """Return a built optimizer as is, or call the factory on the trainable parameters."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    built = optimizer([p for p in model.parameters() if p.requires_grad])
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer factory {optimizer!r} returned {type(built).__name__}; it must return "
            "a torch.optim.Optimizer, e.g. `lambda params: torch.optim.AdamW(params, lr=3e-4)`."
        )
    return built
