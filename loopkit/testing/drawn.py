"""Checks over drawn arguments: a hypothesis search strategy in place of a value.

`check_determinism(make_model, loss_fn, batches=search.classification_batches(...))` runs
the check as its own property test, under `@given`, over drawn batches. Hypothesis is
imported only when a search strategy is actually passed (the caller has it then).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .result import CheckResult

__all__ = ["accepts_search_strategies", "is_search_strategy"]

F = TypeVar("F", bound=Callable[..., Any])


def is_search_strategy(value: object) -> bool:
    """Whether `value` is a hypothesis search strategy (never imports hypothesis itself)."""
    module = sys.modules.get("hypothesis.strategies")
    return module is not None and isinstance(value, module.SearchStrategy)


def accepts_search_strategies(*names: str) -> Callable[[F], F]:
    """Let keyword arguments `names` be hypothesis search strategies: the check then runs
    under `@given` over drawn values (use `max_examples=` to size it)."""

    def decorate(check: F) -> F:
        @functools.wraps(check)
        def wrapper(*args: Any, max_examples: int | None = None, **kwargs: Any) -> Any:
            drawn = {n: kwargs[n] for n in names if is_search_strategy(kwargs.get(n))}
            if not drawn:
                return check(*args, **kwargs)
            _run_property_test(check, args, kwargs, drawn, max_examples)
            return CheckResult(check.__name__, None, 0, f"ran over drawn {', '.join(drawn)}")

        return wrapper  # type: ignore[return-value]

    return decorate


def _run_property_test(
    check: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    drawn: dict[str, Any],
    max_examples: int | None,
) -> None:
    from hypothesis import HealthCheck, given, settings  # optional: the caller passed one

    options: dict[str, Any] = {
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    if max_examples is not None:
        options["max_examples"] = max_examples

    @settings(**options)
    @given(**drawn)
    def property_test(**values: Any) -> None:
        check(*args, **{**kwargs, **values})

    property_test()
