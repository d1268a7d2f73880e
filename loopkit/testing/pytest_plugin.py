"""pytest plugin: the `loopkit_check` fixture (a Checker factory with a per-test directory).

Enable it in your conftest.py with `pytest_plugins = ["loopkit.testing.pytest_plugin"]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from .bound_checks import Checker

__all__ = ["loopkit_check"]


@pytest.fixture
def loopkit_check(tmp_path: Path) -> Callable[..., Checker]:
    """`loopkit_check(make_model, loss_fn, **settings)` -> a Checker whose resume check
    writes into this test's tmp_path.

    Example (a test file)::

        def test_my_step(loopkit_check):
            check = loopkit_check(make_model, loss_fn, make_step=my_make_step)
            check.all(batch=batch)
    """
    return functools.partial(Checker, directory=tmp_path / "loopkit-checkpoints")
