"""Parameter helpers: weight-decay groups and freezing."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

_NORMS = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.RMSNorm,
)


def param_groups(
    model: torch.nn.Module | Iterable[torch.nn.Parameter], *, weight_decay: float
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    Given a module, biases and the parameters of normalisation layers get no weight decay
    (the usual rule of HF's Trainer). Given bare parameters (as an optimizer factory
    receives them), tensors with fewer than 2 dimensions get none. Frozen parameters are
    left out. Empty groups are dropped.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> [len(g["params"]) for g in param_groups(model, weight_decay=0.1)]
        [1, 3]
    """
    if isinstance(weight_decay, bool) or not (
        isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"param_groups(weight_decay={weight_decay!r}): must be a float >= 0.")
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    if isinstance(model, torch.nn.Module):
        seen: set[int] = set()
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                skip = isinstance(module, _NORMS) or name == "bias"
                (no_decay if skip else decay).append(param)
    else:
        for param in model:
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def freeze(model: torch.nn.Module, which: str | Iterable[str] | Callable[[str], bool]) -> list[str]:
    """Set requires_grad=False on the parameters `which` selects; return their names.

    Args:
        model: the module whose parameters to freeze.
        which: a name prefix, several prefixes, or a predicate on the parameter name.
            Frozen parameters get no gradient and are left out of the optimizer.

    Raises:
        ValueError: `which` matches no parameter.
    """
    if callable(which):
        match = which
    else:
        prefixes = (which,) if isinstance(which, str) else tuple(which)
        match = lambda name: name.startswith(prefixes)  # noqa: E731
    names = [name for name, _ in model.named_parameters() if match(name)]
    if not names:
        raise ValueError(
            f"freeze(which={which!r}): matches no parameter. Parameter names start with: "
            f"{sorted({n.split('.')[0] for n, _ in model.named_parameters()})}."
        )
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


__all__ = [
    "freeze",
    "param_groups",
]
