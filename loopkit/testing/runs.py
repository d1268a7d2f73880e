"""Running a step in a check: one window at a time, and copies of what each window left."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._types import Transform
from ..state import TrainState
from ..strategies import unwrap

__all__ = ["clone_tree", "params_tree", "run_window"]


def run_window(
    state: TrainState, step: Transform, micro_batches: Sequence[Any], where: str
) -> TrainState:
    """Apply `step` to every micro-batch of one window; check that it closed the window."""
    before = state.step
    for micro_batch in micro_batches:
        state = step(state, micro_batch)
    if state.step != before + 1 or state.micro_step != 0:
        raise AssertionError(
            f"{where}: after the {len(micro_batches)} micro-batch(es) of window {before}, the "
            f"record is at step {state.step}, micro_step {state.micro_step}; expected step "
            f"{before + 1}, micro_step 0. Does make_step(k) build a chain with accumulate(k) "
            "and optimizer_step() for the k it is given?"
        )
    return state


def params_tree(state: TrainState) -> dict[str, Any]:
    """Detached copies of the named parameters plus the closed window's train/loss."""
    module = unwrap(state.model)
    tree: dict[str, Any] = {"model": {n: p.detach().clone() for n, p in module.named_parameters()}}
    loss = state.metrics.get("train/loss")
    if isinstance(loss, torch.Tensor):
        tree["metrics"] = {"train/loss": loss.detach().clone()}
    return tree


def clone_tree(tree: Any) -> Any:
    """A copy of a nested structure with every tensor detached and cloned."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [clone_tree(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone_tree(v) for v in tree)
    return tree
