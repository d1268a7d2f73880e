"""Issue 19's features used as a newcomer from Lightning / HF would: the edges they hit.

Each test is one thing a user tried that crashed with an unclear message or gave a wrong
result: a token-level or single-logit torchmetrics metric, MeanMetric fed the targets as
weights, an LR-finder plot of a sweep without a finite loss, MLflow metric names that it
refuses or that two keys would share, and `lr: 3e-4` in a YAML config.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import loopkit as lk
from loopkit.lr_finder import LRFinderResult


def _state(model: torch.nn.Module) -> lk.TrainState:
    return lk.TrainState.create(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


class _Tokens(torch.nn.Module):
    """A language-model head: (N, T) token ids -> (N, T, V) logits, classes last."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


# ------------------------------------------------------------------------- torchmetrics


def test_token_level_torchmetrics_read_classes_last_and_skip_padding() -> None:
    pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.text import Perplexity

    torch.manual_seed(0)
    vocab = 7
    ids = torch.randint(0, vocab, (12, 6))
    labels = torch.randint(0, vocab, (12, 6))
    labels[:, 4:] = -100  # padding
    batches = [(ids[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)]
    state = _state(_Tokens(vocab))
    metric = MulticlassAccuracy(vocab, average="micro", ignore_index=-100)
    perplexity = Perplexity(ignore_index=-100)  # wants the classes last: left as they are
    got = lk.evaluate(
        state,
        batches,
        {"tm": metric, "lk": lk.Accuracy(), "ppl": perplexity},
        loss_fn=lambda model, batch: lk.cross_entropy(model(batch[0]), batch[1]),
    )
    with torch.no_grad():
        hits = state.model(ids).argmax(-1) == labels
    expected = hits[:, :4].double().mean().item()  # the 48 real tokens only
    assert got["eval/tm"] == pytest.approx(expected, rel=1e-6)
    assert got["eval/lk"] == pytest.approx(expected, rel=1e-12)
    assert got["eval/ppl"] == pytest.approx(got["eval/perplexity"], rel=1e-5)


def test_a_single_logit_per_item_meets_binary_metrics() -> None:
    pytest.importorskip("torchmetrics")
    from torchmetrics.classification import BinaryAccuracy
    from torchmetrics.regression import MeanSquaredError

    torch.manual_seed(0)
    x = torch.randn(40, 5)
    y = (x[:, 0] > 0).long()
    state = _state(torch.nn.Linear(5, 1))  # (N, 1) outputs against (N,) targets
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    got = lk.evaluate(state, batches, {"acc": BinaryAccuracy(), "mse": MeanSquaredError()})
    with torch.no_grad():
        logits = state.model(x).squeeze(-1)
    assert got["eval/acc"] == pytest.approx(((logits > 0).long() == y).double().mean().item())
    assert got["eval/mse"] == pytest.approx(((logits - y) ** 2).double().mean().item(), rel=1e-6)


def test_an_ambiguous_class_dim_and_a_failing_update_name_the_shapes_and_the_fix() -> None:
    pytest.importorskip("torchmetrics")
    from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

    state = _state(_Tokens(5))
    square = [(torch.randint(0, 5, (2, 5)), torch.randint(0, 5, (2, 5)))]  # T == V == 5
    with pytest.raises(ValueError, match=r"classes could be the last dim .* preds=lambda"):
        lk.evaluate(state, square, {"acc": MulticlassAccuracy(5)})
    for preds in (lambda outputs: outputs.movedim(-1, 1), lambda outputs: outputs):  # the fixes
        chosen = lk.TorchMetric(MulticlassAccuracy(5), preds=preds)
        assert 0 <= lk.evaluate(state, square, {"acc": chosen})["eval/acc"] <= 1
    two_logits = [(torch.randn(6, 3), torch.randint(0, 2, (6,)))]
    with pytest.raises((ValueError, RuntimeError), match=r"preds of shape \(6, 2\).*preds="):
        lk.evaluate(_state(torch.nn.Linear(3, 2)), two_logits, {"acc": BinaryAccuracy()})


def test_an_aggregator_is_not_fed_the_targets_as_weights() -> None:
    pytest.importorskip("torchmetrics")
    from torchmetrics import MeanMetric

    batches = [(torch.randn(6, 3), torch.randint(0, 2, (6,)))]
    state = _state(torch.nn.Linear(3, 1))
    with pytest.raises(TypeError, match=r"MeanMetric.*\(value, weight\).*loopkit.Mean"):
        lk.evaluate(state, batches, {"mean": MeanMetric()})
    weighted = lk.TorchMetric(MeanMetric(), target=lambda batch: torch.ones(6))
    got = lk.evaluate(state, batches, {"mean": weighted})
    with torch.no_grad():
        assert got["eval/mean"] == pytest.approx(state.model(batches[0][0]).mean().item())


# ------------------------------------------------------------------------------ find_lr


def test_a_sweep_without_a_finite_loss_still_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")

    class Exploding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * math.nan

    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    path = tmp_path / "new" / "lr.png"
    found = lk.find_lr(
        Exploding(),
        data,
        loss_fn=lambda model, batch: lk.cross_entropy(model(batch[0]), batch[1]),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        num_steps=20,
        plot_path=path,
    )
    assert found.stopped_by == "nonfinite" and found.suggestion is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = LRFinderResult((), (), (), None, None, "data", "no step")
    assert empty.plot(tmp_path / "empty.png").is_file()


def test_a_short_sweep_is_told_about_the_default_skip_start() -> None:
    with pytest.raises(ValueError, match=r"skip_start=10\).*default 10.*smaller skip_start"):
        lk.find_lr(
            torch.nn.Linear(2, 1),
            [(torch.randn(4, 2), torch.randn(4, 1))],
            loss_fn=lambda model, batch: lk.mse(model(batch[0]), batch[1]),
            optimizer={"name": "SGD", "lr": 0.1},
            num_steps=10,  # the user never wrote skip_start
        )


def test_plot_returns_the_file_it_wrote(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = LRFinderResult((1e-3, 1e-2, 1e-1), (2.0, 1.0, 3.0), (2.0, 1.5, 2.0), None, 1e-2, "x")
    written = result.plot(tmp_path / "curve")  # no suffix: matplotlib adds ".png"
    assert written == tmp_path / "curve.png" and written.is_file()


# ------------------------------------------------------------------------------- MLflow


class _Client:
    def __init__(self) -> None:
        self.names: list[list[str]] = []

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = ()) -> None:
        self.names.append([metric.key for metric in metrics])


def test_mlflow_names_are_valid_and_never_shared() -> None:
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import _validate_metric_name

    logger = lk.MLflowLogger(run_id="run")
    logger._client = _Client()
    state = _state(torch.nn.Linear(2, 1))
    keys = ["eval/f1@0.5", "eval/f1_0.5", "eval/f1#0.5", "eval//top1", "eval/acc/", "eval/./x"]
    for _ in range(2):  # a key keeps its name from record to record
        logger.on_eval_end(state, dict.fromkeys(keys, 1.0))
    first, second = logger._client.names
    assert first == second
    assert len(set(first)) == len(keys)
    assert first[1] == "eval/f1_0.5"  # a name MLflow takes is kept as it is
    for name in first:
        _validate_metric_name(name)  # MLflow's own check: raises on a refused name


def test_a_deleted_mlflow_experiment_is_named_with_the_fix() -> None:
    pytest.importorskip("mlflow")

    class Deleted:
        tracking_uri = "sqlite:///mlruns/mlflow.db"

        def get_experiment_by_name(self, name: str) -> Any:
            return SimpleNamespace(experiment_id="7", lifecycle_stage="deleted")

    logger = lk.MLflowLogger(experiment="gone")
    logger._client = Deleted()
    with pytest.raises(ValueError, match=r"experiment='gone'.*deleted.*--experiment-id 7"):
        logger._experiment_id()


def test_a_tracking_uri_mlflow_cannot_open_is_named() -> None:
    pytest.importorskip("mlflow")
    logger = lk.MLflowLogger("htp://typo:5000")
    with pytest.raises(ValueError, match=r"MLflowLogger\(tracking_uri='htp://typo:5000'\)"):
        logger.client  # noqa: B018 - the store opens on first use (at fit start)


# --------------------------------------------------------------------------- fit config


def test_yaml_floats_without_a_dot_are_floats(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "fit.yaml"
    path.write_text("max_steps: 2\nclip: 1e0\noptimizer: {name: AdamW, lr: 3e-4}\nseed: 7\n")
    config = lk.FitConfig.from_file(path)
    assert config.optimizer == {"name": "AdamW", "lr": 3e-4}
    assert config.clip == 1.0 and config.seed == 7 and isinstance(config.seed, int)


# ---------------------------------------------------------------------------- averaging


def test_an_average_added_on_resume_says_where_it_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    data = [(x[i : i + 8], x[i : i + 8].sum(1, keepdim=True)) for i in range(0, 32, 8)]
    settings: dict[str, Any] = {
        "loss_fn": lambda model, batch: lk.mse(model(batch[0]), batch[1]),
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.05),
        "checkpoint_dir": tmp_path / "ckpt",
        "save_every": 3,
        "progress": False,
        "log_every": None,
    }
    lk.fit(torch.nn.Linear(4, 1), data, max_steps=3, **settings)  # no average
    with caplog.at_level("WARNING", logger="loopkit.averaging"):
        result = lk.fit(
            torch.nn.Linear(4, 1), data, max_steps=6, average=lk.ema(0.9), resume=True, **settings
        )
    average = result.state.averages["ema"]
    assert (average.count, average.updated_at) == (3, 6)  # steps 4, 5, 6
    assert "no 'ema' average at step 4" in caplog.text


def test_lr_next_to_an_optimizer_dict_is_shown_in_that_dict() -> None:
    data = [(torch.randn(4, 2), torch.randn(4, 1))]
    with pytest.raises(ValueError) as error:
        lk.fit(torch.nn.Linear(2, 1), data, optimizer={"name": "SGD", "momentum": 0.9}, lr=0.1)  # type: ignore[call-arg]
    assert "optimizer={'name': 'SGD', 'momentum': 0.9, 'lr': 0.1}" in str(error.value)
    with pytest.raises(ValueError, match=r"build it with weight_decay=0.1"):
        lk.fit(  # type: ignore[call-arg]
            torch.nn.Linear(2, 1),
            data,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            weight_decay=0.1,
        )
