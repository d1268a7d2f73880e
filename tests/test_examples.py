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


def test_torchmetrics_example_reports_the_metrics_over_all_predictions():
    pytest.importorskip("torchmetrics")
    result, once = load("torchmetrics_classification").main(steps=20, counts=(60, 40, 30))
    last = next(row for row in reversed(result.history) if "eval/f1" in row)
    assert once.keys() == {"accuracy", "f1", "auroc"}
    for key, value in once.items():
        assert last[f"eval/{key}"] == pytest.approx(value, rel=1e-6), key


def test_find_lr_suggests_an_lr_that_trains(tmp_path):
    suggestion, accuracy = load("find_lr").main(steps=100, plot=str(tmp_path / "lr.png"))
    assert 1e-3 < suggestion < 1e-1
    assert accuracy > 0.95
    assert (tmp_path / "lr.png").exists()


def test_averaging_example_ema_evaluates_better_than_the_last_weights(tmp_path):
    losses = load("averaging").main(steps=200, out_dir=str(tmp_path / "ema"))
    assert losses["ema"] < 0.8 * losses["model"]
    assert (tmp_path / "ema" / "model.safetensors").exists()


def test_mlflow_logging_reads_its_run_back(tmp_path):
    pytest.importorskip("mlflow")
    metrics = load("mlflow_logging").main(root=str(tmp_path), steps=20)
    assert [step for step, _ in metrics["train/loss"]] == [5, 10, 15, 20]
    assert [step for step, _ in metrics["eval/accuracy"]] == [10, 20]
    assert metrics["eval/accuracy"][-1][1] > 0.8
    # the artifacts sit beside the database, not under ./mlruns of the working directory
    assert list(tmp_path.glob("mlruns/artifacts/*/artifacts/model/model.safetensors"))
