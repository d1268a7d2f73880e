"""torchmetrics under 2 ranks (gloo): fit's evaluation equals one process's over the set.

The eval set is real (lines of the standard library's source, labelled with their package;
examples/torchmetrics_classification.py) and does not split evenly: 65 items in batches of
8 give rank 0 33 items (5 batches, the last of 1) and rank 1 32 items (4 batches). Under
FSDP every forward is a collective, so rank 1 repeats its last forward once, uncounted:
torchmetrics must not see it. torchmetrics syncs its own states in compute() (sum states
for F1, list states for AUROC, gathered from ranks of unequal sizes); loopkit's own
Accuracy is summed by evaluate's all_reduce in the same evaluation. The model does not
change (SGD with lr=0), so both sides evaluate the same weights.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from _models import TIMEOUT_S
from _ranks import run_ranks

import loopkit as lk
from loopkit.strategies import DDP, FSDP, SingleDevice

torchmetrics = pytest.importorskip("torchmetrics")
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import (  # noqa: E402
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torchmetrics_classification.py"
CLASSES, BATCH, N_EVAL = 3, 8, 65


@cache
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_torchmetrics_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def lines() -> tuple[Any, Any]:
    ex = example()
    return ex.split(ex.stdlib_lines((60, 40, 30)), n_eval=N_EVAL)  # type: ignore[no-any-return]


def metrics() -> dict[str, Any]:
    return {
        "f1": MulticlassF1Score(CLASSES, average="weighted"),
        "package": MetricCollection(
            {"accuracy": MulticlassAccuracy(CLASSES), "auroc": MulticlassAUROC(CLASSES)}
        ),
        "lk_accuracy": lk.Accuracy(),
    }


def fit_then_evaluate(rank: int, kind: str) -> dict[str, Any]:
    """fit one step with lr=0 on this rank (its evaluation at the end); under DDP, then
    two evaluations where rank 1 reads no batch at all."""
    torch.set_num_threads(1)
    ex = example()
    train, held = lines()
    strategy = DDP(timeout_s=TIMEOUT_S) if kind == "DDP" else FSDP(timeout_s=TIMEOUT_S)
    result = lk.fit(
        ex.make_model(seed=2),
        train,
        loss_fn=ex.loss_fn,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        strategy=strategy,
        batch_size=BATCH,
        max_steps=1,
        eval_data=held,
        metrics=metrics(),
        progress=False,
    )
    out: dict[str, Any] = {
        "fit": {k: v for k, v in result.history[-1].items() if k.startswith("eval/")}
    }
    if kind == "DDP":
        mine = [held[:BATCH]] if rank == 0 else []  # rank 1: no batch
        f1 = {"f1": MulticlassF1Score(CLASSES, average="weighted")}
        out["idle_f1"] = lk.evaluate(result.state, mine, f1)
        try:
            lk.evaluate(result.state, mine, {"auroc": MulticlassAUROC(CLASSES)})
        except ValueError as error:
            out["idle_auroc"] = str(error)
    return out


def one_process(data: list[Any]) -> dict[str, float]:
    ex = example()
    state = lk.TrainState.create(
        ex.make_model(seed=2),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        strategy=SingleDevice("cpu"),
    )
    return lk.evaluate(state, data, metrics(), loss_fn=ex.loss_fn)


@pytest.mark.parametrize("kind", ["DDP", "FSDP"], ids=["strategy(DDP)", "strategy(FSDP)"])
def test_two_rank_torchmetrics_equal_one_process(kind: str) -> None:
    _, held = lines()
    expected = one_process([held[i : i + BATCH] for i in range(0, N_EVAL, BATCH)])
    assert {"eval/f1", "eval/accuracy", "eval/auroc", "eval/lk_accuracy"} <= expected.keys()
    ranks = [o.unwrap() for o in run_ranks(2, fit_then_evaluate, kind, timeout_s=4 * TIMEOUT_S)]
    for values in ranks:
        assert values["fit"].keys() == expected.keys()
        for key, value in expected.items():
            assert values["fit"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    if kind == "DDP":
        # One batch on rank 0, none on rank 1: F1's sum states sync fine; AUROC's list
        # states cannot be gathered from rank 1, so both ranks refuse alike (no hang).
        alone = one_process([held[:BATCH]])
        for values in ranks:
            assert values["idle_f1"] == {"eval/f1": pytest.approx(alone["eval/f1"], rel=1e-6)}
            assert "1 rank(s) read no eval batch" in values["idle_auroc"]
