"""Trainer: an HF-style class-based trainer, as a thin layer over loopkit.fit().

`Trainer.train()` builds one step chain from loopkit's public transforms and calls `fit()`
once; there is no second training loop. What HF's Trainer does around its loop (the
callback events, log / evaluate / save decisions, best-model tracking, checkpoint rotation)
runs in two loopkit callbacks (see `_bridge.py`). Checkpoints are loopkit's (safetensors +
JSON, atomic, exact resume), written by fit() into `output_dir`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from ..checkpoint import list_checkpoints, save_model, step_dir_name, unwrap
from ..compose import chain, identity
from ..data import make_loader
from ..evaluate import evaluate as lk_evaluate
from ..fit import fit
from ..logging import TensorBoardLogger
from ..loss import Loss
from ..precision import Precision, set_tf32
from ..strategies import SingleDevice, check_strategy
from ..transforms import clip, forward, optimizer_step
from . import _eval
from ._bridge import Bridge, StopWhenAsked, notify, rotate_like_hf
from ._parts import (
    DecayGroups,
    EvalView,
    TorchOptimizer,
    call_model,
    check_optimizers,
    default_data_collator,
    hf_schedule,
    hf_window,
    loss_of,
    resume_path,
    set_seed,
    speed_metrics,
)
from .args import TrainingArguments
from .callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerControl,
    TrainerState,
)


class TrainOutput(NamedTuple):
    """What Trainer.train() returns, as in HF."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


class PredictionOutput(NamedTuple):
    """What Trainer.predict() returns, as in HF."""

    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None


class EvalPrediction:
    """What compute_metrics receives: numpy predictions and label ids over the whole eval
    set (every rank's part, in dataset order), as HF's EvalPrediction.

    Unpacks like a tuple: `predictions, label_ids = eval_pred`.
    """

    def __init__(
        self, predictions: Any, label_ids: Any, inputs: Any = None, losses: Any = None
    ) -> None:
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses
        self.elements = (predictions, label_ids) + tuple(
            x for x in (inputs, losses) if x is not None
        )

    def __iter__(self) -> Any:
        return iter(self.elements)

    def __getitem__(self, index: int) -> Any:
        return self.elements[index]

    def __len__(self) -> int:
        return len(self.elements)

    def __repr__(self) -> str:
        preds, labels = (
            getattr(x, "shape", type(x).__name__) for x in (self.predictions, self.label_ids)
        )
        return f"EvalPrediction(predictions={preds}, label_ids={labels})"


class _TrainLoss:
    """The training loss_fn: Loss(sum, count) so fit normalises each window as HF does now.

    HF divides the summed loss of a window by its item count (labels != -100, all
    micro-batches and ranks). With a model that takes `num_items_in_batch`, it is called
    with 1, so its loss is the sum and the count is exact; a model returning a mean over
    its items counts mean * items.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, model: torch.nn.Module, batch: Any) -> Any:
        trainer = self.trainer
        if trainer.loss_fn is not None:
            return trainer.loss_fn(model, batch)
        inputs = trainer._prepare_inputs(batch)
        count = trainer._item_count(inputs)
        if trainer._passes_num_items():
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=1)
            if count is None:
                raise ValueError(
                    "Trainer: the model takes num_items_in_batch but the batch has no labels "
                    f"({trainer._label_names()}) to count items from; pass loss_fn=... ."
                )
            return Loss(loss, count)
        loss = trainer.compute_loss(model, inputs)
        return loss if count is None else Loss(loss * count, count)

    def __repr__(self) -> str:
        return "trainer_loss"


class _EvalLoss:
    """HF's eval loss: the model's mean loss per batch, weighted by the batch's samples."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, model: torch.nn.Module, batch: Any) -> Any:
        trainer = self.trainer
        if trainer.loss_fn is not None:
            return trainer.loss_fn(model, batch)
        return trainer.compute_loss(model, trainer._prepare_inputs(batch))


class _Predict:
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, model: torch.nn.Module, batch: Any) -> Any:
        return call_model(model, self.trainer._prepare_inputs(batch))


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
        strategy: Any = None,
        loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
        *,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        tokenizer: Any = None,
    ) -> None:
        if args is None:
            args = TrainingArguments()
        elif isinstance(args, Mapping):
            args = TrainingArguments.from_dict(args)
        elif not isinstance(args, TrainingArguments):
            raise TypeError(
                f"Trainer(args={type(args).__name__}): expected loopkit.compat."
                "TrainingArguments or a dict of its fields."
            )
        self.args: TrainingArguments = args
        set_seed(args.seed)
        self.model_init = model_init
        if model is None:
            if model_init is None:
                raise ValueError(
                    "Trainer(model=None, model_init=None): pass model=... or model_init=..."
                )
            model = model_init()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Trainer(model={type(model).__name__}): expected a torch.nn.Module.")
        self.model = model
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.data_collator = data_collator or self._default_collator()
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        for name, fn in (
            ("compute_metrics", compute_metrics),
            ("loss_fn", loss_fn),
            ("preprocess_logits_for_metrics", preprocess_logits_for_metrics),
            ("compute_loss_func", compute_loss_func),
            ("optimizer_factory", optimizer_factory),
            ("lr_scheduler_factory", lr_scheduler_factory),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"Trainer({name}={fn!r}): expected a callable.")
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
        self.strategy = self._resolve_strategy(strategy)
        self._check_eval_settings()
        progress = PrinterCallback if args.disable_tqdm else ProgressCallback
        self.callback_handler = CallbackHandler([DefaultFlowCallback, *(callbacks or []), progress])
        self.state = TrainerState()
        self.control = TrainerControl()
        self._live_state: Any = None
        self._compiled = False
        self._eval_loaders: dict[int, Any] = {}
        self._reporters = (
            [TensorBoardLogger(args.logging_dir)]  # type: ignore[arg-type]
            if "tensorboard" in args.report_targets and self.strategy.rank == 0
            else []
        )
        self.callback_handler.shared.update(
            model=self.model, processing_class=self.processing_class
        )
        self.control = self.callback_handler.call("on_init_end", args, self.state, self.control)

    # -- validation --------------------------------------------------------------------

    def _check_eval_settings(self) -> None:
        args = self.args
        if args.eval_strategy != "no" and self.eval_dataset is None:
            raise ValueError(
                f"TrainingArguments(eval_strategy={args.eval_strategy!r}): needs "
                "Trainer(eval_dataset=...); pass one or set eval_strategy='no'."
            )
        metric = args.metric_for_best_model
        if (
            metric is not None
            and metric.removeprefix("eval_") != "loss"
            and self.compute_metrics is None
        ):
            raise ValueError(
                f"TrainingArguments(metric_for_best_model={metric!r}): the eval metrics are only "
                "'loss' without Trainer(compute_metrics=...); pass compute_metrics returning "
                f"{metric.removeprefix('eval_')!r}, or use 'loss'."
            )

    def _resolve_strategy(self, strategy: Any) -> Any:
        args = self.args
        pipeline = [
            n for n in ("pipeline_split_spec", "pipeline_chunks") if getattr(args, n) is not None
        ]
        if pipeline:
            if strategy is not None:
                raise ValueError(
                    f"Trainer(strategy={strategy!r}) with TrainingArguments({pipeline[0]}=...): "
                    "give either a strategy or the pipeline_* arguments."
                )
            from .. import strategies

            pipeline_cls = getattr(strategies, "Pipeline", None)
            if pipeline_cls is None:
                raise ValueError(
                    f"TrainingArguments({pipeline[0]}={getattr(args, pipeline[0])!r}): "
                    "loopkit.strategies has no Pipeline strategy in this version, so pipeline "
                    "arguments cannot be used yet. Drop the pipeline_* arguments, or pass "
                    "another strategy=."
                )
            if args.pipeline_split_spec is None:
                raise ValueError(
                    "TrainingArguments(pipeline_chunks=...): needs pipeline_split_spec, the "
                    "module names to split the model before, e.g. ['layers.4']."
                )
            kwargs: dict[str, Any] = {"schedule": args.pipeline_schedule}
            if args.pipeline_chunks is not None:
                kwargs["n_microbatches"] = args.pipeline_chunks
            try:
                return pipeline_cls(list(args.pipeline_split_spec), **kwargs)
            except (ValueError, TypeError) as error:
                raise type(error)(
                    f"TrainingArguments(pipeline_split_spec={args.pipeline_split_spec!r}, "
                    f"pipeline_chunks={args.pipeline_chunks!r}, pipeline_schedule="
                    f"{args.pipeline_schedule!r}): {error}"
                ) from error
        if strategy is not None:
            return check_strategy(strategy)
        if args.use_cpu:
            return SingleDevice("cpu")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from .. import strategies

            ddp_cls = getattr(strategies, "DDP", None)
            if ddp_cls is None:
                raise ValueError(
                    f"Trainer(strategy=None): launched on {world} processes (WORLD_SIZE), but "
                    "loopkit.strategies has no DDP in this version; pass strategy=... ."
                )
            return ddp_cls()
        return SingleDevice()

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

    def _share(self, state: Any) -> None:
        self.callback_handler.shared.update(
            model=self.model,
            optimizer=state.optimizer,
            lr_scheduler=state.schedule,
        )

    # -- inputs and losses -------------------------------------------------------------

    def _default_collator(self) -> Callable[[list[Any]], Any]:
        pad = getattr(self.processing_class, "pad", None)
        if callable(pad):

            def pad_collator(features: list[Any]) -> Any:
                batch = dict(pad(features, return_tensors="pt"))
                for old in ("label", "label_ids"):
                    if old in batch:
                        batch["labels"] = batch.pop(old)
                return batch

            return pad_collator
        return default_data_collator

    def _label_names(self) -> list[str]:
        return list(self.args.label_names or ["labels"])

    def _forward_parameters(self) -> tuple[set[str], bool]:
        """forward's parameter names and whether it takes **kwargs (cached per model)."""
        model = unwrap(self.model)
        cached = getattr(self, "_forward_cache", None)
        if cached is None or cached[0] is not model:
            params = inspect.signature(model.forward).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            cached = (model, set(params), takes_any)
            self._forward_cache = cached
        return cached[1], cached[2]

    def _passes_num_items(self) -> bool:
        """Whether the model normalises its own loss by num_items_in_batch (HF's check)."""
        if self.compute_loss_func is not None:
            return True
        if type(self).compute_loss is not Trainer.compute_loss:
            return False  # an overridden compute_loss decides itself
        model = unwrap(self.model)
        accepts = getattr(model, "accepts_loss_kwargs", None)
        if accepts is not None:
            return bool(accepts)
        names, _ = self._forward_parameters()
        return "num_items_in_batch" in names

    def _prepare_inputs(self, batch: Any) -> Any:
        """A dict batch without the keys forward does not take (remove_unused_columns)."""
        if not isinstance(batch, Mapping) or not self.args.remove_unused_columns:
            return batch
        names, takes_any = self._forward_parameters()
        if takes_any:
            return dict(batch)
        keep = names | set(self._label_names())
        return {k: v for k, v in batch.items() if k in keep}

    def _labels_of(self, batch: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(batch, Mapping):
            return tuple(
                batch[n] for n in self._label_names() if isinstance(batch.get(n), torch.Tensor)
            )
        if (
            isinstance(batch, (tuple, list))
            and len(batch) >= 2
            and isinstance(batch[1], torch.Tensor)
        ):
            return (batch[1],)
        return ()

    def _item_count(self, inputs: Any) -> Any:
        """Items the loss averages over: labels that are not -100 (HF's num_items_in_batch)."""
        labels = self._labels_of(inputs)
        if not labels:
            return None
        return labels[0].ne(-100).sum()  # stays on device: no host sync

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
        if self.compute_loss_func is not None and isinstance(inputs, Mapping):
            inputs = dict(inputs)
            labels = inputs.pop(self._label_names()[0], None)
            outputs = call_model(model, inputs)
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            kwargs = (
                {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            )
            outputs = call_model(model, inputs, **kwargs)
            loss = loss_of(outputs)
        return (loss, outputs) if return_outputs else loss

    # -- building the run --------------------------------------------------------------

    def _precision(self) -> Precision:
        return Precision("bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32")

    def _make_optimizer(self) -> Any:
        args = self.args
        optimizer = self.optimizers[0]
        if optimizer is not None:
            return optimizer
        if self.optimizer_factory is not None:
            return self.optimizer_factory
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
            return DecayGroups(self.model, args.weight_decay, TorchOptimizer(cls, dict(kwargs)))
        if args.optim == "sgd":
            build = TorchOptimizer(torch.optim.SGD, {"lr": args.learning_rate})
        else:
            kwargs = {
                "lr": args.learning_rate,
                "betas": (args.adam_beta1, args.adam_beta2),
                "eps": args.adam_epsilon,
            }
            if args.optim == "adamw_torch_fused":
                kwargs["fused"] = True
            build = TorchOptimizer(torch.optim.AdamW, kwargs)
        return DecayGroups(self.model, args.weight_decay, build)

    def _make_schedule(self, max_steps: int, warmup: int) -> Any:
        if self.optimizers[1] is not None:
            return self.optimizers[1]
        if self.lr_scheduler_factory is not None:
            return self.lr_scheduler_factory(num_warmup_steps=warmup, num_training_steps=max_steps)
        return hf_schedule(self.args, max_steps, warmup)

    def _train_loader(self) -> Any:
        args, strategy = self.args, self.strategy
        return make_loader(
            self.train_dataset,
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            drop_last=args.dataloader_drop_last,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.device(strategy.device).type == "cuda",
            collate_fn=self.data_collator,
            rank=strategy.rank,
            world_size=strategy.world_size,
            where="Trainer(train_dataset=...)",
        )

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
        if args.tf32 is not None:
            set_tf32(args.tf32)
        if args.gradient_checkpointing:
            enable = getattr(unwrap(self.model), "gradient_checkpointing_enable", None)
            if enable is None:
                raise ValueError(
                    "TrainingArguments(gradient_checkpointing=True): the model has no "
                    "gradient_checkpointing_enable(); wrap its blocks in "
                    "torch.utils.checkpoint yourself, or use FSDP's activation checkpointing."
                )
            enable()
        if args.torch_compile and not self._compiled:
            compile_kwargs = {
                k: v
                for k, v in (
                    ("backend", args.torch_compile_backend),
                    ("mode", args.torch_compile_mode),
                )
                if v is not None
            }
            self.model.compile(**compile_kwargs)  # in place: names and checkpoints unchanged
            self._compiled = True

        loader = self._train_loader()
        try:
            batches_per_epoch: int | None = len(loader)
        except TypeError:
            batches_per_epoch = None
        k = args.gradient_accumulation_steps
        if args.max_steps > 0:
            max_steps = args.max_steps
            windows = None if batches_per_epoch is None else math.ceil(batches_per_epoch / k)
            epochs = None if windows is None else math.ceil(max_steps / windows)
        else:
            if batches_per_epoch is None:
                raise ValueError(
                    "TrainingArguments(max_steps=-1): the train dataset has no length, so "
                    "epochs cannot be counted; set max_steps."
                )
            windows = math.ceil(batches_per_epoch / k)
            max_steps = math.ceil(args.num_train_epochs * windows)
            epochs = math.ceil(args.num_train_epochs)
        warmup = args.get_warmup_steps(max_steps)

        bridge = Bridge(
            self,
            max_steps=max_steps,
            num_train_epochs=epochs or 0,
            batches_per_epoch=batches_per_epoch,
            accumulation=k,
        )
        max_norm = args.max_grad_norm
        step = chain(
            notify(bridge, "on_step_begin"),
            forward(_TrainLoss(self)),
            hf_window(k, batches_per_epoch),
            notify(bridge, "on_substep_end"),
            clip(max_norm) if max_norm else identity(),
            notify(bridge, "on_pre_optimizer_step"),
            optimizer_step(),
            notify(bridge, "on_optimizer_step"),
        )
        self.state = TrainerState()
        self.control = TrainerControl()
        self.callback_handler.shared.update(train_dataloader=loader)
        start = time.time()
        result = fit(
            self.model,
            loader,
            step=step,
            optimizer=self._make_optimizer(),
            schedule=self._make_schedule(max_steps, warmup),
            # With a length, fit runs whole epochs and the Trainer's flow stops it at
            # max_steps (so that HF's epoch-end events still run); without, fit stops itself.
            epochs=epochs,
            max_steps=max_steps if batches_per_epoch is None else None,
            precision=self._precision().name,
            strategy=self.strategy,
            seed=args.seed,
            checkpoint_dir=args.output_dir,
            resume=resume or False,
            callbacks=[bridge, StopWhenAsked(bridge)],
            log_every=None,
            progress=False,
        )
        self._live_state = result.state
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
        unlogged = bridge.loss_since_log
        if isinstance(unlogged, torch.Tensor):  # this rank's share: sum over ranks
            unlogged = result.state.strategy.reduce_metrics({"train/loss": unlogged})["train/loss"]
        loss_total = bridge.loss_total + float(unlogged)  # host sync: once
        train_loss = loss_total / max(self.state.global_step, 0.001)
        num_samples = (
            max_steps * args.per_device_train_batch_size * k * self.strategy.world_size
            if args.max_steps > 0
            or self.train_dataset is None
            or not hasattr(self.train_dataset, "__len__")
            else int(len(self.train_dataset) * args.num_train_epochs)
        )
        metrics = speed_metrics("train", start, num_samples, max_steps)
        metrics["total_flos"] = float(self.state.total_flos)
        metrics["train_loss"] = train_loss
        self.log(metrics)
        if (
            self.state.is_world_process_zero
            and args.save_total_limit == 1
            and self.state.best_model_checkpoint
        ):
            best = Path(self.state.best_model_checkpoint).resolve()
            for path in list_checkpoints(args.output_dir):  # type: ignore[arg-type]
                if path.resolve() != best:
                    # Hidden first (one atomic rename), as loopkit's rotation does.
                    hidden = path.with_name(f".{path.name}.del-{os.getpid()}")
                    os.rename(path, hidden)
                    shutil.rmtree(hidden, ignore_errors=True)
        self.control = self.callback_handler.call("on_train_end", args, self.state, self.control)
        for reporter in self._reporters:
            reporter.on_fit_end(None)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- best model and checkpoints ----------------------------------------------------

    def _determine_best_metric(self, metrics: Mapping[str, float]) -> bool:
        """Update best_metric / best_global_step from an evaluation (HF's rule)."""
        args, state = self.args, self.state
        if args.metric_for_best_model is None:
            return False
        key = args.metric_for_best_model
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        if key not in metrics:
            raise KeyError(
                f"TrainingArguments(metric_for_best_model={args.metric_for_best_model!r}): "
                f"not among the eval metrics {sorted(metrics)}."
            )
        value = float(metrics[key])
        if state.best_metric is None:
            state.best_metric = -math.inf if args.greater_is_better else math.inf
        better = value > state.best_metric if args.greater_is_better else value < state.best_metric
        if better:
            state.best_metric = value
            state.best_global_step = state.global_step
        return better

    def _update_best_checkpoint(self, saving_step: int) -> None:
        """Point best_model_checkpoint at the best evaluation's checkpoint, once it exists."""
        best = self.state.best_global_step
        if best is None:
            return
        path = Path(self.args.output_dir) / step_dir_name(best)  # type: ignore[arg-type]
        if best == saving_step or path.is_dir():
            self.state.best_model_checkpoint = str(path)

    def _rotate_checkpoints(self) -> None:
        if self.args.save_total_limit is not None:
            rotate_like_hf(
                str(self.args.output_dir),
                self.args.save_total_limit,
                self.state.best_model_checkpoint,
            )

    def _load_best_model(self) -> None:
        from safetensors.torch import load_file

        path = Path(self.state.best_model_checkpoint) / "model.safetensors"  # type: ignore[arg-type]
        if not path.is_file():
            raise FileNotFoundError(
                f"Trainer: load_best_model_at_end found no {path}; the best checkpoint was "
                "removed or is sharded (FSDP): load it with loopkit.load_checkpoint instead."
            )
        unwrap(self.model).load_state_dict(load_file(str(path)))

    # -- logging -----------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record `logs` in state.log_history (with epoch and step) and call on_log."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.call(
            "on_log", self.args, self.state, self.control, logs=logs
        )
        if self._reporters:
            view = SimpleNamespace(
                step=self.state.global_step,
                epoch=int(self.state.epoch or 0),
                strategy=self.strategy,
            )
            numbers = {
                k: float(v)
                for k, v in logs.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
            }
            for prefix in ("eval", "test"):
                if any(k.startswith(f"{prefix}_") for k in numbers):
                    renamed = {
                        f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in numbers.items()
                    }
                    break
            else:
                renamed = {f"train/{k}": v for k, v in numbers.items()}
            for reporter in self._reporters:
                reporter.on_log(view, renamed)

    # -- evaluation --------------------------------------------------------------------

    def _eval_view(self) -> EvalView:
        live = self._live_state
        if live is not None:
            return EvalView(live.model, live.strategy, live.precision)
        self.model.to(self.strategy.device)
        return EvalView(self.model, self.strategy, self._precision())

    def _eval_loader(self, dataset: Any) -> Any:
        key = id(dataset)
        if key not in self._eval_loaders:
            args, strategy = self.args, self.strategy
            self._eval_loaders[key] = make_loader(
                dataset,
                batch_size=args.per_device_eval_batch_size,
                shuffle=False,
                seed=args.seed,
                drop_last=args.dataloader_drop_last,
                num_workers=args.dataloader_num_workers,
                collate_fn=self.data_collator,
                rank=strategy.rank,
                world_size=strategy.world_size,
                where="Trainer(eval_dataset=...)",
            )
        return self._eval_loaders[key]

    def _has_labels(self, dataset: Any, loader: Any) -> bool:
        try:
            sample = self.data_collator([dataset[0]])
        except Exception:  # iterable or unusual datasets: read the first batch instead
            sample = next(iter(loader))
        return bool(self._labels_of(sample))

    def _evaluation(
        self, dataset: Any, ignore_keys: Any, prefix: str, want_predictions: bool
    ) -> tuple[Any, Any, dict[str, float], int | None]:
        loader = self._eval_loader(dataset)
        self.callback_handler.shared["eval_dataloader"] = loader
        has_labels = self._has_labels(dataset, loader)
        loss_fn = _EvalLoss(self) if has_labels else None
        collect = None
        if want_predictions:
            ignore = list(ignore_keys or getattr(self, "_ignore_keys_for_eval", []) or [])
            collect = _eval.Collect(
                self._labels_of,
                self.preprocess_logits_for_metrics,
                ignore,
                has_loss=has_labels and self.loss_fn is None,
            )
        if loss_fn is None and collect is None:
            return None, None, {}, None
        values = lk_evaluate(
            self._eval_view(),
            loader,
            None if collect is None else {"loopkit_compat_predictions": collect},
            loss_fn=loss_fn,
            predict=None if loss_fn is not None else _Predict(self),
        )
        metrics: dict[str, float] = {}
        if "eval/loss" in values:
            metrics[f"{prefix}_loss"] = values["eval/loss"]
        n_items = (
            len(dataset)
            if hasattr(dataset, "__len__") and not self.args.dataloader_drop_last
            else None
        )
        predictions = label_ids = None
        if collect is not None:
            preds = _eval.gather(_eval.stack(collect.predictions), self.strategy, n_items)
            labels = _eval.gather(_eval.stack(collect.labels), self.strategy, n_items)
            predictions = preds[0] if len(preds) == 1 else tuple(preds)
            label_ids = None if not labels else labels[0] if len(labels) == 1 else tuple(labels)
            collect.reset()
            if self.compute_metrics is not None and label_ids is not None:
                computed = self.compute_metrics(EvalPrediction(predictions, label_ids))
                for key, value in dict(computed).items():
                    name = key if key.startswith(f"{prefix}_") else f"{prefix}_{key}"
                    metrics[name] = value.item() if hasattr(value, "item") else value
        return predictions, label_ids, metrics, n_items

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
        _, _, metrics, n_items = self._evaluation(dataset, ignore_keys, metric_key_prefix, want)
        if n_items is not None:
            steps = math.ceil(
                n_items / (self.args.per_device_eval_batch_size * self.strategy.world_size)
            )
            metrics.update(speed_metrics(metric_key_prefix, start, n_items, steps))
        else:
            metrics.update(speed_metrics(metric_key_prefix, start, None, None))
        self.log(metrics)
        self.control = self.callback_handler.call(
            "on_evaluate", self.args, self.state, self.control, metrics=metrics
        )
        return metrics

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
    ) -> PredictionOutput:
        """Predictions (and metrics, when the dataset has labels) on `test_dataset`."""
        start = time.time()
        predictions, label_ids, metrics, n_items = self._evaluation(
            test_dataset, ignore_keys, metric_key_prefix, want_predictions=True
        )
        steps = (
            None if n_items is None else math.ceil(n_items / self.args.per_device_eval_batch_size)
        )
        metrics.update(speed_metrics(metric_key_prefix, start, n_items, steps))
        self.control = self.callback_handler.call(
            "on_predict", self.args, self.state, self.control, metrics=metrics
        )
        return PredictionOutput(predictions, label_ids, metrics)

    # -- saving ------------------------------------------------------------------------

    def unwrapped_model(self) -> torch.nn.Module:
        """The user's module (inside DDP / torch.compile wrappers)."""
        return unwrap(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the weights (safetensors), the processing class and the arguments (JSON).

        A model with `save_pretrained` (an HF PreTrainedModel) saves itself that way;
        others as loopkit.save_model: `model.safetensors` + `config.json`, loadable with
        `model.load_state_dict(safetensors.torch.load_file(...))`. Rank 0 writes.
        """
        output_dir = output_dir or self.args.output_dir
        if self.strategy.rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)  # type: ignore[arg-type]
        model = self.unwrapped_model()
        save_pretrained = getattr(model, "save_pretrained", None)
        if callable(save_pretrained):
            save_pretrained(output_dir, safe_serialization=True)
        else:
            save_model(model, output_dir)  # type: ignore[arg-type]
        saver = getattr(self.processing_class, "save_pretrained", None)
        if callable(saver):
            saver(output_dir)
        path = os.path.join(output_dir, "training_args.json")  # type: ignore[arg-type]
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(self.args.to_dict(), indent=2, sort_keys=True) + "\n")

    def save_state(self) -> None:
        """Write state.json-like `trainer_state.json` to output_dir (rank 0)."""
        if self.strategy.rank == 0:
            os.makedirs(self.args.output_dir, exist_ok=True)  # type: ignore[arg-type]
            self.state.save_to_json(os.path.join(self.args.output_dir, "trainer_state.json"))  # type: ignore[arg-type]

    def is_world_process_zero(self) -> bool:
        return self.strategy.rank == 0
