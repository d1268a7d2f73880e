"""Every example runs (with a small budget) and does what its docstring says."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def load(name: str):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_custom_loop_learns_the_spirals():
    assert load("custom_loop").main(steps=150) > 0.9


def test_fit_spirals_matches_its_custom_loop_twin():
    assert load("fit_spirals").main(steps=150) > 0.9


def test_classifier_stops_early_and_restores_the_best(tmp_path):
    result = load("classifier").main(epochs=30, log_dir=str(tmp_path), patience=2)
    assert result.stopped_by.startswith("EarlyStopping")
    assert result.state.epoch < 30
    assert result.best["eval/accuracy"] > 0.9
    assert (tmp_path / "metrics.csv").exists()
