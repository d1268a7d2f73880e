"""Assertions over nested training state: compare structure first, then values, by path.

A failure names the first differing leaf by its path (`model.0.weight`,
`optimizer.state[3].exp_avg`), says by how much it differs and which tolerance was used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..precision import Precision, PrecisionName, as_precision
from ..state import TrainState
from .trees import Leaf, flatten, optimizer_param_names, state_tree

# Defaults by dtype: float64 tight (only summation order may differ), float32 looser,
# bf16/fp16 loose (autocast rounds every matmul to 8 or 11 mantissa bits).
_DEFAULTS: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (5e-3, 5e-4),
    torch.bfloat16: (2e-2, 2e-3),
}


@dataclass(frozen=True, slots=True)
class Tolerance:
    """A comparison tolerance and where it came from (printed in every failure message).

    A value passes when `|actual - expected| <= atol + rtol * |expected|`; `rtol = atol = 0`
    means bitwise equality.
    """

    rtol: float
    atol: float
    reason: str = "given"

    @property
    def bitwise(self) -> bool:
        return self.rtol == 0 and self.atol == 0

    def __str__(self) -> str:
        if self.bitwise:
            return f"bitwise equality ({self.reason})"
        return f"rtol={self.rtol:g}, atol={self.atol:g} ({self.reason})"


def tolerance_for(
    dtype: torch.dtype | None = torch.float32,
    precision: Precision | PrecisionName | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> Tolerance:
    """The default tolerance for values of `dtype` computed under `precision`.

    float64: rtol=1e-7, atol=1e-10; float32: rtol=1e-4, atol=1e-5; fp16: rtol=5e-3,
    atol=5e-4; bf16: rtol=2e-2, atol=2e-3. Under bf16/fp16 autocast the looser of the
    parameter dtype and the autocast dtype applies. A given `rtol` or `atol` overrides its
    default.

    Example:
        >>> print(tolerance_for(torch.float64))
        rtol=1e-07, atol=1e-10 (default for torch.float64)
        >>> print(tolerance_for(torch.float32, "bf16"))
        rtol=0.02, atol=0.002 (default for torch.float32 under bf16 autocast)
    """
    if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
        default, reason = (0.0, 0.0), f"exact for {dtype}"
    else:
        base = dtype if dtype in _DEFAULTS else torch.float32
        default, reason = _DEFAULTS[base], f"default for {dtype}"
        autocast = None if precision is None else as_precision(precision).dtype
        if autocast is not None and _DEFAULTS[autocast][0] > default[0]:
            default = _DEFAULTS[autocast]
            reason += f" under {as_precision(precision).name} autocast"  # type: ignore[arg-type]
    if rtol is None and atol is None:
        return Tolerance(default[0], default[1], reason)
    return Tolerance(
        default[0] if rtol is None else float(rtol),
        default[1] if atol is None else float(atol),
        "given" if rtol is not None and atol is not None else f"given, else {reason}",
    )


# --- comparison ---------------------------------------------------------------------------


def _describe(leaf: Leaf) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"tensor{tuple(leaf.shape)} {leaf.dtype}"
    return type(leaf).__name__


def _kind(leaf: Leaf) -> tuple[object, ...]:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype)
    if isinstance(leaf, bool) or leaf is None or isinstance(leaf, str):
        return (type(leaf).__name__,)
    if isinstance(leaf, (int, float)):
        return ("number",)
    return (type(leaf).__name__,)


def _short(values: list[str], limit: int = 8) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def _structure_problems(
    actual: dict[str, Leaf], expected: dict[str, Leaf], names: tuple[str, str]
) -> list[str]:
    problems = []
    missing = [p for p in expected if p not in actual]
    unexpected = [p for p in actual if p not in expected]
    if missing:
        problems.append(f"in {names[1]} only: {_short(missing)}")
    if unexpected:
        problems.append(f"in {names[0]} only: {_short(unexpected)}")
    kinds = [
        f"{p}: {names[0]} {_describe(actual[p])}, {names[1]} {_describe(expected[p])}"
        for p in expected
        if p in actual
        and _kind(actual[p]) != _kind(expected[p])
        and not _scalar_pair(actual[p], expected[p])
    ]
    if kinds:
        problems.append("kind/shape/dtype differ: " + _short(kinds, 5))
    return problems


def _is_number(leaf: Leaf) -> bool:
    return isinstance(leaf, (int, float)) and not isinstance(leaf, bool)


def _scalar_pair(a: Leaf, e: Leaf) -> bool:
    """A 0-d tensor and a Python number: the same value in two forms (a counter such as
    tokens_seen is an int until the first device count is added to it)."""
    for x, y in ((a, e), (e, a)):
        if isinstance(x, torch.Tensor) and x.ndim == 0 and _is_number(y):
            return True
    return False


def _leaf_difference(
    a: Leaf, e: Leaf, tolerance: Callable[[Leaf], Tolerance], names: tuple[str, str]
) -> str | None:
    """None if `a` matches `e`, else a description of how they differ."""
    if _scalar_pair(a, e):
        tensor = a if isinstance(a, torch.Tensor) else e
        tol = tolerance(tensor)
        if not (tensor.is_floating_point() or tensor.is_complex()):
            tol = Tolerance(0.0, 0.0, f"exact for {tensor.dtype}")
        a_num = a.item() if isinstance(a, torch.Tensor) else a
        e_num = e.item() if isinstance(e, torch.Tensor) else e
        if abs(a_num - e_num) <= tol.atol + tol.rtol * abs(e_num) or a_num == e_num:
            return None
        return (
            f"{names[0]} {a_num!r}, {names[1]} {e_num!r} (|diff| {abs(a_num - e_num):.3g}, {tol})"
        )
    if isinstance(e, torch.Tensor):
        tol = tolerance(e)
        a_t, e_t = a.detach(), e.detach()
        if a_t.device != e_t.device:
            a_t = a_t.cpu()
            e_t = e_t.cpu()
        if not (e_t.is_floating_point() or e_t.is_complex()):
            bad = a_t != e_t
            if not bool(bad.any()):
                return None
            tol = Tolerance(0.0, 0.0, f"exact for {e_t.dtype}")
            a64, e64 = a_t.to(torch.float64), e_t.to(torch.float64)
        else:
            a64, e64 = (
                a_t.to(torch.complex128 if e_t.is_complex() else torch.float64),
                e_t.to(torch.complex128 if e_t.is_complex() else torch.float64),
            )
            close = torch.isclose(a64, e64, rtol=tol.rtol, atol=tol.atol, equal_nan=True)
            bad = ~close
            if not bool(bad.any()):
                return None
        diff = (a64 - e64).abs()
        diff = torch.where(bad, diff.nan_to_num(nan=math.inf), torch.zeros_like(diff))
        worst = int(diff.reshape(-1).argmax()) if diff.numel() else 0
        index = (
            tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e_t.shape))
            if e_t.ndim
            else ()
        )
        a_val, e_val = a64.reshape(-1)[worst].item(), e64.reshape(-1)[worst].item()
        max_abs = float(diff.reshape(-1)[worst])
        rel = max_abs / abs(e_val) if e_val != 0 else math.inf
        where = f" at index {index}" if index else ""
        return (
            f"max |diff| {max_abs:.3g} (relative {rel:.3g}){where}: {names[0]} {a_val!r}, "
            f"{names[1]} {e_val!r}; {int(bad.sum())} of {e_t.numel()} elements outside "
            f"{tol}"
        )
    if isinstance(e, float) or isinstance(a, float):
        tol = tolerance(e)
        if isinstance(a, (int, float)) and isinstance(e, (int, float)):
            if (math.isnan(a) and math.isnan(e)) or abs(a - e) <= tol.atol + tol.rtol * abs(e):
                return None
            return f"{names[0]} {a!r}, {names[1]} {e!r} (|diff| {abs(a - e):.3g}, {tol})"
    if a == e:
        return None
    return f"{names[0]} {a!r}, {names[1]} {e!r}"


def assert_trees_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    names: tuple[str, str] = ("actual", "expected"),
    notes: Mapping[str, str] | None = None,
) -> None:
    """Assert two nested structures match: same paths and kinds first, then close values.

    Leaves are tensors (compared elementwise), numbers, strings, bools and None; containers
    are mappings, lists, tuples, dataclasses, modules, optimizers and TrainStates (see
    `flatten`). Tolerances default by dtype (see `tolerance_for`); integer tensors, ints and
    strings compare exactly; NaN equals NaN.

    Args:
        actual: the structure under test.
        expected: the structure it must match.
        rtol: relative tolerance (default: by each leaf's dtype).
        atol: absolute tolerance (default: by each leaf's dtype).
        names: how the message calls the two sides, e.g. ("resumed", "uninterrupted").
        notes: path prefix -> a note appended when a leaf under it differs.

    Raises:
        AssertionError: naming the first differing leaf by path (and how many others differ),
            or every structural difference.

    Example:
        >>> a = {"w": torch.ones(2), "step": 3}
        >>> assert_trees_close(a, {"w": torch.ones(2), "step": 3})
        >>> assert_trees_close(a, {"w": torch.tensor([1.0, 1.5]), "step": 3})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        AssertionError: 1 of 2 leaves differ; first w: max |diff| 0.5 (relative 0.333) at ...
    """

    def tolerance(leaf: Leaf) -> Tolerance:
        dtype = leaf.dtype if isinstance(leaf, torch.Tensor) else torch.float64
        return tolerance_for(dtype, rtol=rtol, atol=atol)

    message = first_difference(actual, expected, tolerance=tolerance, names=names, notes=notes)
    if message is not None:
        raise AssertionError(message)


def _note(path: str, notes: Mapping[str, str] | None) -> str:
    for prefix, note in (notes or {}).items():
        if path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "["):
            return f" ({note})"
    return ""


def _value_failures(
    flat_a: dict[str, Leaf],
    flat_e: dict[str, Leaf],
    tolerance: Callable[[Leaf], Tolerance],
    names: tuple[str, str],
) -> list[tuple[str, str]]:
    failures = []
    for path, e in flat_e.items():
        detail = _leaf_difference(flat_a[path], e, tolerance, names)
        if detail is not None:
            failures.append((path, detail))
    return failures


def assert_states_close(
    actual: TrainState,
    expected: TrainState,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    grads: bool = True,
    include: tuple[str, ...] | None = None,
    names: tuple[str, str] = ("actual", "expected"),
) -> None:
    """Assert two TrainStates hold the same model, gradients, optimizer state and counters.

    Compares `state_tree(actual)` with `state_tree(expected)`; optimizer-state paths are
    annotated with their parameter's name. Neither record is consumed.

    Args:
        actual: the record under test.
        expected: the reference record.
        rtol: relative tolerance (default: by dtype; 0 with atol 0 means bitwise).
        atol: absolute tolerance (default: by dtype).
        grads: also compare gradients.
        include: compare only these top-level keys of `state_tree` (e.g. ("model",)).
        names: how the message calls the two sides.

    Raises:
        AssertionError: naming the first differing leaf by path.
    """
    tree_a = state_tree(actual, grads=grads)
    tree_e = state_tree(expected, grads=grads)
    if include is not None:
        tree_a = {k: v for k, v in tree_a.items() if k in include}
        tree_e = {k: v for k, v in tree_e.items() if k in include}
    notes = {
        f"optimizer.state[{i}]": f"parameter {n!r}"
        for i, n in optimizer_param_names(expected).items()
    }
    assert_trees_close(tree_a, tree_e, rtol=rtol, atol=atol, names=names, notes=notes)


def first_difference(
    actual: Any,
    expected: Any,
    *,
    tolerance: Callable[[Leaf], Tolerance],
    names: tuple[str, str] = ("actual", "expected"),
    notes: Mapping[str, str] | None = None,
) -> str | None:
    """Like assert_trees_close with a per-leaf tolerance; returns the message or None."""
    flat_a, flat_e = flatten(actual), flatten(expected)
    problems = _structure_problems(flat_a, flat_e, names)
    if problems:
        return "structures differ; " + "; ".join(problems)
    failures = _value_failures(flat_a, flat_e, tolerance, names)
    if not failures:
        return None
    path, detail = failures[0]
    others = f" (also: {_short([p for p, _ in failures[1:]], 6)})" if len(failures) > 1 else ""
    where = f"{path}{_note(path, notes)}"
    return f"{len(failures)} of {len(flat_e)} leaves differ; first {where}: {detail}{others}"


__all__ = [
    "Tolerance",
    "assert_states_close",
    "assert_trees_close",
    "first_difference",
    "flatten",
    "optimizer_param_names",
    "state_tree",
    "tolerance_for",
]
