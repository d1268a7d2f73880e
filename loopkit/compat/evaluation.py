"""Evaluation and prediction of the Trainer façade on loopkit.evaluate, gathered over ranks.

One pass of `loopkit.evaluate` computes HF's eval loss (the model's mean loss per batch,
weighted by the batch size) and keeps each batch's predictions and labels on device
(`PredictionCollector`); afterwards they are brought to the host as numpy arrays,
gathered from every rank in dataset order, and given to `compute_metrics` as an
`EvalPrediction`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from .._batch import batch_size
from .._types import LossFn, Predict
from ..evaluate import evaluate
from ..loss import as_loss
from ..metrics import accumulator_dtype
from ..normalise import item_sum
from ..precision import Precision
from ..strategies import Strategy
from .args import TrainingArguments

PAD_INDEX = -100  # what HF pads predictions and labels of different lengths with

_COLLECTOR_KEY = "loopkit_compat_predictions"


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


ComputeMetrics = Callable[[EvalPrediction], Mapping[str, Any]]
"""`EvalPrediction -> {name: value}`, HF's compute_metrics."""


@dataclass
class EvalView:
    """What loopkit.evaluate reads of a TrainState: model, strategy, precision."""

    model: torch.nn.Module
    strategy: Strategy
    precision: Precision

    def check_fresh(self) -> None:
        return None


def check_eval_settings(
    args: TrainingArguments, eval_dataset: Any, compute_metrics: ComputeMetrics | None
) -> None:
    """Refuse eval settings that cannot work: evaluations without data, a metric never computed.

    Raises:
        ValueError: eval_strategy without an eval dataset, or metric_for_best_model other
            than the loss without compute_metrics.
    """
    if args.eval_strategy != "no" and eval_dataset is None:
        raise ValueError(
            f"TrainingArguments(eval_strategy={args.eval_strategy!r}): needs "
            "Trainer(eval_dataset=...); pass one or set eval_strategy='no'."
        )
    metric = args.metric_for_best_model
    if metric is None:
        return
    name = metric.removeprefix("eval_")
    if isinstance(eval_dataset, Mapping):
        _check_named_metric(metric, name, [str(k) for k in eval_dataset], compute_metrics)
        return
    if name != "loss" and compute_metrics is None:
        raise ValueError(
            f"TrainingArguments(metric_for_best_model={metric!r}): the eval metrics are only "
            "'loss' without Trainer(compute_metrics=...); pass compute_metrics returning "
            f"{name!r}, or use 'loss'."
        )


def _check_named_metric(
    metric: str, name: str, sets: list[str], compute_metrics: ComputeMetrics | None
) -> None:
    """With a dict of eval datasets every metric is named `eval_<set>_<metric>` (HF).

    Raises:
        ValueError: `name` names no eval set, or a set's metric other than its loss
            without compute_metrics.
    """
    if not sets:
        return
    losses = [f"{s}_loss" for s in sets]
    if compute_metrics is None and name not in losses:
        raise ValueError(
            f"TrainingArguments(metric_for_best_model={metric!r}): with "
            f"Trainer(eval_dataset={{{', '.join(repr(s) for s in sets)}}}) and no "
            f"compute_metrics the eval metrics are {['eval_' + n for n in losses]}; use one "
            "of those."
        )
    if not any(name.startswith(f"{s}_") for s in sets):
        raise ValueError(
            f"TrainingArguments(metric_for_best_model={metric!r}): with a dict of eval "
            f"datasets each metric is named 'eval_<set>_<metric>' (sets: {sets}); use e.g. "
            f"{'eval_' + sets[0] + '_' + name!r}."
        )


def prediction_tensors(
    outputs: Any, has_loss: bool, ignore_keys: Sequence[str] = ()
) -> tuple[torch.Tensor, ...]:
    """The prediction tensors in a model's outputs, as HF's prediction_step picks them.

    A dict (or ModelOutput): every value but "loss" and `ignore_keys`; a tuple/list: all
    but the first element when it is the loss; an object: `.logits`, else its tensor
    fields but `.loss`; a tensor: itself.
    """
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    if isinstance(outputs, Mapping):
        return tuple(
            v
            for k, v in outputs.items()
            if k != "loss" and k not in ignore_keys and isinstance(v, torch.Tensor)
        )
    if isinstance(outputs, (tuple, list)):
        values = outputs[1:] if has_loss else outputs
        return tuple(v for v in values if isinstance(v, torch.Tensor))
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return (logits,)
    if dataclasses.is_dataclass(outputs):
        return tuple(
            getattr(outputs, f.name)
            for f in dataclasses.fields(outputs)
            if f.name != "loss" and isinstance(getattr(outputs, f.name), torch.Tensor)
        )
    raise TypeError(
        f"Trainer.evaluate: cannot find predictions in the model's output "
        f"({type(outputs).__name__}); return a tensor, a dict, a tuple or an object with "
        "`.logits`."
    )


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A host numpy copy; bf16/fp16 become float32 (numpy has no bfloat16, HF does the same)."""
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def pad_concat(arrays: Sequence[np.ndarray], pad: int = PAD_INDEX) -> np.ndarray:
    """Concatenate (at least one array) along dim 0, padding the other dims with `pad`."""
    if all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    ndim = arrays[0].ndim
    shape = [sum(a.shape[0] for a in arrays)] + [
        max(a.shape[d] for a in arrays) for d in range(1, ndim)
    ]
    out = np.full(shape, pad, dtype=np.result_type(*[a.dtype for a in arrays]))
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]),) + tuple(slice(0, s) for s in a.shape[1:])] = a
        row += a.shape[0]
    return out


class PredictionCollector:
    """A loopkit Metric that keeps every batch's predictions and labels (on device).

    evaluate() calls update(outputs, batch) once per batch; its compute() is a placeholder
    (the Trainer pops it). Nothing is summed across ranks: `gather_in_order` does that afterwards.

    Args:
        labels_of: the label tensors of a batch.
        preprocess: HF's preprocess_logits_for_metrics `(logits, labels) -> logits`, or None.
        ignore_keys: output keys that are not predictions.
        has_loss: whether a tuple output starts with the loss.
    """

    def __init__(
        self,
        labels_of: Callable[[Any], tuple[torch.Tensor, ...]],
        preprocess: Callable[[Any, Any], Any] | None,
        ignore_keys: Sequence[str],
        has_loss: bool,
        batch_metrics: Callable[..., Mapping[str, Any] | None] | None = None,
        strategy: Strategy | None = None,
        batches_per_rank: int | None = None,
    ) -> None:
        self.labels_of = labels_of
        self.preprocess = preprocess
        self.ignore_keys = tuple(ignore_keys)
        self.has_loss = has_loss
        self.batch_metrics = batch_metrics
        self.strategy = strategy
        self.batches_per_rank = batches_per_rank
        self.predictions: list[tuple[torch.Tensor, ...]] = []
        self.labels: list[tuple[torch.Tensor, ...]] = []
        self._pending: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
        self.batch_result: Mapping[str, Any] | None = None

    def reset(self) -> None:
        self.predictions, self.labels = [], []
        self._pending, self.batch_result = None, None

    def update(self, outputs: Any, batch: Any) -> None:
        logits: Any = prediction_tensors(outputs, self.has_loss, self.ignore_keys)
        labels = self.labels_of(batch)
        if self.preprocess is not None:
            joined = logits[0] if len(logits) == 1 else logits
            joined = self.preprocess(joined, labels[0] if len(labels) == 1 else labels)
            logits = (joined,) if isinstance(joined, torch.Tensor) else tuple(joined)
        logits = tuple(t.detach() for t in logits)
        labels = tuple(t.detach() for t in labels)
        self.predictions.append(logits)
        self.labels.append(labels)
        if self.batch_metrics is not None and labels and not self._gathers():
            # HF's batch_eval_metrics: compute_result=True on the last batch only, which is
            # known once the next one arrives (or the evaluation ends): one batch held back.
            self._flush(last=False)
            self._pending = (logits, labels)

    def _gathers(self) -> bool:
        """Whether each batch is gathered from several ranks (a collective)."""
        return self.strategy is not None and self.strategy.world_size > 1

    def _flush(self, *, last: bool) -> None:
        if self._pending is None or self.batch_metrics is None:
            return
        logits, labels = self._pending
        self._pending = None
        if self.strategy is not None and self._gathers():  # one batch of each rank
            device = logits[0].device
            logits = tuple(
                torch.from_numpy(a).to(device) for a in _gather_batch(logits, self.strategy)
            )
            labels = tuple(
                torch.from_numpy(a).to(device) for a in _gather_batch(labels, self.strategy)
            )
        result = self.batch_metrics(
            EvalPrediction(
                logits[0] if len(logits) == 1 else logits,
                labels[0] if len(labels) == 1 else labels,
            ),
            compute_result=last,
        )
        if last:
            self.batch_result = result

    def finish_batches(self) -> Mapping[str, Any] | None:
        """batch_eval_metrics: compute the held-back last batch with compute_result=True.

        With several ranks each batch is gathered from all of them (a collective), so
        the batches are computed here, after evaluate's own collectives: a rank that read
        fewer batches (the eval split does not pad) joins the others' remaining gathers
        with empty batches, up to `batches_per_rank`, the busiest rank's count (without
        it, e.g. for an iterable dataset's split, the ranks agree on it with one
        all_reduce), so the collectives match and every rank makes the same calls. A
        rank of an iterable split with no labelled batch at all cannot take part.
        """
        if self.strategy is None or not self._gathers():
            self._flush(last=True)
            return self.batch_result
        mine = [(p, labels) for p, labels in zip(self.predictions, self.labels) if labels]
        busiest = self.batches_per_rank
        if busiest is None:  # an iterable's split: the ranks tell each other their counts
            busiest = _most_over_ranks(len(mine), self.strategy)
        if not mine:
            return None  # no labels: nothing to compute, on every rank alike
        empty = (tuple(t[:0] for t in mine[-1][0]), tuple(t[:0] for t in mine[-1][1]))
        for index in range(busiest):
            self._pending = mine[index] if index < len(mine) else empty
            self._flush(last=index == busiest - 1)
        return self.batch_result

    def compute(self) -> float:
        return 0.0

    def state_tensors(self) -> list[torch.Tensor]:
        return []

    def gathered(self, strategy: Strategy, n_items: int | None) -> tuple[Any, Any]:
        """(predictions, label_ids) over every rank, as HF gives them; then reset.

        One array per output position, or a tuple of them; label_ids is None without labels.
        """
        preds = gather_in_order(concat_batches(self.predictions), strategy, n_items)
        labels = gather_in_order(concat_batches(self.labels), strategy, n_items)
        self.reset()
        predictions = preds[0] if len(preds) == 1 else tuple(preds)
        label_ids = None if not labels else labels[0] if len(labels) == 1 else tuple(labels)
        return predictions, label_ids


def _gather_batch(parts: tuple[torch.Tensor, ...], strategy: Strategy) -> list[np.ndarray]:
    """One batch's tensors of every rank, in dataset order (a collective)."""
    return gather_in_order([to_numpy(t) for t in parts], strategy, None)


def concat_batches(parts: list[tuple[torch.Tensor, ...]]) -> list[np.ndarray]:
    """Per output position, the batches concatenated (padded) as numpy arrays."""
    if not parts:
        return []
    return [pad_concat([to_numpy(p[i]) for p in parts]) for i in range(len(parts[0]))]


def gather_in_order(
    arrays: list[np.ndarray], strategy: Strategy, n_items: int | None
) -> list[np.ndarray]:
    """Every rank's arrays in dataset order, truncated to `n_items` (one process: as is).

    The eval loader's DistributedSampler deals item i to rank i % world_size (after padding
    the dataset to a multiple of it), so rank r's j-th row is item j * world_size + r.
    """
    world = strategy.world_size
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        device = torch.device(strategy.device)
        arrays = [_all_gather_interleaved(a, world, device) for a in arrays]
    if n_items is not None:
        arrays = [a[:n_items] for a in arrays]
    return arrays


def _all_gather_interleaved(array: np.ndarray, world: int, device: torch.device) -> np.ndarray:
    dist = torch.distributed
    shape = torch.tensor(array.shape, dtype=torch.int64, device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    sizes = torch.stack(shapes).cpu()
    biggest = sizes.max(dim=0).values.tolist()
    padded = np.full(biggest, PAD_INDEX, dtype=array.dtype)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    local = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    rows = [p.cpu().numpy()[: int(sizes[r, 0])] for r, p in enumerate(parts)]
    per_rank = max(r.shape[0] for r in rows)
    out = np.full([per_rank * world] + biggest[1:], PAD_INDEX, dtype=array.dtype)
    for r, part in enumerate(rows):
        out[r : r + world * part.shape[0] : world] = part
    # Unpadded shares differ by at most one row, the lower ranks holding more: the rows
    # of the ranks that hold one fewer are the last ones, and are no items.
    return out[: int(sizes[:, 0].sum())]


class FiniteLoss:
    """HF's logging_nan_inf_filter for the eval loss: the batches whose loss is finite.

    HF 5's evaluation loop leaves out the batches with a NaN or infinite loss when some
    batch's loss is finite (each batch weighted by its samples); when none is, the loss
    is the plain mean (NaN or inf). The Trainer's EvalLoss hands each batch's loss to
    `add`; `filtered` sums the finite part over the ranks afterwards.

    Args:
        device: where the sums live (the strategy's device).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        dtype = accumulator_dtype(self.device)
        self.sums = torch.zeros(2, dtype=dtype, device=self.device)  # [loss sum, items]

    def add(self, result: Any, batch: Any) -> None:
        """Count one batch's loss (a scalar mean or Loss(sum, count)) if it is finite."""
        value, count, is_mean = as_loss(result, batch_size(batch, "evaluate"), "evaluate")
        total = item_sum(value.detach().to(self.sums.dtype), count, is_mean).to(self.device)
        finite = torch.isfinite(total)
        self.sums[0] += torch.where(finite, total, torch.zeros_like(total))
        self.sums[1] += finite.to(self.sums.dtype) * torch.as_tensor(
            count, dtype=self.sums.dtype, device=self.device
        )

    def filtered(self, loss: float, strategy: Strategy) -> float:
        """`loss` (the mean over every batch) or, when it is not finite, the mean over the
        batches whose loss is finite, if there are any (a collective with several ranks)."""
        if math.isfinite(loss):
            return loss
        sums = self.sums
        if strategy.world_size > 1 and _distributed():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
        total, items = sums.tolist()  # host sync: once, and only after a non-finite loss
        return total / items if items > 0 else loss


def _most_over_ranks(count: int, strategy: Strategy) -> int:
    """The largest `count` over the ranks (one all_reduce; `count` without several)."""
    if not _distributed():
        return count
    most = torch.tensor([count], dtype=torch.int64, device=torch.device(strategy.device))
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class EvalResult(NamedTuple):
    """One evaluation pass: gathered predictions and labels (or None), metrics, items."""

    predictions: Any
    label_ids: Any
    metrics: dict[str, float]
    n_items: int | None


def eval_items(dataset: Any, args: TrainingArguments) -> int | None:
    """Items an evaluation reports on: len(dataset), or None (no length, or drop_last)."""
    if hasattr(dataset, "__len__") and not args.dataloader_drop_last:
        return len(dataset)
    return None


def run_evaluation(
    view: EvalView,
    loader: Any,
    *,
    loss_fn: LossFn | None,
    predict: Predict,
    collector: PredictionCollector | None,
    compute_metrics: ComputeMetrics | None,
    prefix: str,
    n_items: int | None,
    finite: FiniteLoss | None = None,
) -> EvalResult:
    """Evaluate once over `loader`: `<prefix>_loss` (with `loss_fn`) and compute_metrics' values.

    With `collector`, the predictions and labels of the whole set are gathered over the
    ranks (`view.strategy`) and cut to `n_items`; compute_metrics then sees them when there
    are labels (or, with the collector's `batch_metrics`, each batch as it comes). Without
    `loss_fn`, `predict` gives the outputs the collector reads. With `finite` (fed by
    `loss_fn`: HF's logging_nan_inf_filter) a non-finite loss becomes the mean over the
    batches whose loss is finite.
    """
    values = evaluate(
        view,
        loader,
        None if collector is None else {_COLLECTOR_KEY: collector},
        loss_fn=loss_fn,
        predict=None if loss_fn is not None else predict,
    )
    metrics: dict[str, float] = {}
    if "eval/loss" in values:
        loss = values["eval/loss"]
        metrics[f"{prefix}_loss"] = loss if finite is None else finite.filtered(loss, view.strategy)
    if collector is None:
        return EvalResult(None, None, metrics, n_items)
    computed = collector.finish_batches() if collector.batch_metrics is not None else None
    predictions, label_ids = collector.gathered(view.strategy, n_items)
    if collector.batch_metrics is None and compute_metrics is not None and label_ids is not None:
        computed = compute_metrics(EvalPrediction(predictions, label_ids))
    if computed is not None:
        if not isinstance(computed, Mapping):
            raise TypeError(
                f"Trainer(compute_metrics=...): returned {type(computed).__name__} "
                f"{computed!r:.80}; expected a dict of metric names to numbers, e.g. "
                "{'accuracy': 0.9} (or None for no metrics)."
            )
        for key, value in computed.items():
            name = key if key.startswith(f"{prefix}_") else f"{prefix}_{key}"
            metrics[name] = value.item() if hasattr(value, "item") else value
    return EvalResult(predictions, label_ids, metrics, n_items)


__all__ = [
    "PAD_INDEX",
    "ComputeMetrics",
    "EvalPrediction",
    "EvalResult",
    "EvalView",
    "FiniteLoss",
    "PredictionCollector",
    "PredictionOutput",
    "check_eval_settings",
    "eval_items",
    "gather_in_order",
    "pad_concat",
    "prediction_tensors",
    "run_evaluation",
    "concat_batches",
    "to_numpy",
]
