"""torchmetrics objects in fit() and evaluate(), on a real classification set.

The set: lines of the standard library's source labelled with their package (the example
examples/torchmetrics_classification.py builds it; nothing is downloaded). The oracle:
the same metrics computed once, afterwards, over every eval prediction (torchmetrics'
functional API), and accuracy and macro F1 also by hand from the confusion matrix in
float64, so a wrong torchmetrics call is caught too.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

import loopkit as lk
from loopkit.fit import _check_monitors, _resolve_metrics
from loopkit.metrics import Mean, TorchMetric, as_metric, is_torchmetrics, result_keys
from loopkit.strategies import SingleDevice

torchmetrics = pytest.importorskip("torchmetrics")  # the optional extra "metrics"
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import (  # noqa: E402
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
)
from torchmetrics.functional.classification import (  # noqa: E402
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "torchmetrics_classification.py"
CLASSES, BATCH, N_EVAL = 3, 16, 75  # 75 = 4 batches of 16 and one of 11


@cache
def example() -> ModuleType:
    """examples/torchmetrics_classification.py, loaded by path (its data and model)."""
    spec = importlib.util.spec_from_file_location("_torchmetrics_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def lines() -> tuple[Any, Any]:
    """(train, eval) TensorDatasets of stdlib lines; 3 imbalanced classes."""
    ex = example()
    return ex.split(ex.stdlib_lines((150, 100, 50)), n_eval=N_EVAL)  # type: ignore[no-any-return]


def collection() -> Any:
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(CLASSES, average="micro"),
            "f1_macro": MulticlassF1Score(CLASSES, average="macro"),
            "auroc": MulticlassAUROC(CLASSES),
        }
    )


def by_hand(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 from the confusion matrix, in float64, without torchmetrics."""
    pred = logits.argmax(-1)
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.float64)
    confusion.index_put_((y, pred), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    tp = confusion.diagonal()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return {"eval/accuracy": float(tp.sum() / len(y)), "eval/f1_macro": float(f1.mean())}


def over_all_predictions(model: torch.nn.Module, held: Any) -> dict[str, float]:
    """The metrics of `model` over every eval item at once, computed afterwards."""
    x, y = held.tensors
    with torch.no_grad():
        logits = model.eval()(x)
    expected = {
        "eval/f1": multiclass_f1_score(logits, y, CLASSES, average="weighted"),
        "eval/accuracy": multiclass_accuracy(logits, y, CLASSES, average="micro"),
        "eval/f1_macro": multiclass_f1_score(logits, y, CLASSES, average="macro"),
        "eval/auroc": multiclass_auroc(logits, y, CLASSES),
    }
    values = {key: float(value) for key, value in expected.items()}
    for key, value in by_hand(logits, y).items():
        assert values[key] == pytest.approx(value, rel=1e-6), key
    return values


def test_fit_metrics_equal_the_metrics_over_all_predictions() -> None:
    """F1 alone and a collection (accuracy, macro F1, AUROC), evaluated twice by fit: the
    second evaluation, of the final weights, equals the metrics over all its predictions
    (so every batch, the short last one too, counts once, and nothing is left over from
    the first evaluation)."""
    ex = example()
    train, held = lines()
    result = lk.fit(
        ex.make_model(),
        train,
        loss_fn=ex.loss_fn,
        optimizer={"name": "AdamW", "lr": 3e-3},
        max_steps=20,
        batch_size=BATCH,
        eval_data=held,
        eval_every=10,
        metrics={"f1": MulticlassF1Score(CLASSES, average="weighted"), "package": collection()},
        callbacks=[lk.EarlyStopping(monitor="eval/auroc", mode="max", patience=5)],
        progress=False,
    )
    evals = [row for row in result.history if "eval/f1" in row]
    assert [row["step"] for row in evals] == [10, 20]
    last = evals[-1]
    expected = over_all_predictions(result.state.model, held)
    assert set(expected) | {"eval/loss", "eval/perplexity"} == {
        k for k in last if k.startswith("eval/")
    }
    for key, value in expected.items():
        assert last[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert result.best is not None and result.best["eval/auroc"] == max(
        row["eval/auroc"] for row in evals
    )


def test_evaluate_takes_a_collection_alone_or_wrapped_and_resets_it() -> None:
    ex = example()
    _, held = lines()
    x, y = held.tensors
    state = lk.TrainState.create(
        ex.make_model(seed=1),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        strategy=SingleDevice("cpu"),
    )
    expected = over_all_predictions(state.model, held)
    tuples = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N_EVAL, BATCH)]
    alone = lk.evaluate(state, tuples, collection())
    assert alone == {k: pytest.approx(expected[k], rel=1e-6) for k in alone}
    assert list(alone) == ["eval/accuracy", "eval/auroc", "eval/f1_macro"]  # the collection's order

    # Dict batches without the default "labels": the wrapper says where the targets are;
    # predict= gives the logits.
    dicts = [{"x": xb, "package": yb} for xb, yb in tuples]
    label = lambda b: b["package"]  # noqa: E731
    auroc = MetricCollection([MulticlassAUROC(CLASSES)], prefix="pkg_")
    f1 = MulticlassF1Score(CLASSES, average="weighted")
    metrics = {"all": TorchMetric(auroc, target=label), "f1": TorchMetric(f1, target=label)}
    predict = lambda model, batch: model(batch["x"])  # noqa: E731
    first = lk.evaluate(state, dicts, metrics, predict=predict)
    second = lk.evaluate(state, dicts, metrics, predict=predict)  # reset at the start
    assert (
        first
        == second
        == {
            "eval/pkg_MulticlassAUROC": pytest.approx(expected["eval/auroc"], rel=1e-6),
            "eval/f1": pytest.approx(expected["eval/f1"], rel=1e-6),
        }
    )


def test_torchmetrics_objects_are_wrapped_not_taken_for_functions() -> None:
    f1 = MulticlassF1Score(CLASSES)
    wrapped = as_metric(f1, "f1")
    assert isinstance(wrapped, TorchMetric) and wrapped.metric is f1
    assert as_metric(wrapped) is wrapped
    assert is_torchmetrics(collection()) and not is_torchmetrics(lk.Accuracy())
    assert isinstance(as_metric(lambda outputs, batch: outputs.mean()), Mean)
    assert wrapped.state_tensors() == []  # torchmetrics syncs itself, in compute()
    with pytest.raises(TypeError, match=r"TorchMetric\(metric=.*Accuracy.*torchmetrics Metric"):
        TorchMetric(lk.Accuracy())
    with pytest.raises(TypeError, match=r"TorchMetric\(preds=3\)"):
        TorchMetric(f1, preds=3)  # type: ignore[arg-type]


def test_fit_knows_a_collections_keys_before_training() -> None:
    """The keys of a collection are checked against the monitors and each other before
    any step (fit would fail at once if it trained first: max_steps is huge)."""
    ex = example()
    train, held = lines()
    kwargs: dict[str, Any] = dict(
        loss_fn=ex.loss_fn,
        optimizer={"name": "SGD", "lr": 0.1},
        max_steps=10**9,
        eval_data=held,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"monitor='eval/f1_micro'.*'eval/auroc'.*'eval/f1_macro'"):
        lk.fit(
            ex.make_model(),
            train,
            metrics=collection(),  # alone: FitConfig takes it, fit knows its entries
            callbacks=[lk.EarlyStopping(monitor="eval/f1_micro")],
            **kwargs,
        )
    with pytest.raises(ValueError, match=r"'eval/accuracy' would be reported by both 'accuracy'"):
        lk.fit(ex.make_model(), train, metrics=["accuracy", collection()], **kwargs)
    with pytest.raises(ValueError, match=r"two MulticlassF1Score objects in the list"):
        lk.fit(
            ex.make_model(),
            train,
            metrics=[MulticlassF1Score(CLASSES), MulticlassF1Score(CLASSES, average="micro")],
            **kwargs,
        )
    listed = _resolve_metrics(["top2_accuracy", collection(), MulticlassF1Score(CLASSES)])
    keys = [key for name, metric in listed.items() for key in result_keys(name, metric)]
    assert keys == [
        "eval/top2_accuracy",
        "eval/accuracy",
        "eval/auroc",
        "eval/f1_macro",
        "eval/MulticlassF1Score",
    ]
    monitors = [lk.EarlyStopping(monitor=key) for key in keys]
    _check_monitors(monitors, listed, has_eval=True)  # every key can be monitored


def test_evaluate_refuses_name_collisions() -> None:
    ex = example()
    state = lk.TrainState.create(ex.make_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    data = [lines()[1][:BATCH]]
    clash = MetricCollection({"loss": MulticlassAccuracy(CLASSES)})
    with pytest.raises(ValueError, match=r"'eval/loss' is computed from loss_fn"):
        lk.evaluate(state, data, {"c": clash}, loss_fn=ex.loss_fn)
    with pytest.raises(ValueError, match=r"'eval/accuracy' is given twice"):
        lk.evaluate(state, data, {"accuracy": lk.Accuracy(), "c": collection()})


def _fake_state(**strategy: Any) -> Any:
    """A record whose strategy has the given attributes (the checks run before any work)."""
    defaults = {"device": "cpu", "world_size": 2, "dp_world_size": 2}
    return SimpleNamespace(
        check_fresh=lambda: None, strategy=SimpleNamespace(**{**defaults, **strategy})
    )


@pytest.mark.parametrize(
    ("strategy", "metric", "message"),
    [
        (
            {"world_size": 4, "dp_world_size": 2},
            MulticlassF1Score(CLASSES),
            r"under a pipeline strategy.*loopkit.Accuracy.*loopkit.save_model",
        ),
        ({}, MulticlassF1Score(CLASSES, dist_sync_on_step=True), r"dist_sync_on_step=True"),
        (
            {},
            MetricCollection([MulticlassAUROC(CLASSES, sync_on_compute=False)]),
            r"MulticlassAUROC\(sync_on_compute=False\) with several ranks",
        ),
    ],
    ids=["pipeline", "dist_sync_on_step", "sync_on_compute"],
)
def test_evaluate_refuses_what_torchmetrics_cannot_sync(
    strategy: dict[str, Any], metric: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        lk.evaluate(_fake_state(**strategy), [lines()[1][:BATCH]], {"m": metric})


def test_a_non_scalar_result_is_named() -> None:
    state = lk.TrainState.create(
        example().make_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    per_class = MulticlassF1Score(CLASSES, average=None)
    with pytest.raises(ValueError, match=r"metric 'eval/f1': a tensor of shape \(3,\)"):
        lk.evaluate(state, [lines()[1][:BATCH]], {"f1": per_class})


class _RefuseTorchmetrics:
    """A meta path finder that fails any import of torchmetrics."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchmetrics" or name.startswith("torchmetrics."):
            raise AssertionError(f"loopkit imported {name}")


def test_torchmetrics_is_not_imported_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """loopkit's metrics, fit and evaluate run with torchmetrics gone from sys.modules and
    any import of it refused (this process imported it; the test hides it)."""
    for name in [n for n in sys.modules if n.split(".")[0] == "torchmetrics"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_RefuseTorchmetrics(), *sys.meta_path])
    ex = example()
    _, held = lines()
    result = lk.fit(
        ex.make_model(),
        held,
        loss_fn=ex.loss_fn,
        optimizer={"name": "SGD", "lr": 0.1},
        max_steps=1,
        batch_size=BATCH,
        eval_data=held,
        metrics=["accuracy"],
        progress=False,
    )
    assert "eval/accuracy" in result.history[-1]
    lk.evaluate(result.state, [held[:BATCH]], {"f": lambda outputs, batch: outputs.mean()})
    assert not is_torchmetrics(object())
    assert "torchmetrics" not in sys.modules
