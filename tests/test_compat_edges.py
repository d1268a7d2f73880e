"""loopkit.compat edge cases found by using the façade as HF Trainer users do.

Each test here failed on the code before its fix (see the report of the change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from loopkit.compat import EvalPrediction, Trainer, TrainingArguments


class Points(torch.utils.data.Dataset):
    """Dict samples {"x", "labels"}: two classes by the sign of x[0]."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Linear(torch.nn.Module):
    """A linear classifier returning HF's {"loss", "logits"}."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 2)
        torch.random.set_rng_state(gen)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.lin(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    predictions, labels = pred
    return {"accuracy": float((predictions.argmax(-1) == labels).mean())}


def args_for(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=0.1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )
    base.update(overrides)
    return TrainingArguments(**base)


def two_sets() -> dict[str, Points]:
    return {"a": Points(8, seed=1), "b": Points(8, seed=2)}


# --- a dict of eval datasets: metric_for_best_model names a set (HF: eval_<set>_<metric>) ---


@pytest.mark.parametrize("metric", ["eval_a_loss", "a_loss"])
def test_dict_eval_sets_best_model_by_a_sets_loss(tmp_path, metric):
    args = args_for(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
    )
    trainer = Trainer(Linear(), args, train_dataset=Points(16), eval_dataset=two_sets())
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_a_loss" in h]
    best = min(evals, key=lambda h: h["eval_a_loss"])
    assert trainer.state.best_metric == best["eval_a_loss"]
    assert trainer.state.best_model_checkpoint == str(
        tmp_path / "out" / f"checkpoint-{best['step']}"
    )
    assert not args.greater_is_better


@pytest.mark.parametrize(
    ("metric", "compute_metrics", "hint"),
    [
        ("loss", None, "'eval_a_loss', 'eval_b_loss'"),
        ("eval_loss", None, "'eval_a_loss', 'eval_b_loss'"),
        ("a_accuracy", None, "'eval_a_loss', 'eval_b_loss'"),
        ("accuracy", accuracy, "'eval_a_accuracy'"),
    ],
)
def test_dict_eval_sets_metric_without_a_set_is_refused_before_work(
    tmp_path, metric, compute_metrics, hint
):
    args = args_for(
        tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, metric_for_best_model=metric
    )
    with pytest.raises(ValueError, match="metric_for_best_model") as error:
        Trainer(
            Linear(),
            args,
            train_dataset=Points(16),
            eval_dataset=two_sets(),
            compute_metrics=compute_metrics,
        )
    assert hint in str(error.value)
    assert not (tmp_path / "out").exists()  # refused before any step


def test_dict_eval_sets_metric_of_a_set_with_compute_metrics(tmp_path):
    args = args_for(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="b_accuracy",
    )
    trainer = Trainer(
        Linear(),
        args,
        train_dataset=Points(16),
        eval_dataset=two_sets(),
        compute_metrics=accuracy,
    )
    trainer.train()
    (logged,) = [h["eval_b_accuracy"] for h in trainer.state.log_history if "eval_b_accuracy" in h]
    assert trainer.state.best_metric == logged


# --- evaluate("name"): HF takes a str naming one of the dict's sets ------------------------


def test_evaluate_a_set_by_name(tmp_path):
    sets = two_sets()
    trainer = Trainer(Linear(), args_for(tmp_path), eval_dataset=sets, compute_metrics=accuracy)
    by_name = trainer.evaluate("b")
    by_set = trainer.evaluate(sets["b"])
    assert by_name["eval_loss"] == by_set["eval_loss"]
    assert by_name["eval_accuracy"] == by_set["eval_accuracy"]
    predicted = trainer.predict("a")
    assert predicted.predictions.shape == (8, 2)
    assert predicted.metrics["test_loss"] == trainer.evaluate(sets["a"])["eval_loss"]


def test_evaluate_an_unknown_set_name_says_which_exist(tmp_path):
    trainer = Trainer(Linear(), args_for(tmp_path), eval_dataset=two_sets())
    with pytest.raises(ValueError, match=r"eval_dataset='c'.*\['a', 'b'\]"):
        trainer.evaluate("c")
    single = Trainer(Linear(), args_for(tmp_path), eval_dataset=Points(8))
    with pytest.raises(ValueError, match=r"eval_dataset='a'"):
        single.evaluate("a")


# --- compute_metrics must return a dict: anything else is named, not a bare TypeError ------


@pytest.mark.parametrize("returned", [[1.0], [("accuracy", 1.0)], 0.5])
def test_compute_metrics_returning_a_non_dict_is_named(tmp_path, returned):
    trainer = Trainer(
        Linear(),
        args_for(tmp_path),
        eval_dataset=Points(8),
        compute_metrics=lambda pred: returned,
    )
    with pytest.raises(TypeError, match=r"compute_metrics=.*returned .*expected a dict"):
        trainer.evaluate()


# --- compute_loss_func may return a mean (HF allows it): it is not taken as a sum ----------


def _mean_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> Any:
    return F.cross_entropy(outputs["logits"], labels)  # ignores num_items_in_batch


def _summed_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> Any:
    return F.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("accumulation", [1, 2])
def test_compute_loss_func_returning_a_mean_trains_like_the_models_loss(tmp_path, accumulation):
    def run(compute_loss_func: Any) -> tuple[float, dict[str, torch.Tensor]]:
        args = args_for(
            tmp_path,
            max_steps=2,
            optim="sgd",
            logging_steps=1,
            gradient_accumulation_steps=accumulation,
        )
        trainer = Trainer(
            Linear(), args, train_dataset=Points(16), compute_loss_func=compute_loss_func
        )
        trainer.train()
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        return trainer.state.log_history[0]["loss"], params

    own_loss, own_params = run(None)  # the model's own mean loss: HF's reference
    for loss_func in (_mean_loss, _summed_loss):
        loss, params = run(loss_func)
        assert loss == pytest.approx(own_loss, rel=1e-6), loss_func.__name__
        for name, value in own_params.items():
            torch.testing.assert_close(params[name], value, msg=loss_func.__name__)


# --- HF's grouped setters on TrainingArguments: refused with the fields to use ------------


@pytest.mark.parametrize(
    ("setter", "kwargs", "field"),
    [
        ("set_save", {"strategy": "steps", "steps": 10}, "save_strategy"),
        ("set_evaluate", {"strategy": "steps", "steps": 10}, "eval_strategy"),
        ("set_training", {"learning_rate": 1e-3}, "learning_rate"),
        ("set_logging", {"steps": 5}, "logging_steps"),
    ],
)
def test_grouped_setters_name_the_fields(tmp_path, setter, kwargs, field):
    args = args_for(tmp_path)
    with pytest.raises(NotImplementedError, match=rf"TrainingArguments\.{setter}\(\).*{field}"):
        getattr(args, setter)(**kwargs)


# --- gradient_checkpointing=True on a model without it names the argument the user wrote ---


def test_gradient_checkpointing_refusal_names_the_old_name(tmp_path):
    args = args_for(tmp_path, gradient_checkpointing=True, max_steps=1)
    trainer = Trainer(Linear(), args, train_dataset=Points(8))
    with pytest.raises(ValueError, match=r"gradient_checkpointing=True\)"):
        trainer.train()


# --- a dataset passed where data_collator goes (HF's third positional argument) ------------


def test_a_dataset_as_data_collator_is_named_before_work(tmp_path):
    with pytest.raises(TypeError, match=r"data_collator=.*Points.*train_dataset="):
        Trainer(Linear(), args_for(tmp_path), Points(8))  # type: ignore[arg-type]


# --- ragged samples without a tokenizer: the default collator names the key and the fix ----


class TokenMean(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        logits = self.embed(input_ids).mean(1)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_ragged_samples_without_padding_name_the_key_and_the_fix(tmp_path):
    data = [{"input_ids": list(range(1, 2 + i % 3)), "labels": i % 2} for i in range(8)]
    trainer = Trainer(TokenMean(), args_for(tmp_path, max_steps=1), train_dataset=data)
    with pytest.raises(ValueError, match=r"'input_ids'.*processing_class=.*data_collator="):
        trainer.train()
