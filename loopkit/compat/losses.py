"""Loss adapters: HF-style model outputs and `compute_loss` as loopkit loss functions.

An HF-style model computes its own loss when the batch holds labels; the Trainer's
`compute_loss` returns it. fit() wants `loss_fn(model, batch) -> Loss(sum, count)` so
that it can normalise each window over its items: `TrainLoss` turns one into the other.
`EvalLoss` and `ForwardOutputs` do the same for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._types import LossFn
from ..loss import Loss
from ..strategies import unwrap
from .inputs import BatchReader, call_model, forward_parameters

ComputeLoss = Callable[..., Any]
"""`compute_loss(model, inputs, num_items_in_batch=...)`: the Trainer's (maybe overridden)."""


def loss_of(outputs: Any) -> torch.Tensor:
    """The loss in a model's outputs: `outputs["loss"]`, `outputs.loss` or `outputs[0]`.

    Raises:
        ValueError: the outputs hold no loss tensor (with the two ways to fix it).
    """
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        loss = outputs[0] if outputs else None
    else:
        loss = getattr(outputs, "loss", None)
    if not isinstance(loss, torch.Tensor):
        keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            f"Trainer: the model returned no loss (its output: {keys}). Put the labels in the "
            "batch under 'labels' so the model computes its loss (the HF convention), or pass "
            "Trainer(loss_fn=lambda model, batch: ...)."
        )
    return loss


def model_loss(
    model: torch.nn.Module,
    inputs: Any,
    *,
    compute_loss_func: Callable[..., torch.Tensor] | None,
    label_name: str,
    num_items_in_batch: Any = None,
) -> tuple[torch.Tensor, Any]:
    """HF's Trainer.compute_loss: (loss, outputs) of `model` on `inputs`.

    With `compute_loss_func` (and a dict batch) the labels are taken out of the inputs and
    the loss is `compute_loss_func(outputs, labels, num_items_in_batch=...)`; otherwise it
    is the model's own loss, with `num_items_in_batch` passed on when given.
    """
    if compute_loss_func is not None and isinstance(inputs, Mapping):
        inputs = dict(inputs)
        labels = inputs.pop(label_name, None)
        outputs = call_model(model, inputs)
        return compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch), outputs
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    outputs = call_model(model, inputs, **kwargs)
    return loss_of(outputs), outputs


def accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    """The default of Trainer.model_accepts_loss_kwargs: whether the model *declares* that it
    normalises its loss by `num_items_in_batch`.

    Its `accepts_loss_kwargs` attribute, else whether forward names `num_items_in_batch`.
    HF also counts a bare `**kwargs`; here such a model is called without it and its mean
    loss is weighted by its item count, which gives the same gradients for a model that
    honours num_items_in_batch and HF's own result (k=1) for one that ignores it.
    """
    module = unwrap(model)
    declared = getattr(module, "accepts_loss_kwargs", None)
    if declared is not None:
        return bool(declared)
    names, _ = forward_parameters(module)
    return "num_items_in_batch" in names


def passes_num_items(
    model_accepts_loss_kwargs: bool,
    *,
    compute_loss_func: Callable[..., torch.Tensor] | None,
    compute_loss_overridden: bool,
) -> bool:
    """Whether compute_loss gets num_items_in_batch (and returns a summed loss).

    True with a compute_loss_func; False when compute_loss is overridden (it decides
    itself); else `model_accepts_loss_kwargs`.
    """
    if compute_loss_func is not None:
        return True
    if compute_loss_overridden:
        return False
    return model_accepts_loss_kwargs


@dataclass(frozen=True, slots=True, eq=False)
class TrainLoss:
    """The training loss_fn: Loss(sum, count), so fit normalises each window as HF does now.

    HF divides the summed loss of a window by its item count (labels != -100, all
    micro-batches and ranks). With a model that takes `num_items_in_batch`, it is called
    with 1, so its loss is the sum and the count is exact; a model returning a mean over
    its items counts mean * items. A user's `loss_fn` is used as it is.

    Attributes:
        compute_loss: the Trainer's compute_loss (a subclass may override it).
        reader: how batches are read (columns, labels, item count).
        pass_num_items: call compute_loss with num_items_in_batch=1 (see passes_num_items).
        loss_fn: the user's loopkit loss_fn, which replaces all of the above; or None.
        batch_items: pass the micro-batch's own item count as num_items_in_batch and
            weight the loss by it (for compute_loss_func: HF allows one that returns a
            mean and ignores num_items_in_batch; with 1 its loss would be taken as a sum).
    """

    compute_loss: ComputeLoss
    reader: BatchReader
    pass_num_items: bool
    loss_fn: LossFn | None = None
    batch_items: bool = False

    def __call__(self, model: torch.nn.Module, batch: Any, /) -> Any:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        count = self.reader.item_count(batch)
        if self.pass_num_items:
            if count is None:
                raise ValueError(
                    "Trainer: the model takes num_items_in_batch but the batch has no labels "
                    f"({self.reader.label_names}) to count items from; pass loss_fn=... ."
                )
            if self.batch_items:  # a mean over this batch's items, whether honoured or not
                # at least 1: a batch whose labels are all -100 sums to 0, not 0 / 0
                loss = self.compute_loss(model, batch, num_items_in_batch=count.clamp(min=1))
                return Loss(loss * count, count)
            return Loss(self.compute_loss(model, batch, num_items_in_batch=1), count)
        loss = self.compute_loss(model, batch)
        return loss if count is None else Loss(loss * count, count)

    def __repr__(self) -> str:  # short: fit records the step's repr with each checkpoint
        return "trainer_loss"


@dataclass(frozen=True, slots=True, eq=False)
class EvalLoss:
    """HF's eval loss: the model's mean loss per batch, weighted by the batch's samples.

    Attributes:
        finite: where each batch's loss also goes (`add(loss, batch)`: the eval loss's
            NaN/inf filter), or None.
    """

    compute_loss: ComputeLoss
    reader: BatchReader
    loss_fn: LossFn | None = None
    finite: Any = None

    def __call__(self, model: torch.nn.Module, batch: Any, /) -> Any:
        if self.loss_fn is not None:
            loss = self.loss_fn(model, batch)
        else:
            loss = self.compute_loss(model, batch)
        if self.finite is not None:
            self.finite.add(loss, batch)
        return loss


@dataclass(frozen=True, slots=True, eq=False)
class ForwardOutputs:
    """The model's outputs on a batch without labels (what the prediction metrics read)."""

    reader: BatchReader

    def __call__(self, model: torch.nn.Module, batch: Any, /) -> Any:
        return call_model(model, batch)


__all__ = [
    "ComputeLoss",
    "accepts_loss_kwargs",
    "EvalLoss",
    "ForwardOutputs",
    "TrainLoss",
    "loss_of",
    "model_loss",
    "passes_num_items",
]
