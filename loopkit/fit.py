"""fit(): the prebuilt training loop, assembled from loopkit's public parts.

`fit()` checks its arguments and builds the record, the loaders and the step; `_Run` is the
loop. The loop calls one small named piece for each concern:

- `_cadence.Cadence`: when to log, evaluate and save (log_every, eval_every, save_every,
  ... and the callbacks' Requests);
- `_nonfinite_watch.NonfiniteWatch`: the first step whose loss was NaN or infinite
  (nonfinite="raise") or the streak of skipped steps (nonfinite="skip");
- `_eval_tracking`: `Evaluator` runs an evaluation, `EvalTracker` keeps the best one
  (whether a value improved is `callbacks.improved`, loopkit's one rule for it);
- `_saving.CheckpointSaver`: checkpoints, written once per step, and their rotation;
- `_resume`: what a checkpoint carries besides the record, and resuming from it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ._batch import first_tensor
from ._cadence import Cadence, Plan
from ._eval_tracking import EvalTracker, Evaluator
from ._interrupts import Interrupts
from ._nonfinite_watch import NonfiniteWatch
from ._resume import checkpoint_extra, resume
from ._saving import CheckpointSaver, claim_run
from ._types import Transform
from .averaging import average_kind_of
from .callbacks import (
    Mode,
    Request,
    Stop,
    check_callbacks,
    collect_log_metrics,
    dispatch,
    infer_mode,
)
from .checkpoint import step_dir_name
from .compiled import compile_step
from .compose import chain, identity, inner_of, parts_of
from .config import ConfigSource, FitConfig, merge_config, resolve_named, takes_config
from .data import iterate, make_loader, workers_die_on_sigterm
from .fingerprint import FingerprintRecorder, fingerprint
from .guards import zero_nonfinite
from .logging import CSVLogger, JSONLLogger, ProgressBar, TensorBoardLogger
from .metrics import (
    Accuracy,
    TopKAccuracy,
    TorchMetric,
    as_metric,
    is_torchmetrics,
    result_keys,
    to_host,
)
from .state import TrainState, Window
from .strategies import DDP, SingleDevice, Strategy
from .transforms import (
    accumulate,
    clip,
    forward,
    optimizer_step,
    skip_nonfinite,
    window_size_of,
)

logger = logging.getLogger(__name__)

_NONFINITE_CHUNK = 1024
"""fit() folds the pending losses into its non-finite record at least this often (steps)."""


@dataclass
class FitResult:
    """What fit() returns.

    Attributes:
        state: the final TrainState (model, optimizer, counters).
        history: one dict per log step and per evaluation: "step", "epoch", "time_s" and
            the metrics ("train/loss", "train/lr", "eval/loss", ...), as host floats.
        best: the best evaluation by `monitor` ({"step": ..., "eval/...": ...}), or None.
        stopped_by: why training stopped: "max_steps", "epochs", a callback's reason, or
            "SIGUSR1" (a SIGINT or SIGTERM stop raises instead; callbacks see it).
        run_id: the run's id: new for a fresh run, the checkpoint's for a resumed one
            (kept across resumes); every checkpoint records it.
    """

    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    stopped_by: str = ""
    run_id: str | None = None

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
    """Metric names or a name -> metric mapping, as evaluate() takes them.

    A torchmetrics Metric or MetricCollection may stand alone or in the list: it is named
    by its class, as torchmetrics names a list of metrics (a collection reports its
    entries' names). Two metrics reporting the same key are refused here, before training.
    """
    if metrics is None:
        return {}
    if is_torchmetrics(metrics):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        resolved = {str(k): as_metric(v, str(k)) for k, v in metrics.items()}
    else:
        resolved = {}
        for name in metrics:
            if is_torchmetrics(name):
                label = type(name).__name__
                if label in resolved:
                    raise ValueError(
                        f"fit(metrics=[..., {label}(...), ...]): two {label} objects in the "
                        "list; name them with a dict, e.g. metrics={'f1_macro': ..., "
                        "'f1_micro': ...}, or put them in one MetricCollection."
                    )
                resolved[label] = as_metric(name, label)
            elif name == "accuracy":
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
                    f"{_METRIC_NAMES}, 'loss', 'perplexity', or a torchmetrics Metric or "
                    "MetricCollection. Pass a dict name -> metric for others."
                )
    seen: dict[str, str] = {}
    for name, metric in resolved.items():
        for key in result_keys(name, metric):
            if key in seen:
                raise ValueError(
                    f"fit(metrics=...): {key!r} would be reported by both {seen[key]!r} and "
                    f"{name!r}. Rename one (a MetricCollection's entries: its keys, prefix= "
                    "or postfix=)."
                )
            seen[key] = name
    return resolved


def _check_monitors(callbacks: Sequence[Any], metrics: Mapping[str, Any], has_eval: bool) -> None:
    """Fail before training when a callback monitors an eval metric that will not exist."""
    available = {"eval/loss", "eval/perplexity"} | {
        key for name, metric in metrics.items() for key in result_keys(name, metric)
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


def _window_size(config: FitConfig, loader: Iterable[Any], strategy: Strategy) -> int:
    """Micro-batches per optimizer step, from accumulate or from a samples/tokens target."""
    target = config.samples_per_step or config.tokens_per_step
    if not target:
        return config.accumulate
    batch = next(iterate(loader))
    tensor = first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError("fit(samples_per_step / tokens_per_step): batches hold no tensor.")
    unit = "samples" if config.samples_per_step else "tokens"
    world_size = strategy.dp_world_size
    per_micro = tensor.shape[0] if unit == "samples" else tensor.numel()
    per_micro *= world_size
    k = target // per_micro
    if k < 1 or k * per_micro != target:
        raise ValueError(
            f"fit({unit}_per_step={target}): must be a multiple of the {per_micro} {unit} per "
            f"micro-batch (across {world_size} rank(s)); e.g. {max(1, k) * per_micro}."
        )
    if strategy.is_main:
        logger.info(
            "accumulate=%s (%s %s per step / %s per micro-batch)", k, target, unit, per_micro
        )
    return k


def _check_it_trains(
    cfg: FitConfig, state: TrainState, loader: Any, k: int, max_epochs: int | None
) -> None:
    """Refuse a run too short for one optimizer step; warn of one whose lr is 0 throughout.

    Both would otherwise end without an error having changed no weight. (An lr of 0 is a
    warning, not an error: fit with SGD(lr=0) is a way to evaluate through fit's loop.)
    """
    try:
        micro_batches = None if max_epochs is None else max_epochs * len(loader)
    except TypeError:  # an iterable without a length
        micro_batches = None
    if micro_batches == 0:
        raise ValueError(
            "fit(train_data=...): the data has no batches (len 0), so the run would end "
            "without a step; a DataLoader with drop_last=True and fewer items than its "
            "batch_size has none. Pass data with at least one batch."
        )
    if cfg.step is None and micro_batches is not None and micro_batches < k:
        per_epoch = micro_batches // max(1, max_epochs or 1)
        raise ValueError(
            f"fit(accumulate={k}, epochs={max_epochs}): the run reads {micro_batches} "
            f"micro-batch(es) ({per_epoch} per epoch) and one optimizer step takes {k}, so it "
            "would end without a step. Lower accumulate (or samples_per_step / "
            "tokens_per_step, or batch_size), or raise epochs, or set max_steps=N instead."
        )
    steps = cfg.max_steps
    if micro_batches is not None:
        steps = min(steps or micro_batches // k, micro_batches // k)
    schedule = state.schedule
    if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler) or not state.strategy.is_main:
        return  # a torch scheduler's lrs are known only as it steps
    if all(lr == 0 for lr in state.base_lrs):
        arg, what = f"optimizer={cfg.optimizer!r}", "every parameter group's lr is 0"
    elif steps is not None and not any(float(schedule(s)) != 0 for s in range(steps)):
        arg, what = f"schedule={cfg.schedule!r}", f"the lr factor is 0 at steps 0..{steps - 1}"
    else:
        return
    logger.warning(
        "fit(%s): %s, the whole run, so it changes no weight. Give the optimizer an lr > 0 "
        "and a schedule that is not 0 for the whole run (to evaluate only: loopkit.evaluate).",
        arg,
        what,
    )


@takes_config
def fit(
    model: torch.nn.Module,
    train_data: Any,
    *,
    config: ConfigSource = None,
    loss_fn: Any = None,
    optimizer: Any = None,
    schedule: Any = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    accumulate: int = 1,
    samples_per_step: int | None = None,
    tokens_per_step: int | None = None,
    clip: float | None = None,
    average: Any = None,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    strategy: Any = None,
    eval_data: Any = None,
    eval_every: int | None = None,
    eval_batches: int | None = None,
    eval_weights: Literal["model", "ema", "swa"] = "model",
    metrics: Any = None,
    predict: Any = None,
    monitor: str = "eval/loss",
    mode: Literal["min", "max"] | None = None,
    callbacks: tuple[Any, ...] | list[Any] = (),
    log_every: int | None = 50,
    log_dir: str | Path | None = None,
    fingerprint_every: int | None = None,
    progress: bool = True,
    seed: int = 0,
    compile: bool = False,
    step: Any = None,
    checkpoint_dir: str | Path | None = None,
    save_every: int | None = None,
    save_on_epoch_end: bool = False,
    keep_last: int | None = None,
    keep_best: bool = False,
    resume: bool | str | Path = False,
    allow_data_reshard: bool = False,
    nonfinite: Literal["raise", "skip"] = "raise",
    max_nonfinite_skips: int = 10,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    data_timeout_s: float | None = 600.0,
    pin_memory: bool = False,
    collate_fn: Any = None,
) -> FitResult:
    """Train `model` on `train_data` and return the final state, history and best eval.

    The default step is `chain(forward(loss_fn), accumulate(k), clip(max_norm),
    optimizer_step())`; pass `step=` to run your own chain instead. The keyword arguments
    are FitConfig's fields (tests/test_fit_signature.py keeps the two in step): the ones
    written in the call override `config`'s values, even when equal to the default, and
    all are validated before any work; an unknown name gets "did you mean ...?" or where it
    belongs (`lr=` -> `optimizer=`). Training metrics stay on the device except at log
    steps (every `log_every` optimizer steps). Besides that schedule (and `eval_every`,
    `save_every`, ...), a callback's `on_step_end` / `on_epoch_end` may return
    `Request(log=..., evaluate=..., save=..., end_epoch=...)` to have fit act right then.
    Messages ("resumed from ...") go to the "loopkit" logger (see loopkit.logging).

    Args:
        model: the module to train.
        train_data: a Dataset or a sequence of samples (batched by a StatefulDataLoader
            with `batch_size`), a DataLoader, a torchdata StatefulDataLoader or nodes
            pipeline, or any iterable of batches (the rule: loopkit.data).
        config: a FitConfig, a mapping of its fields, or the path of a .toml, .yaml/.yml or
            .json file of them; the keyword arguments given here override its values. A
            file's values are checked on their own when read (errors name the file), and
            together with the keyword arguments after the merge.
        loss_fn: `loss_fn(model, batch)` -> `Loss(sum, count)` or a scalar mean; required
            unless `step=` is given.
        optimizer: a factory `params -> Optimizer`, a built optimizer, or
            `{'name': 'AdamW', 'lr': 3e-4, ...}` (any torch.optim class); required.
        schedule: the lr factor per step: a function of the step (loopkit.schedules), a
            torch LRScheduler, or `{'name': 'cosine', 'warmup_steps': ..., ...}`; None:
            constant.
        max_steps: stop after this many optimizer steps.
        epochs: stop after this many passes over train_data (1 when max_steps is None too).
        batch_size: the micro-batch size when train_data is a Dataset or a sequence of
            samples.
        eval_batch_size: the batch size of eval_data (default: batch_size).
        accumulate: micro-batches per optimizer step.
        samples_per_step: the step size in samples, instead of accumulate (fit works out k).
        tokens_per_step: the step size in tokens, instead of accumulate.
        clip: the max global gradient norm; None: no clipping.
        average: `loopkit.ema(decay, ...)` or `loopkit.swa(start=...)`: keep that average
            of the weights in the record (fit appends it to its step, after the optimizer
            step; with `step=` put it in your chain instead); docs/averaging.md.
        precision: "fp32", "bf16" or "fp16" (dynamic loss scaling).
        strategy: how the step runs: SingleDevice (None: the best device), DDP, FSDP,
            Pipeline.
        eval_data: a Dataset or loader to evaluate on.
        eval_every: evaluate every n optimizer steps (needs eval_data); None: after each
            epoch and at the end.
        eval_batches: at most this many batches per evaluation.
        eval_weights: "model", or "ema" / "swa": evaluate with that average of the weights
            (the model's weights are restored bitwise after each evaluation).
        metrics: metric names ("accuracy", "top5_accuracy") or a dict name -> metric.
        predict: `predict(model, batch)` giving the outputs metrics see (default: the
            output captured during loss_fn).
        monitor: the eval metric `result.best` and keep_best track ("eval/loss").
        mode: "min" or "max" for monitor; None: inferred from its name.
        callbacks: objects with event hooks (loopkit.callbacks).
        log_every: optimizer steps between log records (the only host syncs of training
            metrics); None: only when a callback's Request(log=True) asks.
        log_dir: write TensorBoard events, metrics.csv and metrics.jsonl there.
        fingerprint_every: record a step fingerprint every n steps under
            <log_dir>/fingerprints/ (None: 1 with a log_dir, 0 with step= or compile; 0:
            off; docs/forensics.md).
        progress: show a progress bar (plain lines when stdout is not a terminal).
        seed: the root of all randomness (dropout per micro-step, data order per epoch).
        compile: run the step through loopkit.compile_step.
        step: your own step transform `(state, batch) -> state` instead of the default
            chain (it brings its own accumulate and clip).
        checkpoint_dir: where checkpoints go (locked for the run).
        save_every: save every n optimizer steps (needs checkpoint_dir).
        save_on_epoch_end: save at each epoch's end (needs checkpoint_dir).
        keep_last: keep the newest n checkpoints (None: all), plus the best with keep_best.
        keep_best: keep the best checkpoint by monitor.
        resume: True: the newest valid checkpoint in checkpoint_dir; a path: that
            checkpoint; False: a fresh run (refused if checkpoint_dir holds checkpoints).
        allow_data_reshard: resume an iterable dataset at another world size from rank 0's
            position (with a warning).
        nonfinite: "raise" (stop with an error naming the step) or "skip" (skip updates
            whose loss is NaN or infinite; one host sync per step).
        max_nonfinite_skips: with nonfinite="skip", raise after this many skipped steps in
            a row.
        shuffle: shuffle a Dataset's order each epoch.
        drop_last: drop a Dataset's last, smaller batch.
        num_workers: DataLoader worker processes for a Dataset.
        data_timeout_s: the longest wait for a worker's batch (None: forever).
        pin_memory: pin a Dataset's batches in page-locked memory.
        collate_fn: `collate_fn(samples)` -> batch, for a Dataset or a sequence of samples.

    Returns:
        FitResult with `.state`, `.history`, `.best`.

    Raises:
        ValueError / TypeError: a bad argument, named in the message, before any training.
        KeyboardInterrupt: SIGINT (Ctrl-C) stopped the run; raised after the checkpoint
            at the end of the open window is saved (see docs/fit.md, "Interrupts").
        SystemExit: SIGTERM stopped the run; code 143, after the same save. SIGUSR1
            saves the same way and returns with `stopped_by="SIGUSR1"`.
    """
    # takes_config merged `config` and the keywords written in the call into one FitConfig,
    # passed as `config`; each keyword parameter holds its merged value too.
    cfg = _checked_config(config)
    if cfg.step is not None:
        window_size_of(cfg.step)  # a chain that can never train is refused before any work
    metrics = _resolve_metrics(cfg.metrics)
    user_callbacks = check_callbacks(cfg.callbacks)
    _check_monitors(user_callbacks, metrics, has_eval=cfg.eval_data is not None)
    state = TrainState.create(
        model,
        optimizer=resolve_named(cfg.optimizer, "optimizer"),
        schedule=resolve_named(cfg.schedule, "schedule"),
        precision=cfg.precision,
        strategy=cfg.strategy,
        seed=cfg.seed,
    )
    for metric in metrics.values():
        if isinstance(metric, TorchMetric):  # refuse what torchmetrics cannot sync, before work
            metric.prepare(state.strategy, "fit(metrics=...)")
    loader, eval_loader = _loaders(train_data, cfg, state.strategy)
    _warn_of_workers_slurm_kills(state.strategy, train_data=loader, eval_data=eval_loader)
    k = _window_size(cfg, loader, state.strategy)
    every = _fingerprint_every(cfg)
    recorder = None  # every rank records its own tensors (rank r > 0 in fingerprints/rank-<r>)
    if every:
        recorder = FingerprintRecorder(
            Path(cfg.log_dir) / "fingerprints",  # type: ignore[arg-type]
            rank=state.strategy.rank,
        )
    several = state.strategy.world_size > 1
    train_step = cfg.step or _default_step(cfg, k, recorder, every, guard=several)
    if cfg.step is None:
        # Tell forward the window size before the first micro-batch, so data-parallel
        # strategies all-reduce gradients once per window from the very first window.
        state = state.replace(window=Window(size=k))
    evaluator = None
    if eval_loader is not None:
        evaluator = Evaluator(
            eval_loader, metrics, cfg.loss_fn, cfg.predict, cfg.eval_batches, cfg.eval_weights
        )
    best_mode: Mode = cfg.mode or (infer_mode(cfg.monitor) if eval_loader is not None else "min")
    callbacks = _with_loggers(user_callbacks, cfg)
    max_epochs = cfg.epochs if cfg.epochs is not None else (None if cfg.max_steps else 1)
    _check_it_trains(cfg, state, loader, k, max_epochs)
    hparams = {**_hparams(cfg, loader, k, train_step, max_epochs), "fingerprint_every": every}
    run = _Run(state, train_step, loader, callbacks, cfg, hparams, evaluator, best_mode)
    run.fingerprints = recorder
    if cfg.compile:  # the whole step, compiled (loopkit.compiled); checks above read the chain
        run.train_step = compile_step(train_step)
    with run.interrupts:  # stop signals end the run at a step boundary (loopkit._interrupts)
        result = run.train(max_epochs)
    if (exit_error := run.interrupts.exit_error()) is not None:
        raise exit_error  # after a saved stop: KeyboardInterrupt (SIGINT), SystemExit(143)
    return result


def _checked_config(config: ConfigSource) -> FitConfig:
    """fit's FitConfig (takes_config merged it), with the checks only fit needs."""
    cfg = config if isinstance(config, FitConfig) else merge_config(config, {}, where="fit")
    if cfg.loss_fn is None and cfg.step is None:
        raise ValueError("fit(loss_fn=None): pass loss_fn(model, batch), or a custom step=.")
    if cfg.optimizer is None:
        raise ValueError(
            "fit(optimizer=None): pass a factory such as "
            "`lambda params: torch.optim.AdamW(params, lr=3e-4)` or {'name': 'AdamW', 'lr': 3e-4}."
        )
    if cfg.mode is None and cfg.eval_data is not None:
        infer_mode(cfg.monitor)  # fail now, not at the first eval
    return cfg


def _warn_of_workers_slurm_kills(strategy: Strategy, **loaders: Any) -> None:
    """Under SLURM, which sends SIGTERM to every process of a job step, name a DataLoader of
    the user's own whose workers that signal would kill before fit can save."""
    if "SLURM_JOB_ID" not in os.environ or not strategy.is_main:
        return
    for name, loader in loaders.items():
        if workers_die_on_sigterm(loader):
            logger.warning(
                "fit(%s=...): a DataLoader with num_workers=%d under SLURM, which sends "
                "SIGTERM to every process of the job step (preemption, time limit, scancel): "
                "its workers would die at once and the run would fail before it can finish "
                "its window and save. Pass worker_init_fn=loopkit.data."
                'keep_workers_through_sigterm to the DataLoader (docs/fit.md, "DataLoader '
                'workers"), or pass fit the Dataset with batch_size= and num_workers= to '
                "have it build the loader.",
                name,
                loader.num_workers,
            )


def _loaders(train_data: Any, cfg: FitConfig, strategy: Strategy) -> tuple[Any, Any]:
    """The train loader and the eval loader (None without eval_data) of this rank."""
    # Data-parallel rank and size: the ranks of one pipeline read the same batches; every
    # other strategy's ranks are replicas (dp_rank == rank).
    loader = make_loader(
        train_data,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        collate_fn=cfg.collate_fn,
        rank=strategy.dp_rank,
        world_size=strategy.dp_world_size,
        timeout_s=cfg.data_timeout_s,
    )
    if cfg.eval_data is None:
        return loader, None
    eval_loader = make_loader(
        cfg.eval_data,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        shuffle=False,
        seed=cfg.seed,
        collate_fn=cfg.collate_fn,
        rank=strategy.dp_rank,
        world_size=strategy.dp_world_size,
        timeout_s=cfg.data_timeout_s,
        batch_size_inherited=cfg.eval_batch_size is None,
        pad=False,  # each item once: evaluate sums over ranks, whatever each rank's share
        where="fit(eval_data=...)",
    )
    return loader, eval_loader


def _default_step(
    cfg: FitConfig,
    k: int,
    recorder: FingerprintRecorder | None = None,
    every: int = 0,
    *,
    guard: bool = False,
) -> Transform:
    """fit's own step: forward, accumulate k, clip, skip non-finite, fingerprint, optimizer step
    and the weight average (`average=`), which reads the weights the step made.

    The fingerprint sits after clip and before the update: it reads the window's final
    gradients and the weights and optimizer state that enter the step. With `guard` (several
    ranks) and nonfinite="raise", `zero_nonfinite()` sits there too: a NaN from one rank's
    loss reaches every rank's gradients through the all-reduce, and it keeps it out of the
    weights until the watch makes every rank raise together (loopkit.guards).
    """
    return chain(
        forward(cfg.loss_fn),
        accumulate(k),
        clip(cfg.clip) if cfg.clip is not None else identity(),
        skip_nonfinite() if cfg.nonfinite == "skip" else identity(),
        zero_nonfinite() if guard and cfg.nonfinite == "raise" else identity(),
        fingerprint(recorder, every=every) if recorder is not None else identity(),
        optimizer_step(),
        cfg.average if cfg.average is not None else identity(),  # reads the new weights
    )


def _fingerprint_every(cfg: FitConfig) -> int:
    """fingerprint_every as set, or its default: 1 with a log_dir (0 with step= or compile)."""
    if cfg.fingerprint_every is not None:
        return cfg.fingerprint_every
    return int(cfg.log_dir is not None and cfg.step is None and not cfg.compile)


def _with_loggers(callbacks: Sequence[Any], cfg: FitConfig) -> list[Any]:
    """The user's callbacks, then the loggers fit's settings ask for.

    Every rank gets them (they write nothing off the main rank), so every rank has as many
    callbacks as the main rank's checkpoints hold state for, and a resume fits on each.
    """
    result = list(callbacks)
    if cfg.log_dir is not None:
        log_dir = Path(cfg.log_dir)
        result += [
            TensorBoardLogger(log_dir),
            CSVLogger(log_dir / "metrics.csv"),
            JSONLLogger(log_dir / "metrics.jsonl"),
        ]
    if cfg.progress:
        result.append(ProgressBar())
    return result


def _hparams(
    cfg: FitConfig, loader: Any, k: int, train_step: Transform, max_epochs: int | None
) -> dict[str, Any]:
    """fit's settings as plain values, for `on_fit_start` and the checkpoints."""
    hparams = {
        name: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
        for name, v in cfg.items()
        if name not in ("eval_data", "callbacks")
    }
    total_steps = cfg.max_steps
    if total_steps is None and max_epochs is not None:
        try:
            total_steps = max_epochs * len(loader) // k
        except TypeError:  # an iterable without a length: the progress bar has no total
            pass
    hparams.update(
        max_steps=cfg.max_steps, total_steps=total_steps, accumulate=k, step=repr(train_step)
    )
    return hparams


class _Run:
    """One fit() run: the record being trained, the loop, and the pieces it calls.

    `state` is the current record (each step consumes it and returns the next); `result`
    collects the history. Events, in order, are those in loopkit.callbacks.
    """

    def __init__(
        self,
        state: TrainState,
        train_step: Transform,
        loader: Any,
        callbacks: Sequence[Any],
        cfg: FitConfig,
        hparams: dict[str, Any],
        evaluator: Evaluator | None,
        mode: Mode,
    ) -> None:
        self.start_s = time.perf_counter()
        self.state = state
        self.train_step = train_step
        self.loader = loader
        self.callbacks = callbacks
        self.cfg = cfg
        self.hparams = hparams
        self.result = FitResult(state)
        self.cadence = Cadence.of(cfg, has_eval=evaluator is not None)
        self.evaluator = evaluator
        self.evals = EvalTracker(cfg.monitor, mode)
        self.interrupts = Interrupts(state.strategy)
        self.fingerprints: FingerprintRecorder | None = None  # fit sets it (every rank)
        self.saver = None
        if cfg.checkpoint_dir is not None:
            self.saver = CheckpointSaver(
                cfg.checkpoint_dir, keep_last=cfg.keep_last, keep_best=cfg.keep_best
            )
        self.watch = NonfiniteWatch(  # with several ranks its check is a collective
            cfg.nonfinite,
            state.strategy,
            deferred=cfg.step is None,
            chunk=_NONFINITE_CHUNK,
            max_skips=cfg.max_nonfinite_skips,
        )
        # Micro-batches since the optimizer last stepped: more than the chain's longest
        # window means the step never trains (host-side ints, no device sync).
        self.open_micro_batches, self.max_open = 0, _largest_window(train_step)
        self.probe: _GradientProbe | None = None  # the first window's gradients, see there
        self.seen = _SeenCounters(state)

    def train(self, max_epochs: int | None) -> FitResult:
        """Claim the run's directories (loopkit._saving.claim_run), train, give them back."""
        claim = claim_run(
            checkpoint_dir=self.cfg.checkpoint_dir,
            log_dir=self.cfg.log_dir,
            resume=self.cfg.resume,
            strategy=self.state.strategy,
        )
        self.claim, self.result.run_id = claim, claim.run_id
        self.hparams["run_id"] = claim.run_id  # the loggers mark their files with it
        if self.saver is not None:
            self.saver.run_id = claim.run_id  # recorded in every checkpoint
        try:
            result = self._train(max_epochs)
        except BaseException:
            self._flush_fingerprints(failing=True)  # the steps up to a failure, for forensics
            raise
        finally:
            claim.release()  # the OS would free the lock at exit; a caller may go on
            if self.probe is not None:
                self.probe.close()  # no hook is left on the user's model
        self._flush_fingerprints()
        return result

    def _flush_fingerprints(self, *, failing: bool = False) -> None:
        """Write the buffered fingerprints (a host sync: log steps, saves and the end only)."""
        if self.fingerprints is None:
            return
        try:
            self.fingerprints.flush()
        except Exception:
            if not failing:
                raise
            logger.exception("could not write the fingerprints of the failed run")

    def _train(self, max_epochs: int | None) -> FitResult:
        """Run the epochs until max_steps, max_epochs or a callback's Stop."""
        resumed = self._resume()
        if self.fingerprints is not None:
            self.fingerprints.start(self.state.step)  # a resumed run continues its fingerprints
        if self.state.step == 0 and _GradientProbe.applies(self.cfg, self.state):
            self.probe = _GradientProbe(self.state)
        stop = dispatch(self.callbacks, "on_fit_start", self.state, self.hparams)
        epoch = self.state.epoch
        while stop is None and (max_epochs is None or epoch < max_epochs):
            if self._reached_max_steps():
                break
            stop = dispatch(self.callbacks, "on_epoch_start", self.state)
            stop = self._epoch(epoch, stop, may_be_empty=resumed)
            resumed = False
            if self.result.stopped_by or stop is not None:
                break
            epoch += 1
            stop = self._end_epoch(epoch)
        return self._finish(stop)

    def _resume(self) -> bool:
        """Pick up the checkpoint `resume=` names; whether there was one."""
        if self.cfg.resume is False:
            return False
        resumed = resume(
            self.state,
            self.loader,
            self.callbacks,
            source=self.cfg.resume,
            checkpoint_dir=self.cfg.checkpoint_dir,
            allow_data_reshard=self.cfg.allow_data_reshard,
            hparams=self.hparams,
        )
        if resumed is None:
            return False
        self.state = resumed.state
        self._warn_of_stale_averages()
        self.seen = _SeenCounters(self.state)  # the checkpoint's counters are global sums
        self.result.history = resumed.history
        self.evals.best, self.evals.evaluated_at = resumed.best, resumed.evaluated_at
        self.claim.adopt(resumed.run_id)  # the run continues under its own id
        self.result.run_id = self.hparams["run_id"] = self.claim.run_id
        if self.saver is not None:
            self.saver.saved_at = self.state.step  # on disk already
            self.saver.run_id = self.claim.run_id
        return True

    def _warn_of_stale_averages(self) -> None:
        """Say so when the checkpoint holds an average that fit's own step will not update."""
        if self.cfg.step is not None or not self.state.strategy.is_main:
            return  # a step of the user's own may hold lk.ema / lk.swa itself
        kept = average_kind_of(self.cfg.average)
        for kind, average in self.state.averages.items():
            if kind != kept:
                logger.warning(
                    "fit(resume=...): the checkpoint holds a %r average (%d updates, the last "
                    "at step %s) that this fit does not update (average=%r); evaluate and "
                    "save_model with weights=%r use it as it stands. Pass "
                    "average=loopkit.%s(...) as the run that wrote it did, to continue it.",
                    kind,
                    average.count,
                    average.updated_at,
                    self.cfg.average,
                    kind,
                    kind,
                )

    def _epoch(self, epoch: int, stop: Stop | None, *, may_be_empty: bool) -> Stop | None:
        """Train on one epoch's batches; return the latest Stop a callback asked for.

        A resumed epoch may have no batches left; any other empty epoch is an error.
        """
        _set_epoch(self.loader, epoch)
        batches = 0
        for batch in iterate(self.loader):
            batches += 1
            previous_step, previous_skips = self.state.step, self.state.skipped_steps
            self._train_step(batch, first_batch=batches == 1)
            if self.state.step == previous_step:
                self._count_open_micro_batch()
                continue  # a micro-batch inside an open window
            self.open_micro_batches = 0
            if self.probe is not None:
                self.probe.check()
                self.probe = None
            self.watch.after_step(self.state, previous_step, previous_skips)
            requests: list[Request] = []
            stop = dispatch(self.callbacks, "on_step_end", self.state, requests=requests) or stop
            request = self.cadence.merge(requests)
            stop = self._act(self.cadence.after_step(self.state.step, request)) or stop
            if self.interrupts.poll(self.state.step):  # several ranks: one host collective
                return Stop(self.interrupts.reason)
            if self._reached_max_steps() or stop is not None or request.end_epoch:
                break
        if batches == 0 and not may_be_empty:
            raise ValueError(
                "fit(train_data=...): the data yielded no batches"
                + (" in the first epoch." if epoch == 0 else f" in epoch {epoch}.")
            )
        return stop

    def _train_step(self, batch: Any, *, first_batch: bool) -> None:
        state = self.state
        try:
            self.state = self.train_step(state, batch)
        except (ValueError, TypeError):
            raise
        except Exception as error:
            if state.step == 0 and first_batch:
                raise RuntimeError(
                    f"fit: the first training step failed ({type(error).__name__}: "
                    f"{error}); nothing was trained. Check loss_fn and the batch format."
                ) from error
            raise

    def _count_open_micro_batch(self) -> None:
        """Count a micro-batch that left the optimizer step unchanged; refuse a stuck step."""
        self.open_micro_batches += 1
        if self.open_micro_batches > self.max_open:
            raise _never_steps_error(self.train_step, self.open_micro_batches, self.state.step)

    def _end_epoch(self, epoch: int) -> Stop | None:
        """Count the epoch, then run its end events; return the latest Stop asked for."""
        self.state = self.state.replace(epoch=epoch)
        requests: list[Request] = []
        stop = dispatch(self.callbacks, "on_epoch_end", self.state, requests=requests)
        request = self.cadence.merge(requests)
        plan = self.cadence.at_epoch_end(self.state.micro_step == 0, request)
        return self._act(plan) or stop

    def _reached_max_steps(self) -> bool:
        if self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps:
            self.result.stopped_by = "max_steps"
            return True
        return False

    def _act(self, plan: Plan) -> Stop | None:
        """Log, evaluate and save as `plan` says, in that order; return the latest Stop."""
        stop = self._log() if plan.log else None
        is_best = False
        if plan.evaluate:
            eval_stop, is_best = self._evaluate()
            stop = eval_stop or stop
        if plan.save or (plan.save_if_improved and is_best):
            stop = self._save() or stop
        return stop

    def _row(self, values: Mapping[str, float]) -> dict[str, float]:
        state = self.state
        elapsed_s = time.perf_counter() - self.start_s
        return {"step": state.step, "epoch": state.epoch, "time_s": elapsed_s, **values}

    def _sum_seen(self) -> None:
        """Make samples_seen / tokens_seen global sums (see _SeenCounters)."""
        self.state = self.seen.summed(self.state)

    def _log(self) -> Stop | None:
        self._sum_seen()
        # host sync: the one place train metrics leave the device, at log steps only.
        # With several processes the train metrics are reduced over ranks first (one
        # all_reduce): "train/loss" becomes the mean over every rank's items.
        train = self.state.strategy.reduce_metrics(self.state.metrics)
        values = to_host({**train, **collect_log_metrics(self.callbacks, self.state)})
        self.watch.check()
        self._flush_fingerprints()
        self.result.history.append(self._row(values))
        return dispatch(self.callbacks, "on_log", self.state, values)

    def _evaluate(self) -> tuple[Stop | None, bool]:
        """Evaluate now; return the Stop a callback asked for and whether it is the best."""
        assert self.evaluator is not None
        self._sum_seen()
        values = self.evaluator(self.state)
        is_best = self.evals.record(self.state.step, values)
        self.result.history.append(self._row(values))
        return dispatch(self.callbacks, "on_eval_end", self.state, values), is_best

    def _save(self) -> Stop | None:
        assert self.saver is not None
        self.watch.check()
        self._flush_fingerprints()  # on disk before the checkpoint that follows them
        self._sum_seen()
        path = self.saver.save(self.state, self._checkpoint_extra, self.evals.best_step)
        if path is None:
            return None
        return dispatch(self.callbacks, "on_checkpoint_saved", self.state, str(path))

    def _checkpoint_extra(self) -> dict[str, Any]:
        history, evals = self.result.history, self.evals
        return checkpoint_extra(
            self.loader,
            self.callbacks,
            history,
            evals.best,
            evals.evaluated_at,
            self.hparams,
            data_world_size=self.state.strategy.dp_world_size,
        )

    def _finish(self, stop: Stop | None) -> FitResult:
        """Say why training stopped, check the losses, evaluate the last step, end the fit."""
        if self.interrupts.poll(self.state.step):  # every rank polls: a late signal stops all
            return self._end_on_signal()
        if stop is not None:
            self.result.stopped_by = stop.reason
        elif not self.result.stopped_by:
            self.result.stopped_by = "epochs"
        if self.state.micro_step and self.state.strategy.is_main:
            logger.warning(
                "fit: the run ended with %d micro-batch(es) in an open gradient window "
                "(accumulate=%d): their gradients were never applied, so that data was not "
                "trained on. Make the run's micro-batches a multiple of %d (batch_size, "
                "drop_last, epochs) or end it by max_steps.",
                self.state.micro_step,
                self.max_open,
                self.max_open,
            )
        self.watch.check()
        if self.evaluator is not None and self.evals.evaluated_at != self.state.step:
            self._evaluate()
        self._sum_seen()
        dispatch(self.callbacks, "on_fit_end", self.state, self.result.stopped_by)
        self.result.state = self.state
        self.result.best = self.evals.best
        return self.result

    def _end_on_signal(self) -> FitResult:
        """Save this step (once), end the fit with the signal as reason, say how to resume.

        No last evaluation: the time after SIGTERM is short, and the resumed run evaluates
        where the uninterrupted one would.
        """
        self.result.stopped_by = self.interrupts.reason
        saved = None
        if self.saver is not None and self.state.micro_step == 0:
            self._save()  # nothing written if this step is on disk already
            saved = self.saver.directory / step_dir_name(self.state.step)
        self._sum_seen()
        dispatch(self.callbacks, "on_fit_end", self.state, self.result.stopped_by)
        self.result.state, self.result.best = self.state, self.evals.best
        self.interrupts.announce(self.state.step, saved, self.cfg.checkpoint_dir)
        return self.result


class _GradientProbe:
    """Whether the first window gave any trainable parameter a gradient (a host flag).

    A loss that does not depend on the parameters (a constant, or computed by a model that
    is not the one trained) gives none, and every step would leave the weights as they are
    without an error. Post-accumulate-grad hooks on the optimizer's parameters set the flag
    (host only, no sync); they are removed after the first window. Only where autograd
    accumulates into those very tensors: one device or DDP, fit's own step, not compiled.
    """

    def __init__(self, state: TrainState) -> None:
        self.reached = False
        params = [p for g in state.optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.handles = [p.register_post_accumulate_grad_hook(self._reach) for p in params]

    @staticmethod
    def applies(cfg: FitConfig, state: TrainState) -> bool:
        return (
            cfg.step is None and not cfg.compile and isinstance(state.strategy, (SingleDevice, DDP))
        )

    def _reach(self, param: torch.Tensor) -> None:
        self.reached = True

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def check(self) -> None:
        """End the probe after the first window; raise if no parameter got a gradient."""
        self.close()
        if not self.reached:
            raise ValueError(
                "fit(loss_fn=...): the first optimizer step's loss gave no gradient to any "
                "parameter the optimizer trains, so no step would change a weight. The loss "
                "must be computed from the model passed to fit (`model(batch...)` inside "
                "loss_fn), not a constant or another module's output; a frozen model trains "
                "nothing either."
            )


class _SeenCounters:
    """samples_seen and tokens_seen as sums over every rank, made so where fit syncs anyway.

    Each micro-batch adds this rank's own items to the record (no communication). At log,
    eval, save and fit end, which sync the host already, `summed` adds up over ranks what
    each rank counted since the last such point, in one all_reduce (`reduce_count`), and
    the record gets the global totals. In between it holds them plus this rank's own since.
    """

    def __init__(self, state: TrainState) -> None:
        self.samples, self.tokens = state.samples_seen, state.tokens_seen  # global here
        self.at = (state.step, state.micro_step)

    def summed(self, state: TrainState) -> TrainState:
        """`state` with global counters (the same decision on every rank: no extra call)."""
        strategy = state.strategy
        if strategy.world_size == 1 or (state.step, state.micro_step) == self.at:
            return state
        # Every stage of a pipeline counts its batch's samples, so each rank adds its share
        # dp_world_size / world_size of them; tokens are counted by the last stage only.
        share = strategy.dp_world_size / strategy.world_size
        added = [(state.samples_seen - self.samples) * share, state.tokens_seen - self.tokens]
        packed = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=strategy.device) for v in added]
        )
        # host sync: at log/eval/save/fit end only, where fit syncs anyway.
        samples, tokens = torch.as_tensor(strategy.reduce_count(packed)).tolist()
        self.samples = self.samples + round(samples)
        self.tokens = _plus(self.tokens, tokens, like=state.tokens_seen)
        self.at = (state.step, state.micro_step)
        return state.replace(samples_seen=self.samples, tokens_seen=self.tokens)


def _plus(base: Any, added: float, *, like: Any) -> Any:
    """`base + added` as the kind of number `like` is (an int, a float or a tensor)."""
    is_float = (
        like.is_floating_point() if isinstance(like, torch.Tensor) else isinstance(like, float)
    )
    value = base + (added if is_float else round(added))
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value


_ACCUMULATE: type[Any] = type(accumulate(1))
"""The class behind the public `accumulate` factory (its instances hold `k`)."""


def _largest_window(step: Transform) -> int:
    """The longest window (micro-batches) any `accumulate(k)` in `step` closes; 1 if none.

    Looks through chains and conditionals (`every`, `when`); a part of the user's own is
    opaque, so a window it closes itself must be no longer than this.
    """
    longest = 1
    for part in parts_of(step):
        inner = inner_of(part)
        if inner is not None:
            longest = max(longest, _largest_window(inner))
        elif isinstance(part, _ACCUMULATE):
            longest = max(longest, part.k)
    return longest


def _never_steps_error(step: Transform, micro_batches: int, at_step: int) -> ValueError:
    """The error for a step chain under which the optimizer stopped stepping."""
    longest = _largest_window(step)
    return ValueError(
        f"fit(step={step!r}): {micro_batches} micro-batches ran without an optimizer step "
        f"(state.step stayed {at_step}; the chain's longest window is {longest} "
        "micro-batch(es)), so nothing trains. The chain must close each window with "
        "accumulate(k) and apply it with optimizer_step(), e.g. chain(forward(loss_fn), "
        "accumulate(1), optimizer_step()). A part of your own that steps the optimizer must "
        "return the record with `step` advanced; a longer window must show as accumulate(k) "
        "in the chain."
    )


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell the sampler (an EpochSampler, a DistributedSampler) which epoch's order to read."""
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


__all__ = ["FitResult", "fit"]
