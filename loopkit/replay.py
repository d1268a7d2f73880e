"""Replay one step of two runs with hooks and name the first module whose values differ.

What `loopkit diff --replay` runs after finding the first divergent step s. For each run it
needs two things on disk:

- the run config `loopkit fit` recorded in the log_dir (`loopkit-run.json`), to rebuild
  the model, data, loss and settings from their import paths;
- a checkpoint of that run at a step <= s in its checkpoint_dir (the newest such is used).

It loads the checkpoint into a freshly built record, restores the data position, runs
fit's default step (`forward`, `accumulate(k)`, `clip`, `skip_nonfinite`, `optimizer_step`,
from the public transforms) up to step s without hooks, then step s with a forward hook on
every module and a gradient hook on every module output and parameter. The captured
tensors of the two runs are compared in the order they were produced: every module's
output in forward order, then the gradients in backward order. The first that differs
(bitwise, or beyond the diff's tolerance) is reported: module path, what differed, shape,
largest difference.

Callbacks do not run in a replay. A change that a callback (or code between steps) made to
the state after the checkpoint is not replayed: use checkpoints at the divergent step
itself (`save_every=1` around it) to see it. The replay holds every module output of one
step on the CPU for both runs: meant for finding a module, not for large models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_extra,
    read_meta,
    validate_checkpoint,
)
from .compose import chain, identity
from .config import FitConfig, resolve_named
from .data import iterate, make_loader
from .run_config import RunConfig
from .state import TrainState, Window
from .strategies import unwrap
from .transforms import accumulate, clip, forward, optimizer_step, skip_nonfinite


@dataclass(frozen=True)
class Captured:
    """One tensor a hook saw: which module, what, in which micro-batch of the step."""

    module: str
    type: str
    what: str  # "output", "output[i]", "gradient of output", "gradient of <param>"
    micro_batch: int
    tensor: torch.Tensor


def _valid_checkpoints(directory: str | os.PathLike[str]) -> Iterator[tuple[int, Path]]:
    """(step, path) of each complete checkpoint in `directory`, newest first."""
    for path in list_checkpoints(directory):
        try:
            validate_checkpoint(path, deep=False)
            yield int(read_meta(path)["step"]), path
        except (CheckpointError, KeyError, ValueError):
            continue


def checkpoint_at_or_before(directory: str | os.PathLike[str], step: int) -> Path | None:
    """The newest valid checkpoint in `directory` whose step is <= `step`, or None."""
    return next((path for at, path in _valid_checkpoints(directory) if at <= step), None)


def _valid_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps of the complete checkpoints in `directory`, oldest first."""
    return sorted(at for at, _ in _valid_checkpoints(directory))


def check_replay_inputs(*runs: str | os.PathLike[str]) -> None:
    """What `--replay` needs of each run, checked before any work: the config `loopkit fit`
    recorded in its log_dir and a checkpoint_dir with a complete checkpoint.

    Raises:
        ValueError: a run lacks its record, a checkpoint_dir, or any complete checkpoint.
    """
    for run in runs:
        config = RunConfig.from_record(run)
        directory = config.path_value("checkpoint_dir")
        if directory is None or not _valid_steps(directory):
            where = "no checkpoint_dir" if directory is None else f"none in {str(directory)!r}"
            raise ValueError(
                f"--replay: {str(run)!r} has no checkpoints ({where}); the replay starts each "
                "run from a checkpoint at or before the divergent step. Run both again with "
                "checkpoint_dir=... and save_every=... (save_every=1 around the step is best), "
                "or leave out --replay."
            )


def _tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}[{key!r}]")


@contextmanager
def _hooks(model: torch.nn.Module, sink: list[Captured], micro: list[int]) -> Iterator[None]:
    """Forward hooks on every module; gradient hooks on their outputs and on parameters."""
    handles = []

    def on_grad(name: str, kind: str, what: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            sink.append(Captured(name, kind, what, micro[0], grad.detach().cpu().clone()))

        return hook

    def on_forward(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            kind = type(module).__name__
            for suffix, tensor in _tensors(output):
                sink.append(
                    Captured(name, kind, f"output{suffix}", micro[0], tensor.detach().cpu().clone())
                )
                if tensor.requires_grad:
                    tensor.register_hook(on_grad(name, kind, f"gradient of output{suffix}"))

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(on_forward(name)))
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                kind = type(module).__name__
                handles.append(param.register_hook(on_grad(name, kind, f"gradient of {pname}")))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _step_of(cfg: FitConfig) -> Any:
    """fit's default step, from the public transforms (no fingerprint: it only observes)."""
    if cfg.samples_per_step or cfg.tokens_per_step:
        raise ValueError(
            "--replay: the run sets its window by samples_per_step / tokens_per_step; replay "
            "supports accumulate=k runs."
        )
    return chain(
        forward(cfg.loss_fn),
        accumulate(cfg.accumulate),
        clip(cfg.clip) if cfg.clip is not None else identity(),
        skip_nonfinite() if cfg.nonfinite == "skip" else identity(),
        optimizer_step(),
    )


def _set_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def capture_step(
    config: RunConfig, checkpoint: str | os.PathLike[str], step: int
) -> list[Captured]:
    """Rebuild a run, load `checkpoint`, train to `step` and capture step `step` with hooks.

    Raises:
        ValueError: the config cannot be built, uses a multi-process strategy or a
            samples/tokens window, or the data ends before `step`.
        CheckpointError: the checkpoint does not load into the rebuilt model.
    """
    built = config.build()
    cfg = FitConfig.from_dict(built.fit_kwargs)
    if cfg.strategy is not None and cfg.strategy.world_size > 1:
        raise ValueError("--replay: the run used several processes; replay runs one.")
    train_step = _step_of(cfg)
    state = TrainState.create(
        built.model,
        optimizer=resolve_named(cfg.optimizer, "optimizer"),
        schedule=resolve_named(cfg.schedule, "schedule"),
        precision=cfg.precision,
        strategy=cfg.strategy,
        seed=cfg.seed,
    )
    state = load_checkpoint(checkpoint, state.replace(window=Window(size=cfg.accumulate)))
    loader = make_loader(
        built.data,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        collate_fn=cfg.collate_fn,
    )
    position = read_extra(checkpoint).get("data")
    if position is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(position)
    return _run_to(state, train_step, loader, step)


def _run_to(state: TrainState, train_step: Any, loader: Any, step: int) -> list[Captured]:
    sink: list[Captured] = []
    micro = [0]
    epoch = state.epoch
    while state.step <= step:
        _set_epoch(loader, epoch)
        batches = 0
        for batch in iterate(loader):
            batches += 1
            if state.step == step:
                micro[0] = state.micro_step
                with _hooks(unwrap(state.model), sink, micro):
                    state = train_step(state, batch)
            else:
                state = train_step(state, batch)
            if state.step > step:
                return sink
        if batches == 0:
            raise ValueError(f"--replay: the data ended before step {step}.")
        epoch += 1
        state = state.replace(epoch=epoch)
    return sink


def _differs(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    if rtol == 0 and atol == 0:
        same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
        return not bool(same.all())
    return not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)


def first_difference(
    a: list[Captured], b: list[Captured], *, rtol: float = 0.0, atol: float = 0.0
) -> dict[str, Any] | None:
    """The first module output or gradient that differs between two captures, or None.

    Outputs are compared first (forward order), then gradients (backward order).
    """

    def ordered(items: list[Captured]) -> list[Captured]:
        outputs = [c for c in items if not c.what.startswith("gradient")]
        return outputs + [c for c in items if c.what.startswith("gradient")]

    for x, y in zip(ordered(a), ordered(b)):
        if (x.module, x.what, x.micro_batch) != (y.module, y.what, y.micro_batch):
            return {
                "module": x.module,
                "type": x.type,
                "what": f"{x.what} (run B ran {y.module or '(the model)'} {y.what} here)",
                "shape": list(x.tensor.shape),
                "micro_batch": x.micro_batch,
                "max_abs_diff": float("inf"),
            }
        if _differs(x.tensor, y.tensor, rtol, atol):
            same_shape = x.tensor.shape == y.tensor.shape
            diff = (x.tensor.double() - y.tensor.double()).abs().max() if same_shape else None
            return {
                "module": x.module,
                "type": x.type,
                "what": x.what,
                "shape": list(x.tensor.shape),
                "micro_batch": x.micro_batch,
                "max_abs_diff": float("inf") if diff is None else float(diff),
            }
    return None


def _listing(steps: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, steps[:limit]))
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > limit else "")


def replay(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    step: int,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> dict[str, Any]:
    """Replay step `step` of both runs (see the module docstring); what differs first.

    Returns:
        {"step", "checkpoint_a", "checkpoint_b", "module", "type", "what", "shape",
        "micro_batch", "max_abs_diff", "message"}; "module" is None when nothing differs.

    Raises:
        ValueError: a run lacks its recorded config or a checkpoint at or before `step`.
    """
    captures, used = [], []
    for run in (run_a, run_b):
        config = RunConfig.from_record(run)
        directory = config.path_value("checkpoint_dir")
        found = None if directory is None else checkpoint_at_or_before(directory, step)
        if found is None:
            steps = [] if directory is None else _valid_steps(directory)
            held = f"its checkpoints are at steps {_listing(steps)}" if steps else "none there"
            raise ValueError(
                f"--replay: {str(run)!r} has no valid checkpoint at or before step {step} "
                f"(checkpoint_dir={None if directory is None else str(directory)!r}: {held}). "
                f"Run it again saving a checkpoint at or before step {step} (save_every=...; "
                "at the step itself is best)."
            )
        captures.append(capture_step(config, found, step))
        used.append(str(found))
    result: dict[str, Any] = {"step": step, "checkpoint_a": used[0], "checkpoint_b": used[1]}
    found_difference = first_difference(captures[0], captures[1], rtol=rtol, atol=atol)
    if found_difference is None:
        result.update(
            module=None,
            message=(
                f"replaying step {step} from {Path(used[0]).name} / {Path(used[1]).name}, no "
                "module output or gradient differs: the difference came from outside the "
                "step (a callback or code between steps) after those checkpoints."
            ),
        )
        return result
    result.update(found_difference)
    result["message"] = (
        f"replayed step {step} from {Path(used[0]).name} (A) and {Path(used[1]).name} (B)"
    )
    return result


__all__ = [
    "Captured",
    "capture_step",
    "check_replay_inputs",
    "checkpoint_at_or_before",
    "first_difference",
    "replay",
]
