"""Trainer: an HF-style class-based trainer, as a thin layer over loopkit.fit().

`Trainer.train()` builds one step chain from loopkit's public transforms (steps.py) and
calls `fit()` once; there is no second training loop. What HF's Trainer does around its
loop (the callback events, log / evaluate / save decisions, best-model tracking,
checkpoint names and rotation, FLOPs and token counts) runs in two loopkit callbacks
(bridge.py), which see the Trainer through `TrainerHost`. Checkpoints are loopkit's
(safetensors + JSON, atomic, exact resume), written by fit() and named `checkpoint-N`
in `output_dir`. The pieces the Trainer composes: inputs.py (datasets, columns,
collators, loaders), losses.py (loss adapters), evaluation.py, optimizers.py,
checkpoints.py, runtime.py, memory.py and reporting.py; members.py holds the smaller
HF members.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..checkpoint import save_model as save_model_file
from ..fit import FitResult, fit
from ..state import TrainState
from ..strategies import Pipeline, Strategy, unwrap
from . import members
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
from .checkpoints import (
    keep_only_best,
    load_best_model,
    prepare_output_dir,
    resume_path,
    save_extras,
    save_model_dir,
    write_model_config,
)
from .evaluation import (
    EvalPrediction,
    EvalResult,
    EvalView,
    FiniteLoss,
    PredictionCollector,
    PredictionOutput,
    check_eval_settings,
    eval_items,
    run_evaluation,
)
from .inputs import (
    batch_reader,
    collator_for,
    dataset_for_model,
    default_collator,
    eval_batches_per_rank,
    eval_loader,
    has_labels,
    label_names,
    train_loader,
)
from .losses import (
    EvalLoss,
    ForwardOutputs,
    TrainLoss,
    accepts_loss_kwargs,
    model_loss,
    passes_num_items,
)
from .members import Refused
from .memory import MemoryTracker
from .optimizers import builtin_optimizer, check_optimizers, make_optimizer, make_schedule
from .reporting import Reporters, speed_metrics
from .runtime import (
    COMPAT_LOGGER,
    HF_LOGGER,
    activate_neftune,
    apply_log_level,
    deactivate_neftune,
    precision_of,
    prepare_model,
    resolve_strategy,
    seed_run,
    set_use_cache,
)
from .steps import RunLength, run_length, train_samples, train_step

logger = logging.getLogger(COMPAT_LOGGER)
hf_logger = logging.getLogger(HF_LOGGER)


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
    docs/migrating.md for every argument and member side by side and what differs.

    Args:
        model: the module to train. Its forward takes the batch's keys (a dict batch) or
            its elements (a tuple batch) and, with labels in the batch, returns a dict or
            object with `.loss` (or a tuple whose first element is the loss); otherwise
            pass `loss_fn`.
        args: TrainingArguments, or a plain dict of its fields (unknown names raise).
        data_collator: builds a batch from a list of samples; default: HF's
            default_data_collator, or DataCollatorWithPadding with a tokenizer.
        train_dataset: any object with `__len__` and `__getitem__` (a torch Dataset, an HF
            `datasets.Dataset`, a list), or an iterable dataset.
        eval_dataset: the same kind of dataset, or a dict of them.
        processing_class: a tokenizer or processor; saved with save_model when it has
            `save_pretrained`.
        model_init: a function returning a fresh model (called after seeding, and again at
            each train()).
        compute_loss_func: HF's `(outputs, labels, num_items_in_batch) -> loss`.
        compute_metrics: `EvalPrediction -> dict[str, float]`, on numpy arrays gathered
            over the whole eval set (all ranks); with batch_eval_metrics, per batch.
        callbacks: TrainerCallback objects or classes, called in the order given, after
            DefaultFlowCallback.
        optimizers: (optimizer, lr_scheduler); an optimizer built on the model's parameters
            and/or a torch LRScheduler on it. None: args.optim and the args' schedule.
        optimizer_cls_and_kwargs: (optimizer class, kwargs): built on HF's two decay groups.
        preprocess_logits_for_metrics: `(logits, labels) -> logits`, per eval batch.
        optimizer_factory: (loopkit) `params -> Optimizer`, as FSDP needs.
        lr_scheduler_factory: (loopkit) `(num_warmup_steps=..., num_training_steps=...) ->
            schedule`, e.g. a loopkit.schedules class.
        strategy: (loopkit) any Strategy (SingleDevice, DDP, FSDP, Pipeline); None picks
            SingleDevice, or DDP under torchrun, or Pipeline from the pipeline_* args.
        loss_fn: (loopkit) `loss_fn(model, batch) -> Loss(sum, count) | mean`, for models
            that do not compute their loss.
        tokenizer: HF's name for processing_class before transformers 4.46.

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
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        compute_metrics: Callable[..., Any] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
        *,
        optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
        lr_scheduler_factory: Callable[..., Any] | None = None,
        strategy: Strategy | None = None,
        loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.args = _arguments(args)
        self.strategy = resolve_strategy(self.args, strategy)
        self._memory = MemoryTracker(not self.args.skip_memory_metrics, self.strategy.device)
        self._memory.start("init")
        apply_log_level(self.args)
        if self.args.max_steps > 0 and self.args.num_train_epochs > 0:
            hf_logger.info(
                "max_steps is given, it will override any value given in num_train_epochs"
            )
        seed_run(self.args)
        self.model_init = model_init
        self.model = _first_model(model, model_init)
        self.processing_class = processing_class if processing_class is not None else tokenizer
        _check_collator(data_collator)
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
        self.model_accepts_loss_kwargs = accepts_loss_kwargs(self.model)
        check_eval_settings(self.args, eval_dataset, compute_metrics)
        if compute_metrics is not None and not self.args.prediction_loss_only:
            _refuse_pipeline_predictions(self.strategy, "Trainer(compute_metrics=...)")
        self._init_state(callbacks)
        set_use_cache(self.model, self.args)
        self._memory.stop("init")

    def _init_state(self, callbacks: list[Any] | None) -> None:
        progress = PrinterCallback if self.args.disable_tqdm else ProgressCallback
        self.callback_handler = CallbackHandler([DefaultFlowCallback, *(callbacks or []), progress])
        self.state = TrainerState()
        self.control = TrainerControl()
        self.is_in_train = False
        self.neftune_noise_alpha = self.args.neftune_noise_alpha
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
            label_name=label_names(self.args, self.model)[0],
            num_items_in_batch=num_items_in_batch,
        )
        return (loss, outputs) if return_outputs else loss

    def _train_loss(self) -> TrainLoss:
        reader = batch_reader(self.model, self.args)
        pass_num_items = self.loss_fn is None and passes_num_items(
            self.model_accepts_loss_kwargs,
            compute_loss_func=self.compute_loss_func,
            compute_loss_overridden=type(self).compute_loss is not Trainer.compute_loss,
        )
        batch_items = self.loss_fn is None and self.compute_loss_func is not None
        return TrainLoss(self.compute_loss, reader, pass_num_items, self.loss_fn, batch_items)

    # -- train -------------------------------------------------------------------------

    def get_train_dataloader(self) -> Any:
        """The training loader (override to feed your own): train_dataset without the
        columns forward does not take, collated, shuffled per epoch, this rank's share."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train(): needs Trainer(train_dataset=...).")
        dataset = dataset_for_model(self.train_dataset, self.model, self.args)
        collate = collator_for(self.data_collator, dataset, self.model, self.args)
        return train_loader(dataset, self.args, self.strategy, collate)

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Train with loopkit.fit(); return TrainOutput(global_step, training_loss, metrics).

        Args:
            resume_from_checkpoint: True (the newest valid checkpoint-N in output_dir), a
                checkpoint directory, or None (then TrainingArguments.resume_from_checkpoint).
                Resume is exact: the run ends with the same weights as one never
                interrupted. A fresh run moves an earlier run's checkpoints in output_dir
                aside (deletes them with overwrite_output_dir=True).
            ignore_keys_for_eval: output keys that are not predictions, for the evaluations
                during training.

        Raises:
            ValueError: no train_dataset, no checkpoint to resume from, a dataset without a
                length and no max_steps, or a bad setting found now (before any step).
        """
        if kwargs:
            raise TypeError(f"Trainer.train() got unexpected arguments {sorted(kwargs)}.")
        if trial is not None:
            raise ValueError(
                "Trainer.train(trial=...): not supported by loopkit.compat: hyperparameter "
                "search (run one Trainer per trial from your search loop)."
            )
        self._memory.start("train")
        try:
            return self._train(resume_from_checkpoint, ignore_keys_for_eval)
        except BaseException:
            self._memory.stop("train")  # the sampling thread ends with the run
            raise

    def _train(
        self, resume_from_checkpoint: str | bool | None, ignore_keys_for_eval: list[str] | None
    ) -> TrainOutput:
        args = self.args
        resume = resume_path(args, resume_from_checkpoint)
        self._fresh_model()
        self._ignore_keys_for_eval = list(ignore_keys_for_eval or [])
        self._compiled = prepare_model(self.model, args, compiled=self._compiled)
        loader = self.get_train_dataloader()
        run = run_length(args, loader)
        if self.strategy.is_main:
            prepare_output_dir(args, resume)
        # Every rank, as HF: log_level / log_level_replica decide what shows.
        _log_start(args, loader, run, self.get_num_trainable_parameters(), self.strategy)
        self.state, self.control = TrainerState(), TrainerControl()
        self.callback_handler.shared.update(train_dataloader=loader)
        start = time.time()
        bridge = Bridge(self, run, start)
        neftune = (
            activate_neftune(self.model, self.neftune_noise_alpha)
            if self.neftune_noise_alpha is not None
            else None
        )
        self.is_in_train = True
        try:
            result = self._fit(loader, run, bridge, resume)
        finally:
            self.is_in_train = False
            if neftune is not None:
                deactivate_neftune(self.model, neftune)
        return self._finish(result, bridge, run, start)

    def _fresh_model(self) -> None:
        """HF: with model_init, each train() starts from a fresh model, seeded first."""
        if self.model_init is None:
            return
        seed_run(self.args)
        self.model = self.call_model_init()
        self.model_accepts_loss_kwargs = accepts_loss_kwargs(self.model)
        set_use_cache(self.model, self.args)
        self._compiled = False
        self.callback_handler.shared["model"] = self.model

    def _fit(self, loader: Any, run: RunLength, bridge: Bridge, resume: str | None) -> FitResult:
        args = self.args
        return fit(
            self.model,
            loader,
            step=train_step(bridge, self._train_loss(), run, args.max_grad_norm),
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
            # HF keeps training on a NaN/inf loss (logging_nan_inf_filter filters the log).
            # "skip" only stops fit from raising: this chain has no skip_nonfinite, so every
            # update is applied, as in HF; fp16 overflow skips never stop the run either.
            nonfinite="skip",
            max_nonfinite_skips=2**62,
            callbacks=[bridge, StopWhenAsked(bridge)],
            log_every=None,
            progress=False,
        )

    def _finish(
        self, result: FitResult, bridge: Bridge, run: RunLength, start: float
    ) -> TrainOutput:
        """After fit(): the train metrics (logged), the best model, HF's last rotation."""
        self._live_state = result.state
        loss_total = bridge.loss_total + bridge.unlogged_loss(result.state)  # host sync: once
        train_loss = loss_total / max(self.state.global_step, 0.001)
        metrics = speed_metrics(
            "train",
            start,
            train_samples(self.args, self.train_dataset, run, self.strategy.dp_world_size),
            run.max_steps,
        )
        bridge.store_counts(result.state)
        metrics["total_flos"] = float(self.state.total_flos)
        metrics["train_loss"] = train_loss
        self._memory.stop("train", metrics)
        self.log(metrics)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            load_best_model(self.model, self.state)
        keep_only_best(self.args, self.state)
        hf_logger.info(
            "\n\nTraining completed. Do not forget to share your model on "
            "huggingface.co/models =)\n\n"
        )
        self._call_event("on_train_end")
        self._reporters.close()
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- logging -----------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record `logs` in state.log_history (with epoch and step) and call on_log.

        With include_num_input_tokens_seen, the logs carry num_input_tokens_seen (and,
        given `start_time`, HF's train_tokens_per_second).
        """
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                logs.update(
                    speed_metrics("train", start_time, num_tokens=self.state.num_input_tokens_seen)
                )
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

    def _named_eval_set(self, eval_dataset: Any) -> Any:
        """`eval_dataset`, the Trainer's when None, or (a str, as HF takes it) the set of
        that name in the Trainer's dict eval_dataset.

        Raises:
            ValueError: a str that names no set of the Trainer's eval_dataset.
        """
        if eval_dataset is None:
            return self.eval_dataset
        if not isinstance(eval_dataset, str):
            return eval_dataset
        sets = self.eval_dataset
        if not isinstance(sets, Mapping) or eval_dataset not in sets:
            names = sorted(sets) if isinstance(sets, Mapping) else []
            raise ValueError(
                f"Trainer.evaluate(eval_dataset={eval_dataset!r}): a str names one of the sets "
                f"of Trainer(eval_dataset={{...}}), whose names are {names}; pass one of "
                "those, or a dataset."
            )
        return sets[eval_dataset]

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """An evaluation loader (dataset order, this rank's share); kept per dataset.

        `eval_dataset` may name one of a dict eval_dataset's sets (HF).
        """
        dataset = self._named_eval_set(eval_dataset)
        if dataset is None:
            raise ValueError("Trainer.evaluate(): needs eval_dataset=... here or in Trainer(...).")
        key = id(dataset)
        if key not in self._eval_loaders:
            prepared = dataset_for_model(dataset, self.model, self.args)
            collate = collator_for(self.data_collator, prepared, self.model, self.args)
            self._eval_loaders[key] = (
                eval_loader(prepared, self.args, self.strategy, collate),
                prepared,
                collate,
            )
        return self._eval_loaders[key][0]

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        """A prediction loader over `test_dataset` (as get_eval_dataloader)."""
        return self.get_eval_dataloader(test_dataset)

    def _evaluation(
        self,
        dataset: Any,
        ignore_keys: list[str] | None,
        prefix: str,
        want_predictions: bool,
        description: str = "Evaluation",
    ) -> EvalResult:
        dataset = self._named_eval_set(dataset)
        loader = self.get_eval_dataloader(dataset)
        _, prepared, collate = self._eval_loaders[id(dataset)]
        _log_evaluation(description, loader, self.args.per_device_eval_batch_size)
        self.callback_handler.shared["eval_dataloader"] = loader
        reader = batch_reader(self.model, self.args)
        labelled = has_labels(prepared, loader, collate, reader)
        collector = None
        if want_predictions:
            _refuse_pipeline_predictions(self.strategy, f"Trainer.{description.lower()}")
            shares = eval_batches_per_rank(loader)
            _check_batch_shares(self.args, self.strategy, shares)
            collector = PredictionCollector(
                reader.labels,
                self.preprocess_logits_for_metrics,
                list(ignore_keys or self._ignore_keys_for_eval),
                has_loss=labelled and self.loss_fn is None,
                batch_metrics=self.compute_metrics if self.args.batch_eval_metrics else None,
                strategy=self.strategy,
                batches_per_rank=None if shares is None else shares[0],
            )
        if not labelled and collector is None:
            return EvalResult(None, None, {}, None)
        view = self._eval_view()
        finite = FiniteLoss(view.strategy.device) if self.args.logging_nan_inf_filter else None
        return run_evaluation(
            view,
            loader,
            loss_fn=EvalLoss(self.compute_loss, reader, self.loss_fn, finite) if labelled else None,
            predict=ForwardOutputs(reader),
            collector=collector,
            compute_metrics=self.compute_metrics,
            prefix=prefix,
            n_items=eval_items(dataset, self.args),
            finite=finite if labelled else None,
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
        dataset = self._named_eval_set(eval_dataset)
        if dataset is None:
            raise ValueError("Trainer.evaluate(): needs eval_dataset=... here or in Trainer(...).")
        if isinstance(dataset, Mapping):
            merged: dict[str, float] = {}
            for name, part in dataset.items():
                merged.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return merged
        self._memory.start("eval")
        start = time.time()
        want = self.compute_metrics is not None and not self.args.prediction_loss_only
        result = self._evaluation(dataset, ignore_keys, metric_key_prefix, want)
        metrics, n_items = result.metrics, result.n_items
        world_batch = self.args.per_device_eval_batch_size * self.strategy.dp_world_size
        steps = None if n_items is None else math.ceil(n_items / world_batch)
        metrics.update(speed_metrics(metric_key_prefix, start, n_items, steps))
        self.log(metrics)
        self._call_event("on_evaluate", metrics=metrics)
        self._memory.stop("eval", metrics)
        return metrics

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
    ) -> PredictionOutput:
        """Predictions (and metrics, when the dataset has labels) on `test_dataset`."""
        self._memory.start("test")
        start = time.time()
        result = self._evaluation(test_dataset, ignore_keys, metric_key_prefix, True, "Prediction")
        metrics, n_items = result.metrics, result.n_items
        world_batch = self.args.per_device_eval_batch_size * self.strategy.dp_world_size
        steps = None if n_items is None else math.ceil(n_items / world_batch)
        metrics.update(speed_metrics(metric_key_prefix, start, n_items, steps))
        self._call_event("on_predict", metrics=metrics)
        self._memory.stop("test", metrics)
        return PredictionOutput(result.predictions, result.label_ids, metrics)

    # -- saving ------------------------------------------------------------------------

    def unwrapped_model(self) -> torch.nn.Module:
        """The user's module (inside DDP / torch.compile wrappers)."""
        return unwrap(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the weights (safetensors), the processing class and the arguments (JSON).

        A model with `save_pretrained` (an HF PreTrainedModel) saves itself that way;
        others as loopkit.save_model: `model.safetensors` + `config.json`, loadable with
        `model.load_state_dict(safetensors.torch.load_file(...))`. Where the ranks hold
        parts of the trained model (FSDP, Pipeline) this is a collective: every rank calls
        it, the whole model gathers on the main rank, which writes.
        """
        directory = output_dir if output_dir else str(self.args.output_dir)
        live, strategy = self._live_state, self.strategy
        if (
            live is not None
            and strategy.world_size > 1
            and (strategy.is_sharded or strategy.dp_world_size != strategy.world_size)
        ):
            save_model_file(live, directory)  # every rank: the gather is a collective
            if strategy.is_main:
                write_model_config(self.model, directory)
                save_extras(self.processing_class, self.args, directory)
            return
        if strategy.is_main:
            save_model_dir(self.unwrapped_model(), self.processing_class, self.args, directory)

    def save_state(self) -> None:
        """Write the TrainerState to `output_dir/trainer_state.json` (main process)."""
        if self.strategy.is_main:
            directory = str(self.args.output_dir)
            os.makedirs(directory, exist_ok=True)
            self.state.save_to_json(os.path.join(directory, "trainer_state.json"))

    # -- HF's smaller members (loopkit.compat.members) ----------------------------------

    @property
    def model_wrapped(self) -> torch.nn.Module:
        """The outermost model: fit's wrapped one (DDP, FSDP, compiled) once train() ran."""
        live = self._live_state
        return live.model if live is not None else self.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the last train() (None before)."""
        live = self._live_state
        return live.optimizer if live is not None else self.optimizers[0]

    @property
    def lr_scheduler(self) -> Any:
        """The schedule of the last train(): a torch LRScheduler, or loopkit's (step -> lr)."""
        live = self._live_state
        return live.schedule if live is not None else self.optimizers[1]

    @property
    def accelerator(self) -> members.AcceleratorView:
        """A view with the accelerate.Accelerator members HF scripts call (unwrap_model,
        is_main_process, wait_for_everyone, ...), answered by the strategy."""
        return members.AcceleratorView(self.strategy)

    def get_num_trainable_parameters(self) -> int:
        """The number of trainable parameters (elements of those that require grad)."""
        return members.num_trainable_parameters(self.model)

    def get_learning_rates(self) -> list[float]:
        """Each parameter group's learning rate as HF's optimizer holds it: the next
        step's (after train(), the lr a further step would use)."""
        return members.learning_rates(self.optimizer, self._live_state)

    def get_decay_parameter_names(self, model: torch.nn.Module | None = None) -> list[str]:
        """The names of the parameters that get weight decay (HF's rule)."""
        return members.decay_parameter_names(self.model if model is None else model)

    def floating_point_ops(self, inputs: Any) -> float:
        """FLOPs of one forward + backward on `inputs`, HF's estimate (override freely)."""
        return members.floating_point_ops(self.model, inputs)

    def input_tokens(self, inputs: Any) -> int | torch.Tensor | None:
        """The tokens of `inputs` that include_num_input_tokens_seen counts (None: "no")."""
        return members.input_tokens(
            str(self.args.include_num_input_tokens_seen),
            self.model,
            self.processing_class,
            inputs,
        )

    def num_examples(self, dataloader: Any) -> int:
        """The number of samples behind a loader."""
        return members.num_examples(dataloader)

    def get_total_train_batch_size(self, args: TrainingArguments | None = None) -> int:
        """Samples per optimizer step over every data-parallel rank."""
        args = self.args if args is None else args
        return (
            args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * self.strategy.dp_world_size
        )

    def call_model_init(self, trial: Any = None) -> torch.nn.Module:
        """A fresh model from model_init.

        Raises:
            ValueError: no model_init, or it did not return a torch module.
        """
        if self.model_init is None:
            raise ValueError("Trainer.call_model_init(): needs Trainer(model_init=...).")
        return _first_model(None, self.model_init)

    def is_world_process_zero(self) -> bool:
        """Whether this is the main process (rank 0)."""
        return self.strategy.is_main

    def is_local_process_zero(self) -> bool:
        """Whether this is the first process of its node."""
        return self.args.local_process_index == 0

    def metrics_format(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """HF's human-readable metrics (runtime as h:mm:ss, memory in MB)."""
        return members.metrics_format(metrics)

    def log_metrics(self, split: str, metrics: dict[str, Any]) -> None:
        """Print the metrics of `split`, formatted (main process)."""
        if self.strategy.is_main:
            members.log_metrics(split, metrics)

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """Write `<split>_results.json` (and all_results.json) to output_dir (main process)."""
        if self.strategy.is_main:
            members.save_metrics(str(self.args.output_dir), split, metrics, combined)

    @property
    def label_names(self) -> list[str]:
        """The batch keys holding labels: args.label_names, else HF's default for the model."""
        return label_names(self.args, self.model)

    def store_flos(self) -> None:
        """Nothing to do: FLOPs reach state.total_flos at log steps, saves and the end."""

    def get_tp_size(self) -> int:
        """Tensor-parallel size: 1 (loopkit has no tensor parallelism)."""
        return 1

    def get_cp_size(self) -> int:
        """Context-parallel size: 1 (loopkit has no context parallelism)."""
        return 1

    def get_sp_size(self) -> int:
        """Sequence-parallel size: 1 (loopkit has no sequence parallelism)."""
        return 1

    @staticmethod
    def get_optimizer_cls_and_kwargs(
        args: TrainingArguments, model: torch.nn.Module | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """The optimizer class and keyword arguments args.optim stands for (HF's helper)."""
        spec = builtin_optimizer(args)
        return spec.cls, dict(spec.kwargs)

    hyperparameter_search = Refused()
    push_to_hub = Refused()
    init_hf_repo = Refused()
    create_model_card = Refused()
    training_step = Refused()
    prediction_step = Refused()
    evaluation_loop = Refused()
    create_optimizer = Refused()
    create_scheduler = Refused()
    create_optimizer_and_scheduler = Refused()
    get_batch_samples = Refused()
    get_optimizer_group = Refused()
    get_resumed_dataloader = Refused()
    set_initial_training_values = Refused()
    autocast_smart_context_manager = Refused()
    compute_loss_context_manager = Refused()
    create_accelerator_and_postprocess = Refused()
    end = Refused()


def _log_start(
    args: TrainingArguments, loader: Any, run: RunLength, trainable: int, strategy: Strategy
) -> None:
    """HF's "***** Running training *****" summary, at INFO on HF's logger
    ('transformers.trainer'), whose level log_level / log_level_replica set."""
    batches = run.batches_per_epoch
    total = args.per_device_train_batch_size * args.gradient_accumulation_steps
    total *= strategy.dp_world_size
    if batches is not None:  # HF's numbers: with a length, and without (max_steps)
        examples = members.num_examples(loader)
        epochs, per_epoch = run.epochs or 0, max(math.ceil(batches / run.accumulation), 1)
    else:
        examples, epochs, per_epoch = total * run.max_steps, sys.maxsize, run.max_steps
    hf_logger.info("***** Running training *****")
    hf_logger.info("  Num examples = %s", f"{examples:,}")
    hf_logger.info("  Num Epochs = %s", f"{epochs:,}")
    hf_logger.info("  Num update steps per epoch = %s", f"{per_epoch:,}")
    hf_logger.info(
        "  Instantaneous batch size per device = %s", f"{args.per_device_train_batch_size:,}"
    )
    hf_logger.info(
        "  Total train batch size (w. parallel, distributed & accumulation) = %s",
        f"{total:,}",
    )
    hf_logger.info("  Gradient Accumulation steps = %d", args.gradient_accumulation_steps)
    hf_logger.info("  Total optimization steps = %s", f"{run.max_steps:,}")
    hf_logger.info("  Number of trainable parameters = %s", f"{trainable:,}")


def _log_evaluation(description: str, loader: Any, batch_size: int) -> None:
    """HF's "***** Running Evaluation *****" (or Prediction) lines, at INFO on HF's logger."""
    hf_logger.info("\n***** Running %s *****", description)
    try:
        hf_logger.info("  Num examples = %d", members.num_examples(loader))
    except (TypeError, AttributeError):
        hf_logger.info("  Num examples: Unknown")
    hf_logger.info("  Batch size = %d", batch_size)


def _refuse_pipeline_predictions(strategy: Strategy, where: str) -> None:
    """Predictions under Pipeline are refused: only the last stage holds the outputs.

    Raises:
        ValueError: `strategy` is a Pipeline.
    """
    if isinstance(strategy, Pipeline):
        raise ValueError(
            f"{where} with strategy={strategy!r}: not supported by loopkit.compat: "
            "predictions under Pipeline (only the last stage holds the model's outputs, and "
            "they are not gathered to every rank; the eval loss works: set "
            "prediction_loss_only=True or leave compute_metrics out, and predict with the "
            "saved model under SingleDevice or DDP)."
        )


def _check_batch_shares(
    args: TrainingArguments, strategy: Strategy, shares: tuple[int, int] | None
) -> None:
    """batch_eval_metrics on several ranks gathers every batch from every rank: each rank
    needs a batch of its own to take part (every rank finds the same from the sampler).

    Raises:
        ValueError: some rank reads no eval batch at all.
    """
    if args.batch_eval_metrics and strategy.world_size > 1 and shares is not None:
        busiest, idlest = shares
        if busiest > 0 and idlest == 0:
            raise ValueError(
                f"TrainingArguments(batch_eval_metrics=True, per_device_eval_batch_size="
                f"{args.per_device_eval_batch_size}): the eval set leaves a rank of "
                f"{strategy.dp_world_size} without a batch, so the per-batch gather cannot "
                "run; use more eval items than ranks, or batch_eval_metrics=False."
            )


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


def _check_collator(data_collator: Any) -> None:
    """Raises TypeError: data_collator is not callable (often a dataset given positionally:
    HF's third argument is data_collator, not train_dataset)."""
    if data_collator is not None and not callable(data_collator):
        raise TypeError(
            f"Trainer(data_collator={type(data_collator).__name__}): expected a callable that "
            "builds a batch from a list of samples. The third positional argument is "
            "data_collator (HF's order); pass a dataset by name: train_dataset=... ."
        )


def _check_callables(**functions: Any) -> None:
    for name, fn in functions.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"Trainer({name}={fn!r}): expected a callable.")


__all__ = ["EvalPrediction", "PredictionOutput", "TrainOutput", "Trainer"]
