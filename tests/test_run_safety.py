"""A run that never destroys work: one writer per directory, run ids, resume refusals, checks.

Real processes, real signals and real files: concurrent fits are forked processes that
race for one directory; a holder is SIGKILLed; a read-only directory is a read-only
mount where this machine allows one. "Byte-identical" means every file's sha256.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlp

import loopkit as lk
from loopkit import checkpoint as ckpt
from loopkit.checkpoint import CheckpointMismatchError
from loopkit.run_lock import LOCK_FILE, PROBE_PREFIX, DirectoryLock, DirectoryLockedError

# --- a tiny run ---------------------------------------------------------------------------


def dataset(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def loss_fn(model: torch.nn.Module, batch: Any) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


BASE: dict[str, Any] = dict(loss_fn=loss_fn, optimizer=sgd, batch_size=8, progress=False)


class Steps:
    """Counts the optimizer steps fit ran in this process."""

    def __init__(self) -> None:
        self.count = 0

    def on_step_end(self, state: Any) -> None:
        self.count += 1


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under `root`: relative path -> sha256 (or "dir")."""
    return {
        str(path.relative_to(root)): (
            "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        )
        for path in sorted(root.rglob("*"))
    }


def old_run(directory: Path, steps: int = 4) -> lk.FitResult:
    """A finished run with checkpoints at steps 2, 4, ... in `directory`."""
    result = lk.fit(
        mlp(), dataset(), max_steps=steps, checkpoint_dir=directory, save_every=2, **BASE
    )
    assert [p.name for p in ckpt.list_checkpoints(directory)][0] == ckpt.step_dir_name(steps)
    return result


# --- two concurrent fits on one directory -------------------------------------------------


class HoldAtEnd:
    """Keeps the run (and so its lock) alive at fit end until `go` exists (at most 30 s)."""

    def __init__(self, go: Path) -> None:
        self.go = go

    def on_fit_end(self, state: Any) -> None:
        deadline = time.monotonic() + 30  # only a broken lock gets here twice: no hang
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.002)


def _contend(directory: Path, go: Path, start: Any, delay_s: float, conn: Any) -> None:
    """A forked process: at `start` plus `delay_s`, fit on `directory`; report; leave at once."""
    start.wait(60)
    time.sleep(delay_s)
    try:
        result = lk.fit(
            mlp(),
            dataset(32),
            max_steps=6,
            checkpoint_dir=directory,
            save_every=2,
            keep_last=2,
            callbacks=[HoldAtEnd(go)],
            **BASE,
        )
        report = {"pid": os.getpid(), "ok": True, "run_id": result.run_id,
                  "step": result.state.step, "delay_s": delay_s}  # fmt: skip
    except BaseException as error:  # noqa: BLE001 - everything goes back to the test
        report = {"pid": os.getpid(), "ok": False, "type": type(error).__name__,
                  "message": str(error)}  # fmt: skip
    conn.send_bytes(json.dumps(report).encode())
    conn.close()
    os._exit(0)


def _start(target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    proc = context.Process(target=target, args=(*args, sender))
    proc.start()
    sender.close()
    return proc, receiver


def _race(directory: Path, go: Path, offset_s: float) -> list[dict[str, Any]]:
    """Start two fits `offset_s` apart; release the winner once the loser has finished.

    Both processes exist before either starts, so the offset is the only head start.
    """
    start = mp.get_context("fork").Event()
    first = _start(_contend, directory, go, start, 0.0)
    second = _start(_contend, directory, go, start, offset_s)
    start.set()
    pending = {first[1]: first[0], second[1]: second[0]}
    reports = []
    while pending:
        ready = multiprocessing.connection.wait(list(pending), timeout=60)
        assert ready, "a contender hung"
        for conn in ready:
            reports.append(json.loads(conn.recv_bytes()))  # type: ignore[union-attr]
            pending.pop(conn).join(10)  # type: ignore[call-overload]
        go.touch()  # the first to finish is the refused one: let the holder end
    return reports


def test_the_second_of_two_concurrent_fits_is_refused_every_time(tmp_path: Path) -> None:
    rng = random.Random(15)  # the offsets are drawn, and reproducible
    first_won = 0
    for attempt in range(20):
        directory = tmp_path / f"run{attempt}"
        # Half start together (a real race for the lock), half while the first runs.
        offset_s = rng.uniform(0.0, 0.002 if attempt % 2 else 0.3)
        reports = _race(directory, tmp_path / f"go{attempt}", offset_s)
        won = [r for r in reports if r["ok"]]
        lost = [r for r in reports if not r["ok"]]
        assert len(won) == 1 and len(lost) == 1, (attempt, offset_s, reports)
        winner, loser = won[0], lost[0]
        first_won += winner["delay_s"] == 0.0
        assert loser["type"] == "DirectoryLockedError", loser
        assert f"checkpoint_dir={str(directory)!r} is in use" in loser["message"]
        assert f"pid {winner['pid']}" in loser["message"]
        assert f"run id {winner['run_id']}" in loser["message"]
        # The winner's run is whole: it completed, and its checkpoints are valid and its own.
        assert winner["step"] == 6
        names = [p.name for p in ckpt.list_checkpoints(directory)]
        assert names == [ckpt.step_dir_name(6), ckpt.step_dir_name(4)]
        for path in ckpt.list_checkpoints(directory):
            ckpt.validate_checkpoint(path)
            assert ckpt.read_meta(path)["run_id"] == winner["run_id"]
        assert (directory / "latest").read_text() == ckpt.step_dir_name(6)
        assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == [LOCK_FILE]
    print(f"20 races: the first started won {first_won}, the second {20 - first_won}")


def _killed_mid_save(directory: Path, conn: Any) -> None:
    """A forked process: fit, and stop for good inside the save of step 3 (then SIGKILL)."""

    def pause() -> None:
        if any(directory.glob(".step-00000003.tmp-*/state.safetensors")):
            conn.send_bytes(b"inside the save of step 3")
            time.sleep(60)

    ckpt._pause = pause  # this process only: the test hook between the files of a save
    lk.fit(mlp(), dataset(), max_steps=8, checkpoint_dir=directory, save_every=1, **BASE)
    os._exit(1)


def _resume_at_once(directory: Path, conn: Any) -> None:
    """A forked process: resume=True on `directory`; send back the result and the log."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("loopkit").addHandler(handler)
    try:
        result = lk.fit(
            mlp(), dataset(), max_steps=8, checkpoint_dir=directory, save_every=1, resume=True,
            **BASE,
        )  # fmt: skip
        report = {"ok": True, "run_id": result.run_id, "step": result.state.step}
    except BaseException as error:  # noqa: BLE001
        report = {"ok": False, "type": type(error).__name__, "message": str(error)}
    conn.send_bytes(json.dumps({**report, "log": messages}).encode())
    conn.close()
    os._exit(0)


def test_a_sigkilled_holders_lock_is_free_at_once(tmp_path: Path) -> None:
    holder, conn = _start(_killed_mid_save, tmp_path)
    assert conn.poll(60), "the holder never reached the save of step 3"
    conn.recv_bytes()
    first_run = ckpt.read_meta(tmp_path / ckpt.step_dir_name(2))["run_id"]
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert holder.exitcode == -signal.SIGKILL
    leftover = f".step-00000003.tmp-{holder.pid}"
    assert (tmp_path / leftover).is_dir()  # killed inside the save
    # No waiting and no retry: the next run starts right away and continues the same run.
    proc, conn = _start(_resume_at_once, tmp_path)
    assert conn.poll(60)
    report = json.loads(conn.recv_bytes())
    proc.join(10)
    assert report["ok"], report
    assert report["step"] == 8 and report["run_id"] == first_run
    assert any(leftover in m and "removed what dead writers left" in m for m in report["log"])
    assert not (tmp_path / leftover).exists()
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.validate_checkpoint(path)
        assert ckpt.read_meta(path)["run_id"] == first_run


# --- run ids ------------------------------------------------------------------------------


def test_the_run_id_is_new_for_a_fresh_run_and_kept_across_resumes(tmp_path: Path) -> None:
    in_lock: list[str] = []

    class LockRecord:
        """Reads the holder's run id from the lock file while the run holds it."""

        def on_fit_start(self, state: Any, hparams: Any) -> None:
            in_lock.append(json.loads((tmp_path / "a" / LOCK_FILE).read_text())["run_id"])

    kw = dict(BASE, checkpoint_dir=tmp_path / "a", save_every=2, callbacks=[LockRecord()])
    first = lk.fit(mlp(), dataset(), max_steps=4, **kw)
    other = old_run(tmp_path / "b")
    assert first.run_id and other.run_id and first.run_id != other.run_id
    resumed = lk.fit(mlp(), dataset(), max_steps=8, resume=True, **kw)
    assert resumed.run_id == first.run_id
    assert in_lock == [first.run_id, first.run_id]  # the lock names the run it continues
    assert (tmp_path / "a" / LOCK_FILE).read_bytes() == b""  # released: no stale holder
    ids = {ckpt.read_meta(p)["run_id"] for p in ckpt.list_checkpoints(tmp_path / "a")}
    assert ids == {first.run_id}
    assert lk.fit(mlp(), dataset(), max_steps=2, **BASE).run_id not in (None, first.run_id)


# --- resume never destroys ----------------------------------------------------------------


def _two_groups(params: Any) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)


MISMATCHES: dict[str, tuple[dict[str, Any], str]] = {
    "model": (
        dict(model=lambda: mlp(d_hidden=5)),
        r"shape mismatches: \['0\.bias: checkpoint \(8,\), model \(5,\)'",
    ),
    "param-groups": (
        dict(optimizer=_two_groups),
        r"the optimizer had param groups of sizes \[4\], this one has \[2, 2\]",
    ),
    "precision": (dict(precision="bf16"), r"saved with precision 'fp32', loading into 'bf16'"),
    "schedule-kind": (
        dict(schedule=lambda: None),  # replaced below by a torch LRScheduler
        r"saved with schedule .*use the same kind of schedule",
    ),
}


@pytest.mark.parametrize("change", list(MISMATCHES))
def test_a_checkpoint_that_does_not_fit_is_an_error_and_touches_nothing(
    tmp_path: Path, change: str
) -> None:
    first = old_run(tmp_path)
    before = tree(tmp_path)
    changes, message = MISMATCHES[change]
    model = changes.get("model", mlp)()
    kw = {**BASE, **{k: v for k, v in changes.items() if k != "model"}}
    if change == "schedule-kind":
        optimizer = sgd(model.parameters())
        kw.update(optimizer=optimizer, schedule=torch.optim.lr_scheduler.StepLR(optimizer, 2))
    steps = Steps()
    with pytest.raises(CheckpointMismatchError) as caught:
        lk.fit(
            model, dataset(), max_steps=8, checkpoint_dir=tmp_path, save_every=2, resume=True,
            callbacks=[steps], **kw,
        )  # fmt: skip
    text = str(caught.value)
    assert f"fit(resume=True): the newest valid checkpoint in checkpoint_dir={str(tmp_path)!r}" in (
        text
    )
    assert f"(step-00000004, run {first.run_id}) does not fit this run" in text
    assert re.search(message, text), text
    assert "pass another checkpoint_dir" in text and "pass resume=False" in text
    assert steps.count == 0
    assert tree(tmp_path) == before  # every file byte-identical (the lock's record is empty)


def test_resume_false_onto_an_old_run_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    first = old_run(tmp_path)
    (tmp_path / ".step-00000006.tmp-999999").mkdir()  # a dead writer's leftover stays too
    before = tree(tmp_path)
    steps = Steps()
    with pytest.raises(lk.CheckpointError) as caught:
        lk.fit(mlp(), dataset(), max_steps=8, checkpoint_dir=tmp_path, save_every=2,
               callbacks=[steps], **BASE)  # fmt: skip
    assert str(caught.value) == (
        f"fit(checkpoint_dir={str(tmp_path)!r}, resume=False): the directory holds 2 "
        f"checkpoint(s) of run {first.run_id} (newest step-00000004); a fresh run would write "
        "over them. Pass resume=True to continue that run, choose another checkpoint_dir, or "
        "delete them first."
    )
    assert caught.value.path == tmp_path
    assert steps.count == 0
    assert tree(tmp_path) == before  # the lock file included: refused before it is touched


def test_resume_of_another_runs_checkpoint_into_a_used_directory_is_refused(
    tmp_path: Path,
) -> None:
    old_run(tmp_path / "mine")
    theirs = old_run(tmp_path / "theirs")
    before = tree(tmp_path / "mine")
    with pytest.raises(lk.CheckpointError, match=rf"that checkpoint is of run {theirs.run_id}"):
        lk.fit(mlp(), dataset(), max_steps=8, checkpoint_dir=tmp_path / "mine",
               resume=str(tmp_path / "theirs" / ckpt.step_dir_name(2)), **BASE)  # fmt: skip
    assert tree(tmp_path / "mine") == before


def test_resume_from_an_older_checkpoint_moves_the_newer_ones_aside_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = old_run(tmp_path, steps=6)
    newer = {s: tree(tmp_path / ckpt.step_dir_name(s)) for s in (4, 6)}
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        resumed = lk.fit(
            mlp(), dataset(), max_steps=5, checkpoint_dir=tmp_path, save_every=2,
            resume=str(tmp_path / ckpt.step_dir_name(2)), **BASE,
        )  # fmt: skip
    aside = tmp_path / "abandoned-after-step-00000002"
    assert any(
        "step-00000006, step-00000004" in r.getMessage() and str(aside) in r.getMessage()
        for r in caplog.records
    )
    for s, files in newer.items():  # kept, unchanged, where resume=True and rotation ignore
        assert tree(aside / ckpt.step_dir_name(s)) == files
    assert resumed.run_id == first.run_id
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000002"]
    assert (tmp_path / "latest").read_text() == "step-00000004"
    # resume=True now continues the new branch, and ends where an unbroken run does.
    again = lk.fit(mlp(), dataset(), max_steps=8, checkpoint_dir=tmp_path, resume=True, **BASE)
    straight = lk.fit(mlp(), dataset(), max_steps=8, **BASE)
    for a, b in zip(again.state.model.parameters(), straight.state.model.parameters()):
        assert torch.equal(a, b)


# --- checked before work ------------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only tmpfs mount (skips where mounting is not allowed)."""
    place = tmp_path / "ro"
    place.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(place)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield place
    finally:
        subprocess.run(["umount", str(place)], check=True)


def _unwritable(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Make the write probe in `directory` fail as a directory without write permission does.

    The tests run as root, which ignores permission bits: os.open is what refuses here.
    """
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).parent == directory and Path(path).name.startswith(PROBE_PREFIX):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


BAD_DIRS = ["empty", "a-file", "under-a-file", "unwritable", "read-only-mount"]


@pytest.mark.parametrize("argument", ["checkpoint_dir", "log_dir"])
@pytest.mark.parametrize("kind", BAD_DIRS)
def test_a_bad_directory_fails_before_the_first_step_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
    argument: str, kind: str,
) -> None:  # fmt: skip
    (tmp_path / "a_file").write_text("not a directory")
    places: dict[str, str | Path] = {
        "empty": "",
        "a-file": tmp_path / "a_file",
        "under-a-file": tmp_path / "a_file" / "sub",
        "unwritable": tmp_path / "new" / "place",  # created by the probe, then removed
    }
    if kind == "read-only-mount":
        places[kind] = request.getfixturevalue("read_only_dir") / "sub"
    bad = places[kind]
    if kind == "unwritable":
        _unwritable(monkeypatch, Path(bad))
    other = "log_dir" if argument == "checkpoint_dir" else "checkpoint_dir"
    kw: dict[str, Any] = {argument: bad, other: tmp_path / "other"}  # must not appear either
    before = tree(tmp_path)
    steps = Steps()
    a_file = tmp_path / "a_file"
    expected = {
        "empty": f"FitConfig({argument}=''): must be None or a directory path",
        "a-file": f"FitConfig({argument}='{bad}'): is a file, not a directory",
        "under-a-file": f"FitConfig({argument}='{bad}'): is under '{a_file}', a file",
        "unwritable": f"fit({argument}='{bad}'): cannot create or write files there "
        "(Permission denied; errno 13 EACCES",
        "read-only-mount": f"fit({argument}='{bad}'): cannot create or write files there "
        "(Read-only file system; errno 30 EROFS",
    }[kind]
    with pytest.raises(ValueError, match=re.escape(expected)) as caught:
        lk.fit(mlp(), dataset(), max_steps=2, callbacks=[steps], **kw, **BASE)
    if argument == "checkpoint_dir" and kind in ("unwritable", "read-only-mount"):
        assert isinstance(caught.value, lk.CheckpointError)
        assert caught.value.errno in (errno.EACCES, errno.EROFS)
    assert steps.count == 0
    assert tree(tmp_path) == before  # nothing written: not the bad place, nor the good one


def test_a_directory_held_by_another_process_is_refused_before_any_step(tmp_path: Path) -> None:
    steps = Steps()
    with DirectoryLock(tmp_path, run_id="holder"):  # this process, through another open file
        with pytest.raises(DirectoryLockedError, match=rf"pid {os.getpid()}.*run id holder"):
            lk.fit(mlp(), dataset(), max_steps=2, checkpoint_dir=tmp_path, callbacks=[steps],
                   **BASE)  # fmt: skip
    assert steps.count == 0
    lk.fit(mlp(), dataset(), max_steps=2, checkpoint_dir=tmp_path, **BASE)  # free again


def test_resuming_ready_batches_without_a_position_says_it_reads_them_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = dataset()
    batches = [data[i : i + 8] for i in range(0, 64, 8)]  # ready batches: no data position
    kw: dict[str, Any] = dict(loss_fn=loss_fn, optimizer=sgd, progress=False, log_every=None)
    lk.fit(mlp(), batches, max_steps=3, checkpoint_dir=tmp_path, save_every=3, **kw)
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        lk.fit(mlp(), batches, max_steps=5, checkpoint_dir=tmp_path, resume=True, **kw)
    assert "has no data position to save or restore" in caplog.text
    assert "reads it again from its first batch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loopkit"):  # a Dataset resumes exactly
        lk.fit(mlp(), data, max_steps=3, batch_size=8, checkpoint_dir=tmp_path / "ds",
               save_every=3, **kw)  # fmt: skip
        lk.fit(mlp(), data, max_steps=5, batch_size=8, checkpoint_dir=tmp_path / "ds",
               resume=True, **kw)  # fmt: skip
    assert "no data position" not in caplog.text
