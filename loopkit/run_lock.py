"""One writer per checkpoint directory: an exclusive OS lock held for a whole run.

`fit` takes the lock on its `checkpoint_dir` before any work and holds it until it returns.
The lock is `fcntl.flock` on `<dir>/.loopkit.lock`: the operating system frees it when the
holding process exits, however it exits (a SIGKILL included), so a dead run never leaves
a stale lock behind. The file also records who holds it (host, pid, start time, run id),
which is what a refused second run is told. flock works on local file systems; on a
network file system that does not support it, two runs on different hosts are not kept
apart.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from types import TracebackType

from .checkpoint import CheckpointError

LOCK_FILE = ".loopkit.lock"
_LEFTOVER = re.compile(
    r"^\.(step-\d{8,}\.(tmp|del|old)-.+|latest\.tmp-.+|model\.safetensors\.tmp-.+)$"
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

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> DirectoryLock:
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
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "run_id": self.run_id,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is not None:
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


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (
            f"host {record['host']}, pid {record['pid']}, started {record['started']}, "
            f"run id {record['run_id']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: the lock file is unreadable"


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
    "clean_leftovers",
    "new_run_id",
]
