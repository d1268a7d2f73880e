"""fit()'s checkpoint saving: the run's claim on its directories, then one directory per step.

`claim_run` runs before the first step: it probes `checkpoint_dir` and `log_dir` for
writing, takes `checkpoint_dir`'s lock for the whole run (one writer per directory),
refuses a start that would write over another run (`run_lock.check_start`) and removes dead
writers' leftovers. `CheckpointSaver` then writes each step's checkpoint once and rotates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._types import Strategy
from .checkpoint import (
    CheckpointError,
    rotate_checkpoints,
    save_checkpoint,
    step_dir_name,
    validate_checkpoint,
)
from .run_lock import (
    DirectoryLock,
    DirectoryLockedError,
    check_start,
    clean_leftovers,
    new_run_id,
    probe_writable,
    read_holder,
    remove_created,
)
from .state import TrainState

logger = logging.getLogger("loopkit.fit")

# What rank 0's claim failed with, as the number it sends the other ranks (0: it did not).
_FAILURES: tuple[type[Exception], ...] = (
    DirectoryLockedError,
    CheckpointError,
    ValueError,
    Exception,
)


_ID_SPAN = 16**12
"""Run ids are 12 hex digits (loopkit.run_lock.new_run_id)."""


class RunClaim:
    """What fit holds for a whole run: `checkpoint_dir`'s lock (rank 0 only) and the run id.

    Attributes:
        run_id: a new id for a fresh run; `adopt` replaces it by a resumed run's.
        lock: the held DirectoryLock, or None (no checkpoint_dir, or not rank 0).
    """

    def __init__(self, run_id: str, lock: DirectoryLock | None) -> None:
        self.run_id = run_id
        self.lock = lock

    def adopt(self, run_id: str | None) -> None:
        """Continue the run `run_id` (a resumed checkpoint's; None: it has none, keep ours)."""
        if run_id is None:
            return
        self.run_id = run_id
        if self.lock is not None:
            self.lock.record(run_id)

    def release(self) -> None:
        """Give the directory back (fit calls it however the run ends)."""
        if self.lock is not None:
            self.lock.release()


def claim_run(
    *,
    checkpoint_dir: str | os.PathLike[str] | None,
    log_dir: str | os.PathLike[str] | None,
    resume: bool | str | os.PathLike[str],
    strategy: Strategy,
) -> RunClaim:
    """Check and claim the run's directories before any work; every rank fails together.

    Rank 0 probes `log_dir` and `checkpoint_dir` for writing, locks `checkpoint_dir`,
    checks the start (`check_start`) and cleans leftovers; the other ranks share the
    directory and take no lock. With several processes, one all-reduce (`reduce_count`)
    then tells every rank whether rank 0 failed, so they raise an error of the same type
    instead of waiting for it in the first collective; every rank gets rank 0's run id.
    On failure nothing is left behind: directories the probes created are removed, and a
    refused start empties the lock's record again (as a finished run leaves it).

    Raises:
        DirectoryLockedError: another live run holds checkpoint_dir (names it and the holder).
        CheckpointError: checkpoint_dir is unwritable, or holds another run's checkpoints.
        ValueError: log_dir is unwritable.
    """
    run_id = new_run_id()
    lock, failure = None, None
    if strategy.is_main:
        try:
            lock = _claim_on_main(checkpoint_dir, log_dir, resume, run_id)
        except Exception as error:  # sent to the other ranks below, then raised
            failure = error
    if strategy.world_size > 1:
        # One number from rank 0 (the others add 0): its failure's kind, and its run id so
        # that every rank reports the same one. 48 bits of id + 3 of kind: exact in float64.
        code = next((i + 1 for i, kind in enumerate(_FAILURES) if isinstance(failure, kind)), 0)
        mine = code * _ID_SPAN + int(run_id, 16) if strategy.is_main else 0
        sent = int(strategy.reduce_count(mine))  # host sync: once per fit, before any work
        code, id_number = divmod(sent, _ID_SPAN)
        run_id = f"{id_number:012x}"
        if code and failure is None:
            raise _peer_failure(code, checkpoint_dir, log_dir)
    if failure is not None:
        raise failure
    return RunClaim(run_id, lock)


def _claim_on_main(
    checkpoint_dir: str | os.PathLike[str] | None,
    log_dir: str | os.PathLike[str] | None,
    resume: bool | str | os.PathLike[str],
    run_id: str,
) -> DirectoryLock | None:
    """Rank 0's part of claim_run: probes, lock, start check, leftovers."""
    if not isinstance(resume, bool):
        validate_checkpoint(resume, deep=False)  # a bad explicit path fails before any write
    created: list[Path] = []
    try:
        if log_dir is not None:
            created += probe_writable(log_dir, argument="log_dir")
        if checkpoint_dir is None:
            return None
        created += probe_writable(checkpoint_dir, argument="checkpoint_dir")
        lock = DirectoryLock(checkpoint_dir, run_id=run_id).acquire(
            check=lambda: check_start(checkpoint_dir, resume)
        )
    except BaseException:
        remove_created(created)
        raise
    try:
        removed = clean_leftovers(checkpoint_dir)
    except BaseException:
        lock.release()
        raise
    if removed:
        logger.info(
            "removed what dead writers left in %s: %s.",
            checkpoint_dir,
            ", ".join(p.name for p in removed),
        )
    return lock


def _peer_failure(
    code: int,
    checkpoint_dir: str | os.PathLike[str] | None,
    log_dir: str | os.PathLike[str] | None,
) -> Exception:
    """The error a rank other than 0 raises when rank 0 could not claim the directories."""
    kind = _FAILURES[min(code, len(_FAILURES)) - 1]
    where = f"checkpoint_dir={str(checkpoint_dir)!r}, log_dir={str(log_dir)!r}"
    if kind is DirectoryLockedError and checkpoint_dir is not None:
        return DirectoryLockedError(
            f"checkpoint_dir={str(checkpoint_dir)!r} is in use by another run "
            f"({read_holder(checkpoint_dir)}); rank 0 was refused, so this rank stops too.",
            path=checkpoint_dir,
        )
    message = f"fit({where}): rank 0 could not start the run; its error says why."
    if kind is CheckpointError:
        return CheckpointError(message, path=checkpoint_dir)
    if kind is ValueError:
        return ValueError(message)
    return RuntimeError(message)


class CheckpointSaver:
    """Save fit()'s checkpoints into `directory` and keep the last `keep_last` (plus the best).

    Args:
        directory: fit's `checkpoint_dir`.
        keep_last: after each save keep only the newest this many checkpoints (None: all).
        keep_best: also keep the checkpoint of the best evaluation when rotating.
        saved_at: the step of the newest checkpoint on disk from this run, or of the one it
            resumed from (-1: none).
        run_id: recorded in every checkpoint (fit sets it to the resumed run's on resume).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None,
        keep_best: bool,
        saved_at: int = -1,
        run_id: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.saved_at = saved_at
        self.run_id = run_id

    def save(
        self, state: TrainState, extra: Callable[[], dict[str, Any]], best_step: int | None
    ) -> Path | None:
        """Write `state` (with `extra()`) unless this step is on disk already; then rotate.

        Args:
            state: the record to save (a collective under multi-process strategies).
            extra: builds what fit needs besides the record to resume (called only when
                a checkpoint is written).
            best_step: the step of the best evaluation so far, kept by rotation when
                `keep_best`; None if there is none.

        Returns:
            The checkpoint directory written, or None if this step was on disk already.
        """
        if state.step == self.saved_at:
            # This step is on disk already (an epoch end right after a step save, or the
            # checkpoint resumed from), and resuming from it replays what followed exactly.
            # Writing it again would replace the newest valid checkpoint in place, which is
            # not atomic (a directory cannot be renamed over a non-empty one).
            return None
        path = save_checkpoint(state, self.directory, extra=extra(), run_id=self.run_id)
        self.saved_at = state.step
        if self.keep_last is not None:
            keep = [path]
            if self.keep_best and best_step is not None:
                keep.append(self.directory / step_dir_name(best_step))
            if state.strategy.is_main:  # one process deletes; the others would race it
                rotate_checkpoints(self.directory, self.keep_last, keep=keep)
        return path


__all__ = ["CheckpointSaver", "RunClaim", "claim_run"]
