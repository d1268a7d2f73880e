"""fit()'s checkpoint saving: one directory per step, written once, then rotated."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import rotate_checkpoints, save_checkpoint, step_dir_name
from .state import TrainState


class CheckpointSaver:
    """Save fit()'s checkpoints into `directory` and keep the last `keep_last` (plus the best).

    Args:
        directory: fit's `checkpoint_dir`.
        keep_last: after each save keep only the newest this many checkpoints (None: all).
        keep_best: also keep the checkpoint of the best evaluation when rotating.
        saved_at: the step of the newest checkpoint on disk from this run, or of the one it
            resumed from (-1: none).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None,
        keep_best: bool,
        saved_at: int = -1,
    ) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.saved_at = saved_at

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
        path = save_checkpoint(state, self.directory, extra=extra())
        self.saved_at = state.step
        if self.keep_last is not None:
            keep = [path]
            if self.keep_best and best_step is not None:
                keep.append(self.directory / step_dir_name(best_step))
            if state.strategy.is_main:  # one process deletes; the others would race it
                rotate_checkpoints(self.directory, self.keep_last, keep=keep)
        return path


__all__ = ["CheckpointSaver"]
