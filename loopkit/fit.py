"""fit(): the prebuilt training loop, assembled from loopkit's public parts."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks import Request, Stop, check_callbacks, collect_log_metrics, dispatch, infer_mode
from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_extra,
    rotate_checkpoints,
    save_checkpoint,
    step_dir_name,
)
from .compose import chain, identity
from .config import FitConfig, resolve_named
from .data import make_loader
from .evaluate import evaluate
from .logging import CSVLogger, JSONLLogger, ProgressBar, TensorBoardLogger
from .metrics import Accuracy, TopKAccuracy, as_metric, to_host
from .state import TrainState, Window
from .transforms import accumulate, clip, forward, optimizer_step, skip_nonfinite


@dataclass
class FitResult:
    """What fit() returns.

    Attributes:
        state: the final TrainState (model, optimizer, counters).
        history: one dict per log step and per evaluation: "step", "epoch", "time_s" and
            the metrics ("train/loss", "train/lr", "eval/loss", ...), as host floats.
        best: the best evaluation by `monitor` ({"step": ..., "eval/...": ...}), or None.
        stopped_by: why training stopped: "max_steps", "epochs" or a callback's reason.
    """

    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    stopped_by: str = ""

    def __str__(self) -> str:
        lines = [
            f"FitResult: {self.state.step} steps, {self.state.epoch} epochs, "
            f"{self.state.samples_seen} samples; stopped by {self.stopped_by}"
        ]
        last_train = next((h for h in reversed(self.history) if "train/loss" in h), None)
        last_eval = next(
            (h for h in reversed(self.history) if any(k.startswith("eval/") for k in h)), None
        )
        for title, row in (
            ("last train", last_train),
            ("last eval", last_eval),
            ("best", self.best),
        ):
            if row:
                values = ", ".join(
                    f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "time_s")
                )
                lines.append(f"  {title}: {values}")
        return "\n".join(lines)


_METRIC_NAMES = "'accuracy', 'top<k>_accuracy' (e.g. 'top5_accuracy')"


def _resolve_metrics(metrics: Any) -> dict[str, Any]:
    """Metric names or a name -> metric mapping, as evaluate() takes them."""
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return {str(k): as_metric(v) for k, v in metrics.items()}
    resolved: dict[str, Any] = {}
    for name in metrics:
        if name == "accuracy":
            resolved[name] = Accuracy()
        elif (
            isinstance(name, str)
            and name.startswith("top")
            and name.endswith("_accuracy")
            and name[3:-9].isdigit()
        ):
            resolved[name] = TopKAccuracy(int(name[3:-9]))
        elif name in ("loss", "perplexity"):
            continue  # always reported from loss_fn
        else:
            raise ValueError(
                f"fit(metrics=[..., {name!r}, ...]): unknown metric name; known names: "
                f"{_METRIC_NAMES}, 'loss', 'perplexity'. Pass a dict name -> metric for others."
            )
    return resolved


def _check_monitors(callbacks: Sequence[Any], metrics: Mapping[str, Any], has_eval: bool) -> None:
    """Fail before training when a callback monitors an eval metric that will not exist."""
    available = {"eval/loss", "eval/perplexity"} | {
        name if "/" in name else f"eval/{name}" for name in metrics
    }
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if not (isinstance(monitor, str) and monitor.startswith("eval/")):
            continue
        if not has_eval:
            raise ValueError(
                f"fit(callbacks=[{type(callback).__name__}(monitor={monitor!r})]): monitors an "
                "eval metric but fit has no eval_data. Pass eval_data=..."
            )
        if monitor not in available:
            raise ValueError(
                f"fit(callbacks=[{type(callback).__name__}(monitor={monitor!r})]): no such eval "
                f"metric; available: {sorted(available)}."
            )


def _window_size(config: FitConfig, loader: Iterable[Any], world_size: int) -> int:
    """Micro-batches per optimizer step, from accumulate or from a samples/tokens target."""
    target = config.samples_per_step or config.tokens_per_step
    if not target:
        return config.accumulate
    from ._batch import first_tensor

    batch = next(iter(loader))
    tensor = first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError("fit(samples_per_step / tokens_per_step): batches hold no tensor.")
    unit = "samples" if config.samples_per_step else "tokens"
    per_micro = tensor.shape[0] if unit == "samples" else tensor.numel()
    per_micro *= world_size
    k = target // per_micro
    if k < 1 or k * per_micro != target:
        raise ValueError(
            f"fit({unit}_per_step={target}): must be a multiple of the {per_micro} {unit} per "
            f"micro-batch (across {world_size} rank(s)); e.g. {max(1, k) * per_micro}."
        )
    print(f"loopkit: accumulate={k} ({target} {unit} per step / {per_micro} per micro-batch)")
    return k


def fit(
    model: torch.nn.Module,
    train_data: Any,
    *,
    config: FitConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> FitResult:
    """Train `model` on `train_data` and return the final state, history and best eval.

    The default step is `chain(forward(loss_fn), accumulate(k), clip(max_norm),
    optimizer_step())`; pass `step=` to run your own chain instead. Every argument is a
    FitConfig field and is validated before any work. Training metrics stay on the device
    except at log steps (every `log_every` optimizer steps). Besides that schedule (and
    `eval_every`, `save_every`, ...), a callback's `on_step_end` / `on_epoch_end` may return
    `Request(log=..., evaluate=..., save=..., end_epoch=...)` to have fit act right then.

    Args:
        model: the module to train.
        train_data: a Dataset (batched by a StatefulDataLoader with `batch_size`), a
            DataLoader, a torchdata StatefulDataLoader or nodes pipeline, or any iterable of
            batches.
        config: a FitConfig or mapping of its fields; keyword arguments override it.
        **kwargs: FitConfig fields: loss_fn, optimizer, schedule, max_steps, epochs,
            batch_size, accumulate (or samples_per_step / tokens_per_step), clip, precision,
            strategy, eval_data, eval_every, eval_batches, metrics, monitor, mode, callbacks,
            log_every, log_dir, progress, seed, compile, step, ... (see FitConfig).

    Returns:
        FitResult with `.state`, `.history`, `.best`.

    Raises:
        ValueError / TypeError: a bad argument, named in the message, before any training.
    """
    base = dict(config) if config is not None else {}
    cfg = FitConfig.from_dict({**base, **kwargs})
    if cfg.loss_fn is None and cfg.step is None:
        raise ValueError("fit(loss_fn=None): pass loss_fn(model, batch), or a custom step=.")
    if cfg.optimizer is None:
        raise ValueError(
            "fit(optimizer=None): pass a factory such as "
            "`lambda params: torch.optim.AdamW(params, lr=3e-4)` or {'name': 'AdamW', 'lr': 3e-4}."
        )
    if cfg.mode is None and cfg.eval_data is not None:
        infer_mode(cfg.monitor)  # fail now, not at the first eval
    metrics = _resolve_metrics(cfg.metrics)
    user_callbacks = check_callbacks(cfg.callbacks)
    _check_monitors(user_callbacks, metrics, has_eval=cfg.eval_data is not None)
    if cfg.compile:
        model.compile()  # in place: parameter names (and checkpoints) stay unprefixed
    state = TrainState.create(
        model,
        optimizer=resolve_named(cfg.optimizer, "optimizer"),
        schedule=resolve_named(cfg.schedule, "schedule"),
        precision=cfg.precision,
        strategy=cfg.strategy,
        seed=cfg.seed,
    )
    # Data-parallel rank and size: the ranks of one pipeline (Pipeline's dp_rank and
    # dp_world_size) read the same batches; every other strategy's ranks are replicas.
    data_rank = getattr(state.strategy, "dp_rank", state.strategy.rank)
    data_world = getattr(state.strategy, "dp_world_size", state.strategy.world_size)
    loader = make_loader(
        train_data,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        collate_fn=cfg.collate_fn,
        rank=data_rank,
        world_size=data_world,
    )
    eval_loader = None
    if cfg.eval_data is not None:
        eval_loader = make_loader(
            cfg.eval_data,
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            shuffle=False,
            seed=cfg.seed,
            collate_fn=cfg.collate_fn,
            rank=data_rank,
            world_size=data_world,
            where="fit(eval_data=...)",
        )
    k = _window_size(cfg, loader, data_world)
    train_step = cfg.step or chain(
        forward(cfg.loss_fn),
        accumulate(k),
        clip(cfg.clip) if cfg.clip is not None else identity(),
        skip_nonfinite() if cfg.nonfinite == "skip" else identity(),
        optimizer_step(),
    )
    if cfg.step is None:
        # Tell forward the window size before the first micro-batch, so data-parallel
        # strategies all-reduce gradients once per window from the very first window.
        state = state.replace(window=Window(size=k))
    mode = cfg.mode or (infer_mode(cfg.monitor) if eval_loader is not None else "min")
    callbacks = list(user_callbacks)
    if state.strategy.rank == 0:  # only the main process logs
        if cfg.log_dir is not None:
            log_dir = Path(cfg.log_dir)
            callbacks += [
                TensorBoardLogger(log_dir),
                CSVLogger(log_dir / "metrics.csv"),
                JSONLLogger(log_dir / "metrics.jsonl"),
            ]
        if cfg.progress:
            callbacks.append(ProgressBar())
    max_epochs = cfg.epochs if cfg.epochs is not None else (None if cfg.max_steps else 1)
    hparams = {
        k_: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
        for k_, v in cfg.items()
        if k_ not in ("eval_data", "callbacks")
    }
    total_steps = cfg.max_steps
    if total_steps is None and max_epochs is not None:
        try:
            total_steps = max_epochs * len(loader) // k  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length: the progress bar has no total
            pass
    hparams.update(
        max_steps=cfg.max_steps, total_steps=total_steps, accumulate=k, step=repr(train_step)
    )
    return _run(
        state, train_step, loader, eval_loader, cfg, metrics, callbacks, max_epochs, mode, hparams
    )


def _run(
    state: TrainState,
    train_step: Any,
    loader: Iterable[Any],
    eval_loader: Iterable[Any] | None,
    cfg: FitConfig,
    metrics: dict[str, Any],
    callbacks: Sequence[Any],
    max_epochs: int | None,
    mode: str,
    hparams: dict[str, Any],
) -> FitResult:
    start = time.perf_counter()
    result = FitResult(state)
    evaluated_at = -1
    resumed_mid_epoch = False
    saved_at = -1  # the step of the newest checkpoint on disk from this run (or resumed from)
    if cfg.resume is not False:
        state, resumed_mid_epoch, evaluated_at = _resume(state, loader, callbacks, result, cfg)
        if resumed_mid_epoch:
            saved_at = state.step
    stop: Stop | None = dispatch(callbacks, "on_fit_start", state, hparams)
    skips_in_a_row = 0
    # Device-side record of the first step whose loss was not finite: no per-step sync.
    first_nonfinite = torch.full((), -1, dtype=torch.int64, device=state.strategy.device)
    # fit's own step makes a new "train/loss" tensor every optimizer step and never writes
    # to it again, so its check can wait: the losses of consecutive steps since the last
    # check are kept (one list append per step, no device op) and read at the next log or
    # save step and at the end, where fit syncs anyway (one stack and one copy to the
    # host); a run that checks less often than every _NONFINITE_CHUNK steps folds them
    # into first_nonfinite on the device. A user's step= might reuse one tensor: its loss
    # is checked on the device every step.
    pending: list[torch.Tensor] | None = [] if cfg.step is None else None
    pending_start = 0  # the step (before its update) of pending[0]
    on_device = pending is None  # whether first_nonfinite may hold a step

    def fold_pending() -> None:
        # Device ops only, no host sync.
        nonlocal first_nonfinite, on_device
        assert pending
        bad = ~torch.isfinite(torch.stack(pending))
        first_bad = torch.argmax(bad.to(torch.int32)) + pending_start  # the first True
        first_nonfinite = torch.where((first_nonfinite < 0) & bad.any(), first_bad, first_nonfinite)
        on_device = True
        pending.clear()

    def row(values: Mapping[str, float]) -> dict[str, float]:
        return {
            "step": state.step,
            "epoch": state.epoch,
            "time_s": time.perf_counter() - start,
            **values,
        }

    def check_finite() -> None:
        # host sync: at log and save steps only.
        bad = int(first_nonfinite) if on_device else -1
        if bad < 0 and pending:
            values = torch.stack(pending).tolist()
            bad = next(
                (pending_start + i for i, value in enumerate(values) if not math.isfinite(value)),
                -1,
            )
            pending.clear()
        if bad >= 0:
            raise FloatingPointError(
                f"fit: the training loss became NaN or infinite at step {bad}. Checkpoints "
                "written before it are intact. Lower the lr, clip gradients, or pass "
                "nonfinite='skip' to drop such updates."
            )

    def run_eval() -> tuple[Stop | None, bool]:
        nonlocal evaluated_at
        assert eval_loader is not None
        values = evaluate(
            state,
            eval_loader,
            metrics,
            loss_fn=cfg.loss_fn,
            predict=cfg.predict,
            max_batches=cfg.eval_batches,
        )
        evaluated_at = state.step
        result.history.append(row(values))
        improved = False
        if cfg.monitor in values:
            value, best = values[cfg.monitor], result.best
            improved = not math.isnan(value) and (
                best is None
                or (value < best[cfg.monitor] if mode == "min" else value > best[cfg.monitor])
            )
            if improved:
                result.best = {"step": state.step, **values}
        return dispatch(callbacks, "on_eval_end", state, values), improved

    def save() -> Stop | None:
        nonlocal saved_at
        assert cfg.checkpoint_dir is not None
        if cfg.nonfinite == "raise":
            check_finite()
        if state.step == saved_at:
            # This step is on disk already (an epoch end right after a step save, or the
            # checkpoint resumed from), and resuming from it replays what followed exactly.
            # Writing it again would replace the newest valid checkpoint in place, which is
            # not atomic (a directory cannot be renamed over a non-empty one).
            return None
        path = save_checkpoint(
            state,
            cfg.checkpoint_dir,
            extra=_extra(loader, callbacks, result, evaluated_at, hparams),
        )
        saved_at = state.step
        if cfg.keep_last is not None:
            keep = [path]
            if cfg.keep_best and result.best is not None:
                keep.append(Path(cfg.checkpoint_dir) / step_dir_name(int(result.best["step"])))
            if state.strategy.rank == 0:  # one process deletes; the others would race it
                rotate_checkpoints(cfg.checkpoint_dir, cfg.keep_last, keep=keep)
        return dispatch(callbacks, "on_checkpoint_saved", state, str(path))

    def log() -> Stop | None:
        # host sync: the one place train metrics leave the device, at log steps only.
        # With several processes the train metrics are reduced over ranks first (one
        # all_reduce): "train/loss" becomes the mean over every rank's items.
        train = state.strategy.reduce_metrics(state.metrics)
        values = to_host({**train, **collect_log_metrics(callbacks, state)})
        if cfg.nonfinite == "raise":
            check_finite()
        result.history.append(row(values))
        return dispatch(callbacks, "on_log", state, values)

    epoch = state.epoch
    while stop is None and (max_epochs is None or epoch < max_epochs):
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            result.stopped_by = "max_steps"
            break
        stop = dispatch(callbacks, "on_epoch_start", state)
        _set_epoch(loader, epoch)
        batches = 0
        for batch in loader:
            batches += 1
            previous_step, previous_skips = state.step, state.skipped_steps
            try:
                state = train_step(state, batch)
            except (ValueError, TypeError):
                raise
            except Exception as error:
                if state.step == 0 and previous_step == 0 and batches == 1:
                    raise RuntimeError(
                        f"fit: the first training step failed ({type(error).__name__}: "
                        f"{error}); nothing was trained. Check loss_fn and the batch format."
                    ) from error
                raise
            if state.step == previous_step:
                continue  # a micro-batch inside an open window
            loss = state.metrics.get("train/loss")
            if cfg.nonfinite == "raise" and isinstance(loss, torch.Tensor):
                if pending is None:
                    first_nonfinite = torch.where(
                        (first_nonfinite < 0) & ~torch.isfinite(loss),
                        previous_step,
                        first_nonfinite,
                    )
                else:
                    if pending and previous_step != pending_start + len(pending):
                        fold_pending()  # not consecutive (never with fit's own step)
                    if not pending:
                        pending_start = previous_step
                    pending.append(loss)
                    if len(pending) >= _NONFINITE_CHUNK:
                        fold_pending()
            elif cfg.nonfinite == "skip":
                skips_in_a_row = skips_in_a_row + 1 if state.skipped_steps > previous_skips else 0
                if skips_in_a_row >= cfg.max_nonfinite_skips:
                    raise FloatingPointError(
                        f"fit: {skips_in_a_row} optimizer steps in a row were skipped for a "
                        f"non-finite loss or gradient (last at step {previous_step}); "
                        f"max_nonfinite_skips={cfg.max_nonfinite_skips}."
                    )
            requests: list[Request] = []
            stop = dispatch(callbacks, "on_step_end", state, requests=requests) or stop
            request = _merged(requests, eval_loader, cfg)
            if (cfg.log_every and state.step % cfg.log_every == 0) or request.log:
                stop = log() or stop
            improved = False
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or request.evaluate:
                eval_stop, improved = run_eval()
                stop = eval_stop or stop
            if cfg.checkpoint_dir is not None and (
                (cfg.save_every and state.step % cfg.save_every == 0)
                or (cfg.keep_best and improved)
                or request.save
            ):
                stop = save() or stop
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                result.stopped_by = "max_steps"
                break
            if stop is not None or request.end_epoch:
                break
        if batches == 0 and not resumed_mid_epoch:
            raise ValueError(
                "fit(train_data=...): the data yielded no batches"
                + (" in the first epoch." if epoch == 0 else f" in epoch {epoch}.")
            )
        resumed_mid_epoch = False
        if result.stopped_by or stop is not None:
            break
        epoch += 1
        state = state.replace(epoch=epoch)
        requests = []
        stop = dispatch(callbacks, "on_epoch_end", state, requests=requests)
        request = _merged(requests, eval_loader, cfg)
        if request.log:
            stop = log() or stop
        improved = False
        if (eval_loader is not None and not cfg.eval_every) or request.evaluate:
            eval_stop, improved = run_eval()
            stop = eval_stop or stop
        if cfg.checkpoint_dir is not None and (
            (state.micro_step == 0 and (cfg.save_on_epoch_end or (cfg.keep_best and improved)))
            or request.save  # an open window makes save_checkpoint raise, naming the fix
        ):
            stop = save() or stop
    if stop is not None:
        result.stopped_by = stop.reason
    elif not result.stopped_by:
        result.stopped_by = "epochs"
    if cfg.nonfinite == "raise":
        check_finite()
    if eval_loader is not None and evaluated_at != state.step:
        run_eval()
    dispatch(callbacks, "on_fit_end", state)
    result.state = state
    return result


_NONFINITE_CHUNK = 1024
"""fit() folds the pending losses into its non-finite record at least this often (steps)."""

_NO_REQUEST = Request()  # frozen: one shared instance for the usual step with no requests


def _merged(requests: Sequence[Request], eval_loader: Any, cfg: FitConfig) -> Request:
    """The callbacks' requests as one; fail on one fit cannot serve."""
    if not requests:
        return _NO_REQUEST
    request = Request()
    for each in requests:
        request = request | each
    if request.evaluate and eval_loader is None:
        raise ValueError(
            "fit: a callback returned Request(evaluate=True) but fit has no eval_data; pass "
            "eval_data=..."
        )
    if request.save and cfg.checkpoint_dir is None:
        raise ValueError(
            "fit: a callback returned Request(save=True) but fit has no checkpoint_dir; pass "
            "checkpoint_dir=..."
        )
    return request


def _set_epoch(loader: Any, epoch: int) -> None:
    """Reshuffle a DistributedSampler per epoch, as torch requires."""
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _extra(
    loader: Any,
    callbacks: Sequence[Any],
    result: FitResult,
    evaluated_at: int,
    hparams: Mapping[str, Any],
) -> dict[str, Any]:
    """What a checkpoint needs besides the TrainState to resume fit() exactly."""
    return {
        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "callbacks": [
            cb.state_dict()
            if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")
            else None
            for cb in callbacks
        ],
        "history": result.history,
        "best": result.best,
        "evaluated_at": evaluated_at,
        "config": dict(hparams),
    }


def _resume(
    state: TrainState, loader: Any, callbacks: Sequence[Any], result: FitResult, cfg: FitConfig
) -> tuple[TrainState, bool, int]:
    """Load the checkpoint `cfg.resume` asks for; return (state, mid_epoch, evaluated_at).

    resume=True tries the checkpoints in checkpoint_dir newest first, skipping (and saying
    why) each one that is invalid or does not fit this run; an explicit path must load.
    """
    if cfg.resume is True:
        assert cfg.checkpoint_dir is not None
        candidates = list_checkpoints(cfg.checkpoint_dir)
    else:
        candidates = [Path(cfg.resume)]  # type: ignore[arg-type]
    for path in candidates:
        try:
            state = load_checkpoint(path, state)  # validates first; touches nothing if bad
        except CheckpointError as error:
            if cfg.resume is not True:
                raise  # a bad explicit path raises; no fallback
            print(f"loopkit: skipping checkpoint {path.name}: {error}")
            continue
        break
    else:
        print(f"loopkit: no valid checkpoint in {cfg.checkpoint_dir}; starting fresh.")
        return state, False, -1
    extra = read_extra(path)  # parsed fine by load_checkpoint just above
    if extra.get("data") is not None:
        if not hasattr(loader, "load_state_dict"):
            raise ValueError(
                f"fit(resume={str(path)!r}): the checkpoint holds a data position but "
                f"train_data ({type(loader).__name__}) cannot restore one; pass a Dataset or "
                "a torchdata StatefulDataLoader for exact resume."
            )
        loader.load_state_dict(extra["data"])
    saved = extra.get("callbacks") or []
    if len(saved) != len(callbacks):
        raise ValueError(
            f"fit(resume={str(path)!r}): the checkpoint has state for {len(saved)} callbacks, "
            f"this run has {len(callbacks)}; pass the same callbacks as the interrupted run."
        )
    for callback, callback_state in zip(callbacks, saved):
        if callback_state is not None:
            callback.load_state_dict(callback_state)
    result.history = list(extra.get("history") or [])
    result.best = extra.get("best")
    print(f"loopkit: resumed from {path} (step {state.step}, epoch {state.epoch}).")
    return state, True, int(extra.get("evaluated_at", -1))
