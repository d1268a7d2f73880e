"""fit()'s resume: what a checkpoint carries besides the record, and loading it back."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, read_extra
from .state import TrainState

logger = logging.getLogger("loopkit.fit")


def checkpoint_extra(
    loader: Any,
    callbacks: Sequence[Any],
    history: list[dict[str, float]],
    best: dict[str, float] | None,
    evaluated_at: int,
    hparams: Mapping[str, Any],
) -> dict[str, Any]:
    """What a checkpoint needs besides the TrainState to resume fit() exactly.

    The data position (a StatefulDataLoader's state), each callback's `state_dict()` (None
    for a callback without one), the history, the best evaluation, the step of the last
    evaluation and fit's settings; `resume` reads them back.
    """
    return {
        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "callbacks": [
            cb.state_dict()
            if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")
            else None
            for cb in callbacks
        ],
        "history": history,
        "best": best,
        "evaluated_at": evaluated_at,
        "config": dict(hparams),
    }


@dataclass(frozen=True)
class Resumed:
    """A run picked up from a checkpoint: the loaded record and fit's own bookkeeping.

    Attributes:
        state: the record loaded from the checkpoint.
        history: the history up to the checkpoint.
        best: the best evaluation up to it, or None.
        evaluated_at: the step of the last evaluation before it (-1: none).
    """

    state: TrainState
    history: list[dict[str, float]]
    best: dict[str, float] | None
    evaluated_at: int


def resume(
    state: TrainState,
    loader: Any,
    callbacks: Sequence[Any],
    *,
    source: bool | str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str] | None,
) -> Resumed | None:
    """Load the checkpoint fit's `resume=` asks for; None when there is none to start from.

    `source=True` tries the checkpoints in `checkpoint_dir` newest first, skipping (and
    saying why) each one that is invalid or does not fit this run; an explicit path must
    load. The data position and the callbacks' state are restored in place.

    Raises:
        CheckpointError: an explicit path does not load.
        ValueError: the checkpoint holds a data position `loader` cannot restore, or state
            for another number of callbacks.
    """
    loaded = _load_first_valid(state, source, checkpoint_dir)
    if loaded is None:
        return None
    state, path = loaded
    extra = read_extra(path)  # parsed fine by load_checkpoint already
    _restore_data_position(loader, extra.get("data"), path)
    _restore_callbacks(callbacks, extra.get("callbacks") or [], path)
    if state.strategy.is_main:
        logger.info("resumed from %s (step %s, epoch %s).", path, state.step, state.epoch)
    return Resumed(
        state=state,
        history=list(extra.get("history") or []),
        best=extra.get("best"),
        evaluated_at=int(extra.get("evaluated_at", -1)),
    )


def _load_first_valid(
    state: TrainState,
    source: bool | str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str] | None,
) -> tuple[TrainState, Path] | None:
    """The first candidate checkpoint that loads into `state`, and its path."""
    if source is True:
        assert checkpoint_dir is not None  # FitConfig checks resume=True has a directory
        candidates = list_checkpoints(checkpoint_dir)
    else:
        candidates = [Path(source)]  # type: ignore[arg-type]
    for path in candidates:
        try:
            return load_checkpoint(path, state), path  # validates first; touches nothing if bad
        except CheckpointError as error:
            if source is not True:
                raise  # a bad explicit path raises; no fallback
            if state.strategy.is_main:
                logger.warning("skipping checkpoint %s: %s", path.name, error)
    if state.strategy.is_main:
        logger.info("no valid checkpoint in %s; starting fresh.", checkpoint_dir)
    return None


def _restore_data_position(loader: Any, position: Any, path: Path) -> None:
    if position is None:
        return
    if not hasattr(loader, "load_state_dict"):
        raise ValueError(
            f"fit(resume={str(path)!r}): the checkpoint holds a data position but "
            f"train_data ({type(loader).__name__}) cannot restore one; pass a Dataset or "
            "a torchdata StatefulDataLoader for exact resume."
        )
    loader.load_state_dict(position)


def _restore_callbacks(callbacks: Sequence[Any], saved: Sequence[Any], path: Path) -> None:
    if len(saved) != len(callbacks):
        raise ValueError(
            f"fit(resume={str(path)!r}): the checkpoint has state for {len(saved)} callbacks, "
            f"this run has {len(callbacks)}; pass the same callbacks as the interrupted run."
        )
    for callback, callback_state in zip(callbacks, saved):
        if callback_state is not None:
            callback.load_state_dict(callback_state)


__all__ = ["Resumed", "checkpoint_extra", "resume"]
