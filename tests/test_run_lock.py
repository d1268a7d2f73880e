"""One writer per checkpoint directory: the OS lock, its holder record, leftovers."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from loopkit.checkpoint import CheckpointError
from loopkit.run_lock import (
    LOCK_FILE,
    PROBE_PREFIX,
    DirectoryLock,
    DirectoryLockedError,
    clean_leftovers,
    new_run_id,
    probe_writable,
    remove_created,
)

HOLD = """
import sys, time
from loopkit.run_lock import DirectoryLock
lock = DirectoryLock(sys.argv[1], run_id="holder-run").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(directory: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def test_a_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(DirectoryLockedError) as caught:
            DirectoryLock(tmp_path, run_id=new_run_id()).acquire()
        message = str(caught.value)
        assert str(tmp_path) in message
        assert f"pid {proc.pid}" in message and "run id holder-run" in message
        assert "host " in message and "started " in message
    finally:
        _stop(proc)


def test_a_killed_holder_frees_the_lock_at_once(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    _stop(proc)
    start = time.monotonic()
    with DirectoryLock(tmp_path, run_id="next"):
        assert time.monotonic() - start < 5  # no wait for a timeout: the OS freed it
        assert '"run_id": "next"' in (tmp_path / LOCK_FILE).read_text()


def test_released_locks_can_be_taken_again_in_one_process(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path, run_id="a"):
        pass
    with DirectoryLock(tmp_path, run_id="b"):
        pass


def test_an_unwritable_place_is_a_checkpoint_error_naming_the_argument(tmp_path: Path) -> None:
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(Exception, match="checkpoint_dir=.*a_file.*cannot create"):
        DirectoryLock(file / "sub", run_id="x").acquire()


def test_clean_leftovers_removes_only_dead_writers_hidden_files(tmp_path: Path) -> None:
    keep = ["step-00000002", "latest", LOCK_FILE, ".hidden_user_file", "notes.txt"]
    dead = [
        ".step-00000004.tmp-123",
        ".step-00000001.del-77",
        ".step-00000003.old-9",
        ".latest.tmp-55",
        ".model.safetensors.tmp-8",
        f"{PROBE_PREFIX}77-0a1b2c3d",
    ]
    for name in keep + dead:
        if name.startswith((".step", "step")):
            (tmp_path / name).mkdir()
            (tmp_path / name / "x").write_text("x")
        else:
            (tmp_path / name).write_text("x")
    removed = clean_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted(dead)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_the_record_is_emptied_on_release_and_after_a_refused_check(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path, run_id="a").acquire()
    assert '"run_id": "a"' in (tmp_path / LOCK_FILE).read_text()
    lock.record("b")  # a resumed run's id replaces the fresh one
    assert '"run_id": "b"' in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_bytes() == b""  # no stale holder to name

    def refuse() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        DirectoryLock(tmp_path, run_id="c").acquire(check=refuse)
    assert (tmp_path / LOCK_FILE).read_bytes() == b""
    with DirectoryLock(tmp_path, run_id="d"):  # and the lock was given back
        pass


def test_a_refused_run_waits_for_the_holder_to_record_itself(tmp_path: Path) -> None:
    # A holder caught between its flock and its record: the refused run must not name
    # "unknown" (or a previous holder), but wait the moment and name this one.
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    record = b'{"host": "h", "pid": 4242, "started": "now", "run_id": "late"}'
    writer = threading.Timer(0.2, lambda: os.pwrite(fd, record, 0))
    writer.start()
    try:
        with pytest.raises(DirectoryLockedError, match="pid 4242, started now, run id late"):
            DirectoryLock(tmp_path, run_id="x").acquire()
    finally:
        writer.join()
        os.close(fd)


def test_probe_writable_creates_writes_deletes_and_undoes_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a" / "b"
    assert probe_writable(target, argument="log_dir") == [tmp_path / "a", target]
    assert list(target.iterdir()) == []  # the probe file is gone
    remove_created([tmp_path / "a", target])
    assert list(tmp_path.iterdir()) == []
    real_open = os.open

    def refuse(path: Any, flags: int, *args: Any) -> int:
        if Path(path).name.startswith(PROBE_PREFIX):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CheckpointError, match=r"checkpoint_dir=.*errno \d+ EDQUOT") as caught:
        probe_writable(target, argument="checkpoint_dir")
    assert caught.value.errno == errno.EDQUOT and caught.value.path == target
    assert list(tmp_path.iterdir()) == []  # the directories it made are gone again
