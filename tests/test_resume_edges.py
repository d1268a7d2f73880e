"""Resume and save edges where work or data could be lost, or a change go unsaid.

Each test uses fit, load_checkpoint and save_model as a user would: another optimizer
class on resume is refused before any step (it used to load and then fail inside torch
with a bare KeyError), changed settings are named in a warning, and save_model leaves
files it did not write alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import mlp

import loopkit as lk
from loopkit.checkpoint import CheckpointError, CheckpointMismatchError


def dataset(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def loss_fn(model: torch.nn.Module, batch: Any) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def sgd_slow_momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.5)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


BASE: dict[str, Any] = dict(
    loss_fn=loss_fn, optimizer=sgd, batch_size=8, progress=False, log_every=None
)


def first_run(directory: Path, **kw: Any) -> None:
    lk.fit(mlp(), dataset(), **{**BASE, **kw}, checkpoint_dir=directory, save_every=2, max_steps=4)


def resumed_run(directory: Path, max_steps: int = 6, **kw: Any) -> lk.FitResult:
    return lk.fit(
        mlp(),
        dataset(),
        **{**BASE, **kw},
        checkpoint_dir=directory,
        save_every=2,
        max_steps=max_steps,
        resume=True,
    )


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".loopkit.lock"
    }


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_resume_with_another_optimizer_class_is_refused_before_any_step(tmp_path: Path) -> None:
    first_run(tmp_path)
    before = digests(tmp_path)
    with pytest.raises(CheckpointMismatchError) as raised:
        resumed_run(tmp_path, max_steps=8, optimizer=adam)
    message = str(raised.value)
    assert "torch.optim.sgd.SGD" in message and "torch.optim.adam.Adam" in message
    assert "step-00000004" in message
    assert digests(tmp_path) == before  # nothing trained, nothing changed


def test_load_checkpoint_names_optimizer_settings_it_replaces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_run(tmp_path)
    state = lk.TrainState.create(mlp(), optimizer=sgd_slow_momentum)
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        loaded = lk.load_checkpoint(tmp_path / "step-00000004", state)
    assert loaded.optimizer.param_groups[0]["momentum"] == 0.9  # torch loads the saved one
    said = warnings_of(caplog)
    assert "momentum: checkpoint 0.9, this optimizer 0.5" in said
    assert "betas" not in said and "lr" not in said.split("loaded:")[1]


def test_same_optimizer_settings_load_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_run(tmp_path, optimizer=adam)  # betas, eps, amsgrad, ...: all as saved
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        lk.load_checkpoint(tmp_path / "step-00000004", lk.TrainState.create(mlp(), optimizer=adam))
    assert warnings_of(caplog) == ""


def test_resume_with_changed_settings_goes_on_and_names_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        result = resumed_run(tmp_path, batch_size=16, accumulate=2)
    assert result.state.step == 6
    said = warnings_of(caplog)
    assert "batch_size 8 -> 16" in said and "accumulate 1 -> 2" in said
    assert "max_steps" not in said and "resume" not in said.split("step-00000004")[1]


def test_resume_with_the_same_settings_says_nothing_of_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        resumed_run(tmp_path)
    assert "settings differ" not in warnings_of(caplog)


def test_a_torch_scheduler_that_changes_momentum_resumes_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # OneCycleLR sets each group's momentum as it steps: the checkpoint's momentum differs
    # from a fresh optimizer's by design, and the scheduler resumes it with its own state.
    def run(max_steps: int, resume: bool) -> None:
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20)
        kw = {**BASE, "optimizer": optimizer, "schedule": schedule}
        lk.fit(model, dataset(), **kw, checkpoint_dir=tmp_path, save_every=2,
               max_steps=max_steps, resume=resume)  # fmt: skip

    run(4, resume=False)
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        run(6, resume=True)
    assert "optimizer's settings differ" not in warnings_of(caplog)


@pytest.mark.parametrize("foreign", ["config.json", "model.safetensors"])
def test_save_model_leaves_files_it_did_not_write(tmp_path: Path, foreign: str) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / foreign).write_text('{"model_type": "bert"}')  # e.g. a Hugging Face config
    before = digests(tmp_path)
    with pytest.raises(CheckpointError, match=foreign.replace(".", r"\.") + " exists"):
        lk.save_model(mlp(), tmp_path)
    assert digests(tmp_path) == before


def test_save_model_replaces_its_own_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    lk.save_model(mlp(seed=0), tmp_path)
    lk.save_model(mlp(seed=1), tmp_path)  # a re-save of our own files is fine
    weights = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(weights["0.weight"], mlp(seed=1).state_dict()["0.weight"])
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "loopkit-model/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]


def test_a_resumed_run_leaves_another_runs_log_in_a_shared_log_dir_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logs = tmp_path / "logs"
    kw: dict[str, Any] = {**BASE, "log_every": 1, "log_dir": logs, "save_every": 4}
    lk.fit(mlp(), dataset(), **kw, checkpoint_dir=tmp_path / "a", max_steps=4)
    b = lk.fit(mlp(), dataset(), **kw, checkpoint_dir=tmp_path / "b", max_steps=8)
    run_b = {name: (logs / name).read_bytes() for name in ("metrics.csv", "metrics.jsonl")}
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        lk.fit(mlp(), dataset(), **kw, checkpoint_dir=tmp_path / "a", max_steps=6, resume=True)
    # Run b's logs (steps 1-8) are kept, byte for byte, under a numbered name.
    kept = {p.read_bytes() for p in logs.iterdir() if p.is_file()}
    assert set(run_b.values()) <= kept
    assert f"records of run {b.run_id}" in warnings_of(caplog)
    # The resumed run a's file holds a's steps only.
    lines = (logs / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 6]
