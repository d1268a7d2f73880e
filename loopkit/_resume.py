"""fit()'s resume: what a checkpoint carries besides the record, and loading it back.

It never destroys a run: a checkpoint that is valid but does not fit is an error (not a
fresh start over the old files), a fresh run refuses a directory that holds another run's
checkpoints, and a resume from an older checkpoint moves the newer ones aside, whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    list_checkpoints,
    load_checkpoint,
    read_extra,
    read_meta,
    step_dir_name,
    write_pointer,
)
from .data import as_global_position, has_global_position
from .run_lock import run_id_of
from .state import TrainState

logger = logging.getLogger("loopkit.fit")


def checkpoint_extra(
    loader: Any,
    callbacks: Sequence[Any],
    history: list[dict[str, float]],
    best: dict[str, float] | None,
    evaluated_at: int,
    hparams: Mapping[str, Any],
    *,
    data_world_size: int = 1,
) -> dict[str, Any]:
    """What a checkpoint needs besides the TrainState to resume fit() exactly.

    The data position (a StatefulDataLoader's state: rank 0's, global when the loader reads
    through loopkit's EpochSampler), the number of data-parallel ranks that read the data,
    each callback's `state_dict()` (None for a callback without one), the history, the best
    evaluation, the step of the last evaluation and fit's settings; `resume` reads them back.
    """
    return {
        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "data_world_size": data_world_size,
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
        run_id: the id of the run it continues (None: saved before run ids were recorded).
    """

    state: TrainState
    history: list[dict[str, float]]
    best: dict[str, float] | None
    evaluated_at: int
    run_id: str | None = None


def resume(
    state: TrainState,
    loader: Any,
    callbacks: Sequence[Any],
    *,
    source: bool | str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str] | None,
    allow_data_reshard: bool = False,
    hparams: Mapping[str, Any] | None = None,
) -> Resumed | None:
    """Load the checkpoint fit's `resume=` asks for; None when there is none to start from.

    `source=True` tries the checkpoints in `checkpoint_dir` newest first, skipping (and
    saying why) each one that is invalid (incomplete, corrupt); a valid one that does not
    fit this model, optimizer, precision or kind of schedule stops the run. An explicit
    path must load; then the newer checkpoints of the same run in `checkpoint_dir` (the
    future it abandons) are moved aside, whole (see `set_aside_newer`). The data position
    and the callbacks' state are restored in place. A global data position (see
    `loopkit.data.EpochSampler`) resumes at any number of data-parallel ranks; any other is
    rank 0's, refused at another number unless `allow_data_reshard`. Settings in `hparams`
    (fit's) that change what is trained and differ from the checkpoint's run are named in a
    warning (see `say_changed_settings`).

    Raises:
        CheckpointMismatchError: (source=True) the newest valid checkpoint does not fit;
            the message names the first mismatches and the ways out.
        CheckpointError: an explicit path does not load.
        ValueError: the checkpoint holds a data position `loader` cannot restore (a
            rank-local one at another world size, without allow_data_reshard), or state
            for another number of callbacks.
    """
    loaded = _load_first_valid(state, source, checkpoint_dir)
    if loaded is None:
        return None
    state, path = loaded
    extra = read_extra(path)  # parsed fine by load_checkpoint already
    position = _position_for(
        loader, extra, state.strategy.dp_world_size, path, allow_data_reshard, state.strategy
    )
    _restore_data_position(loader, position, path)
    if position is None and state.strategy.is_main:
        _say_no_data_position(loader, path)
    _restore_callbacks(callbacks, extra.get("callbacks") or [], path)
    run_id = read_meta(path).get("run_id")
    if state.strategy.is_main:
        logger.info("resumed from %s (step %s, epoch %s).", path, state.step, state.epoch)
        if hparams is not None:
            say_changed_settings(extra.get("config"), hparams, path)
        if source is not True and checkpoint_dir is not None:
            set_aside_newer(checkpoint_dir, state.step, path)
    return Resumed(
        state=state,
        history=list(extra.get("history") or []),
        best=extra.get("best"),
        evaluated_at=int(extra.get("evaluated_at", -1)),
        run_id=run_id if isinstance(run_id, str) else None,
    )


# fit's settings that change what a step trains on or how; the others (max_steps, logging,
# saving, ...) may change on resume without changing the training.
_TRAINING_SETTINGS = (
    "batch_size",
    "accumulate",
    "samples_per_step",
    "tokens_per_step",
    "clip",
    "average",
    "seed",
    "compile",
    "nonfinite",
    "shuffle",
    "drop_last",
)


def say_changed_settings(saved: Any, now: Mapping[str, Any], path: Path) -> list[str]:
    """Warn when fit's training settings differ from those of the run that saved `path`.

    The resume itself is exact (weights, optimizer, data position); from there the run
    trains with the new settings, so it will not match the run it continues. Settings saved
    as a repr with an address (functions) are not compared. Returns the differences.

    Args:
        saved: the checkpoint's `extra["config"]` (None: saved without it).
        now: this fit's settings (as `checkpoint_extra` records them).
        path: the checkpoint resumed from, for the message.
    """
    if not isinstance(saved, Mapping):
        return []
    changed = [
        f"{name} {saved[name]!r} -> {now[name]!r}"
        for name in _TRAINING_SETTINGS
        if name in saved
        and name in now
        and saved[name] != now[name]
        and " at 0x" not in f"{saved[name]}{now[name]}"
    ]
    if changed:
        seed = "seed" in saved and "seed" in now and saved["seed"] != now["seed"]
        logger.warning(
            "fit(resume=...): this run's settings differ from those of the run that saved %s: "
            "%s. It continues from the checkpoint exactly, then trains with the new settings, "
            "so it will not match an uninterrupted run%s.",
            path.name,
            "; ".join(changed),
            f" (the checkpoint's seed {saved['seed']!r} is kept)" if seed else "",
        )
    return changed


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
        except CheckpointMismatchError as error:
            if source is not True:
                raise  # a bad explicit path raises; no fallback
            # A valid checkpoint of another model: an older one would not fit either, and
            # starting fresh would write over that run. Stop and say how to go on.
            raise _does_not_fit(path, checkpoint_dir, error) from error
        except CheckpointError as error:
            if source is not True:
                raise  # a bad explicit path raises; no fallback
            if state.strategy.is_main:
                logger.warning("skipping checkpoint %s: %s", path.name, error)
    if state.strategy.is_main:
        logger.info("no valid checkpoint in %s; starting fresh.", checkpoint_dir)
    return None


def _does_not_fit(
    path: Path, checkpoint_dir: str | os.PathLike[str] | None, error: CheckpointError
) -> CheckpointMismatchError:
    """resume=True's error for a valid checkpoint that does not fit: what and the ways out."""
    run = run_id_of(path)
    return CheckpointMismatchError(
        f"fit(resume=True): the newest valid checkpoint in checkpoint_dir="
        f"{str(checkpoint_dir)!r} ({path.name}, run {run}) does not fit this run: {error} "
        "Nothing was trained and no checkpoint was changed. To continue that run, build the same "
        "model and optimizer. To start a new run, pass another checkpoint_dir, or move the "
        "old run's checkpoints away and pass resume=False.",
        path=path,
    )


def set_aside_newer(checkpoint_dir: str | os.PathLike[str], step: int, resumed: Path) -> list[Path]:
    """Move the checkpoints after `step` (a resume's abandoned future) aside, whole.

    They stay on disk, unchanged, in `<checkpoint_dir>/abandoned-after-step-<step>[-N]/`,
    where neither resume=True nor rotation looks; a warning names them. Left in place they
    would count as the newest checkpoints: resume=True after a crash would continue the
    abandoned future, and rotation would delete the new checkpoints before them. If
    `latest` named one of them, it names the resumed checkpoint (when in this directory)
    or is removed. Returns their new paths.
    """
    directory = Path(checkpoint_dir)
    newer = [p for p in list_checkpoints(directory) if int(p.name.split("-")[1]) > step]
    if not newer:
        return []
    base = directory / f"abandoned-after-{step_dir_name(step)}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    target.mkdir()
    moved = []
    for path in newer:
        os.rename(path, target / path.name)  # one atomic rename each: nothing half-moved
        moved.append(target / path.name)
    _repoint_latest(directory, {p.name for p in newer}, resumed)
    logger.warning(
        "resumed from %s, an older checkpoint than %s of the same run: moved them, unchanged, "
        "to %s (resume=True and rotation ignore it; delete it when you no longer need them).",
        resumed.name,
        ", ".join(p.name for p in newer),
        target,
    )
    return moved


def _repoint_latest(directory: Path, moved: set[str], resumed: Path) -> None:
    pointer = directory / "latest"
    try:
        named = pointer.read_text().strip()
    except OSError:
        return
    if named not in moved:
        return
    if resumed.parent.resolve() == directory.resolve():
        write_pointer(directory, resumed.name)
    else:
        pointer.unlink(missing_ok=True)


def _position_for(
    loader: Any,
    extra: Mapping[str, Any],
    world_size: int,
    path: Path,
    allow_reshard: bool,
    strategy: Any,
) -> Any:
    """The saved data position as this run's ranks load it; refuse one that cannot map.

    Each rank runs this on the same checkpoint, so all refuse together.
    """
    position = extra.get("data")
    saved = extra.get("data_world_size")  # absent: saved before it was recorded
    if position is None or not has_global_position(loader):
        if position is not None and saved is not None and saved != world_size:
            if not allow_reshard:
                raise _reshard_refused(loader, path, saved, world_size)
            if strategy.is_main:
                logger.warning(
                    "fit(allow_data_reshard=True): %s's data position was saved by %s "
                    "data-parallel rank(s), this run has %s; every rank continues from rank 0's "
                    "position in its own share, so in this epoch some items may repeat and "
                    "others be skipped.",
                    path.name,
                    saved,
                    world_size,
                )
        return position
    # A position saved through torch's DistributedSampler (before EpochSampler) counts one
    # rank's samples; every rank drew as many at the world size it was saved at.
    return as_global_position(position, saved if saved is not None else world_size)


def _reshard_refused(loader: Any, path: Path, saved: int, world_size: int) -> ValueError:
    """The error for a rank-local data position at another number of data-parallel ranks."""
    what = type(getattr(loader, "dataset", loader)).__name__
    return ValueError(
        f"fit(resume={str(path)!r}): the checkpoint was saved by {saved} data-parallel "
        f"rank(s) and this run has {world_size}; the data position it holds is rank 0's own "
        f"position in its share of train_data ({what}, which has no global position), so it "
        "cannot be mapped onto the new ranks: items would be repeated or skipped. Resume "
        f"with {saved} rank(s); or pass a map-style Dataset with batch_size=... (its "
        "position is global and resumes exactly at any world size); or pass "
        "allow_data_reshard=True to continue from rank 0's position on every rank anyway."
    )


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


def _say_no_data_position(loader: Any, path: Path) -> None:
    """Warn that a resumed run reads data without a saved position from its start again."""
    logger.warning(
        "fit(resume=%r): train_data (%s) has no data position to save or restore, so the "
        "resumed run reads it again from its first batch: it does not continue exactly where "
        "the run stopped. For exact resume pass a Dataset or a sequence of samples with "
        "batch_size=, or a torchdata StatefulDataLoader.",
        str(path),
        type(loader).__name__,
    )


def _restore_callbacks(callbacks: Sequence[Any], saved: Sequence[Any], path: Path) -> None:
    if len(saved) != len(callbacks):
        raise ValueError(
            f"fit(resume={str(path)!r}): the checkpoint has state for {len(saved)} callbacks, "
            f"this run has {len(callbacks)}; pass the same callbacks as the interrupted run."
        )
    for callback, callback_state in zip(callbacks, saved):
        if callback_state is not None:
            callback.load_state_dict(callback_state)


__all__ = ["Resumed", "checkpoint_extra", "resume", "say_changed_settings", "set_aside_newer"]
