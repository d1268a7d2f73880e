"""State trees: a TrainState (or any nested structure) as `{path: leaf}`, gathered where sharded.

Paths read `model.0.weight`, `grad.0.weight`, `optimizer.state[3].exp_avg`,
`counters.step`; the assertions compare two trees leaf by leaf along them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..state import TrainState
from ..strategies import unwrap

__all__ = ["Leaf", "flatten", "full_tensor", "optimizer_param_names", "state_tree"]

Leaf = Any
"""A leaf of a tree: a tensor, number, str, bool or None."""


def _join(path: str, key: object) -> str:
    if isinstance(key, str):
        return f"{path}.{key}" if path else key
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}[{key!r}]"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered to a plain tensor (a collective); others as they are."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor  # type: ignore[no-any-return]


def _gathered(tree: Any) -> Any:
    """`tree` with every sharded tensor gathered (optimizer state under FSDP)."""
    if isinstance(tree, torch.Tensor):
        return full_tensor(tree)
    if isinstance(tree, Mapping):
        return {k: _gathered(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_gathered(v) for v in tree)
    return tree


def flatten(tree: Any, path: str = "") -> dict[str, Leaf]:
    """`{path: leaf}` for a nested structure, in traversal order.

    Mappings and dataclasses add `.key` (`[key]` for non-string keys), sequences `[i]`. A
    TrainState is read with `state_tree`, a module through its state_dict and an optimizer
    through its state_dict.
    """
    out: dict[str, Leaf] = {}

    def walk(node: Any, at: str) -> None:
        if isinstance(node, TrainState):
            walk(state_tree(node), at)
        elif isinstance(node, torch.Tensor):
            out[at] = node
        elif isinstance(node, torch.nn.Module):
            walk(dict(node.state_dict()), at)
        elif isinstance(node, torch.optim.Optimizer):
            walk(node.state_dict(), at)
        elif isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, _join(at, key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, _join(at, i))
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name), _join(at, f.name))
        else:
            out[at] = node

    walk(tree, path)
    return out


def state_tree(state: TrainState, *, grads: bool = True) -> dict[str, Any]:
    """Everything a TrainState holds that a resumed or repeated run must reproduce.

    Keys: `model` (parameters and buffers by name), `grad` (by parameter name), `optimizer`
    (its state_dict: `optimizer.state[i].exp_avg`, `optimizer.param_groups[0].lr`),
    `counters`, `window`, `loss_scale`, `growth_tracker` and `metrics`. Sharded tensors are
    gathered (a collective: call it on every rank). Reading does not consume the record.
    """
    module = unwrap(state.model)
    tree: dict[str, Any] = {
        "model": {k: full_tensor(v) for k, v in module.state_dict().items()},
    }
    if grads:
        tree["grad"] = {
            name: None if p.grad is None else full_tensor(p.grad)
            for name, p in module.named_parameters()
        }
    tree["optimizer"] = _gathered(state.optimizer.state_dict())
    tree["counters"] = {
        "step": state.step,
        "micro_step": state.micro_step,
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "skipped_steps": state.skipped_steps,
        "seed": state.seed,
    }
    window = state.window
    tree["window"] = {
        "loss": window.loss,
        "count": window.count,
        "ref_count": window.ref_count,
        "size": window.size,
        "closed": window.closed,
        "found_inf": window.found_inf,
    }
    tree["loss_scale"] = state.loss_scale
    tree["growth_tracker"] = state.growth_tracker
    tree["metrics"] = dict(state.metrics)
    return tree


def optimizer_param_names(state: TrainState) -> dict[int, str]:
    """Index in the optimizer's state_dict -> parameter name (`optimizer.state[i]`)."""
    names = {id(p): n for n, p in unwrap(state.model).named_parameters()}
    return {i: names.get(id(p), "?") for i, p in enumerate(state.params)}
