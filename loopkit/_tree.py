"""Split nested state (optimizer, data loader, scheduler) into JSON plus a flat tensor dict.

Checkpoints hold no pickle: every tensor goes to safetensors under a generated key and the
rest to JSON, with tuples, non-string dict keys and non-finite floats tagged so that
`join(*split(x)) == x` for the types torch's state_dicts use.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"


TENSOR = _TENSOR
"""The skeleton key that marks a tensor reference: `{TENSOR: key}`."""


def split(
    tree: Any, prefix: str = "", *, by_path: bool = False
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (JSON-able skeleton, tensors by key) for a nested structure.

    With `by_path`, each tensor is keyed by its path in the tree (e.g.
    "optimizer.state.fc.weight.exp_avg") and kept as it is: live (D)Tensors for
    torch.distributed.checkpoint, which writes each rank's shard and loads in place.

    Raises:
        TypeError: a leaf that is neither a tensor, a number, a string, a bool nor None
            (the message gives its path).
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor) and by_path:
            key = f"{prefix}{path.lstrip('.')}"
            if key in tensors:
                raise ValueError(f"two tensors at the same path {key!r}; rename one.")
            tensors[key] = node
            return {_TENSOR: key}
        if isinstance(node, torch.Tensor):
            key = f"{prefix}{len(tensors)}"
            value = node.detach().cpu().contiguous()
            # safetensors refuses tensors that share storage (the same tensor twice, a view
            # and its base): give each its own copy; join() returns them unshared.
            ptr = value.untyped_storage().data_ptr()
            if ptr and ptr in storages:
                value = value.clone()
            storages.add(ptr)
            tensors[key] = value
            return {_TENSOR: key}
        if isinstance(node, bool) or node is None or isinstance(node, (str, int)):
            return node
        if isinstance(node, float):
            return node if math.isfinite(node) else {_FLOAT: repr(node)}
        if isinstance(node, tuple):
            return {_TUPLE: [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node) and not any(
                k in (_TENSOR, _TUPLE, _DICT, _FLOAT) for k in node
            ):
                return {k: walk(v, f"{path}.{k}") for k, v in node.items()}
            return {_DICT: [[walk(k, path), walk(v, f"{path}[{k!r}]")] for k, v in node.items()]}
        raise TypeError(
            f"cannot store {type(node).__name__} at {path or 'the root'} in a checkpoint: only "
            "tensors, numbers, strings, bools, None, lists, tuples and dicts are kept (no pickle)."
        )

    return walk(tree, ""), tensors


def join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split`.

    Raises:
        KeyError: the skeleton names a tensor the tensor file lacks.
    """
    if isinstance(skeleton, list):
        return [join(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _TUPLE in skeleton:
            return tuple(join(v, tensors) for v in skeleton[_TUPLE])
        if _DICT in skeleton:
            return {_hashable(join(k, tensors)): join(v, tensors) for k, v in skeleton[_DICT]}
        if _FLOAT in skeleton:
            return float(skeleton[_FLOAT])
        return {k: join(v, tensors) for k, v in skeleton.items()}
    return skeleton


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
