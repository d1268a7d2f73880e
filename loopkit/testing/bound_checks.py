"""Checker: bind a model factory and loss_fn once, then run any check in one line.

The `loopkit_check` pytest fixture (loopkit.testing.pytest_plugin) hands out Checkers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .accumulation import check_accumulation_invariance
from .determinism import check_determinism
from .reference import check_matches_reference
from .result import CheckResult
from .resume import check_resume_equivalence
from .sanity import check_gradient_flow, check_loss_decreases
from .stale_reuse import check_no_stale_reuse
from .strategy_equivalence import check_strategy_equivalence

__all__ = ["Checker"]


def _accepts(check: Callable[..., Any]) -> set[str]:
    """The keyword arguments `check` takes (through its search-strategy wrapper)."""
    return set(inspect.signature(inspect.unwrap(check)).parameters) | {"max_examples"}


class Checker:
    """Your pieces, bound once; each method runs the check of the same name.

    Settings given here (`make_step=`, `optimizer=`, `precision=`, `seed=`, ...) apply to
    every check that takes them; a method's own keyword arguments override them. The
    `loopkit_check` pytest fixture builds one with a per-test checkpoint directory.

    Example:
        >>> import torch, loopkit as lk
        >>> from loopkit.testing import Checker
        >>> from loopkit.testing.search import MLPFactory
        >>> check = Checker(MLPFactory(d_in=4, hidden=(8,), d_out=3),
        ...                 lambda model, b: lk.cross_entropy(model(b[0]), b[1]))
        >>> batch = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
        >>> print(check.accumulation_invariance(batches=batch).tolerance)
        rtol=1e-07, atol=1e-10 (default for torch.float64)
    """

    def __init__(
        self,
        make_model: Callable[[], Any],
        loss_fn: Any,
        *,
        directory: str | Path | None = None,
        **settings: Any,
    ) -> None:
        self.make_model = make_model
        self.loss_fn = loss_fn
        self.directory = directory
        self.settings = settings

    def _run(self, check: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        accepted = _accepts(check)
        merged = {k: v for k, v in self.settings.items() if k in accepted}
        if "directory" in accepted and self.directory is not None:
            merged["directory"] = self.directory
        merged.update(kwargs)
        return check(self.make_model, self.loss_fn, **merged)

    def accumulation_invariance(self, **kwargs: Any) -> CheckResult:
        """check_accumulation_invariance with the bound pieces."""
        return self._run(check_accumulation_invariance, kwargs)  # type: ignore[no-any-return]

    def determinism(self, **kwargs: Any) -> CheckResult:
        """check_determinism with the bound pieces."""
        return self._run(check_determinism, kwargs)  # type: ignore[no-any-return]

    def resume_equivalence(self, **kwargs: Any) -> CheckResult:
        """check_resume_equivalence with the bound pieces (and the bound directory)."""
        return self._run(check_resume_equivalence, kwargs)  # type: ignore[no-any-return]

    def strategy_equivalence(self, **kwargs: Any) -> CheckResult:
        """check_strategy_equivalence with the bound pieces (they must pickle)."""
        return self._run(check_strategy_equivalence, kwargs)  # type: ignore[no-any-return]

    def loss_decreases(self, **kwargs: Any) -> CheckResult:
        """check_loss_decreases with the bound pieces."""
        return self._run(check_loss_decreases, kwargs)  # type: ignore[no-any-return]

    def gradient_flow(self, **kwargs: Any) -> CheckResult:
        """check_gradient_flow with the bound pieces."""
        return self._run(check_gradient_flow, kwargs)  # type: ignore[no-any-return]

    def no_stale_reuse(self, **kwargs: Any) -> CheckResult:
        """check_no_stale_reuse with the bound pieces."""
        return self._run(check_no_stale_reuse, kwargs)  # type: ignore[no-any-return]

    def matches_reference(self, **kwargs: Any) -> CheckResult:
        """check_matches_reference with the bound pieces."""
        return self._run(check_matches_reference, kwargs)  # type: ignore[no-any-return]

    def all(
        self, *, batch: Any, batches: Any = None, skip: Iterable[str] = ()
    ) -> list[CheckResult]:
        """Run every single-process check: accumulation invariance, determinism, resume
        equivalence, no stale reuse, gradient flow and loss decreases.

        Args:
            batch: one batch (for gradient flow and loss decreases, and the default for the
                others).
            batches: batches for the multi-step checks (default: `batch`).
            skip: names of checks to leave out, e.g. ("loss_decreases",).
        """
        skipped = set(skip)
        many = batch if batches is None else batches
        plan: list[tuple[str, dict[str, Any]]] = [
            ("accumulation_invariance", {"batches": many}),
            ("determinism", {"batches": many}),
            ("resume_equivalence", {"batches": many}),
            ("no_stale_reuse", {"batches": many}),
            ("gradient_flow", {"batch": batch}),
            ("loss_decreases", {"batch": batch}),
        ]
        unknown = skipped - {name for name, _ in plan}
        if unknown:
            raise ValueError(
                f"Checker.all(skip={sorted(unknown)}): unknown check names; known: "
                f"{[name for name, _ in plan]}."
            )
        return [getattr(self, name)(**kw) for name, kw in plan if name not in skipped]

    def __repr__(self) -> str:
        return f"Checker(make_model={self.make_model!r}, loss_fn={self.loss_fn!r})"
