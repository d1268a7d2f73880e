"""examples/test_my_transform.py: the user test file's tests pass when run as plain calls."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from pathlib import Path

import pytest

from loopkit.testing import Checker

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module("test_my_transform")
    finally:
        sys.path.remove(str(EXAMPLES))


EXAMPLE = load_example()
TESTS = sorted(name for name in vars(EXAMPLE) if name.startswith("test_"))


@pytest.mark.parametrize("name", TESTS)
def test_example_test_passes(name: str, tmp_path: Path, monkeypatch) -> None:
    # On the path while it runs: spawned ranks import the example's pieces by name.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    test = getattr(EXAMPLE, name)
    marks = getattr(test, "pytestmark", [])
    if any(m.name == "skipif" and m.args and m.args[0] for m in marks):
        pytest.skip("skipped in the example itself")
    fixtures = {
        "tmp_path": tmp_path,
        "loopkit_check": functools.partial(Checker, directory=tmp_path / "checkpoints"),
    }
    wanted = inspect.signature(test).parameters
    test(**{k: v for k, v in fixtures.items() if k in wanted})
