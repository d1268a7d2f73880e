"""loopkit.compat: the HF-style Trainer is the same training as HF's rules, on fit()."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from loopkit.compat import (
    EarlyStoppingCallback,
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    TrainOutput,
)
from loopkit.compat.checkpoints import list_hf_checkpoints

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# --- a small HF-style model and dataset ----------------------------------------------------


class Blobs(torch.utils.data.Dataset):
    """Dict samples {"x", "labels"}; some labels are -100 (ignored items), as HF pads."""

    def __init__(self, n: int, seed: int = 0, masked: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()  # 3 classes
        drop = torch.rand(n, generator=g) < masked
        self.y[drop] = -100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Net(torch.nn.Module):
    """Linear -> LayerNorm -> tanh -> (dropout) -> Linear; returns {"loss", "logits"}.

    With `sums=True` it takes HF's `num_items_in_batch` and returns the summed loss divided
    by it (how transformers models normalise across a window); else the mean.
    """

    def __init__(self, seed: int = 0, dropout: float = 0.0, sums: bool = False) -> None:
        super().__init__()
        gen = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.drop = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(8, 3)
        self.to(torch.float64)
        torch.random.set_rng_state(gen)
        self.sums = sums

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.norm(self.inp(x)))))

    def forward(self, x, labels=None, **kwargs):  # noqa: ANN001
        logits = self.logits(x)
        if labels is None:
            return {"logits": logits}
        n_items = kwargs.get("num_items_in_batch")
        if self.sums and n_items is not None:
            loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / n_items
        else:
            loss = F.cross_entropy(logits, labels, ignore_index=-100)
        return {"loss": loss, "logits": logits}


class SumsNet(Net):
    accepts_loss_kwargs = True  # the attribute transformers models set


def args_for(tmp_path: Path, **overrides) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=0.05,
        seed=7,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )
    base.update(overrides)
    return TrainingArguments(**base)


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    predictions, labels = pred
    keep = labels != -100
    return {"accuracy": float((predictions.argmax(-1)[keep] == labels[keep]).mean())}


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --- 1. the same training as a hand-written float64 loop with HF's rules -------------------


def hf_reference(
    model: Net,
    data: Blobs,
    *,
    epochs: int,
    batch: int,
    accumulation: int,
    lr: float,
    weight_decay: float,
    warmup: int,
    max_norm: float,
    seed: int,
) -> Net:
    """HF Trainer's rules, written out by hand.

    - data order: transformers + accelerate's SeedableRandomSampler, i.e.
      torch.randperm(n, generator seeded with seed + epoch), batches in that order;
    - windows of `accumulation` batches; the epoch's last window keeps what is left;
    - the window's loss is the mean over every item of the window (labels != -100);
    - AdamW with weight decay on the Linear weights only (not biases, not LayerNorm);
    - clip_grad_norm_(max_norm) of the whole model; then the step with
      lr = base * get_linear_schedule_with_warmup's factor, stepped once per update.
    """
    n = len(data)
    batches_per_epoch = math.ceil(n / batch)
    windows_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total = epochs * windows_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    decay = [model.inp.weight, model.out.weight]
    no_decay = [model.inp.bias, model.norm.weight, model.norm.bias, model.out.bias]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        batches = [order[i : i + batch] for i in range(0, n, batch)]
        for w in range(0, len(batches), accumulation):
            idx = torch.cat(batches[w : w + accumulation])
            for group in opt.param_groups:
                group["lr"] = lr * factor(step)
            opt.zero_grad()
            loss = F.cross_entropy(model.logits(data.x[idx]), data.y[idx], ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            step += 1
    return model


@pytest.mark.parametrize("model_cls", [Net, SumsNet], ids=["mean-loss", "num_items_in_batch"])
def test_trainer_matches_a_float64_loop_with_hf_rules(tmp_path, model_cls):
    # 42 samples / batch 4 = 11 batches per epoch; accumulation 4 -> windows of 4, 4, 3.
    data = Blobs(42, seed=1, masked=0.25)  # every micro-batch keeps some items (seeded)
    settings = dict(
        epochs=2, batch=4, accumulation=4, lr=0.05, weight_decay=0.1, warmup=2, max_norm=0.3, seed=7
    )
    expected = hf_reference(Net(seed=3), data, **settings)
    args = args_for(
        tmp_path,
        num_train_epochs=2,
        gradient_accumulation_steps=4,
        weight_decay=0.1,
        warmup_steps=2,
        max_grad_norm=0.3,
        lr_scheduler_type="linear",
    )
    trainer = Trainer(
        model=model_cls(seed=3, sums=model_cls is SumsNet), args=args, train_dataset=data
    )
    out = trainer.train()
    assert out.global_step == 6 == trainer.state.max_steps
    actual = params_of(trainer.model)
    for name, value in params_of(expected).items():
        torch.testing.assert_close(
            actual[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_trainer_reports_like_hf(tmp_path):
    data = Blobs(32, seed=2)
    args = args_for(
        tmp_path,
        max_steps=4,
        logging_strategy="steps",
        logging_steps=2,
        warmup_steps=0,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(model=Net(seed=1), args=args, train_dataset=data)
    out = trainer.train()
    assert isinstance(out, TrainOutput) and out.global_step == 4
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    assert set(logs[0]) == {"loss", "grad_norm", "learning_rate", "epoch", "step"}
    assert logs[0]["learning_rate"] == pytest.approx(0.05)
    # training_loss: the mean over steps of each window's loss (HF's train_loss)
    assert out.training_loss == pytest.approx((logs[0]["loss"] + logs[1]["loss"]) / 2, abs=1e-4)
    final = trainer.state.log_history[-1]
    assert {"train_runtime", "train_loss", "epoch", "total_flos"} <= set(final)


# --- 2. callbacks: every hook in order, with the right state; control is obeyed ------------


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int, float | None]] = []

    def _note(self, name, args, state, control, **kwargs):  # noqa: ANN001
        self.events.append((name, state.global_step, state.epoch))
        assert isinstance(control, TrainerControl) and isinstance(state, TrainerState)
        assert kwargs["model"] is not None and "optimizer" in kwargs and "lr_scheduler" in kwargs


for _hook in (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_evaluate",
    "on_save",
    "on_log",
):
    setattr(Recorder, _hook, lambda self, *a, _h=_hook, **k: self._note(_h, *a, **k))


def test_every_hook_fires_in_hf_order_with_the_right_state(tmp_path):
    recorder = Recorder()
    # 12 samples / batch 2 = 6 batches per epoch, 2 per step: 3 steps per epoch, 2 epochs.
    args = args_for(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        logging_strategy="steps",
        logging_steps=2,
        eval_strategy="epoch",
        save_strategy="epoch",
    )
    trainer = Trainer(
        model=Net(),
        args=args,
        train_dataset=Blobs(12),
        eval_dataset=Blobs(6, 1),
        callbacks=[recorder],
    )
    trainer.train()

    def step(k, *after):  # the events of optimizer step k (global_step k-1 -> k)
        return [
            ("on_step_begin", k - 1),
            ("on_substep_end", k - 1),
            ("on_pre_optimizer_step", k - 1),
            ("on_optimizer_step", k - 1),
            ("on_step_end", k),
            *[(name, k) for name in after],
        ]

    expected = [
        ("on_init_end", 0),
        ("on_train_begin", 0),
        ("on_epoch_begin", 0),
        *step(1),
        *step(2, "on_log"),
        *step(3),
        ("on_epoch_end", 3),
        ("on_log", 3),
        ("on_evaluate", 3),
        ("on_save", 3),
        ("on_epoch_begin", 3),
        *step(4, "on_log"),
        *step(5),
        # the last step: a logging step (transformers 5 saves it at the end only with
        # save_strategy="steps"; here the epoch end saves it)
        *step(6, "on_log"),
        ("on_epoch_end", 6),
        ("on_log", 6),
        ("on_evaluate", 6),
        ("on_save", 6),
        ("on_log", 6),
        ("on_train_end", 6),
    ]
    assert [(name, gs) for name, gs, _ in recorder.events] == expected
    epochs = {(name, gs): ep for name, gs, ep in recorder.events}
    # HF's float epoch: epoch + micro-batches done / batches per epoch
    assert epochs[("on_step_end", 1)] == pytest.approx(2 / 6)
    assert epochs[("on_step_end", 5)] == pytest.approx(1 + 4 / 6)
    assert epochs[("on_epoch_end", 3)] == pytest.approx(1.0)
    assert epochs[("on_train_end", 6)] == pytest.approx(2.0)
    assert [p.name for p in list_hf_checkpoints(tmp_path / "out")] == [
        "checkpoint-6",
        "checkpoint-3",
    ]


class Steer(TrainerCallback):
    """Sets control flags at given steps, as users' callbacks do."""

    def __init__(self, **at_step: int) -> None:
        self.at_step = at_step
        self.saved_at: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        for flag, step in self.at_step.items():
            if state.global_step == step:
                setattr(control, flag, True)
        return control

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        self.saved_at.append(state.global_step)


def test_should_training_stop_stops_at_that_step(tmp_path):
    steer, recorder = Steer(should_training_stop=4), Recorder()
    args = args_for(tmp_path, max_steps=20)
    trainer = Trainer(model=Net(), args=args, train_dataset=Blobs(40), callbacks=[steer, recorder])
    out = trainer.train()
    assert out.global_step == 4 == trainer.state.global_step
    names = [e[0] for e in recorder.events]
    # the epoch ends (HF runs its epoch-end events), then training ends
    assert names[-3:] == ["on_epoch_end", "on_log", "on_train_end"]
    assert [e[1] for e in recorder.events if e[0] == "on_step_end"] == [1, 2, 3, 4]


def test_should_save_evaluate_and_log_set_by_a_callback_are_obeyed(tmp_path):
    steer = Steer(should_save=2, should_evaluate=3, should_log=1)
    args = args_for(tmp_path, max_steps=4)  # save/eval/log strategies: all "no"
    trainer = Trainer(
        model=Net(), args=args, train_dataset=Blobs(40), eval_dataset=Blobs(8, 1), callbacks=[steer]
    )
    trainer.train()
    assert steer.saved_at == [2]
    assert [p.name for p in list_hf_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()
    history = trainer.state.log_history
    assert [h["step"] for h in history if "loss" in h] == [1]
    assert [h["step"] for h in history if "eval_loss" in h] == [3]


def test_should_epoch_stop_ends_the_epoch_and_training_goes_on(tmp_path):
    recorder = Recorder()
    # 20 samples / batch 4 = 5 steps per epoch; the first epoch is cut after step 2.
    args = args_for(tmp_path, num_train_epochs=2, lr_scheduler_type="constant")
    trainer = Trainer(
        model=Net(),
        args=args,
        train_dataset=Blobs(20),
        callbacks=[Steer(should_epoch_stop=2), recorder],
    )
    trainer.train()
    names = [(e[0], e[1]) for e in recorder.events if e[0] in ("on_epoch_end", "on_epoch_begin")]
    assert names[:3] == [("on_epoch_begin", 0), ("on_epoch_end", 2), ("on_epoch_begin", 2)]
    assert trainer.state.global_step == 2 + 5  # the second (last) epoch runs in full, as in HF


# --- 3. best model: restored at the end, kept by rotation ----------------------------------


class Scripted:
    """compute_metrics returning a scripted score per evaluation (best at the 2nd)."""

    def __init__(self, scores):  # noqa: ANN001
        self.scores = list(scores)

    def __call__(self, pred: EvalPrediction) -> dict[str, float]:
        assert pred.predictions.shape == (8, 3) and pred.label_ids.shape == (8,)
        return {"score": self.scores.pop(0)}


class Snapshots(TrainerCallback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.on_disk: dict[int, list[str]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.weights[state.global_step] = params_of(model)

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        self.on_disk[state.global_step] = sorted(
            p.name for p in list_hf_checkpoints(args.output_dir)
        )


def test_load_best_model_at_end_restores_the_best_eval_and_rotation_keeps_it(tmp_path):
    snaps = Snapshots()
    args = args_for(
        tmp_path,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
    )
    trainer = Trainer(
        model=Net(),
        args=args,
        train_dataset=Blobs(40),
        eval_dataset=Blobs(8, 1),
        compute_metrics=Scripted([0.5, 0.9, 0.7, 0.6]),
        callbacks=[snaps],
    )
    trainer.train()
    best = str(tmp_path / "out" / "checkpoint-4")
    assert trainer.state.best_metric == 0.9 and trainer.state.best_model_checkpoint == best
    # rotation (limit 1) never deleted the best: it kept the best and the newest
    assert snaps.on_disk[6] == ["checkpoint-4", "checkpoint-6"]
    assert snaps.on_disk[8] == ["checkpoint-4", "checkpoint-8"]
    assert [p.name for p in list_hf_checkpoints(tmp_path / "out")] == ["checkpoint-4"]
    restored = params_of(trainer.model)
    for name, value in snaps.weights[4].items():
        assert torch.equal(restored[name], value), name
    assert not torch.equal(restored["out.weight"], snaps.weights[8]["out.weight"])


def test_early_stopping_callback_stops_after_patience(tmp_path):
    args = args_for(
        tmp_path, max_steps=40, eval_strategy="steps", eval_steps=1, metric_for_best_model="score"
    )
    trainer = Trainer(
        model=Net(),
        args=args,
        train_dataset=Blobs(40),
        eval_dataset=Blobs(8, 1),
        compute_metrics=Scripted([0.5, 0.9, 0.8, 0.9, 0.7] + [0.0] * 40),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=3)],
    )
    assert trainer.train().global_step == 5  # no improvement at evals 3, 4, 5


def test_evaluate_gathers_predictions_in_dataset_order(tmp_path):
    seen = []

    def metrics(pred: EvalPrediction) -> dict[str, float]:
        seen.append(pred)
        return {"n": float(len(pred.label_ids))}

    data = Blobs(10, seed=4)
    args = args_for(tmp_path, per_device_eval_batch_size=3)
    trainer = Trainer(model=Net(seed=5), args=args, eval_dataset=data, compute_metrics=metrics)
    result = trainer.evaluate()
    pred = seen[0]
    assert isinstance(pred.predictions, np.ndarray) and pred.predictions.shape == (10, 3)
    np.testing.assert_array_equal(pred.label_ids, data.y.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(pred.predictions, Net(seed=5).logits(data.x).numpy())
    # eval_loss: each batch's mean loss weighted by its samples, as HF reports it
    with torch.no_grad():
        model = Net(seed=5)
        losses = [
            float(model(data.x[i : i + 3], data.y[i : i + 3])["loss"]) * len(data.x[i : i + 3])
            for i in range(0, 10, 3)
        ]
    assert result["eval_loss"] == pytest.approx(sum(losses) / 10, rel=1e-12)
    assert result["eval_n"] == 10.0 and "eval_runtime" in result
    assert trainer.state.log_history[-1]["eval_n"] == 10.0
    out = trainer.predict(data)
    assert out.predictions.shape == (10, 3) and out.metrics["test_n"] == 10.0


# --- 4. exact resume ------------------------------------------------------------------------


class Crash(TrainerCallback):
    def __init__(self, at: int | None) -> None:
        self.at = at
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.steps.append(state.global_step)
        if state.global_step == self.at:
            raise RuntimeError(f"killed at step {self.at}")


def _resume_run(tmp_path: Path, name: str, crash_at: int | None, resume=None):  # noqa: ANN001
    args = args_for(
        tmp_path,
        output_dir=str(tmp_path / name),
        max_steps=9,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=3,
        logging_strategy="steps",
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        warmup_steps=2,
        save_total_limit=2,
    )
    trainer = Trainer(
        model=Net(seed=2, dropout=0.3),
        args=args,
        train_dataset=Blobs(36),
        eval_dataset=Blobs(8, 1),
        compute_metrics=accuracy,
        callbacks=[Crash(crash_at)],
    )
    return trainer, trainer.train(resume_from_checkpoint=resume)


def test_a_killed_run_resumed_ends_bitwise_equal(tmp_path):
    # 36 samples / batch 4 = 9 batches, 2 per step: windows 2,2,2,2,1 -> epochs of 5 steps.
    straight, out = _resume_run(tmp_path, "straight", None)
    with pytest.raises(RuntimeError, match="killed at step 7"):
        _resume_run(tmp_path, "resumed", 7)
    assert (tmp_path / "resumed" / "checkpoint-6").is_dir()
    resumed, out2 = _resume_run(tmp_path, "resumed", None, resume=True)
    assert out2.global_step == out.global_step == 9
    crash = next(c for c in resumed.callback_handler.callbacks if isinstance(c, Crash))
    assert crash.steps == [7, 8, 9]  # it went on from the checkpoint-6 checkpoint
    a, b = params_of(straight.model), params_of(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    drop = ("_runtime", "_per_second")
    clean = lambda h: [{k: v for k, v in r.items() if not k.endswith(drop)} for r in h]  # noqa: E731
    assert clean(resumed.state.log_history) == clean(straight.state.log_history)
    assert out2.training_loss == out.training_loss


def test_resume_accepts_the_hf_checkpoint_name(tmp_path):
    args = args_for(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(model=Net(), args=args, train_dataset=Blobs(40)).train()
    again = Trainer(model=Net(), args=args_for(tmp_path, max_steps=6), train_dataset=Blobs(40))
    out = again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert out.global_step == 6


# --- 5. bad arguments: a clear error naming the field, before any training ------------------


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (
            {"output_dir": "x", "lerning_rate": 1e-3},
            r"'lerning_rate' \(did you mean 'learning_rate'\?\)",
        ),
        ({"bf16": True, "fp16": True}, r"bf16=True, fp16=True"),
        (
            {"eval_strategy": "steps", "save_strategy": "epoch", "load_best_model_at_end": True},
            r"eval_strategy='steps', save_strategy='epoch'.*must match",
        ),
        (
            {
                "eval_strategy": "steps",
                "eval_steps": 3,
                "save_steps": 10,
                "load_best_model_at_end": True,
            },
            r"save_steps=10, eval_steps=3.*multiple",
        ),
        ({"load_best_model_at_end": True}, r"load_best_model_at_end=True, eval_strategy='no'"),
        ({"lr_scheduler_type": "cosine_warm"}, r"lr_scheduler_type='cosine_warm'"),
        ({"optim": "adafactor"}, r"optim='adafactor'"),
        ({"report_to": "wandb"}, r"report_to='wandb'.*TrainerCallback"),
        ({"warmup_ratio": 2.0}, r"warmup_ratio=2.0"),
        ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps=0"),
        ({"save_strategy": "best"}, r"save_strategy='best'.*metric_for_best_model"),
        ({"logging_steps": 2.5}, r"logging_steps=2.5"),
        (
            {"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"lr_end": 1.0}},
            r"lr_end \(1.0\) must be",
        ),
        ({"push_to_hub": True}, r"push_to_hub=True"),
    ],
)
def test_bad_training_arguments_name_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        TrainingArguments.from_dict(values)


def test_unknown_names_in_a_plain_dict_for_trainer_args(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown field\(s\) 'max_step' \(did you mean 'max_steps'\?\)"
    ):
        Trainer(
            model=Net(), args={"output_dir": str(tmp_path), "max_step": 3}, train_dataset=Blobs(8)
        )


@pytest.mark.parametrize(
    ("settings", "kwargs", "match"),
    [
        ({"eval_strategy": "steps"}, {}, r"eval_strategy='steps'.*eval_dataset"),
        (
            {"metric_for_best_model": "accuracy"},
            {},
            r"metric_for_best_model='accuracy'.*compute_metrics",
        ),
        ({"pipeline_split_spec": ["out"]}, {}, r"pipeline_split_spec=\['out'\].*Pipeline"),
        (
            {},
            {
                "optimizers": (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), None),
                "optimizer_factory": lambda p: torch.optim.SGD(p, lr=1.0),
            },
            r"optimizers\[0\], optimizer_factory",
        ),
        ({}, {"callbacks": [object()]}, r"defines none of the hooks"),
    ],
)
def test_bad_trainer_arguments_fail_when_built(tmp_path, settings, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(model=Net(), args=args_for(tmp_path, **settings), train_dataset=Blobs(8), **kwargs)


@pytest.mark.parametrize(
    ("settings", "kwargs", "call", "match"),
    [
        (
            {},
            {},
            {"resume_from_checkpoint": True},
            r"resume_from_checkpoint=True.*no valid checkpoint",
        ),
        (
            {"eval_strategy": "epoch"},
            {"callbacks": [EarlyStoppingCallback()]},
            {},
            r"EarlyStoppingCallback: needs TrainingArguments\(metric_for_best_model",
        ),
    ],
)
def test_bad_run_settings_fail_before_any_step(tmp_path, settings, kwargs, call, match):
    model = Net()
    before = params_of(model)
    trainer = Trainer(
        model=model,
        args=args_for(tmp_path, max_steps=2, **settings),
        train_dataset=Blobs(8),
        eval_dataset=Blobs(4, 1),
        **kwargs,
    )
    with pytest.raises(ValueError, match=match):
        trainer.train(**call)
    assert all(torch.equal(v, before[k]) for k, v in params_of(model).items())
    assert not list_hf_checkpoints(tmp_path / "out")


# --- 6. an HF-style script runs with only its import changed --------------------------------


def test_hf_style_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("hf_style", None)
    script = importlib.import_module("hf_style")
    metrics = script.main(output_dir=str(tmp_path / "run"), num_train_epochs=2, n_train=512)
    assert metrics["eval_accuracy"] > 0.8
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    source = (EXAMPLES / "hf_style.py").read_text()
    assert "from loopkit.compat import" in source and "import loopkit\n" not in source


# --- 7. the rest of the surface -------------------------------------------------------------


def _hf_factor(kind: str, step: int, warmup: int, total: int, **kw) -> float:
    """transformers.optimization's lr lambdas, written out."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((kw["num_cycles"] * progress) % 1.0))))
    if kind == "polynomial":
        lr_init, lr_end, power = 0.05, kw["lr_end"], kw["power"]
        if step > total:
            return lr_end / lr_init
        decay = (lr_init - lr_end) * (1 - (step - warmup) / (total - warmup)) ** power + lr_end
        return decay / lr_init
    timescale = warmup or 10_000  # inverse_sqrt
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("linear", {}),
        ("cosine", {}),
        ("cosine_with_restarts", {"num_cycles": 2}),
        ("polynomial", {"lr_end": 1e-3, "power": 2.0}),
        ("constant", {}),
        ("constant_with_warmup", {}),
        ("inverse_sqrt", {}),
    ],
)
def test_each_lr_scheduler_type_gives_hfs_learning_rates(tmp_path, kind, kwargs):
    args = args_for(
        tmp_path,
        max_steps=8,
        warmup_ratio=0.25,
        lr_scheduler_type=kind,
        lr_scheduler_kwargs=kwargs,
        logging_strategy="steps",
        logging_steps=1,
    )
    trainer = Trainer(model=Net(), args=args, train_dataset=Blobs(40))
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    expected = [0.05 * _hf_factor(kind, s, 2, 8, **kwargs) for s in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_callbacks_can_be_added_popped_and_removed_by_class_or_instance(tmp_path):
    trainer = Trainer(model=Net(), args=args_for(tmp_path), train_dataset=Blobs(8))
    names = lambda: [type(c).__name__ for c in trainer.callback_handler.callbacks]  # noqa: E731
    assert names() == ["DefaultFlowCallback", "PrinterCallback"]
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.add_callback(EarlyStoppingCallback)
    assert names()[-2:] == ["Recorder", "EarlyStoppingCallback"]
    assert isinstance(trainer.pop_callback(EarlyStoppingCallback), EarlyStoppingCallback)
    trainer.remove_callback(recorder)
    assert names() == ["DefaultFlowCallback", "PrinterCallback"]
    with pytest.raises(ValueError, match="no such callback"):
        trainer.remove_callback(recorder)


def test_report_to_tensorboard_and_save_model(tmp_path):
    args = args_for(
        tmp_path, max_steps=2, report_to="tensorboard", logging_strategy="steps", logging_steps=1
    )
    trainer = Trainer(model=Net(), args=args, train_dataset=Blobs(16))
    trainer.train()
    assert list((tmp_path / "out" / "runs").glob("events.out.tfevents.*"))
    trainer.save_model()
    from safetensors.torch import load_file

    loaded = Net(seed=9)
    loaded.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    pairs = zip(loaded.parameters(), trainer.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert (tmp_path / "out" / "training_args.json").is_file()


def test_a_model_without_a_loss_needs_loss_fn(tmp_path):
    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3, dtype=torch.float64)

        def forward(self, x, labels=None):  # noqa: ANN001
            return self.lin(x)

    trainer = Trainer(model=Bare(), args=args_for(tmp_path, max_steps=1), train_dataset=Blobs(8))
    with pytest.raises(ValueError, match=r"returned no loss.*loss_fn"):
        trainer.train()
    trainer = Trainer(
        model=Bare(),
        args=args_for(tmp_path, max_steps=2),
        train_dataset=Blobs(8),
        loss_fn=lambda model, batch: F.cross_entropy(model(batch["x"]), batch["labels"]),
    )
    assert trainer.train().global_step == 2


def test_a_model_returning_an_object_with_loss_works_without_loss_fn(tmp_path):
    from types import SimpleNamespace

    class ObjectOut(Net):
        def forward(self, x, labels=None):  # noqa: ANN001
            out = super().forward(x, labels)
            return SimpleNamespace(loss=out.get("loss"), logits=out["logits"])

    seen = []
    args = args_for(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=3)
    trainer = Trainer(
        model=ObjectOut(),
        args=args,
        train_dataset=Blobs(24),
        eval_dataset=Blobs(5, 1),
        compute_metrics=lambda p: seen.append(p) or {"n": len(p.label_ids)},
    )
    assert trainer.train().global_step == 3
    assert seen[0].predictions.shape == (5, 3)
    reference = Trainer(
        model=Net(), args=args_for(tmp_path / "r", max_steps=3), train_dataset=Blobs(24)
    )
    reference.train()
    a, b = params_of(trainer.model), params_of(reference.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
