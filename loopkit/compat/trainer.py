"""Trainer: an HF-style class-based trainer, as a thin layer over loopkit.fit().

`Trainer.train()` builds one step chain from loopkit's public transforms (steps.py) and
calls `fit()` once; there is no second training loop. What HF's Trainer does around its
loop (the callback events, log / evaluate / save decisions, best-model tracking,
checkpoint rotation) runs in two loopkit callbacks (bridge.py), which see the Trainer
through `TrainerHost`. Checkpoints are loopkit's (safetensors + JSON, atomic, exact
resume), written by fit() into `output_dir`. The pieces the Trainer composes: inputs.py
(collators, loaders, batches), losses.py (loss adapters), evaluation.py, optimizers.py,
checkpoints.py, runtime.py and reporting.py.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..fit import FitResult, fit
from ..state import TrainState
from ..strategies import Strategy, unwrap
from .args import TrainingArguments
from .bridge import Bridge, StopWhenAsked
from .callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerControl,
    TrainerState,
)
from .checkpoints import keep_only_best, load_best_model, resume_path, save_model_dir
from .evaluation import (
    EvalPrediction,
    EvalResult,
    EvalView,
    PredictionCollector,
    PredictionOutput,
    check_eval_settings,
    eval_items,
    run_evaluation,
)
from .inputs import (
    batch_reader,
    default_collator,
    eval_loader,
    has_labels,
    label_names,
    train_loader,
)
from .losses import EvalLoss, ForwardOutputs, TrainLoss, model_loss, passes_num_items
from .optimizers import check_optimizers, make_optimizer, make_schedule
from .reporting import Reporters, speed_metrics
from .runtime import precision_of, prepare_model, resolve_strategy, set_seed
from .steps import RunLength, run_length, train_samples, train_step


class TrainOutput(NamedTuple):
    """What Trainer.train() returns, as in HF."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


class Trainer:
    """Train, evaluate and save a model with HF Trainer's API, on loopkit.fit().

    A script written for HF's `Trainer` runs by changing its imports; the training is the
    same (schedule, AdamW with decay on weights only, clipping, gradient accumulation
    normalised over each window's items, data order), not a look-alike. See
    docs/migrating.md for the names side by side and what differs.

    Args:
        model: the module to train. Its forward takes the batch's keys (a dict batch) or
            its elements (a tuple batch) and, with labels in the batch, returns a dict or
            object with `.loss` (or a tuple whose first element is the loss); otherwise
            pass `loss_fn`.
        args: TrainingArguments, or a plain dict of its fields (unknown names raise).
        data_collator: builds a batch from a list of samples; default: HF's
            default_data_collator (or `processing_class.pad` when it has one).
        train_dataset / eval_dataset: map-style or iterable datasets (eval_dataset may be a
            dict of them).
        processing_class: a tokenizer or processor; saved with save_model when it has
            `save_pretrained`.
        model_init: a function returning a fresh model (called after seeding).
        compute_metrics: `EvalPrediction -> dict[str, float]`, on numpy arrays gathered
            over the whole eval set (all ranks).
        callbacks: TrainerCallback objects or classes, called in the order given, after
            DefaultFlowCallback.
        optimizers: (optimizer, lr_scheduler); an optimizer built on the model's parameters
            and/or a torch LRScheduler on it. None: AdamW and the args' schedule.
        optimizer_factory: `params -> Optimizer` (loopkit's factory, required by FSDP).
        optimizer_cls_and_kwargs: (optimizer class, kwargs): built on HF's two decay groups.
        lr_scheduler_factory: `(num_warmup_steps=..., num_training_steps=...) -> schedule`,
            e.g. a loopkit.schedules class.
        strategy: any loopkit Strategy (SingleDevice, DDP, FSDP, Pipeline); None picks
            SingleDevice, or DDP under torchrun, or Pipeline from the pipeline_* args.
        loss_fn: loopkit's `loss_fn(model, batch) -> Loss(sum, count) | mean`, for models
            that do not compute their loss.
        preprocess_logits_for_metrics: `(logits, labels) -> logits`, per eval batch.
        compute_loss_func: HF's `(outputs, labels, num_items_in_batch) -> loss`.

    Raises:
        ValueError / TypeError: a bad argument or combination, naming it, before any work.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | Mapping[str, Any] | None = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[[], torch.nn.Module] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        lr_scheduler_factory: Callable[..., Any] | None = None,
        strategy: Strategy | None = None,
        loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
        *,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.args = _arguments(args)
        set_seed(self.args.seed)
        self.model_init = model_init
        self.model = _first_model(model, model_init)
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.data_collator = data_collator or default_collator(self.processing_class)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        _check_callables(
            compute_metrics=compute_metrics,
            loss_fn=loss_fn,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            compute_loss_func=compute_loss_func,
            optimizer_factory=optimizer_factory,
            lr_scheduler_factory=lr_scheduler_factory,
        )
        self.compute_metrics = compute_metrics
        self.loss_fn = loss_fn
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.compute_loss_func = compute_loss_func
        check_optimizers(
            optimizers, optimizer_factory, optimizer_cls_and_kwargs, lr_scheduler_factory
        )
        self.optimizers = tuple(optimizers)
        self.optimizer_factory = optimizer_factory
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.lr_scheduler_factory = lr_scheduler_factory
        self.strategy = resolve_strategy(self.args, strategy)
        check_eval_settings(self.args, eval_dataset, compute_metrics)
        progress = PrinterCallback if self.args.disable_tqdm else ProgressCallback
        self.callback_handler = CallbackHandler([DefaultFlowCallback, *(callbacks or []), progress])
        self.state = TrainerState()
        self.control = TrainerControl()
        self._live_state: TrainState | None = None  # fit's record, once train() ran
        self._compiled = False
        self._eval_loaders: dict[int, Any] = {}
        self._ignore_keys_for_eval: list[str] = []
        self._reporters = Reporters(self.args, self.strategy)
        self.callback_handler.shared.update(
            model=self.model, processing_class=self.processing_class
        )
        self._call_event("on_init_end")

    def _call_event(self, event: str, **kwargs: Any) -> None:
        self.control = self.callback_handler.call(
            event, self.args, self.state, self.control, **kwargs
        )

    # -- callbacks ---------------------------------------------------------------------

    def add_callback(self, callback: Any) -> None:
        """Add a TrainerCallback (instance or class); it runs after those already added."""
        self.callback_handler.add(callback)

    def pop_callback(self, callback: Any) -> Any:
        """Remove and return a callback (an instance, or the first of a class); None if absent."""
        return self.callback_handler.pop(callback)

    def remove_callback(self, callback: Any) -> None:
        """Remove a callback (an instance, or the first of a class)."""
        self.callback_handler.remove(callback)

    def attach_train_state(self, state: TrainState) -> None:
        """Use fit's live record from now on: evaluation runs on its (wrapped) model, and the
        callbacks get its optimizer and schedule. The bridge calls it at each fit event."""
        self._live_state = state
        self.callback_handler.shared.update(
            model=self.model, optimizer=state.optimizer, lr_scheduler=state.schedule
        )

    # -- loss --------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Any,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The model's loss on `inputs`, as HF's Trainer.compute_loss (override it freely).

        With `num_items_in_batch` (the Trainer passes 1 when the model takes it), the model
        returns the summed loss; otherwise its mean.
        """
        loss, outputs = model_loss(
            model,
            inputs,
            compute_loss_func=self.compute_loss_func,
            label_name=label_names(self.args)[0],
            num_items_in_batch=num_items_in_batch,
        )
        return (loss, outputs) if return_outputs else loss

    def _train_loss(self) -> TrainLoss:
        reader = batch_reader(self.model, self.args)
        pass_num_items = self.loss_fn is None and passes_num_items(
            reader,
            compute_loss_func=self.compute_loss_func,
            compute_loss_overridden=type(self).compute_loss is not Trainer.compute_loss,
        )
        return TrainLoss(self.compute_loss, reader, pass_num_items, self.loss_fn)

    # -- train -------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Train with loopkit.fit(); return TrainOutput(global_step, training_loss, metrics).

        Args:
            resume_from_checkpoint: True (the newest valid checkpoint in output_dir), a
                checkpoint directory (HF's `checkpoint-500` name is accepted), or None (then
                TrainingArguments.resume_from_checkpoint). Resume is exact: the run ends
                with the same weights as one never interrupted.

        Raises:
            ValueError: no train_dataset, no checkpoint to resume from, a dataset without a
                length and no max_steps, or a bad setting found now (before any step).
        """
        if kwargs:
            raise TypeError(f"Trainer.train() got unexpected arguments {sorted(kwargs)}.")
        if trial is not None:
            raise ValueError("Trainer.train(trial=...): hyperparameter search is not supported.")
        args = self.args
        if self.train_dataset is None:
            raise ValueError("Trainer.train(): needs Trainer(train_dataset=...).")
        resume = resume_path(args, resume_from_checkpoint)
        if self.model_init is not None:
            set_seed(args.seed)
            self.model = self.model_init()
            self.callback_handler.shared["model"] = self.model
        self._ignore_keys_for_eval = list(ignore_keys_for_eval or [])
        self._compiled = prepare_model(self.model, args, compiled=self._compiled)
        loader = train_loader(self.train_dataset, args, self.strategy, self.data_collator)
        run = run_length(args, loader)
        bridge = Bridge(self, run)
        step = train_step(bridge, self._train_loss(), run, args.max_grad_norm)
        self.state = TrainerState()
        self.control = TrainerControl()
        self.callback_handler.shared.update(train_dataloader=loader)
        start = time.time()
        result = fit(
            self.model,
            loader,
            step=step,
            optimizer=make_optimizer(
                self.model,
                args,
                optimizer=self.optimizers[0],
                factory=self.optimizer_factory,
                cls_and_kwargs=self.optimizer_cls_and_kwargs,
            ),
            schedule=make_schedule(
                args, run.max_steps, scheduler=self.optimizers[1], factory=self.lr_scheduler_factory
            ),
            # With a length, fit runs whole epochs and the Trainer's flow stops it at
            # max_steps (so that HF's epoch-end events still run); without, fit stops itself.
            epochs=run.epochs,
            max_steps=run.max_steps if run.batches_per_epoch is None else None,
            precision=precision_of(args).name,
            strategy=self.strategy,
            seed=args.seed,
            checkpoint_dir=args.output_dir,
            resume=resume or False,
            callbacks=[bridge, StopWhenAsked(bridge)],
            log_every=None,
            progress=False,
        )
        return self._finish(result, bridge, run, start)

    def _finish(
        self, result: FitResult, bridge: Bridge, run: RunLength, start: float
    ) -> TrainOutput:
        """After fit(): the best model, the train metrics (logged), HF's last rotation."""
        self._live_state = result.state
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            load_best_model(self.model, self.state)
        loss_total = bridge.loss_total + bridge.unlogged_loss(result.state)  # host sync: once
        train_loss = loss_total / max(self.state.global_step, 0.001)
        metrics = speed_metrics(
            "train",
            start,
            train_samples(self.args, self.train_dataset, run, self.strategy.world_size),
            run.max_steps,
        )
        metrics["total_flos"] = float(self.state.total_flos)
        metrics["train_loss"] = train_loss
        self.log(metrics)
        keep_only_best(self.args, self.state)
        self._call_event("on_train_end")
        self._reporters.close()
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- logging -----------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record `logs` in state.log_history (with epoch and step) and call on_log."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._call_event("on_log", logs=logs)
        self._reporters.log(logs, step=self.state.global_step, epoch=self.state.epoch)

    # -- evaluation --------------------------------------------------------------------

    def _eval_view(self) -> EvalView:
        live = self._live_state
        if live is not None:
            return EvalView(live.model, live.strategy, live.precision)
        self.model.to(self.strategy.device)
        return EvalView(self.model, self.strategy, precision_of(self.args))

    def _eval_loader(self, dataset: Any) -> Any:
        key = id(dataset)
        if key not in self._eval_loaders:
            self._eval_loaders[key] = eval_loader(
                dataset, self.args, self.strategy, self.data_collator
            )
        return self._eval_loaders[key]

    def _evaluation(
        self, dataset: Any, ignore_keys: list[str] | None, prefix: str, want_predictions: bool
    ) -> EvalResult:
        loader = self._eval_loader(dataset)
        self.callback_handler.shared["eval_dataloader"] = loader
        reader = batch_reader(self.model, self.args)
        labelled = has_labels(dataset, loader, self.data_collator, reader)
        collector = None
        if want_predictions:
            collector = PredictionCollector(
                reader.labels,
                self.preprocess_logits_for_metrics,
                list(ignore_keys or self._ignore_keys_for_eval),
                has_loss=labelled and self.loss_fn is None,
            )
        if not labelled and collector is None:
            return EvalResult(None, None, {}, None)
        return run_evaluation(
            self._eval_view(),
            loader,
            loss_fn=EvalLoss(self.compute_loss, reader, self.loss_fn) if labelled else None,
            predict=ForwardOutputs(reader),
            collector=collector,
            compute_metrics=self.compute_metrics,
            prefix=prefix,
            n_items=eval_items(dataset, self.args),
        )

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Evaluate on eval_dataset (default: the Trainer's); return metrics named "eval_*".

        The loss is the model's mean loss per batch weighted by batch size, as HF reports
        it; compute_metrics sees the predictions of the whole set. Logs the metrics and
        calls on_evaluate.

        Raises:
            ValueError: no eval dataset.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate(): needs eval_dataset=... here or in Trainer(...).")
        if isinstance(dataset, Mapping):
            merged: dict[str, float] = {}
            for name, part in dataset.items():
                merged.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return merged
        start = time.time()
        want = self.compute_metrics is not None and not self.args.prediction_loss_only
        result = self._evaluation(dataset, ignore_keys, metric_key_prefix, want)
        metrics, n_items = result.metrics, result.n_items
        world_batch = self.args.per_device_eval_batch_size * self.strategy.world_size
        steps = None if n_items is None else math.ceil(n_items / world_batch)
        metrics.update(speed_metrics(metric_key_prefix, start, n_items, steps))
        self.log(metrics)
        self._call_event("on_evaluate", metrics=metrics)
        return metrics

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
    ) -> PredictionOutput:
        """Predictions (and metrics, when the dataset has labels) on `test_dataset`."""
        start = time.time()
        result = self._evaluation(test_dataset, ignore_keys, metric_key_prefix, True)
        metrics, n_items = result.metrics, result.n_items
        steps = (
            None if n_items is None else math.ceil(n_items / self.args.per_device_eval_batch_size)
        )
        metrics.update(speed_metrics(metric_key_prefix, start, n_items, steps))
        self._call_event("on_predict", metrics=metrics)
        return PredictionOutput(result.predictions, result.label_ids, metrics)

    # -- saving ------------------------------------------------------------------------

    def unwrapped_model(self) -> torch.nn.Module:
        """The user's module (inside DDP / torch.compile wrappers)."""
        return unwrap(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the weights (safetensors), the processing class and the arguments (JSON).

        A model with `save_pretrained` (an HF PreTrainedModel) saves itself that way;
        others as loopkit.save_model: `model.safetensors` + `config.json`, loadable with
        `model.load_state_dict(safetensors.torch.load_file(...))`. The main process writes.
        """
        if self.strategy.is_main:
            directory = output_dir if output_dir else str(self.args.output_dir)
            save_model_dir(self.unwrapped_model(), self.processing_class, self.args, directory)

    def save_state(self) -> None:
        """Write the TrainerState to `output_dir/trainer_state.json` (main process)."""
        if self.strategy.is_main:
            directory = str(self.args.output_dir)
            os.makedirs(directory, exist_ok=True)
            self.state.save_to_json(os.path.join(directory, "trainer_state.json"))

    def is_world_process_zero(self) -> bool:
        """Whether this is the main process (rank 0)."""
        return self.strategy.is_main


def _arguments(args: TrainingArguments | Mapping[str, Any] | None) -> TrainingArguments:
    if args is None:
        return TrainingArguments()
    if isinstance(args, Mapping):
        return TrainingArguments.from_dict(args)
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"Trainer(args={type(args).__name__}): expected loopkit.compat."
            "TrainingArguments or a dict of its fields."
        )
    return args


def _first_model(
    model: torch.nn.Module | None, model_init: Callable[[], torch.nn.Module] | None
) -> torch.nn.Module:
    if model is None:
        if model_init is None:
            raise ValueError(
                "Trainer(model=None, model_init=None): pass model=... or model_init=..."
            )
        model = model_init()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Trainer(model={type(model).__name__}): expected a torch.nn.Module.")
    return model


def _check_callables(**functions: Any) -> None:
    for name, fn in functions.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"Trainer({name}={fn!r}): expected a callable.")


__all__ = ["EvalPrediction", "PredictionOutput", "TrainOutput", "Trainer"]
