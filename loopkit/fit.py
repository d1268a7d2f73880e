"""fit(): the prebuilt training loop, assembled from loopkit's public parts."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks import Stop, check_callbacks, collect_log_metrics, dispatch, infer_mode
from .compose import chain, identity
from .config import FitConfig, resolve_named
from .data import make_loader
from .evaluate import evaluate
from .logging import CSVLogger, JSONLLogger, ProgressBar, TensorBoardLogger
from .metrics import Accuracy, TopKAccuracy, as_metric, to_host
from .state import TrainState
from .transforms import accumulate, clip, forward, optimizer_step


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
        lines = [f"FitResult: {self.state.step} steps, {self.state.epoch} epochs, "
                 f"{self.state.samples_seen} samples; stopped by {self.stopped_by}"]
        last_train = next((h for h in reversed(self.history) if "train/loss" in h), None)
        last_eval = next((h for h in reversed(self.history) if any(k.startswith("eval/") for k in h)), None)
        for title, row in (("last train", last_train), ("last eval", last_eval), ("best", self.best)):
            if row:
                values = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "time_s"))
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
    except at log steps (every `log_every` optimizer steps).

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
    loader = make_loader(
        train_data,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        collate_fn=cfg.collate_fn,
    )
    eval_loader = None
    if cfg.eval_data is not None:
        eval_loader = make_loader(
            cfg.eval_data,
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            shuffle=False,
            seed=cfg.seed,
            collate_fn=cfg.collate_fn,
            where="fit(eval_data=...)",
        )
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
    k = _window_size(cfg, loader, state.strategy.world_size)
    train_step = cfg.step or chain(
        forward(cfg.loss_fn),
        accumulate(k),
        clip(cfg.clip) if cfg.clip is not None else identity(),
        optimizer_step(),
    )
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
    if total_steps is None and max_epochs is not None and hasattr(loader, "__len__"):
        total_steps = max_epochs * len(loader) // k  # type: ignore[arg-type]
    hparams.update(max_steps=cfg.max_steps, total_steps=total_steps, accumulate=k,
                   step=repr(train_step))
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
    stop: Stop | None = dispatch(callbacks, "on_fit_start", state, hparams)
    evaluated_at = -1

    def row(values: Mapping[str, float]) -> dict[str, float]:
        return {"step": state.step, "epoch": state.epoch,
                "time_s": time.perf_counter() - start, **values}

    def run_eval() -> Stop | None:
        nonlocal evaluated_at
        assert eval_loader is not None
        values = evaluate(state, eval_loader, metrics, loss_fn=cfg.loss_fn,
                          predict=cfg.predict, max_batches=cfg.eval_batches)
        evaluated_at = state.step
        result.history.append(row(values))
        if cfg.monitor in values:
            value, best = values[cfg.monitor], result.best
            better = best is None or (value < best[cfg.monitor] if mode == "min"
                                      else value > best[cfg.monitor])
            if better and not math.isnan(value):
                result.best = {"step": state.step, **values}
        return dispatch(callbacks, "on_eval_end", state, values)

    epoch = 0
    while stop is None and (max_epochs is None or epoch < max_epochs):
        stop = dispatch(callbacks, "on_epoch_start", state)
        batches = 0
        for batch in loader:
            batches += 1
            previous_step = state.step
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
            stop = dispatch(callbacks, "on_step_end", state) or stop
            if state.step % cfg.log_every == 0:
                # host sync: the one place train metrics leave the device, at log steps only.
                values = to_host({**state.metrics, **collect_log_metrics(callbacks, state)})
                result.history.append(row(values))
                stop = dispatch(callbacks, "on_log", state, values) or stop
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                stop = run_eval() or stop
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                result.stopped_by = "max_steps"
                break
            if stop is not None:
                break
        if batches == 0:
            raise ValueError(
                "fit(train_data=...): the data yielded no batches"
                + (" in the first epoch." if epoch == 0 else f" in epoch {epoch}.")
            )
        if result.stopped_by or stop is not None:
            break
        epoch += 1
        state = state.replace(epoch=epoch)
        stop = dispatch(callbacks, "on_epoch_end", state)
        if eval_loader is not None and not cfg.eval_every:
            stop = run_eval() or stop
    if stop is not None:
        result.stopped_by = stop.reason
    elif not result.stopped_by:
        result.stopped_by = "epochs"
    if eval_loader is not None and evaluated_at != state.step:
        run_eval()
    dispatch(callbacks, "on_fit_end", state)
    result.state = state
    return result
