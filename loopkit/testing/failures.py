"""How a failing check reports itself: the message parts, the reproduction line, names.

Every check failure reads: a header (what differed, at which optimizer step), the first
difference (path, size, tolerance), an explanation with the usual causes, and a
`Reproduce: check_x(make_model, loss_fn, ...)` line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .assertions import Tolerance, first_difference

__all__ = ["detached_graph_error", "failure", "name_of", "raise_if_different", "reproduce"]


def name_of(obj: object) -> str:
    """A short, readable name for a user piece (function, factory record, class)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return repr(obj)
    return getattr(obj, "__qualname__", None) or repr(obj)


def reproduce(call: str, **values: Any) -> str:
    """'Reproduce: call(make_model, loss_fn, a=1, ...)'; values that are None are left out."""
    args = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
    return f"Reproduce: {call}(make_model, loss_fn, {args})"


def failure(header: str, difference: str, explanation: str, repro: str) -> AssertionError:
    """The AssertionError a check raises: one part per line, indented under the header."""
    return AssertionError(f"{header}\n  {difference}\n  {explanation}\n  {repro}")


def raise_if_different(
    actual: Any,
    expected: Any,
    tol: Tolerance,
    *,
    names: tuple[str, str],
    header: str,
    explanation: str,
    repro: str,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Raise the check's failure if `actual` and `expected` differ beyond `tol` at any leaf:
    `header`, the first difference (path, size, tolerance), `explanation`, `repro`.

    `names` name the two sides in the difference; `notes` add a hint to a leaf's path.
    """
    diff = first_difference(actual, expected, tolerance=lambda _: tol, names=names, notes=notes)
    if diff is not None:
        raise failure(header, diff, explanation, repro)


def detached_graph_error(where: str, error: RuntimeError) -> AssertionError | None:
    """An AssertionError explaining a detached graph, if `error` is autograd saying so."""
    text = str(error)
    if "does not require grad" in text or "does not have a grad_fn" in text:
        return AssertionError(
            f"{where}: backward failed because the loss is not connected to any parameter "
            f"({text.splitlines()[0]}). A detached graph: look for .detach(), .item(), "
            "torch.no_grad() or tensors rebuilt from numpy/Python numbers in loss_fn or "
            "the model's forward."
        )
    return None
