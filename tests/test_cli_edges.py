"""The `loopkit` command at its edges: each failure says what, where and what to do, with exit
status 2 for bad input (1 for a run that fails, or a finding), before any work, without a
traceback, and nothing a user wrote is overwritten. In-process (`main(argv)`), small runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from forensics_parts import base_config, build_data, build_model, loss_fn, train

import loopkit as lk
import loopkit.certify
import loopkit.cli
from loopkit import _sharded
from loopkit.certify import certify_resume
from loopkit.cli import main
from loopkit.run_config import RUN_RECORD, RunConfig

NUDGE_3 = 'callbacks=[{call="faults:Nudge", step=3, parameter="2.weight"}]'


def run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """main(argv): its exit status (also when argparse exits), stdout and stderr."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:
        status = int(stop.code or 0)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return status, out.out, out.err


# --- loopkit fit -----------------------------------------------------------------------------


def test_a_model_builder_that_raises_is_named_with_the_line_that_raised(tmp_path, capsys):
    config = base_config(tmp_path)
    status, _, err = run(["fit", config, "--set", "model.hidden=-3"], capsys)
    assert status == 2
    assert "model: calling forensics_parts:build_model(hidden=-3) failed: RuntimeError" in err
    assert "forensics_parts.py:" in err and "in build_model" in err


def test_a_run_that_fails_prints_its_error_and_line_exit_1(tmp_path, capsys):
    argv = ["fit", base_config(tmp_path), "--set", "max_steps=3", "--set",
            'callbacks=[{call="faults:Nudge", step=1, parameter="nope"}]']  # fmt: skip
    status, _, err = run(argv, capsys)
    assert status == 1
    assert err.startswith("loopkit fit: error: KeyError: 'nope' (at ")
    assert "faults.py:" in err and "--traceback" in err
    with pytest.raises(KeyError):
        main(["--traceback", *map(str, argv)])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["optimizer.lr=-1"], "optimizer={'name': 'AdamW', 'lr': -1}: Invalid learning rate"),
        (['callbacks="faults:Nudge"'], "callbacks='faults:Nudge': must be a list"),
        (['python_path=["nowhere"]'], "python_path=[..., 'nowhere', ...]"),
        (["metrics=[accuracy]"], "--set 'metrics=[accuracy]': not a TOML array or table"),
    ],
    ids=["optimizer", "callbacks", "python_path", "unquoted-array"],
)
def test_bad_values_are_named(tmp_path, capsys, sets, message):
    argv = ["fit", base_config(tmp_path), "--set", "max_steps=1"]
    status, _, err = run([*argv, *(x for s in sets for x in ("--set", s))], capsys)
    assert status == 2 and message in err, err


def test_an_unparsable_config_names_the_file(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("max_steps = [\n")
    status, _, err = run(["fit", tmp_path / "bad.toml"], capsys)
    assert status == 2 and f"CONFIG='{tmp_path / 'bad.toml'}': cannot parse" in err


def test_set_null_removes_a_key(tmp_path):
    config = RunConfig.load(base_config(tmp_path), ["max_steps=null", "epochs=1"])
    assert "max_steps" not in config.values and config.values["epochs"] == 1
    assert RunConfig.load(base_config(tmp_path), ['log_dir="null"']).values["log_dir"] == "null"


def test_save_model_refuses_a_file_or_saved_weights_before_training(tmp_path, capsys):
    config = base_config(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_text("my weights")
    (tmp_path / "file").write_text("mine")
    for target, message in (
        (mine, "already holds model.safetensors"),
        (tmp_path / "file", "is a file"),
    ):
        status, out, err = run(
            ["fit", config, "--set", "max_steps=2", "--save-model", target], capsys
        )
        assert status == 2 and message in err and "FitResult" not in out
    assert (mine / "model.safetensors").read_text() == "my weights"


def test_a_refused_fit_keeps_the_run_record_of_the_log_dir(tmp_path, capsys):
    """A relaunch that fit refuses (the checkpoint_dir holds the first run's checkpoints) must
    not replace the first run's record: `diff --replay` rebuilds that run from it."""
    config = base_config(tmp_path)
    dirs = ["--set", "log_dir=run", "--set", "checkpoint_dir=ckpt", "--set", "save_every=2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert run(["fit", config, "--set", "max_steps=2", *dirs], capsys)[0] == 0
        record = (tmp_path / "run" / RUN_RECORD).read_text()
        status, _, err = run(["fit", config, "--set", "model.hidden=8", *dirs], capsys)
    assert status == 2 and "resume=False" in err
    assert (tmp_path / "run" / RUN_RECORD).read_text() == record


# --- loopkit ckpt ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    torch.manual_seed(0)
    lk.fit(
        build_model(8), build_data(96), loss_fn=loss_fn, optimizer={"name": "AdamW", "lr": 0.1},
        max_steps=6, batch_size=16, progress=False, checkpoint_dir=directory, save_every=2,
    )  # fmt: skip
    return directory


def _copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            (target / f.name).write_bytes(f.read_bytes())
    return target


def test_ckpt_validate_with_nothing_to_validate_exits_1(tmp_path, capsys):
    (tmp_path / "logs" / "fingerprints").mkdir(parents=True)
    status, _, err = run(["ckpt", "validate", tmp_path / "logs"], capsys)
    assert status == 1 and "no checkpoints in" in err and "it is a fit log_dir" in err
    assert run(["ckpt", "validate", tmp_path / "logs" / "fingerprints"], capsys)[0] == 1


def test_ckpt_inspect_skips_incomplete_checkpoints_and_flags_an_altered_one(
    checkpoints, tmp_path, capsys
):
    directory = tmp_path / "ckpt"
    for name in ("step-00000004", "step-00000006"):
        _copy(checkpoints / name, directory / name)
    (directory / "step-00000006" / "manifest.json").unlink()  # a save cut short
    (directory / "step-00000008").mkdir()  # an empty one
    status, out, err = run(["ckpt", "inspect", directory], capsys)
    assert status == 0 and "step: 4" in out
    assert "skipped step-00000006: " in err and "manifest.json is missing" in err

    status, out, err = run(["ckpt", "inspect", directory / "step-00000006", "--json"], capsys)
    assert status == 1 and "incomplete or altered" in err
    info = json.loads(out)
    assert info["complete"] is False and "manifest.json is missing" in info["problem"]

    status, _, err = run(["ckpt", "inspect", directory / "step-00000008"], capsys)
    assert status == 2 and "cannot inspect it" in err and "manifest.json is missing" in err


def test_ckpt_inspect_lists_a_sharded_checkpoints_whole_tensors(checkpoints, tmp_path, capsys):
    """A sharded (FSDP) checkpoint keeps its tensors in shards/: inspect lists them."""
    path = _copy(checkpoints / "step-00000006", tmp_path / "step-00000006")
    model = build_model(8)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    _sharded.write_shards(model, optimizer, path / "shards", collective=False)
    (path / "model.safetensors").unlink()
    meta = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**meta, "layout": "sharded"}))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["layout"] = "sharded"
    manifest["files"] = {
        str(f.relative_to(path)): {
            "bytes": f.stat().st_size,
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
        }
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != "manifest.json"
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert run(["ckpt", "validate", path], capsys)[0] == 0

    status, out, _ = run(["ckpt", "inspect", path, "--json"], capsys)
    info = json.loads(out)
    assert status == 0 and info["layout"] == "sharded"
    assert info["model"]["2.weight"] == {"shape": [8, 8], "dtype": "F32"}
    assert info["state"]["optimizer.state.2.weight.exp_avg"]["shape"] == [8, 8]
    status, out, _ = run(["ckpt", "inspect", path], capsys)
    assert "model (whole tensors, from shards/): 6 tensors" in out


# --- loopkit diff ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plot", "message"),
    [("nowhere/d.png", "does not exist"), (".", "must be a .png"), ("d.txt", "must be a .png")],
    ids=["no-directory", "a-directory", "not-png"],
)
def test_the_plot_path_is_checked_before_any_work(tmp_path, capsys, plot, message):
    status, _, err = run(
        ["diff", tmp_path / "a", tmp_path / "b", "--plot", tmp_path / plot], capsys
    )
    assert status == 2 and f"argument --plot: '{tmp_path / plot}'" in err and message in err


def test_diff_of_a_missing_run_says_so(tmp_path, capsys):
    status, _, err = run(["diff", tmp_path, tmp_path / "nope", "--no-plot"], capsys)
    assert status == 2 and f"RUN_B='{tmp_path / 'nope'}': no such directory" in err


def test_runs_without_a_step_in_common_are_not_reported_equal(tmp_path, capsys):
    for name, first in (("a", 0), ("b", 10)):
        with lk.FingerprintRecorder(tmp_path / name / "fingerprints") as recorder:
            model = build_model(4)
            state = lk.TrainState.create(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
            step = lk.chain(
                lk.forward(loss_fn), lk.accumulate(1), lk.fingerprint(recorder), lk.optimizer_step()
            )
            state = state.replace(step=first)
            for batch in torch.utils.data.DataLoader(build_data(32), batch_size=8):
                state = step(state, batch)
    status, out, err = run(["diff", tmp_path / "a", tmp_path / "b", "--no-plot"], capsys)
    assert status == 2 and "no difference" not in out
    assert "(A: steps 0..3, B: steps 10..13): nothing compared" in out
    assert "recorded no step in common" in err


@pytest.fixture(scope="module")
def nudged_at_3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6-step runs: `n` nudged after step 3 and `c` not, both with a checkpoint at step 5
    only; `bare` nudged, without checkpoints."""
    root = tmp_path_factory.mktemp("nudged3")
    runs = {}
    for name, sets in (
        ("n", [NUDGE_3, f"checkpoint_dir={root}/n-ckpt", "save_every=5"]),
        ("c", [f"checkpoint_dir={root}/c-ckpt", "save_every=5"]),
        ("bare", [NUDGE_3]),
    ):
        runs[name] = root / name
        train(RunConfig.load(base_config(root), [f"log_dir={runs[name]}", "max_steps=6", *sets]))
    return runs


def test_replay_without_checkpoints_is_refused_before_the_diff(nudged_at_3, capsys, monkeypatch):
    def no_diff(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the diff ran")

    monkeypatch.setattr(loopkit.cli, "diff_runs", no_diff)
    argv = ["diff", nudged_at_3["bare"], nudged_at_3["c"], "--replay", "--no-plot"]
    status, out, err = run(argv, capsys)
    assert status == 2 and out == ""
    assert "has no checkpoints (no checkpoint_dir)" in err and "leave out --replay" in err


def test_replay_without_a_checkpoint_before_the_step_still_prints_the_diff(nudged_at_3, capsys):
    argv = ["diff", nudged_at_3["n"], nudged_at_3["c"], "--replay", "--no-plot", "--json"]
    status, out, err = run(argv, capsys)
    assert status == 2
    report = json.loads(out)
    assert report["first_divergent_step"] == 3 and report["tensors"][0] == "weights/2.weight"
    assert "no valid checkpoint at or before step 3" in report["replay"]["error"]
    assert "its checkpoints are at steps 5" in err


# --- loopkit certify-resume ------------------------------------------------------------------


def test_certify_resume_refuses_a_workdir_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    argv = ["certify-resume", base_config(tmp_path), "--workdir", tmp_path / "w"]
    status, _, err = run(argv, capsys)
    assert status == 2 and "the directory is not empty" in err
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["notes.txt"]


def test_an_interruption_that_does_not_stop_the_run_certifies_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(loopkit.certify.signal, "raise_signal", lambda signum: None)
    config = RunConfig.load(base_config(tmp_path), ["max_steps=4"])
    certificate = certify_resume(config, interruptions=1, workdir=str(tmp_path / "w"))
    assert not certificate.ok and certificate.report.first_divergent_step is None
    assert "nothing is certified" in certificate.format()
    assert "no mid-window interruption" in certificate.format()


def test_interruptions_are_labelled_by_where_the_data_stopped(tmp_path, monkeypatch):
    """5 micro-batches per epoch, windows of 2: windows span epoch ends. A stop after step 1
    (micro-batch 3) leaves micro-batch 4 of epoch 0 to read: mid-epoch, though step 2's
    window ends in epoch 1; a stop after step 4 (micro-batch 9) is the end of epoch 1."""
    monkeypatch.setattr(
        loopkit.certify, "_draw", lambda sizes, count, seed: [(1, 0), (2, 0), (4, 0)]
    )
    config = RunConfig.load(
        base_config(tmp_path), ["max_steps=6", "accumulate=2", "data.n=80", "batch_size=16"]
    )
    certificate = certify_resume(config, interruptions=3, workdir=str(tmp_path / "w"))
    assert certificate.ok, certificate.format()
    where = [(i.stopped_at, i.mid_window, i.mid_epoch) for i in certificate.interruptions]
    assert where == [(2, True, True), (3, True, True), (5, True, False)]
    assert [i.epoch for i in certificate.interruptions] == [0, 1, 1]
    text = certificate.format()
    assert "at step 2 (mid-window; mid-epoch, in epoch 0)" in text
    assert "at step 3 (mid-window; mid-epoch, in epoch 1)" in text
    assert "at step 5 (mid-window; at an epoch boundary, the end of epoch 1)" in text


def test_a_fresh_run_keeps_the_earlier_runs_record_with_its_fingerprints(tmp_path, capsys):
    """The earlier run's fingerprints move to fingerprints.1 and its record goes with them:
    `loopkit diff --replay` still rebuilds it from there."""
    config = base_config(tmp_path)
    records = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        for sets in (["checkpoint_dir=ckpt1"], ["checkpoint_dir=ckpt2", NUDGE_3]):
            argv = ["fit", config, "--set", "max_steps=5", "--set", "log_dir=run", "--set",
                    "save_every=1", *(x for s in sets for x in ("--set", s))]  # fmt: skip
            assert run(argv, capsys)[0] == 0
            records.append((tmp_path / "run" / RUN_RECORD).read_text())
    aside = tmp_path / "run" / "fingerprints.1"
    assert (aside / RUN_RECORD).read_text() == records[0] != records[1]
    status, out, err = run(["diff", aside, tmp_path / "run", "--no-plot", "--replay"], capsys)
    assert status == 1, err
    assert "first divergent step: 3" in out and "first differing module: 2 (Linear)" in out


def test_a_value_error_from_the_users_loss_while_training_is_a_failed_run(tmp_path, capsys):
    """Exit 1 (a run that failed), not 2 (bad input): training had begun."""
    (tmp_path / "raising_loss.py").write_text(
        "from forensics_parts import loss_fn\n"
        "calls = [0]\n\n\n"
        "def loss(model, batch):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3:\n"
        "        raise ValueError('labels out of range')\n"
        "    return loss_fn(model, batch)\n"
    )
    argv = ["fit", base_config(tmp_path), "--set", "max_steps=5", "--set",
            "loss_fn=raising_loss:loss"]  # fmt: skip
    status, _, err = run(argv, capsys)
    assert status == 1
    assert err.startswith("loopkit fit: error: ValueError: labels out of range (at ")
    assert "raising_loss.py:8, in loss" in err and "--traceback" in err
