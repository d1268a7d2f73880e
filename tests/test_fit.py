"""fit(): counts, callbacks, logging, config and errors."""

from __future__ import annotations

import ast
import csv
import importlib
import json
import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, reference_train, window_cross_entropy
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk


def dataset(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def loss_fn(model, batch):
    x, y = batch
    return lk.cross_entropy(model(x), y)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


BASE = dict(loss_fn=loss_fn, optimizer=sgd, batch_size=8, progress=False, shuffle=False)


class Recorder:
    """Records every hook call as (hook, step)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda state, *args: self.calls.append((name, state.step))


@given(
    max_steps=st.integers(1, 12),
    k=st.integers(1, 3),
    log_every=st.integers(1, 5),
    eval_every=st.integers(1, 6),
)
def test_counts_do_exactly_what_they_say(max_steps, k, log_every, eval_every):
    recorder = Recorder()
    result = lk.fit(
        mlp(),
        dataset(),
        max_steps=max_steps,
        accumulate=k,
        log_every=log_every,
        eval_data=dataset(16, seed=1),
        eval_every=eval_every,
        callbacks=[recorder],
        **BASE,
    )
    state = result.state
    assert state.step == max_steps and result.stopped_by == "max_steps"
    assert state.samples_seen == max_steps * k * 8
    # 8 micro-batches per epoch; no epoch end after the stop
    assert state.epoch == (max_steps * k - 1) // 8
    logs = [h["step"] for h in result.history if "train/loss" in h]
    assert logs == [s for s in range(1, max_steps + 1) if s % log_every == 0]
    evals = [h["step"] for h in result.history if "eval/loss" in h]
    expected = [s for s in range(1, max_steps + 1) if s % eval_every == 0]
    if max_steps % eval_every:
        expected.append(max_steps)  # a final evaluation of the final weights
    assert evals == expected
    step_ends = [s for hook, s in recorder.calls if hook == "on_step_end"]
    assert step_ends == list(range(1, max_steps + 1))
    assert [s for hook, s in recorder.calls if hook == "on_log"] == logs


@pytest.mark.parametrize("epochs", [1, 3])
def test_epochs_run_whole_passes(epochs):
    recorder = Recorder()
    result = lk.fit(mlp(), dataset(60), epochs=epochs, callbacks=[recorder], **BASE)
    assert result.state.step == epochs * math.ceil(60 / 8)
    assert result.state.epoch == epochs and result.stopped_by == "epochs"
    epoch_events = [h for h, _ in recorder.calls if h.startswith("on_epoch")]
    assert epoch_events == ["on_epoch_start", "on_epoch_end"] * epochs
    assert recorder.calls[0][0] == "on_fit_start" and recorder.calls[-1][0] == "on_fit_end"


def test_fit_equals_hand_written_loop():
    data = dataset(48)
    result = lk.fit(mlp(), data, max_steps=6, accumulate=2, clip=0.5, log_every=100, **BASE)
    x, y = data.tensors
    windows = [
        [(x[i : i + 8], y[i : i + 8]), (x[i + 8 : i + 16], y[i + 8 : i + 16])]
        for i in range(0, 48, 16)
    ] * 2
    expected = reference_train(
        mlp(), windows, window_cross_entropy, max_norm=0.5, make_optimizer=sgd
    )
    for (name, p), q in zip(result.state.model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_custom_step_chain_runs():
    seen: list[int] = []

    def spy(state, batch):
        seen.append(state.micro_step)
        return state

    step = lk.chain(lk.forward(loss_fn), spy, lk.accumulate(3), lk.optimizer_step())
    result = lk.fit(mlp(), dataset(), max_steps=2, step=step, **BASE)
    assert result.state.step == 2 and seen == [1, 2, 3, 1, 2, 3]


def test_samples_per_step_works_out_k(capsys):
    result = lk.fit(mlp(), dataset(), max_steps=2, samples_per_step=32, **BASE)
    assert result.state.samples_seen == 64
    assert "accumulate=4" in capsys.readouterr().out


def test_early_stopping_stops_at_the_right_eval():
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.6, 0.7, 0.9])  # best at eval 2; patience 3 -> eval 5

    def score(outputs, batch):
        return torch.tensor(next(scores))

    result = lk.fit(
        mlp(),
        dataset(),
        max_steps=50,
        eval_data=dataset(8, seed=1),
        eval_every=2,
        metrics={"score": score},
        callbacks=[lk.EarlyStopping(monitor="eval/score", patience=3)],
        **BASE,
    )
    evals = [h["step"] for h in result.history if "eval/score" in h]
    assert evals == [2, 4, 6, 8, 10]
    assert result.state.step == 10 and result.stopped_by not in ("max_steps", "epochs")


def test_no_host_sync_on_steps_that_do_not_log(monkeypatch):
    syncs: list[int] = []
    current = {"step": -1}

    package = str(Path(lk.__file__).parent)

    def record(original):
        def wrapped(self, *args, **kwargs):
            # Count syncs that loopkit's code asks for; the DataLoader draws its base seed
            # with .item() on a CPU tensor once per epoch, which is not ours.
            files = [frame.filename for frame in traceback.extract_stack()]
            ours = any(f.startswith(package) for f in files)
            if ours and not any("torch/utils/data" in f or "torchdata" in f for f in files):
                syncs.append(current["step"])
            return original(self, *args, **kwargs)

        return wrapped

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, record(getattr(torch.Tensor, name)))

    class Where:
        def on_step_end(self, state):
            current["step"] = state.step

    def mean_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    lk.fit(
        mlp(),
        dataset(),
        loss_fn=mean_loss,
        optimizer=sgd,
        batch_size=8,
        progress=False,
        max_steps=12,
        log_every=4,
        clip=1.0,
        callbacks=[Where()],
    )
    assert syncs, "the log steps must pull metrics to the host"
    assert set(syncs) <= {4, 8, 12}, f"host syncs at steps {sorted(set(syncs))}"


def test_log_files_match_history(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = lk.fit(
        mlp(),
        dataset(),
        max_steps=6,
        log_every=2,
        log_dir=tmp_path,
        eval_data=dataset(16, seed=1),
        eval_every=3,
        **BASE,
    )
    logged = [h for h in result.history if "train/loss" in h]
    events = EventAccumulator(str(tmp_path)).Reload()
    tb = events.Scalars("train/loss")
    assert [e.step for e in tb] == [h["step"] for h in logged]
    assert [e.value for e in tb] == pytest.approx([h["train/loss"] for h in logged], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [h["step"] for h in result.history]
    with open(tmp_path / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in csv_rows] == [h["step"] for h in result.history]
    for r, h in zip(csv_rows, result.history):
        for key, value in h.items():
            if key != "time_s":
                assert float(r[key]) == pytest.approx(value, rel=1e-6)


def test_config_from_toml_and_mapping(tmp_path):
    path = tmp_path / "fit.toml"
    path.write_text(
        "max_steps = 3\nbatch_size = 8\nprogress = false\nshuffle = false\n"
        'optimizer = {name = "SGD", lr = 0.1}\n'
        'schedule = {name = "linear", warmup_steps = 1, total_steps = 3}\n'
    )
    config = lk.FitConfig.from_file(path)
    a = lk.fit(mlp(), dataset(), config=config, loss_fn=loss_fn)
    b = lk.fit(mlp(), dataset(), **config.__class__.from_dict({**dict(config), "loss_fn": loss_fn}))
    assert a.state.step == b.state.step == 3
    for p, q in zip(a.state.model.parameters(), b.state.model.parameters()):
        assert torch.equal(p, q)
    yaml_path = tmp_path / "fit.yaml"
    yaml_path.write_text("max_steps: 3\nlog_every: 7\n")
    assert lk.FitConfig.from_file(yaml_path).log_every == 7


BAD_FIELDS = [
    ("max_steps", 0),
    ("max_steps", 1.5),
    ("epochs", -1),
    ("batch_size", "8"),
    ("accumulate", 0),
    ("accumulate", True),
    ("clip", 0.0),
    ("clip", float("inf")),
    ("precision", "fp8"),
    ("eval_every", 0),
    ("log_every", 0),
    ("seed", -1),
    ("seed", "0"),
    ("progress", "yes"),
    ("compile", 1),
    ("num_workers", -2),
    ("mode", "up"),
    ("monitor", "loss"),
    ("optimizer", 3),
    ("schedule", 3),
    ("metrics", "accuracy"),
    ("callbacks", None),
    ("step", 5),
    ("log_dir", 3),
    ("samples_per_step", 0),
]


@pytest.mark.parametrize(("name", "value"), BAD_FIELDS, ids=[f"{n}({v!r})" for n, v in BAD_FIELDS])
def test_every_bad_field_is_named_before_any_work(tmp_path, name, value):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"{name}={value!r}"):
        lk.fit(model, dataset(), **{**BASE, "log_dir": tmp_path / "logs", name: value})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not (tmp_path / "logs").exists()


def test_bad_inputs_fail_before_training(tmp_path):
    kwargs = {**BASE, "log_dir": tmp_path / "logs"}
    with pytest.raises(ValueError, match="empty"):
        lk.fit(mlp(), torch.utils.data.TensorDataset(torch.zeros(0, 4)), **kwargs)
    with pytest.raises(ValueError, match="eval_every=5.*eval_data"):
        lk.fit(mlp(), dataset(), eval_every=5, **kwargs)
    with pytest.raises(ValueError, match="'acurracy'"):
        lk.fit(mlp(), dataset(), metrics=["acurracy"], **kwargs)
    with pytest.raises(ValueError, match="unknown field"):
        lk.fit(mlp(), dataset(), learning_rate=1e-3, **kwargs)
    with pytest.raises(ValueError, match="accumulate.*tokens_per_step"):
        lk.fit(mlp(), dataset(), accumulate=2, tokens_per_step=64, **kwargs)

    def broken(model, batch):
        raise KeyError("labels")

    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="first training step failed.*KeyError"):
        lk.fit(model, dataset(), **{**kwargs, "loss_fn": broken})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_monitor_of_a_missing_metric_fails_before_training():
    with pytest.raises(ValueError, match="eval/acc'.*available"):
        lk.fit(
            mlp(),
            dataset(),
            eval_data=dataset(8, seed=1),
            metrics=["accuracy"],
            callbacks=[lk.EarlyStopping(monitor="eval/acc", mode="max")],
            **BASE,
        )
    with pytest.raises(ValueError, match="no eval_data"):
        lk.fit(mlp(), dataset(), callbacks=[lk.EarlyStopping(monitor="eval/loss")], **BASE)


# --- fit is built from public parts -------------------------------------------------------

FIT_PIECES = ("_cadence", "_eval_tracking", "_interrupts", "_nonfinite_watch", "_resume", "_saving")
"""fit's own private modules: the named pieces its loop calls."""

PRIVATE_ALLOWED = {("_batch", "first_tensor")}
"""Private helpers fit may use: the batch probe behind samples_per_step (nothing public
finds a batch's first tensor)."""


def _public_names() -> set[str]:
    names = set(lk.__all__)
    for path in Path(lk.__file__).parent.glob("*.py"):
        if not path.stem.startswith("_"):
            names |= set(importlib.import_module(f"loopkit.{path.stem}").__all__)
    for package in ("strategies",):
        names |= set(importlib.import_module(f"loopkit.{package}").__all__)
    return names


@pytest.mark.parametrize("module", ["fit", *FIT_PIECES])
def test_fit_and_its_pieces_import_only_public_names(module):
    public = _public_names()
    path = Path(lk.__file__).parent / f"{module}.py"
    private = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.level == 1):
            continue
        if module == "fit" and node.module in FIT_PIECES:
            continue  # fit's own pieces, checked themselves
        private += [
            f"{node.module}.{alias.name}"
            for alias in node.names
            if alias.name not in public and (node.module, alias.name) not in PRIVATE_ALLOWED
        ]
    assert not private, f"loopkit/{module}.py imports private names: {private}"


def test_the_public_names_check_can_fail():
    assert "first_tensor" not in _public_names()
    assert "_set_epoch" not in _public_names() and "fit" in _public_names()


# --- issue 15, nothing silent (the proofs are in test_nothing_silent.py) ------------------


def test_data_timeout_s_must_be_a_positive_finite_number_or_none():
    assert lk.FitConfig().data_timeout_s == 600.0
    assert lk.FitConfig(data_timeout_s=None).data_timeout_s is None
    for bad in (0, -1.0, float("inf"), float("nan"), True, "10"):
        with pytest.raises(ValueError, match=r"FitConfig\(data_timeout_s=.*positive, finite"):
            lk.FitConfig(data_timeout_s=bad)


def test_workers_with_a_data_timeout_train_exactly_like_the_main_process():
    # The timeout only bounds a wait: worker processes, data_timeout_s and fit's check of
    # each batch leave the batches, their order and so the weights untouched.
    kwargs = dict(epochs=2, accumulate=2, **{**BASE, "shuffle": True})
    expected = lk.fit(mlp(), dataset(60), num_workers=0, **kwargs)
    actual = lk.fit(mlp(), dataset(60), num_workers=2, data_timeout_s=30, **kwargs)
    assert actual.state.step == expected.state.step == 8
    for a, b in zip(actual.state.model.parameters(), expected.state.model.parameters()):
        assert torch.equal(a, b)


def test_the_run_time_step_check_sees_windows_inside_conditionals():
    # The Trainer facade puts accumulate(k) inside `when`; a window of k micro-batches is
    # no stuck step. Its loader and step are those fit gets from the facade.
    step = lk.chain(
        lk.forward(loss_fn),
        lk.when(lambda s: s.step % 2 == 0, lk.accumulate(3)),
        lk.when(lambda s: s.step % 2 == 1, lk.accumulate(1)),
        lk.optimizer_step(),
    )
    result = lk.fit(mlp(), dataset(64), step=step, max_steps=4, **BASE)
    assert result.state.step == 4 and result.state.samples_seen == (3 + 1 + 3 + 1) * 8
