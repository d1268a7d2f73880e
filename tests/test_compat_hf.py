"""loopkit.compat against transformers' own Trainer: the same script, run by both, ends equal.

Each scenario is one function written against an `api` (a module with Trainer,
TrainingArguments, EarlyStoppingCallback): run once with `transformers`, once with
`loopkit.compat`, then compared: losses, learning rates, grad norms, eval metrics,
predictions, step counts, early stopping, checkpoint names, trainer_state.json, FLOPs and
the memory metrics' names. Skipped where transformers (an optional test dependency, the
`hf` extra) is not installed. The runs are shared by module-scoped fixtures: HF's import
and Trainer set-up are the slow part.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

import loopkit.compat as lk  # noqa: E402
from loopkit.compat.checkpoints import list_hf_checkpoints  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # transformers and datasets warn about their own deprecations on import and use.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
APIS = {"hf": transformers, "lk": lk}
VOLATILE = ("_runtime", "_per_second")
"""Keys whose values are timings or memory readings: compared by name only."""


def volatile(key: str) -> bool:
    return key.endswith(VOLATILE) or "_mem_" in key


# --- the scripts -----------------------------------------------------------------------------


class Points:
    """A map-style dataset that is *not* a torch Dataset: numpy samples, as HF users write.

    `y = 2 x + 3 + noise`; an extra column ("note", a str) is not taken by the model.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 2)).astype(np.float32)
        self.y = (self.x @ np.array([2.0, -1.0], np.float32) + 3 + rng.normal(0, 0.1, n)).astype(
            np.float32
        )

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.x[i], "labels": self.y[i], "note": "unused"}


def tiny_pretrained_model() -> torch.nn.Module:
    """A transformers PreTrainedModel (it counts its parameters: HF's FLOPs apply)."""

    class TinyConfig(transformers.PreTrainedConfig):  # type: ignore[name-defined]
        model_type = "loopkit-tiny"

        def __init__(self, hidden: int = 8, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.hidden = hidden

    class TinyRegressor(transformers.PreTrainedModel):  # type: ignore[name-defined]
        config_class = TinyConfig
        main_input_name = "features"

        def __init__(self, config: TinyConfig) -> None:
            super().__init__(config)
            self.inp = torch.nn.Linear(2, config.hidden)
            self.out = torch.nn.Linear(config.hidden, 1)
            self.post_init()

        def _init_weights(self, module: torch.nn.Module) -> None:
            pass  # keep torch's initialisation, seeded by the test

        def forward(self, features, labels=None):  # noqa: ANN001
            pred = self.out(torch.tanh(self.inp(features))).squeeze(-1)
            if labels is None:
                return (pred,)
            return (F.mse_loss(pred, labels), pred)

    torch.manual_seed(1)
    return TinyRegressor(TinyConfig())


def regression_script(api: types.ModuleType, out: Path) -> dict[str, Any]:
    """Accumulation with a short last window, step logs, evals and saves, predict."""
    args = api.TrainingArguments(
        output_dir=str(out),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=5,
        gradient_accumulation_steps=3,  # 10 batches per epoch: windows 3, 3, 3, 1
        learning_rate=0.05,
        weight_decay=0.01,
        warmup_steps=2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        save_total_limit=2,
        skip_memory_metrics=False,
        seed=3,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = api.Trainer(
        model=tiny_pretrained_model(),
        args=args,
        train_dataset=Points(40),
        eval_dataset=Points(12, seed=1),
        compute_metrics=lambda p: {"mae": float(np.abs(p.predictions - p.label_ids).mean())},
    )
    lrs = lr_recorder(api, trainer)
    output = trainer.train()
    predictions = trainer.predict(Points(7, seed=2))
    return {
        "lrs": lrs + [trainer.get_learning_rates()],
        "output": output,
        "history": trainer.state.log_history,
        "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
        "predictions": predictions,
        "checkpoints": [p.name for p in list_hf_checkpoints(out)],
        "state_json": json.loads((out / "checkpoint-8" / "trainer_state.json").read_text()),
        "trainable": trainer.get_num_trainable_parameters(),
        "wrapped_is_model": trainer.model_wrapped is trainer.model,
        "flos": trainer.state.total_flos,
    }


def lr_recorder(api: types.ModuleType, trainer: Any) -> list[list[float]]:
    """trainer.get_learning_rates() at every step's end, recorded by a callback."""
    seen: list[list[float]] = []

    class Record(api.TrainerCallback):  # type: ignore[name-defined,misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append(trainer.get_learning_rates())

    trainer.add_callback(Record())
    return seen


class Scripted:
    """compute_metrics returning a fixed sequence of scores, one per evaluation."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)

    def __call__(self, pred: Any) -> dict[str, float]:
        return {"score": self.scores.pop(0)}


def early_stopping_script(api: types.ModuleType, out: Path) -> dict[str, Any]:
    args = api.TrainingArguments(
        output_dir=str(out),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        save_total_limit=1,
        logging_steps=1,
        seed=0,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = api.Trainer(
        model=tiny_pretrained_model(),
        args=args,
        train_dataset=Points(64),
        eval_dataset=Points(8, seed=1),
        compute_metrics=Scripted([0.5, 0.9, 0.8, 0.9, 0.7, 0.1, 0.1, 0.1]),
        callbacks=[api.EarlyStoppingCallback(early_stopping_patience=3)],
    )
    output = trainer.train()
    return {
        "step": output.global_step,
        "best": Path(trainer.state.best_model_checkpoint).name,
        "best_metric": trainer.state.best_metric,
        "checkpoints": [p.name for p in list_hf_checkpoints(out)],
        "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
        "history": trainer.state.log_history,
    }


def nan_script(api: types.ModuleType, out: Path, nan_filter: bool) -> dict[str, Any]:
    """A learning rate that blows the loss up to inf, then NaN: HF keeps training."""
    args = api.TrainingArguments(
        output_dir=str(out),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e9,
        max_grad_norm=0.0,
        optim="sgd",
        logging_steps=3,
        logging_nan_inf_filter=nan_filter,
        save_strategy="no",
        seed=0,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = api.Trainer(model=tiny_pretrained_model(), args=args, train_dataset=Points(48))
    output = trainer.train()
    return {"step": output.global_step, "history": trainer.state.log_history}


def log_script(api: types.ModuleType, out: Path, level: str) -> tuple[list[str], int]:
    """A short train + evaluate with log_level=`level`: the messages on HF's Trainer logger
    ('transformers.trainer') and the level of transformers' logger afterwards."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name == "transformers.trainer" and "have been ignored" not in record.msg:
                seen.append(record.getMessage())  # (HF also names the columns it drops)

    root, before = logging.getLogger("transformers"), transformers.logging.get_verbosity()
    handler = Keep()
    root.addHandler(handler)
    try:
        args = api.TrainingArguments(
            output_dir=str(out),
            max_steps=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            per_device_eval_batch_size=3,
            log_level=level,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = api.Trainer(
            model=tiny_pretrained_model(),
            args=args,
            train_dataset=Points(20),
            eval_dataset=Points(7, seed=1),
        )
        trainer.train()
        trainer.evaluate()
        return seen, root.getEffectiveLevel()
    finally:
        root.removeHandler(handler)
        transformers.logging.set_verbosity(before)


class Poisoned(Points):
    """Points whose items 1 and 5 have a NaN feature (their batches' loss is NaN) and item
    9 a huge label (its batch's squared error overflows to inf): in batches of 4, the
    first three batches' losses are not finite."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, seed)
        self.x[[1, 5], 0] = np.nan
        self.y[9] = np.float32(3e38)


def nan_eval_script(api: types.ModuleType, out: Path, nan_filter: bool, n: int) -> float:
    """evaluate() on batches of 4 where some batches' loss is NaN or inf: the eval loss."""
    args = api.TrainingArguments(
        output_dir=str(out),
        per_device_eval_batch_size=4,
        logging_nan_inf_filter=nan_filter,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = api.Trainer(model=tiny_pretrained_model(), args=args, eval_dataset=Poisoned(n))
    return float(trainer.evaluate()["eval_loss"])


def load_example(api_name: str) -> types.ModuleType:
    """examples/hf_datasets_classification.py, with its import line pointed at `api_name`."""
    source = (EXAMPLES / "hf_datasets_classification.py").read_text()
    line = "from loopkit.compat import EarlyStoppingCallback, Trainer, TrainingArguments"
    assert source.count(f"\n{line}\n") == 1  # the one line a user changes
    if api_name == "hf":
        source = source.replace(
            f"\n{line}\n", f"\n{line.replace('loopkit.compat', 'transformers')}\n"
        )
    name = f"hf_datasets_classification_{api_name}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, str(EXAMPLES / "hf_datasets_classification.py"), "exec"), module.__dict__)
    return module


# --- shared runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("regression")
    return {name: regression_script(api, root / name) for name, api in APIS.items()}


@pytest.fixture(scope="module")
def early(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("early")
    return {name: early_stopping_script(api, root / name) for name, api in APIS.items()}


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("example")
    runs = {}
    for name in APIS:
        trainer, metrics = load_example(name).run(str(root / name), num_train_epochs=3, n=300)
        runs[name] = {
            "trainer": trainer,
            "metrics": metrics,
            "checkpoints": [p.name for p in list_hf_checkpoints(root / name)],
            "dir": root / name,
        }
    return runs


def assert_histories_match(ours: list[dict], theirs: list[dict], rel: float = 1e-5) -> None:
    """Same records, same keys in the same order, values equal to float noise (timings and
    memory readings by name only)."""
    assert [list(h) for h in ours] == [list(h) for h in theirs]
    ours = [{k: v for k, v in h.items() if not volatile(k)} for h in ours]
    theirs = [{k: v for k, v in h.items() if not volatile(k)} for h in theirs]
    for mine, hf in zip(ours, theirs, strict=True):
        for key, value in hf.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(mine[key]), key
            elif isinstance(value, (int, float)):
                assert mine[key] == pytest.approx(value, rel=rel, abs=1e-7), (key, mine, hf)
            else:
                assert mine[key] == value, key


def assert_params_match(ours: dict, theirs: dict, atol: float = 1e-6) -> None:
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=atol, msg=name)


# --- the comparisons -------------------------------------------------------------------------


def test_logged_losses_lrs_evals_and_steps_are_hfs(regression):
    ours, hf = regression["lk"], regression["hf"]
    assert ours["output"].global_step == hf["output"].global_step == 8
    assert_histories_match(ours["history"], hf["history"])
    # logged losses are HF's unrounded means, not rounded to 4 decimals
    losses = [h["loss"] for h in ours["history"] if "loss" in h]
    assert any(round(loss, 4) != loss for loss in losses)
    assert ours["output"].training_loss == pytest.approx(hf["output"].training_loss, rel=1e-6)
    # get_learning_rates(): what HF's optimizer holds, the next step's lr (warmup, decay)
    assert len(ours["lrs"]) == len(hf["lrs"]) == 8 + 1
    for mine, theirs in zip(ours["lrs"], hf["lrs"], strict=True):
        assert mine == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_weights_and_predictions_are_hfs(regression):
    ours, hf = regression["lk"], regression["hf"]
    assert_params_match(ours["params"], hf["params"])
    np.testing.assert_allclose(
        ours["predictions"].predictions, hf["predictions"].predictions, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(ours["predictions"].label_ids, hf["predictions"].label_ids)
    for key, value in hf["predictions"].metrics.items():
        if not volatile(key):
            assert ours["predictions"].metrics[key] == pytest.approx(value, rel=1e-5)


def test_checkpoint_names_and_trainer_state_json_are_hfs(regression):
    ours, hf = regression["lk"], regression["hf"]
    assert ours["checkpoints"] == hf["checkpoints"] == ["checkpoint-8", "checkpoint-6"]
    mine, theirs = ours["state_json"], hf["state_json"]
    assert sorted(mine) == sorted(theirs)
    for key in ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps"):
        assert mine[key] == theirs[key], key
    assert mine["epoch"] == pytest.approx(theirs["epoch"])
    assert mine["total_flos"] == theirs["total_flos"] > 0
    assert (
        mine["stateful_callbacks"]["TrainerControl"]
        == theirs["stateful_callbacks"]["TrainerControl"]
    )
    assert_histories_match(mine["log_history"], theirs["log_history"])


def test_flops_memory_metrics_and_members_are_hfs(regression):
    ours, hf = regression["lk"], regression["hf"]
    assert ours["flos"] == hf["flos"] > 0  # 6 * tokens * parameters, per micro-batch
    assert ours["history"][-1]["total_flos"] == hf["history"][-1]["total_flos"]
    # HF's PrinterCallback takes total_flos out of the metrics it prints: so does ours
    assert sorted(ours["output"].metrics) == sorted(hf["output"].metrics)
    assert "train_mem_cpu_alloc_delta" in ours["output"].metrics
    assert "init_mem_cpu_peaked_delta" in ours["output"].metrics
    assert sorted(ours["predictions"].metrics) == sorted(hf["predictions"].metrics)
    assert ours["trainable"] == hf["trainable"] == 2 * 8 + 8 + 8 + 1
    assert ours["wrapped_is_model"] and hf["wrapped_is_model"]


def test_early_stopping_stops_where_hf_stops_and_keeps_the_best(early):
    ours, hf = early["lk"], early["hf"]
    assert ours["step"] == hf["step"] == 10  # no improvement at evals 3, 4, 5
    assert ours["best"] == hf["best"] == "checkpoint-4"
    assert ours["best_metric"] == hf["best_metric"] == 0.9
    assert ours["checkpoints"] == hf["checkpoints"] == ["checkpoint-4"]
    assert_params_match(ours["params"], hf["params"])  # the best model, loaded at the end
    assert_histories_match(ours["history"], hf["history"])


@pytest.mark.parametrize("nan_filter", [True, False], ids=["filter", "no-filter"])
def test_a_nonfinite_loss_is_logged_and_trained_through_as_hf_does(tmp_path, nan_filter):
    ours = nan_script(lk, tmp_path / "lk", nan_filter)
    hf = nan_script(transformers, tmp_path / "hf", nan_filter)
    assert ours["step"] == hf["step"] == 12  # training went on
    losses = [h["loss"] for h in hf["history"] if "loss" in h]
    assert any(not math.isfinite(x) for x in losses) != nan_filter
    assert_histories_match(ours["history"], hf["history"])


@pytest.mark.parametrize("nan_filter", [True, False])
@pytest.mark.parametrize("n", [18, 10])  # 18: two finite batches, of 4 and 2; 10: none
def test_the_eval_loss_leaves_nonfinite_batches_out_as_hf_does(tmp_path, nan_filter, n):
    ours = nan_eval_script(lk, tmp_path / "lk", nan_filter, n)
    theirs = nan_eval_script(transformers, tmp_path / "hf", nan_filter, n)
    if nan_filter and n == 18:
        assert math.isfinite(theirs)  # the batches of items 12-15 and 16-17, by their sizes
        assert ours == pytest.approx(theirs, rel=1e-6)
    else:
        assert not math.isfinite(theirs) and not math.isfinite(ours)


@pytest.mark.parametrize("level", ["info", "error", "passive"])
def test_hf_messages_go_where_hfs_go_at_hfs_log_level(tmp_path, level):
    ours = log_script(lk, tmp_path / "lk", level)
    theirs = log_script(transformers, tmp_path / "hf", level)
    assert ours == theirs  # the same lines on 'transformers.trainer', the same level
    shown = "***** Running training *****" in theirs[0]
    assert shown == (level == "info" or (level == "passive" and theirs[1] <= logging.INFO))
    if level == "info":
        assert "\n***** Running Evaluation *****" in ours[0]


def test_the_datasets_example_ends_equal_to_hfs_run(example):
    ours, hf = example["lk"], example["hf"]
    assert_params_match(
        dict(ours["trainer"].model.named_parameters()),
        dict(hf["trainer"].model.named_parameters()),
        atol=0,
    )
    assert ours["trainer"].state.global_step == hf["trainer"].state.global_step
    assert_histories_match(ours["trainer"].state.log_history, hf["trainer"].state.log_history)
    assert ours["metrics"]["eval_accuracy"] == hf["metrics"]["eval_accuracy"]
    assert ours["checkpoints"] == hf["checkpoints"]
    for name in ("lk", "hf"):
        best = Path(example[name]["trainer"].state.best_model_checkpoint).name
        assert best in example[name]["checkpoints"]
    assert (ours["dir"] / "final" / "model.safetensors").is_file()


def test_with_a_tokenizer_the_default_collator_pads_as_hfs_data_collator_with_padding(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(10)}}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    )
    features = [
        {**tokenizer(text), "label": label}
        for text, label in (("w1 w2 w3", 0), ("w4", 1), ("w5 w6", 2))
    ]
    ours = lk.Trainer(
        model=torch.nn.Linear(1, 1),
        args=lk.TrainingArguments(str(tmp_path), report_to="none"),
        processing_class=tokenizer,
    ).data_collator([dict(f) for f in features])
    theirs = transformers.DataCollatorWithPadding(tokenizer)([dict(f) for f in features])
    assert sorted(ours) == sorted(theirs) and "labels" in ours
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_trainer_takes_hfs_arguments_in_hfs_order():
    import inspect

    theirs = list(inspect.signature(transformers.Trainer.__init__).parameters)
    ours = list(inspect.signature(lk.Trainer.__init__).parameters)
    assert ours[: len(theirs)] == theirs  # loopkit's own extras are keyword-only, after
