"""CheckResult: what a passing check compared, and with which tolerance."""

from __future__ import annotations

from dataclasses import dataclass

from .assertions import Tolerance

__all__ = ["CheckResult"]


@dataclass(frozen=True)
class CheckResult:
    """What a passing check compared, and with which tolerance.

    Attributes:
        check: the check's name.
        tolerance: the tolerance used (None where nothing was compared numerically).
        comparisons: how many states (or parameters) were compared.
        details: one line on what was run.
    """

    check: str
    tolerance: Tolerance | None
    comparisons: int
    details: str

    def __str__(self) -> str:
        tol = f"; tolerance {self.tolerance}" if self.tolerance is not None else ""
        return f"{self.check}: passed ({self.comparisons} comparisons{tol}). {self.details}"
