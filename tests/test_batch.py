"""Walking batches: move keeps container types; batch_size reads the leading dimension."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch

from loopkit._batch import batch_size, move

META = torch.device("meta")  # a real device change that needs no accelerator

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Example:
    tokens: torch.Tensor
    mask: torch.Tensor
    name: str = "example"
    length: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self.length = self.tokens.shape[-1]


def t(*shape: int) -> torch.Tensor:
    return torch.ones(*shape)


def structure(value: Any) -> Any:
    """The batch's shape with tensors replaced by (device type, shape, dtype)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.device.type, tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return (type(value), [(k, structure(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value), [structure(v) for v in value])
    if dataclasses.is_dataclass(value):
        return (
            type(value),
            [(f.name, structure(getattr(value, f.name))) for f in dataclasses.fields(value)],
        )
    return value


CASES = {
    "tensor": t(2, 3),
    "dict": {"x": t(2, 3), "y": t(2)},
    "ordered-dict": OrderedDict(b=t(2), a=t(2, 1)),
    "tuple": (t(2, 3), t(2)),
    "list": [t(2, 3), t(2)],
    "namedtuple": Pair(t(2, 3), t(2)),
    "dataclass": Example(t(2, 5), t(2, 5)),
    "nested": {
        "pair": Pair([t(2), 3], {"ex": Example(t(1, 2), t(1, 2), "n")}),
        "meta": "keep",
        "n": None,
    },
}


def expected_structure(value: Any) -> Any:
    """structure() of the batch as if every tensor lived on meta, computed from the input."""
    s = structure(value)

    def swap(node: Any) -> Any:
        if isinstance(node, tuple) and node and node[0] == "tensor":
            return ("tensor", "meta", node[2], node[3])
        if isinstance(node, tuple) and len(node) == 2 and isinstance(node[1], list):
            return (node[0], [swap(x) for x in node[1]])
        if isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], str):
            return (node[0], swap(node[1]))
        return node

    return swap(s)


@pytest.mark.parametrize("batch", CASES.values(), ids=CASES.keys())
def test_move_keeps_container_types_and_moves_every_tensor(batch: Any) -> None:
    moved = move(batch, META, non_blocking=False)
    assert type(moved) is type(batch)
    assert structure(moved) == expected_structure(batch)
    assert structure(batch) == structure(move(batch, torch.device("cpu"), False))  # input untouched


def test_move_keeps_namedtuple_fields_and_dataclass_values() -> None:
    moved = move(CASES["nested"], META, False)
    assert moved["pair"].x[1] == 3 and moved["meta"] == "keep" and moved["n"] is None
    example = moved["pair"].y["ex"]
    assert example.name == "n" and example.length == 2 and example.tokens.is_meta


def test_move_to_the_same_device_returns_the_same_tensors() -> None:
    x = t(2, 3)
    assert move(x, torch.device("cpu"), False) is x
    assert move({"x": x}, torch.device("cpu"), False)["x"] is x


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        (t(5, 3), 5),
        ({"ids": t(4, 7), "labels": t(4)}, 4),
        ((t(3), t(3, 2)), 3),
        ([7, "a", t(6, 1)], 6),  # the first *tensor*, depth first
        (Pair({"z": t(2, 9)}, t(8)), 2),
        (Example(t(9, 2), t(9, 2)), 9),
    ],
    ids=["tensor", "dict", "tuple", "list-with-scalars", "nested", "dataclass"],
)
def test_batch_size_is_the_leading_dim_of_the_first_tensor(batch: Any, size: int) -> None:
    assert batch_size(batch, "here") == size


@pytest.mark.parametrize(
    ("batch", "part"),
    [
        (t(0, 4), "empty batch (first tensor has shape (0, 4))"),
        ({"x": [1, 2]}, "(dict) has no tensor"),
        (torch.tensor(3.0), "(Tensor) has no tensor with a batch dimension"),
        ("text", "(str) has no tensor"),
    ],
    ids=["empty", "no-tensor", "0-d", "string"],
)
def test_batch_size_errors(batch: Any, part: str) -> None:
    with pytest.raises(ValueError) as info:
        batch_size(batch, "forward(f)")
    assert str(info.value).startswith("forward(f): ") and part in str(info.value)
