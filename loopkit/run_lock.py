"""One writer per checkpoint directory: an exclusive OS lock held for a whole run.

`fit` takes the lock on its `checkpoint_dir` before any work and holds it until it returns.
The lock is `fcntl.flock` on `<dir>/.loopkit.lock`: the operating system frees it when the
holding process exits, however it exits (a SIGKILL included), so a dead run never leaves
a stale lock behind. The file also records who holds it (host, pid, start time, run id),
which is what a refused second run is told. flock works on local file systems; on a
network file system that does not support it, two runs on different hosts are not kept
apart.

Also here, for fit's start (loopkit._saving.claim_run): `probe_writable` (can the run
write there at all), `check_start` (would this start write over another run's
checkpoints) and `clean_leftovers` (what dead writers left, removed under the lock).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .checkpoint import CheckpointError, list_checkpoints, read_meta

LOCK_FILE = ".loopkit.lock"
PROBE_PREFIX = ".loopkit-probe-"
_LEFTOVER = re.compile(
    r"^\.(step-\d{8,}\.(tmp|del|old)-.+|latest\.tmp-.+|model\.safetensors\.tmp-.+"
    r"|loopkit-probe-.+)$"
)


class DirectoryLockedError(CheckpointError):
    """Another live run holds the checkpoint directory."""


def new_run_id() -> str:
    """A fresh run id: 12 hex digits, kept across the run's resumes."""
    return uuid.uuid4().hex[:12]


class DirectoryLock:
    """An exclusive lock on a run directory, held from `acquire` (or `with`) to `release`.

    Args:
        directory: the directory to hold (created if missing).
        run_id: recorded in the lock file so that a refused run can name the holder's run.
        argument: the argument the directory came from, for error messages.

    Raises:
        DirectoryLockedError: (from acquire) another process holds it; the message names
            the directory, the holder's host, pid, start time and run id.
        CheckpointError: (from acquire) the directory cannot be created or written.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, run_id: str, argument: str = "checkpoint_dir"
    ) -> None:
        self.directory = Path(directory)
        self.run_id = run_id
        self.argument = argument
        self._fd: int | None = None
        self._started = ""

    @property
    def path(self) -> Path:
        """The lock file, `<directory>/.loopkit.lock`."""
        return self.directory / LOCK_FILE

    @property
    def is_held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self, *, check: Callable[[], object] | None = None) -> DirectoryLock:
        """Take the lock (without waiting) and record this process as its holder.

        Args:
            check: called once the lock is held and the holder recorded; if it raises, the
                lock is released (which empties the record again) and the error propagates:
                fit refuses a start here, leaving the directory as it found it.

        Returns:
            self, holding the lock.

        Raises:
            DirectoryLockedError: another process holds it.
            CheckpointError: the directory or the lock file cannot be created or opened.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise CheckpointError(
                f"{self.argument}={str(self.directory)!r}: cannot create or open "
                f"{self.path} ({error.strerror}; errno {error.errno}). Choose a writable "
                "directory.",
                path=self.path,
                errno=error.errno,
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise DirectoryLockedError(
                f"{self.argument}={str(self.directory)!r} is in use by another run "
                f"({holder}). Two runs writing one directory would overwrite each other's "
                "checkpoints. Wait for it to finish, stop it, or use another "
                f"{self.argument}.",
                path=self.directory,
            ) from None
        self._fd = fd
        # Record at once: a run refused meanwhile waits for the record (see _read_holder).
        self._started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            self._write_record()
            if check is not None:
                check()
        except BaseException:
            self.release()
            raise
        return self

    def record(self, run_id: str) -> None:
        """Name another run id as the holder's (fit learns it when it resumes a run)."""
        self.run_id = run_id
        if self._fd is not None:
            self._write_record()

    def _write_record(self) -> None:
        assert self._fd is not None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "run_id": self.run_id,
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)

    def release(self) -> None:
        """Give the lock up, emptying the record first.

        The lock file itself stays: deleting it would let two runs hold the lock (one on
        the deleted file, one on a new one). An empty record means "free, or being taken":
        a stale holder is never named (except a killed one's, until the next run records).
        """
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


_RECORD_WAIT_S = 2.0
"""How long a refused run waits for the holder to record itself (it does so right after
taking the lock, so this wait is microseconds unless the machine is overloaded)."""


def _read_holder(fd: int) -> str:
    """The holder named by the lock file; waits briefly while the record is being written."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode())
            return (
                f"host {record['host']}, pid {record['pid']}, started {record['started']}, "
                f"run id {record['run_id']}"
            )
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "holder unknown: it has not recorded itself in the lock file"
            time.sleep(0.005)


def read_holder(directory: str | os.PathLike[str]) -> str:
    """Who holds (or last held) `directory`'s lock: host, pid, start time and run id."""
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return "holder unknown: no lock file"
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def probe_writable(directory: str | os.PathLike[str], *, argument: str) -> list[Path]:
    """Create `directory` if missing, then create, write and delete a probe file in it.

    fit calls it for `checkpoint_dir` and `log_dir` before the first step, so that a place
    it cannot write fails at once instead of at the first save. Cost: a mkdir, one small
    file written and deleted (no fsync).

    Args:
        directory: the directory to check.
        argument: the argument it came from, for the message ("checkpoint_dir", "log_dir").

    Returns:
        The directories it created, outermost first (`remove_created` undoes them).

    Raises:
        CheckpointError: (argument "checkpoint_dir") the directory cannot be created, or a
            file cannot be written in it; the message names the argument, the path, the
            reason and the errno, which `.path` and `.errno` hold too.
        ValueError: the same for any other argument.
    """
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
    probe = directory / f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"loopkit write probe\n")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as failure:
        remove_created(created)
        code = failure.errno
        message = (
            f"fit({argument}={str(directory)!r}): cannot create or write files there "
            f"({failure.strerror}; errno {code} {errno.errorcode.get(code or 0, '')}; at "
            f"{failure.filename or directory}). Pass a directory this process can write, "
            "or fix its permissions."
        )
        if argument == "checkpoint_dir":
            raise CheckpointError(message, path=directory, errno=code) from failure
        raise ValueError(message) from failure
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the directories `probe_writable` created, innermost first, if still empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return  # not empty (someone wrote there) or gone: leave it and its parents


def run_id_of(path: str | os.PathLike[str]) -> str:
    """The run id recorded in a checkpoint, for messages ('unknown' if none is readable)."""
    try:
        run_id = read_meta(path).get("run_id")
    except CheckpointError:
        return "unknown"
    return run_id if isinstance(run_id, str) else "unknown"


def check_start(
    checkpoint_dir: str | os.PathLike[str], source: bool | str | os.PathLike[str]
) -> None:
    """Refuse a start that would write over another run's checkpoints in `checkpoint_dir`.

    Called with the directory's lock held, before anything is written. resume=True
    continues the run recorded there, so it is always allowed; resume=False is refused
    when the directory holds any checkpoint; an explicit checkpoint path is refused when
    the directory holds checkpoints of another run (by run id; unknown ids do not count).

    Raises:
        CheckpointError: naming the directory, the checkpoints, their run and the ways out.
    """
    found = list_checkpoints(checkpoint_dir)
    if not found or source is True:
        return
    newest_run = run_id_of(found[0])
    if source is False:
        raise CheckpointError(
            f"fit(checkpoint_dir={str(checkpoint_dir)!r}, resume=False): the directory holds "
            f"{len(found)} checkpoint(s) of run {newest_run} (newest {found[0].name}); a "
            "fresh run would write over them. Pass resume=True to continue that run, choose "
            "another checkpoint_dir, or delete them first.",
            path=Path(checkpoint_dir),
        )
    resumed_run = run_id_of(Path(source))
    others = sorted({run_id_of(p) for p in found} - {"unknown", resumed_run})
    if resumed_run != "unknown" and others:
        raise CheckpointError(
            f"fit(resume={str(source)!r}): that checkpoint is of run {resumed_run}, but "
            f"checkpoint_dir={str(checkpoint_dir)!r} holds checkpoints of run(s) {others}; "
            "continuing here would mix two runs, and rotation would delete the other's. Pass "
            "an empty checkpoint_dir for the resumed run, or the directory of its own run.",
            path=Path(checkpoint_dir),
        )


def clean_leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the hidden temporary and half-deleted checkpoints that dead writers left.

    Call it only while holding the directory's lock: then no live writer owns them.
    Returns what was removed.
    """
    removed = []
    for path in sorted(Path(directory).iterdir()):
        if _LEFTOVER.match(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


__all__ = [
    "LOCK_FILE",
    "DirectoryLock",
    "DirectoryLockedError",
    "PROBE_PREFIX",
    "check_start",
    "clean_leftovers",
    "new_run_id",
    "probe_writable",
    "read_holder",
    "remove_created",
    "run_id_of",
]
