"""Checkpoints: atomic, validated, rotated; safetensors + JSON, nothing ever unpickled.

Layout of one checkpoint, `<dir>/step-00001200/`:

    model.safetensors   the model's state_dict (parameters and buffers)
    state.safetensors   every other tensor: optimizer state, loss scale, data-loader RNG,
                        the weight averages (loopkit.ema / swa, by parameter name), ...
    state.json          counters, seed, schedule position and the skeleton that places each
                        tensor of state.safetensors back into its nested structure
    manifest.json       size and sha256 of every file above, written last

A checkpoint is written under a hidden temporary name, fsynced, then renamed into place,
and `<dir>/latest` is replaced the same way: a crash at any instant leaves every complete
checkpoint valid and no half-written one visible under a `step-*` name.

Several processes: every rank calls save_checkpoint. With a strategy whose ranks hold the
whole model (DDP), rank 0 writes the checkpoint above while the others wait. With a
sharded strategy (FSDP, `strategy.is_sharded`) the layout is "sharded":

    shards/shard-0000<r>-model-00001-of-00001.safetensors
                        rank r-1's part of the model, optimizer and weight-average tensors,
                        written by that
                        rank with torch.distributed.checkpoint (safetensors, offsets in the
                        JSON header; see loopkit._sharded), loadable at any world size
    state.safetensors   as above, without the optimizer's tensors (they are in the shards)
    state.json          as above, plus "layout": "sharded" and the shards' skeleton
    manifest.json       as above, listing every shard file too

Rank 0 creates the temporary directory, every rank writes its part, and rank 0 hashes,
renames and points `latest` only after all of them have finished (the directory must be
on a file system every rank sees). A failure on any rank raises on every rank.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from . import _sharded, _tree
from ._version import __version__
from .averaging import Weights, averaged_weights, check_weights, reshard_gathered
from .state import Average, TrainState, Window
from .strategies import unwrap

FORMAT = "loopkit-checkpoint/1"
MODEL_FORMAT = "loopkit-model/1"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_FILES = ("model.safetensors", "state.safetensors", "state.json")
_SHARDED_FILES = ("state.safetensors", "state.json")
SHARDS_DIR = "shards"
_META_KEYS = ("step", "epoch", "samples_seen", "skipped_steps", "seed", "precision", "schedule")
logger = logging.getLogger(__name__)
# Optimizer settings fit sets every step (the lr from the schedule) or torch keeps itself.
_SCHEDULED_KEYS = frozenset({"params", "lr", "initial_lr"})
# Test hook: seconds to pause between the files of a save, so a kill can land inside it.
_PAUSE_ENV = "LOOPKIT_TEST_SAVE_PAUSE_S"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or unwritable, or does not fit the state.

    Attributes:
        path: the file or directory concerned, where one is known.
        errno: the operating system's error number of a failed write (None otherwise).
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.errno = errno


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint that does not fit the model or optimizer it is loaded into.

    Unlike a corrupt checkpoint, an older one would not fit either: resuming refuses it
    instead of falling back (and never starts afresh over the old run's files).
    """


_OS_ERROR = re.compile(r"os error (\d+)")


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, failing as an OSError with the errno and the file's path."""
    try:
        safetensors.torch.save_file(tensors, str(path))
    except safetensors.SafetensorError as error:
        found = _OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from error
    _fsync_path(path)


def _tensors_for_file(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): give each its own copy,
    # so the file loads with plain load_file + load_state_dict(strict=True).
    seen: set[int] = set()
    out = {}
    for key, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def _pause() -> None:
    seconds = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    state: TrainState,
    directory: str | os.PathLike[str],
    *,
    extra: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Write `state` as `<directory>/step-<step>/`, atomically, and point `latest` at it.

    Save at a window boundary (right after `optimizer_step`); an open window's gradients
    are not saved.

    Args:
        state: the record to save; it stays fresh (saving reads it only).
        directory: the run's checkpoint directory (created if missing).
        extra: JSON-able values and tensors stored with it (data-loader state, callbacks,
            config); read back with `read_extra`.
        run_id: the id of the run writing it (fit keeps one across resumes); recorded in
            state.json and read back with `read_meta`.

    Returns:
        The checkpoint's path.

    Raises:
        ValueError: the window is open (micro_step > 0).
        CheckpointError: a write failed (disk full, unwritable, a file too large): `.path`
            names the file, `.errno` the reason; earlier checkpoints are untouched.
    """
    state.check_fresh()
    if state.micro_step != 0:
        raise ValueError(
            f"save_checkpoint(state at step {state.step}, micro_step {state.micro_step}): the "
            "gradient window is open. Save right after optimizer_step (micro_step == 0)."
        )
    strategy = state.strategy
    sharded, is_main = strategy.is_sharded, strategy.rank == 0
    directory = Path(directory)
    final = directory / step_dir_name(state.step)
    # Every rank must name the same temporary directory, so with several it has no pid.
    tag = os.getpid() if strategy.world_size == 1 else "ranks"
    tmp = directory / f".{final.name}.tmp-{tag}"
    meta, tensors = _state_payload(state, extra)
    meta["run_id"] = run_id

    def make_tmp() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def write_shards() -> None:
        meta["layout"] = "sharded"
        meta["shards"] = _sharded.write_shards(
            state.model,
            state.optimizer,
            tmp / SHARDS_DIR,
            collective=True,
            extra=_average_shards(state, state.averages),
        )

    def finish() -> None:
        _write_files(state, tmp, meta, tensors, sharded=sharded)
        _replace_dir(tmp, final)
        _fsync_path(directory)
        write_pointer(directory, final.name)

    try:
        _on_every_rank(strategy, make_tmp if is_main else None)
        if sharded:
            _on_every_rank(strategy, write_shards)  # each rank writes its own shards
        _on_every_rank(strategy, finish if is_main else None)
    except OSError as error:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(error, directory, tmp, state.step) from error
    except Exception:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_files(
    state: TrainState,
    tmp: Path,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    sharded: bool,
) -> None:
    """Write a checkpoint's files into `tmp`, fsynced, the manifest of checksums last."""
    if not sharded:
        model_sd = _tensors_for_file(unwrap(state.model).state_dict())
        _write_tensors(model_sd, tmp / "model.safetensors")
        _pause()
    _write_tensors(tensors, tmp / "state.safetensors")
    _pause()
    _write_bytes(tmp / "state.json", json.dumps(meta, indent=1).encode())
    names = list(_SHARDED_FILES if sharded else _FILES)
    if sharded:
        names += sorted(f"{SHARDS_DIR}/{f.name}" for f in (tmp / SHARDS_DIR).iterdir())
        _fsync_path(tmp / SHARDS_DIR)
    manifest = {
        "format": FORMAT,
        "layout": "sharded" if sharded else "full",
        "files": {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in names
        },
    }
    _write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    _fsync_path(tmp)
    _pause()


def _write_error(error: OSError, directory: Path, tmp: Path, step: int) -> CheckpointError:
    """A failed write as a CheckpointError naming the file, the errno and what survived."""
    code = error.errno
    where = Path(error.filename) if error.filename else tmp
    if where.is_relative_to(tmp):  # the temporary name is gone: say what it would have been
        where = directory / step_dir_name(step) / where.relative_to(tmp)
    reason = "the disk is full" if code == errno.ENOSPC else (error.strerror or str(error))
    name = errno.errorcode.get(code or 0, "")
    return CheckpointError(
        f"save_checkpoint(directory={str(directory)!r}): could not write step {step}: "
        f"{where} ({reason}; errno {code} {name}); earlier checkpoints are untouched.",
        path=where,
        errno=code,
    )


def _on_every_rank(strategy: Any, part: Callable[[], object] | None) -> None:
    """Run this rank's `part` of a save, then wait until every rank has run its part.

    With several processes, reduce_count doubles as the barrier: it counts the ranks
    whose part failed (host sync, at checkpoint time only), so a failure on one rank
    raises on all of them instead of leaving the others waiting.
    """
    try:
        if part is not None:
            part()
    except Exception:
        if strategy.world_size > 1:
            strategy.reduce_count(1)
        raise
    if strategy.world_size > 1:
        failed = int(strategy.reduce_count(0))
        if failed:
            raise OSError(
                errno.EIO, f"{failed} other rank(s) failed to write their part of the checkpoint"
            )


def _replace_dir(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    # Re-saving a step (e.g. after a resume): move the old one aside, then swap.
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_pointer(directory: str | os.PathLike[str], name: str) -> None:
    """Point `<directory>/latest` at checkpoint `name`, atomically (temp file + rename)."""
    directory = Path(directory)
    tmp = directory / f".latest.tmp-{os.getpid()}"
    _write_bytes(tmp, name.encode())
    os.replace(tmp, directory / "latest")
    _fsync_path(directory)


def _state_payload(
    state: TrainState, extra: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    optimizer_sd = state.optimizer.state_dict()
    if state.strategy.is_sharded:
        # Its tensors are rank-local shards: they go to the shard files, and only the
        # param groups (hyperparameters) stay here.
        optimizer_sd = {"state": {}, "param_groups": optimizer_sd["param_groups"]}
    tree: dict[str, Any] = {"optimizer": optimizer_sd}
    schedule = state.schedule
    if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        tree["lr_scheduler"] = schedule.state_dict()
    if state.loss_scale is not None:
        tree["loss_scale"] = state.loss_scale
        tree["growth_tracker"] = state.growth_tracker
    tree["tokens_seen"] = state.tokens_seen
    if state.averages:
        tree["averages"] = _averages_tree(state)
    tree["extra"] = dict(extra or {})
    skeleton, tensors = _tree.split(tree, prefix="t")
    meta = {
        "format": FORMAT,
        "step": state.step,
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "skipped_steps": state.skipped_steps,
        "seed": state.seed,
        "precision": state.precision.name,
        "base_lrs": list(state.base_lrs),
        "optimizer": _optimizer_class(state.optimizer),
        "schedule": repr(state.schedule),
        "versions": {"torch": torch.__version__, "loopkit": __version__},
        "tree": skeleton,
    }
    return meta, tensors


def _param_names(state: TrainState) -> list[str]:
    """The model's name of each of `state.params` (the averages' keys in a checkpoint)."""
    # After a forward without backward (an evaluation) FSDP's root lists its gathered
    # parameters, not the sharded ones in `state.params`: free them first.
    reshard_gathered(state.model)
    by_id = {id(p): name for name, p in unwrap(state.model).named_parameters()}
    return [by_id.get(id(p), f"param.{i}") for i, p in enumerate(state.params)]


def _averages_tree(state: TrainState) -> dict[str, Any]:
    """The averages' counters (JSON) and, unsharded, their tensors by parameter name."""
    names = None if state.strategy.is_sharded else _param_names(state)
    tree: dict[str, Any] = {}
    for kind, average in state.averages.items():
        entry: dict[str, Any] = {"count": average.count, "updated_at": average.updated_at}
        if names is not None:  # sharded: the tensors go to the shard files
            entry["tensors"] = dict(zip(names, average.tensors, strict=True))
        tree[kind] = entry
    return tree


def _average_shards(state: TrainState, averages: Mapping[str, Average]) -> dict[str, Any] | None:
    """The averages' (D)Tensors by kind and parameter name, for the shard files."""
    if not averages:
        return None
    names = _param_names(state)
    return {
        "averages": {
            kind: dict(zip(names, average.tensors, strict=True))
            for kind, average in averages.items()
        }
    }


def _new_averages(state: TrainState, saved: Any, path: Path) -> dict[str, Average]:
    """Averages to load the checkpoint's into: allocated like `state.params`, counters set."""
    if saved is None:
        return {}
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: malformed weight averages in state.json.")
    averages = {}
    for kind, entry in saved.items():
        try:
            count, updated_at = int(entry["count"]), int(entry["updated_at"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: malformed {kind!r} average ({error!r}).") from error
        with torch.no_grad():
            tensors = tuple(torch.empty_like(p.detach()) for p in state.params)
        averages[str(kind)] = Average(tensors, count=count, updated_at=updated_at)
    return averages


def _fill_averages(
    path: Path, state: TrainState, averages: Mapping[str, Average], saved: Any
) -> None:
    """Copy an unsharded checkpoint's average tensors into `averages`, by parameter name."""
    names = _param_names(state)
    for kind, average in averages.items():
        tensors = saved[kind].get("tensors")
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{path}: the {kind!r} average has no tensors.")
        missing = sorted(set(names) - set(tensors))
        unexpected = sorted(set(tensors) - set(names))
        shapes = [
            f"{n}: checkpoint {tuple(tensors[n].shape)}, here {tuple(t.shape)}"
            for n, t in zip(names, average.tensors, strict=True)
            if n in tensors and tensors[n].shape != t.shape
        ]
        if missing or unexpected or shapes:
            raise CheckpointMismatchError(
                f"{path}: the {kind!r} average does not fit the trained parameters; missing "
                f"from the checkpoint: {missing[:10]}; unexpected in it: {unexpected[:10]}; "
                f"shape mismatches: {shapes[:10]}."
            )
        with torch.no_grad():
            for name, target in zip(names, average.tensors, strict=True):
                target.copy_(tensors[name])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: unreadable JSON ({error}).") from error


def validate_checkpoint(path: str | os.PathLike[str], *, deep: bool = True) -> None:
    """Check that a checkpoint is complete: manifest, files, sizes and (deep) checksums.

    Raises:
        CheckpointError: naming the first problem found.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory.")
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: manifest.json is missing (an incomplete save?).")
    manifest = _read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: manifest.json is not a {FORMAT} manifest.")
    layout = manifest.get("layout", "full")
    if layout not in ("full", "sharded"):
        raise CheckpointError(f"{path}: manifest.json has an unknown layout {layout!r}.")
    sharded = layout == "sharded"
    for name in _SHARDED_FILES if sharded else _FILES:
        if name not in files:
            raise CheckpointError(f"{path}: the manifest does not list {name}.")
    if sharded:
        # The shard reader reads every file in shards/: one the manifest does not list
        # (left over, or planted) must not slip into the state.
        listed = {n for n in files if n.startswith(f"{SHARDS_DIR}/")}
        present = (
            {f"{SHARDS_DIR}/{f.name}" for f in (path / SHARDS_DIR).iterdir()}
            if (path / SHARDS_DIR).is_dir()
            else set()
        )
        if not listed:
            raise CheckpointError(f"{path}: the manifest lists no shard files.")
        if present - listed:
            raise CheckpointError(
                f"{path}: {sorted(present - listed)} are not in the manifest (left over?)."
            )
    for name, expected in files.items():
        parts = Path(name).parts
        well_formed = len(parts) == 1 or (
            sharded and len(parts) == 2 and parts[0] == SHARDS_DIR and parts[1] not in ("..", ".")
        )
        if not isinstance(expected, dict) or not well_formed or Path(name).name != parts[-1]:
            raise CheckpointError(f"{path}: manifest.json has a malformed entry for {name!r}.")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing.")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(
                f"{path}: {name} has {size} bytes, the manifest says {expected.get('bytes')} "
                "(truncated or overwritten)."
            )
        if deep and _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"{path}: {name} fails its sha256 checksum (corrupted).")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}).") from error


def _check_model(path: Path, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected in the checkpoint: {unexpected[:10]}")
        if shapes:
            parts.append(f"shape mismatches: {shapes[:10]}")
        raise CheckpointMismatchError(
            f"{path}: the checkpoint does not fit this model; " + "; ".join(parts) + "."
        )


def load_checkpoint(path: str | os.PathLike[str], state: TrainState) -> TrainState:
    """Load a checkpoint into `state`'s model and optimizer; return the resumed record.

    `state` must be built like the one that was saved (same model, optimizer, precision,
    schedule kind); it is consumed. Nothing is unpickled: tensors come from safetensors,
    everything else from JSON. The resumed record's `averages` are the checkpoint's (new
    tensors laid out like `state.params`; none if it saved none).

    Raises:
        CheckpointError: the checkpoint is invalid or does not fit `state`.
    """
    path = Path(path)
    state.check_fresh()
    validate_checkpoint(path)
    meta, tree = _read_state(path)
    sharded = meta.get("layout", "full") == "sharded"
    strategy = state.strategy
    model = unwrap(state.model)
    if not sharded:
        if strategy.is_sharded:
            raise CheckpointMismatchError(
                f"{path}: saved unsharded (by SingleDevice or DDP), and {strategy!r} loads "
                "sharded checkpoints only. Resume it with SingleDevice or DDP, or load just "
                "the weights (model.safetensors) into the model before sharding it."
            )
        model_tensors = _load_tensors(path / "model.safetensors")
        _check_model(path, model, model_tensors)
    _check_state_fits(path, state, meta, tree, sharded=sharded)
    scheduler = state.schedule
    # The checkpoint's averages (loopkit.ema / swa), in new tensors shaped like the params.
    averages = _new_averages(state, tree.get("averages"), path)
    if sharded:
        # A collective with several processes; any world size and any strategy (FSDP
        # reshards, SingleDevice and DDP read whole tensors).
        try:
            _sharded.read_shards(
                state.model,
                state.optimizer,
                path / SHARDS_DIR,
                meta.get("shards"),
                # SingleDevice (or one DDP process) has no process group of its own.
                collective=strategy.is_sharded or strategy.world_size > 1,
                extra=_average_shards(state, averages),
            )
        except ValueError as error:
            raise CheckpointMismatchError(f"{path}: {error}") from error
    else:
        _fill_averages(path, state, averages, tree.get("averages"))
        with torch.no_grad():
            model.load_state_dict(model_tensors, strict=True)
        state.optimizer.load_state_dict(tree["optimizer"])
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler.load_state_dict(tree["lr_scheduler"])
    if state.loss_scale is not None:
        state.loss_scale.copy_(tree["loss_scale"])
        state.growth_tracker.copy_(tree["growth_tracker"])  # type: ignore[union-attr]
    state.optimizer.zero_grad(set_to_none=True)
    return state.replace(
        step=meta["step"],
        micro_step=0,
        epoch=meta["epoch"],
        samples_seen=meta["samples_seen"],
        tokens_seen=tree["tokens_seen"],
        skipped_steps=meta["skipped_steps"],
        seed=meta["seed"],
        window=Window(size=state.window.size),  # keeps a window size fit() set in advance
        metrics={},
        averages=averages,
    )


def _optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _plain(value: Any) -> Any:
    """A param group's setting as JSON would give it back (tuples as lists, tensors as numbers)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _check_optimizer(path: Path, state: TrainState, meta: dict[str, Any], saved: Any) -> None:
    """Refuse another optimizer class; say which saved settings replace this one's.

    Another class's state would load without error and then fail at the first step (Adam
    over SGD's momentum buffers) or, worse, train on without the saved state. Settings
    such as momentum or weight_decay are the checkpoint's once loaded (torch's
    load_state_dict), so a changed one is named in a warning; the lr is fit's schedule's.
    Under a torch LRScheduler, which may change any setting as it steps, nothing is compared.
    """
    optimizer = state.optimizer
    kind = meta.get("optimizer")  # absent: saved before loopkit recorded it
    if kind is not None and kind != _optimizer_class(optimizer):
        raise CheckpointMismatchError(
            f"{path}: saved with optimizer {kind}, loading into {_optimizer_class(optimizer)}; "
            "its state (step counts, moments, momentum buffers) does not carry over. Build "
            "the same kind of optimizer to resume, or load only the weights (model.safetensors) "
            "into a new run.",
            path=path,
        )
    if isinstance(state.schedule, torch.optim.lr_scheduler.LRScheduler):
        return  # it may set any group setting each step (OneCycleLR: momentum), and resumes
    changed = [
        f"group {i} {key}: checkpoint {group[key]!r}, this optimizer {now[key]!r}"
        for i, (group, now) in enumerate(zip(saved, optimizer.param_groups))
        for key in sorted(set(group) & set(now) - _SCHEDULED_KEYS)
        if _plain(group[key]) != _plain(now[key])
    ]
    if changed and state.strategy.is_main:
        logger.warning(
            "load_checkpoint(%s): the optimizer's settings differ from the checkpoint's, and "
            "the checkpoint's are loaded: %s. To train with other settings, change the "
            "optimizer's param_groups after loading.",
            path.name,
            "; ".join(changed[:10]),
        )


def _check_state_fits(
    path: Path, state: TrainState, meta: dict[str, Any], tree: dict[str, Any], *, sharded: bool
) -> None:
    """Raise CheckpointMismatchError unless precision, param groups and schedule kind fit."""
    if meta["precision"] != state.precision.name:
        raise CheckpointMismatchError(
            f"{path}: saved with precision {meta['precision']!r}, loading into "
            f"{state.precision.name!r}; build the state with the same precision."
        )
    try:
        saved_sizes = [len(g["params"]) for g in tree["optimizer"]["param_groups"]]
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: malformed optimizer state ({error!r}).") from error
    sizes = [len(g["params"]) for g in state.optimizer.param_groups]
    # Sharded: this rank may hold other parameters than rank 0 did (pipeline stages), so
    # only the number of groups is compared here; read_shards matches them by name.
    if (len(saved_sizes) != len(sizes)) if sharded else (saved_sizes != sizes):
        raise CheckpointMismatchError(
            f"{path}: the optimizer had param groups of sizes {saved_sizes}, this one has "
            f"{sizes}; build the optimizer over the same parameter groups."
        )
    _check_optimizer(path, state, meta, tree["optimizer"]["param_groups"])
    scheduler = state.schedule
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) != ("lr_scheduler" in tree):
        raise CheckpointMismatchError(
            f"{path}: saved with schedule {meta['schedule']}, loading into {scheduler!r}; "
            "use the same kind of schedule (a function of the step or an LRScheduler)."
        )


def _read_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """state.json and the tree it describes; any structural problem is a CheckpointError."""
    meta = _read_json(path / "state.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: state.json is not a {FORMAT} file.")
    tensors = _load_tensors(path / "state.safetensors")
    missing = [k for k in _META_KEYS if k not in meta]
    try:
        tree = _tree.join(meta.get("tree"), tensors)
        if not isinstance(tree, dict):
            missing.append("tree")
        else:
            missing += [k for k in ("optimizer", "extra", "tokens_seen") if k not in tree]
            if "param_groups" not in tree.get("optimizer", {}):
                missing.append("optimizer.param_groups")
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
        raise CheckpointError(
            f"{path}: state.json does not match state.safetensors "
            f"({type(error).__name__}: {error})."
        ) from error
    if missing:
        raise CheckpointError(f"{path}: state.json lacks {missing}; not a loopkit checkpoint.")
    return meta, tree


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's state.json: counters, seed, run id, versions (no tensors read).

    Raises:
        CheckpointError: state.json is missing, unreadable or not a loopkit checkpoint's.
    """
    path = Path(path)
    meta = _read_json(path / "state.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: state.json is not a {FORMAT} file.")
    return meta


def read_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `extra` values saved with a checkpoint (data-loader state, callbacks, config).

    Raises:
        CheckpointError: state.json or state.safetensors is unreadable or malformed.
    """
    _, tree = _read_state(Path(path))
    return dict(tree["extra"])


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint directories under `directory`, newest step first (validity not checked)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest_checkpoint(
    directory: str | os.PathLike[str], *, report: Callable[[str], None] = print
) -> Path | None:
    """The newest valid checkpoint under `directory`, or None; reports each one skipped."""
    for path in list_checkpoints(directory):
        try:
            validate_checkpoint(path)
        except CheckpointError as error:
            report(f"loopkit: skipping checkpoint {path.name}: {error}")
            continue
        return path
    return None


def rotate_checkpoints(
    directory: str | os.PathLike[str], keep_last: int, *, keep: Iterable[Path] = ()
) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and those in `keep`.

    Incomplete checkpoints never count towards `keep_last`, and the newest checkpoint that
    passes the full check (checksums included) is always kept, so the newest valid one is
    never deleted, even when newer ones are corrupt. Cost: one sha256 pass over the newest
    checkpoint (just written, usually still in the page cache). Returns the deleted paths.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"rotate_checkpoints(keep_last={keep_last!r}): must be an int >= 1.")
    protected = {Path(p).resolve() for p in keep}
    newest_valid = latest_checkpoint(directory, report=lambda message: None)
    if newest_valid is not None:
        protected.add(newest_valid.resolve())
    kept = 0
    deleted = []
    for path in list_checkpoints(directory):
        try:
            validate_checkpoint(path, deep=False)
            valid = True
        except CheckpointError:
            valid = False
        if valid and kept < keep_last:
            kept += 1
            continue
        if path.resolve() in protected or not valid:
            continue  # an invalid one is left for inspection; resume skips it
        # Hide it first (one atomic rename): a crash mid-delete leaves no half-deleted
        # checkpoint under a step-* name.
        hidden = path.with_name(f".{path.name}.del-{os.getpid()}")
        os.rename(path, hidden)
        shutil.rmtree(hidden)
        deleted.append(path)
    return deleted


def _parameter_count(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> int:
    """The whole model's parameter count (tied weights once).

    A strategy whose ranks hold different parts of the model (Pipeline) marks the
    parameters of the state it gathers as nn.Parameter, a tied one as one object under
    each name: those are counted. Otherwise this rank's module has them all (FSDP's
    DTensors count their full size).
    """
    marked = {id(v): v.numel() for v in state_dict.values() if isinstance(v, torch.nn.Parameter)}
    if marked:
        return sum(marked.values())
    return sum(p.numel() for p in module.parameters())


def save_model(
    model: TrainState | torch.nn.Module,
    directory: str | os.PathLike[str],
    *,
    weights: Weights = "model",
) -> Path:
    """Save weights only, as `<directory>/model.safetensors` plus `config.json`.

    The file loads without loopkit:
    `model.load_state_dict(safetensors.torch.load_file(".../model.safetensors"))`.
    With several processes rank 0 writes it. A sharded model (FSDP) is gathered into one
    full file: then every rank must call save_model (a collective), and all return once
    the file is written; otherwise the other ranks return at once.

    Args:
        model: a TrainState or a module.
        directory: where the files go (created if missing).
        weights: "model", or "ema" / "swa" to write the average that `loopkit.ema` /
            `loopkit.swa` keep in a TrainState (its parameters; buffers are the model's).
            config.json then records `"weights": "ema"` (before the average's first
            update the model's own weights are written, and recorded as such).

    Raises:
        TypeError: weights other than "model" with a module instead of a TrainState.
        ValueError: weights is not "model", "ema" or "swa", or the record has no such average.
        CheckpointError: (a ValueError) the directory holds a model.safetensors or
            config.json that save_model did not write (they are left as they are).
    """
    if weights != "model" and not isinstance(model, TrainState):
        raise TypeError(
            f"save_model(model={type(model).__name__}, weights={weights!r}): the averaged "
            "weights live in a TrainState; pass the state (e.g. result.state) instead of "
            "the module."
        )
    written = weights  # what config.json records: the model's own before a first update
    if isinstance(model, TrainState):
        average = check_weights(model, weights, where="save_model")
        if average is not None and average.count == 0:
            written = "model"
    step = model.step if isinstance(model, TrainState) else None
    module = unwrap(model.model if isinstance(model, TrainState) else model)
    directory = Path(directory)
    if isinstance(model, TrainState):
        rank = model.strategy.rank
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    else:
        rank = 0
    strategy = model.strategy if isinstance(model, TrainState) else None
    sharded = (strategy is not None and strategy.is_sharded) or _sharded.has_dtensors(module)
    if strategy is not None:
        # Where ranks hold parts of the model (FSDP, Pipeline) a collective: every rank
        # calls save_model, and the whole model gathers on rank 0.
        state_dict = _gathered(model, strategy, module, weights)  # type: ignore[arg-type]
    elif sharded:
        # A collective: every rank calls save_model; the full weights gather on rank 0.
        state_dict = _sharded.full_model_state(module)
    else:
        state_dict = module.state_dict()
    if rank != 0:
        if sharded:
            torch.distributed.barrier()  # returns once rank 0 has written the file
        return directory / "model.safetensors"
    try:
        _write_model(directory, module, state_dict, step, written)
    finally:
        if sharded and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the other ranks wait here, even when rank 0 failed
    return directory / "model.safetensors"


def _check_model_dir(directory: Path) -> None:
    """Refuse a directory whose model.safetensors or config.json no save_model wrote.

    save_model replaces its own two files (a re-save); anything else of those names (a
    Hugging Face config.json, weights of another tool) would be lost.
    """
    config, weights = directory / "config.json", directory / "model.safetensors"
    ours = False
    if config.exists():
        try:
            ours = json.loads(config.read_text()).get("format") == MODEL_FORMAT
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise CheckpointError(
                f"save_model(directory={str(directory)!r}): {config} exists and is not a "
                f"{MODEL_FORMAT} config written by save_model; it would be overwritten. "
                "Pass another directory, or move the file away first.",
                path=config,
            )
    if weights.exists() and not ours:
        raise CheckpointError(
            f"save_model(directory={str(directory)!r}): {weights} exists without the "
            "config.json save_model writes beside it, so it is not a save_model file; it would "
            "be overwritten. Pass another directory, or move the file away first.",
            path=weights,
        )


def _write_model(
    directory: Path,
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    step: int | None,
    written: str,
) -> None:
    """Rank 0's part of save_model: check the directory, write both files atomically."""
    _check_model_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_for_file(state_dict)
    tmp = directory / f".model.safetensors.tmp-{os.getpid()}"
    _write_tensors(tensors, tmp)
    os.replace(tmp, directory / "model.safetensors")
    config = {
        "format": MODEL_FORMAT,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "step": step,
        "parameters": _parameter_count(module, state_dict),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
    }
    if written != "model":
        config["weights"] = written
    tmp = directory / f".config.json.tmp-{os.getpid()}"
    _write_bytes(tmp, json.dumps(config, indent=1).encode())
    os.replace(tmp, directory / "config.json")


def _gathered(
    state: TrainState, strategy: Any, module: torch.nn.Module, weights: Weights
) -> dict[str, torch.Tensor]:
    """The whole model's state_dict on rank 0, with the averaged weights where asked.

    The average is copied into the parameters for the gathering, and the tensors are
    copied out before the weights are restored (a state_dict may share their storage).
    """
    if weights == "model":
        return strategy.full_model_state(module)  # type: ignore[no-any-return]
    with averaged_weights(state, weights, where="save_model"):
        gathered = strategy.full_model_state(module)
        copies: dict[int, torch.Tensor] = {}  # a tied tensor stays one object (see below)
        for value in gathered.values():
            if id(value) not in copies:
                copy = value.detach().clone()
                is_param = isinstance(value, torch.nn.Parameter)
                copies[id(value)] = torch.nn.Parameter(copy, False) if is_param else copy
        # Pipeline marks gathered parameters as nn.Parameter for _parameter_count.
        return {k: copies[id(v)] for k, v in gathered.items()}


__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "FORMAT",
    "MODEL_FORMAT",
    "SHARDS_DIR",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_extra",
    "read_meta",
    "rotate_checkpoints",
    "save_checkpoint",
    "save_model",
    "step_dir_name",
    "unwrap",
    "validate_checkpoint",
    "write_pointer",
]
