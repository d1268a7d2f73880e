"""Device-side metric accumulators: update on device, sync to the host once at the end.

A metric is any object with four methods (the `Metric` protocol):

- `update(outputs, batch)`: add one batch; device ops only, never a host sync;
- `compute()`: the value over everything added since `reset()`, a scalar tensor;
- `reset()`: forget everything;
- `state_tensors()`: the live sum/count tensors behind the value. Summing them across
  ranks (`all_reduce(SUM)`, in place) and then calling `compute()` gives the metric over
  every rank's data; `evaluate` does this.

A plain function `fn(outputs, batch)` returning a scalar mean or `Loss(sum, count)` is a
metric too: `as_metric` wraps it in `Mean`. A torchmetrics `Metric` or `MetricCollection`
is one as well: `as_metric` wraps it in `TorchMetric`, which feeds it `update(preds,
target)` and lets torchmetrics sync its own states in `compute()` (its `state_tensors()`
is empty). torchmetrics is never imported by loopkit: an object of its classes means the
user imported it already.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from ._batch import batch_size
from .loss import as_loss

Target = Callable[[Any], torch.Tensor]


@runtime_checkable
class Metric(Protocol):
    """An on-device accumulator of one evaluation metric."""

    def update(self, outputs: Any, batch: Any) -> None:
        """Add one batch (device ops only; no host sync)."""
        ...

    def compute(self) -> torch.Tensor:
        """The metric over every batch since the last reset, as a scalar tensor."""
        ...

    def reset(self) -> None:
        """Forget every batch added so far."""
        ...

    def state_tensors(self) -> list[torch.Tensor]:
        """The live tensors whose element-wise sum across ranks is the global state.

        A metric that syncs itself inside `compute()` (a collective every rank calls, as
        `TorchMetric` does) returns [].
        """
        ...


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact sums of many batches; float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _zeros(device: torch.device | str = "cpu") -> torch.Tensor:
    device = torch.device(device)
    return torch.zeros((), dtype=accumulator_dtype(device), device=device)


def _follow(state: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`state` moved to `like`'s device (once, on the first update)."""
    if state.device == like.device:
        return state
    return state.to(device=like.device, dtype=accumulator_dtype(like.device))


def default_target(batch: Any) -> torch.Tensor:
    """The targets of a batch: `batch[1]` of a tuple/list, `batch["labels"]` or
    `batch["targets"]` of a dict.

    Raises:
        ValueError: the batch has none of these; pass `target=` to the metric.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in ("labels", "targets"):
            if key in batch:
                return batch[key]
        found = f"a dict with keys {sorted(map(str, batch))}"
    else:
        found = type(batch).__name__
    raise ValueError(
        f"cannot find the targets in the batch ({found}): the default target is batch[1] for "
        'a tuple/list and batch["labels"] or batch["targets"] for a dict. Pass '
        'target=lambda batch: ... to the metric, e.g. Accuracy(target=lambda b: b["y"]).'
    )


def logits_of(outputs: Any) -> torch.Tensor:
    """The prediction tensor in a model's outputs: the tensor itself, `outputs["logits"]`,
    `outputs.logits`, or the first element of a tuple/list.

    Raises:
        TypeError: none of these is a tensor.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(getattr(outputs, "logits", None), torch.Tensor):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"metric: the model outputs are {type(outputs).__name__}; expected a logits tensor, a "
        'dict with "logits", an object with .logits, or a tuple whose first element is the '
        "logits. Pass predict=... to evaluate to return the logits."
    )


def _check_target_fn(target: object, where: str) -> Target:
    if target is None:
        return default_target
    if not callable(target):
        raise TypeError(
            f"{where}(target={target!r}): expected None or a function batch -> targets, "
            'e.g. target=lambda batch: batch["labels"].'
        )
    return target  # type: ignore[return-value]


def _check_index(value: object, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}({name}={value!r}): expected an int.")
    return value


class Mean:
    """The mean over every item of a per-batch function of (outputs, batch).

    `fn(outputs, batch)` returns `Loss(sum, count)` (exact mean over items: the sums
    are added and divided by the total count) or a scalar mean (weighted by the batch's
    leading dimension).

    Example:
        >>> metric = Mean(lambda outputs, batch: (outputs - batch[1]).abs().mean())
        >>> metric.update(torch.tensor([1.0, 2.0]), (None, torch.tensor([0.0, 0.0])))
        >>> metric.update(torch.tensor([4.0]), (None, torch.tensor([0.0])))
        >>> float(metric.compute())
        2.3333333333333335
    """

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        if not callable(fn):
            raise TypeError(
                f"Mean(fn={fn!r}): expected a function (outputs, batch) returning a scalar "
                "mean or loopkit.Loss(sum, count)."
            )
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self._sum = _zeros()
        self._count = _zeros()

    def update(self, outputs: Any, batch: Any) -> None:
        value, count, is_mean = as_loss(self.fn(outputs, batch), batch_size(batch, self), self)
        self._sum = _follow(self._sum, value)
        self._count = _follow(self._count, value)
        value = value.detach().to(self._sum.dtype)  # sum in float64: many batches, exactly
        self._sum += value * count if is_mean else value
        self._count += count

    def compute(self) -> torch.Tensor:
        return self._sum / self._count

    def state_tensors(self) -> list[torch.Tensor]:
        return [self._sum, self._count]

    def __repr__(self) -> str:
        return f"Mean({getattr(self.fn, '__qualname__', None) or self.fn!r})"


class _Counting:
    """Shared state of the accuracy metrics: correct items and counted items."""

    def __init__(self) -> None:
        self._correct = _zeros()
        self._total = _zeros()

    def reset(self) -> None:
        self._correct = _zeros()
        self._total = _zeros()

    def compute(self) -> torch.Tensor:
        return self._correct / self._total

    def state_tensors(self) -> list[torch.Tensor]:
        return [self._correct, self._total]

    def _add(self, hits: torch.Tensor, mask: torch.Tensor) -> None:
        self._correct = _follow(self._correct, hits)
        self._total = _follow(self._total, hits)
        self._correct += (hits & mask).sum()
        self._total += mask.sum()


def _targets_and_logits(
    metric: Any, outputs: Any, batch: Any, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_of(outputs)
    targets = metric.target(batch)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{where}: targets must be a tensor, got {type(targets).__name__}.")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"{where}: outputs of shape {tuple(logits.shape)} do not fit targets of shape "
            f"{tuple(targets.shape)}; expected outputs = targets' shape plus a class "
            "dimension (logits or scores)."
        )
    return logits, targets.to(logits.device)


class Accuracy(_Counting):
    """Fraction of items whose highest-scoring class is the target.

    Items whose target is `ignore_index` (padding) are left out.

    Args:
        target: function batch -> class indices; default `default_target`.
        ignore_index: target value that marks items to skip.
    """

    def __init__(self, target: Target | None = None, ignore_index: int = -100) -> None:
        self.target = _check_target_fn(target, "Accuracy")
        self.ignore_index = _check_index(ignore_index, "Accuracy", "ignore_index")
        super().__init__()

    def update(self, outputs: Any, batch: Any) -> None:
        logits, targets = _targets_and_logits(self, outputs, batch, repr(self))
        hits = logits.argmax(dim=-1) == targets
        self._add(hits, targets != self.ignore_index)

    def __repr__(self) -> str:
        return f"Accuracy(ignore_index={self.ignore_index})"


class TopKAccuracy(_Counting):
    """Fraction of items whose target is among the k highest-scoring classes.

    Args:
        k: how many top classes count as a hit, an int >= 1.
        target: function batch -> class indices; default `default_target`.
        ignore_index: target value that marks items to skip.
    """

    def __init__(self, k: int, target: Target | None = None, ignore_index: int = -100) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopKAccuracy(k={k!r}): an int >= 1, e.g. TopKAccuracy(5).")
        self.k = k
        self.target = _check_target_fn(target, "TopKAccuracy")
        self.ignore_index = _check_index(ignore_index, "TopKAccuracy", "ignore_index")
        super().__init__()

    def update(self, outputs: Any, batch: Any) -> None:
        logits, targets = _targets_and_logits(self, outputs, batch, repr(self))
        if logits.shape[-1] < self.k:
            raise ValueError(
                f"{self!r}: the outputs have {logits.shape[-1]} classes, fewer than k={self.k}."
            )
        top = logits.topk(self.k, dim=-1).indices
        hits = (top == targets.unsqueeze(-1)).any(dim=-1)
        self._add(hits, targets != self.ignore_index)

    def __repr__(self) -> str:
        return f"TopKAccuracy(k={self.k}, ignore_index={self.ignore_index})"


def is_torchmetrics(value: object) -> bool:
    """Whether `value` is a torchmetrics `Metric` or `MetricCollection`.

    Never imports torchmetrics: an object of its classes exists only once the user has
    imported it, so when it is not in `sys.modules` the answer is no.
    """
    module = sys.modules.get("torchmetrics")
    if module is None:
        return False
    return isinstance(value, (module.Metric, module.MetricCollection))


_COMPUTE_BEFORE_UPDATE = r"The ``compute`` method of metric .* was called before the ``update``"


class TorchMetric:
    """A torchmetrics `Metric` or `MetricCollection` as a loopkit metric.

    evaluate() and fit() wrap a torchmetrics object in this with the defaults; wrap it
    yourself to say where the predictions or the targets are. Each batch runs
    `metric.update(preds(outputs), target(batch))` on the device (float16/bfloat16
    predictions from autocast are cast to float32 first; without `preds=`, predictions in
    loopkit's layout, the targets' shape plus a last class dim, are put in torchmetrics':
    see `_torchmetrics_layout`). torchmetrics syncs its own
    states across ranks inside `compute()` (over the metric's `process_group`, every rank
    by default), so `state_tensors()` is [] and evaluate calls `compute()` on every rank;
    loopkit's packed all_reduce never touches these states. A collection reports one
    value per entry, under the entry's name (with the collection's prefix/postfix).

    Args:
        metric: a `torchmetrics.Metric` or `torchmetrics.MetricCollection`.
        preds: function outputs -> predictions, passed to torchmetrics as they are;
            default `logits_of` (the logits tensor, in torchmetrics' layout).
        target: function batch -> targets; default `default_target`.

    Raises:
        TypeError: `metric` is not a torchmetrics object, preds/target not callable, or
            an aggregator (MeanMetric, ...: it takes (value, weight)) without `target=`.

    Example:
        >>> from torchmetrics.classification import MulticlassF1Score
        >>> f1 = TorchMetric(MulticlassF1Score(num_classes=3), target=lambda b: b["y"])
        >>> f1.update(torch.eye(3), {"y": torch.tensor([0, 1, 1])})
        >>> round(float(f1.compute()), 4)
        0.5556
    """

    def __init__(
        self,
        metric: Any,
        *,
        preds: Callable[[Any], torch.Tensor] | None = None,
        target: Target | None = None,
    ) -> None:
        if not is_torchmetrics(metric):
            raise TypeError(
                f"TorchMetric(metric={metric!r}): expected a torchmetrics Metric or "
                "MetricCollection, e.g. TorchMetric(MulticlassF1Score(num_classes=3)). "
                "loopkit's own metrics and plain functions need no wrapper."
            )
        if preds is not None and not callable(preds):
            raise TypeError(
                f"TorchMetric(preds={preds!r}): expected None or a function outputs -> "
                "predictions, e.g. preds=lambda outputs: outputs['logits']."
            )
        self.metric = metric
        self.preds = preds or logits_of
        self.adapts_layout = preds is None  # a preds= function picks the layout itself
        self.target = _check_target_fn(target, "TorchMetric")
        self.is_collection = isinstance(metric, sys.modules["torchmetrics"].MetricCollection)
        if target is None:
            _refuse_aggregators(self)
        # torchmetrics' classification metrics want the classes second; others (text
        # Perplexity: classes last) take the logits as a model gives them.
        self.classes_second = all(
            any(c.__module__.startswith("torchmetrics.classification") for c in type(leaf).__mro__)
            for leaf in self.leaves()
        )

    def names(self) -> tuple[str, ...]:
        """The names of a collection's entries (prefix/postfix applied); () for one metric."""
        if not self.is_collection:
            return ()
        return tuple(str(name) for name in self.metric.keys(keep_base=False))

    def leaves(self) -> list[Any]:
        """The torchmetrics Metric objects that hold states: the metric, or each entry."""
        if self.is_collection:
            return list(self.metric.values(copy_state=False))
        return [self.metric]

    def prepare(self, strategy: Any, where: str) -> None:
        """Check the metric can be synced by `strategy`'s ranks; move it to their device.

        Raises:
            ValueError: a pipeline (outputs on the last stage only), or, with several
                ranks, `dist_sync_on_step=True` or `sync_on_compute=False`.
        """
        if strategy.dp_world_size != strategy.world_size:
            raise ValueError(_PIPELINE_REFUSAL.format(where=where, metric=self))
        if strategy.world_size > 1:
            for leaf in self.leaves():
                _check_sync_settings(leaf, where)
        self.metric.to(torch.device(strategy.device))

    def has_list_states(self) -> bool:
        """Whether a state is a list of batches (e.g. AUROC's): torchmetrics cannot gather
        it from a rank that saw no batch (it stands in a 1-D float tensor)."""
        return any(
            isinstance(state, list)
            for leaf in self.leaves()
            for state in leaf.metric_state.values()
        )

    def update(self, outputs: Any, batch: Any) -> None:
        preds = self.preds(outputs)
        targets = self.target(batch)
        for name, value in (("predictions", preds), ("targets", targets)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{self!r}: the {name} must be a tensor, got {type(value).__name__}. Pass "
                    "TorchMetric(metric, preds=..., target=...) to pick them."
                )
        if preds.dtype in (torch.float16, torch.bfloat16):
            preds = preds.float()  # autocast outputs: torchmetrics' softmax/sums in float32
        targets = targets.to(preds.device)
        if self.adapts_layout:
            preds = _torchmetrics_layout(self, preds, targets)
        try:
            self.metric.update(preds, targets)
        except (ValueError, RuntimeError) as error:
            if type(error) not in (ValueError, RuntimeError):
                raise  # e.g. torch.OutOfMemoryError: not about the inputs
            raise type(error)(
                f"{self!r}: update(preds of shape {tuple(preds.shape)} {preds.dtype}, target "
                f"of shape {tuple(targets.shape)} {targets.dtype}) failed: {error} Pick the "
                "inputs with loopkit.TorchMetric(metric, preds=lambda outputs: ..., "
                "target=lambda batch: ...)."
            ) from error

    def compute(self) -> Any:
        """The value (a dict name -> value for a collection); a collective with several ranks."""
        with warnings.catch_warnings():
            # A rank may read no eval batch (more ranks than batches): its empty states
            # still join the sync, and torchmetrics' warning about it is noise here.
            warnings.filterwarnings("ignore", _COMPUTE_BEFORE_UPDATE, UserWarning)
            value = self.metric.compute()
        if not self.is_collection:
            return value  # type: ignore[no-any-return]
        expected = set(self.names())
        if not isinstance(value, Mapping) or set(value) != expected:
            found = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise TypeError(
                f"{self!r}: compute() returned {found}; expected one value per entry "
                f"{sorted(expected)}. An entry whose compute() returns a dict is not supported: "
                "pass it on its own or pick one value with a wrapper metric."
            )
        return dict(value)

    def reset(self) -> None:
        self.metric.reset()

    def state_tensors(self) -> list[torch.Tensor]:
        return []  # torchmetrics syncs its own states inside compute()

    def __repr__(self) -> str:
        return f"TorchMetric({type(self.metric).__name__})"


def _refuse_aggregators(metric: TorchMetric) -> None:
    """Refuse MeanMetric and its kin fed (preds, target): they would read it as (value, weight).

    Raises:
        TypeError: an entry is a `torchmetrics.aggregation.BaseAggregator`.
    """
    aggregation = sys.modules.get("torchmetrics.aggregation")
    if aggregation is None:
        return
    for leaf in metric.leaves():
        if isinstance(leaf, aggregation.BaseAggregator):
            name = type(leaf).__name__
            raise TypeError(
                f"TorchMetric({name}): {name}.update takes (value, weight), so the adapter's "
                f"(predictions, targets) would weight the predictions by the targets. For "
                "the mean of a function of each batch use loopkit.Mean(lambda outputs, "
                "batch: ...) or a plain function in metrics=; to feed the aggregator "
                f"yourself, pass both: TorchMetric({name}(), preds=..., target=...)."
            )


def _torchmetrics_layout(
    metric: TorchMetric, preds: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """`preds` in torchmetrics' layout when it has loopkit's: classes last.

    loopkit's metrics read outputs of the targets' shape plus a last class dim, as a Linear
    head gives them. torchmetrics wants one score per item without a class dim, and its
    classification metrics want the classes second, (N, C, ...). So, when `preds` is
    `targets`' shape plus one last dim: a last dim of 1 is dropped ((N, 1) against (N,)),
    and for a classification metric (or a collection of them) classes last move second
    ((N, T, C) against (N, T) become (N, C, T)); (N, C) is already both layouts.

    Raises:
        ValueError: the classes could be last or second (C equals the other sizes).
    """
    if preds.ndim != targets.ndim + 1 or preds.shape[:-1] != targets.shape:
        return preds
    if preds.shape[-1] == 1:
        return preds.squeeze(-1)
    if preds.ndim < 3 or not metric.classes_second:
        return preds
    if preds.shape[2:] == targets.shape[1:]:
        raise ValueError(
            f"{metric!r}: predictions of shape {tuple(preds.shape)} against targets of shape "
            f"{tuple(targets.shape)}: the classes could be the last dim (loopkit's layout) or "
            "the second (torchmetrics'). Say which with TorchMetric(metric, preds=...): "
            "preds=lambda outputs: outputs.movedim(-1, 1) for classes last, or "
            "preds=lambda outputs: outputs for classes second."
        )
    return preds.movedim(-1, 1)


_PIPELINE_REFUSAL = (
    "{where}: {metric!r} under a pipeline strategy: only the last stage's ranks have the "
    "model outputs, and torchmetrics syncs a metric over its whole process group, where "
    "the other stages' ranks hold empty states it cannot gather. Use loopkit's own "
    "metrics under Pipeline (loopkit.Accuracy, loopkit.TopKAccuracy, or a function "
    "(outputs, batch) returning loopkit.Loss(sum, count)): evaluate sums them over every "
    "rank. Or compute the torchmetrics metric afterwards with DDP or SingleDevice on the "
    "saved model (loopkit.save_model)."
)


def _check_sync_settings(leaf: Any, where: str) -> None:
    """Refuse torchmetrics settings that break evaluate's one sync per evaluation."""
    name = type(leaf).__name__
    if leaf.dist_sync_on_step:
        raise ValueError(
            f"{where}: {name}(dist_sync_on_step=True) makes every update a collective, but "
            "ranks may read different numbers of eval batches (each item is read once), so "
            "they would wait for each other forever. Leave dist_sync_on_step=False (the "
            "default): torchmetrics syncs once, in compute(), which every rank calls."
        )
    if not leaf.sync_on_compute:
        raise ValueError(
            f"{where}: {name}(sync_on_compute=False) with several ranks: each rank would "
            "report the metric of its own share only, and ranks that disagree take "
            "different decisions (early stopping, best model). Leave sync_on_compute=True "
            "(the default)."
        )


def eval_key(name: str) -> str:
    """The key a metric named `name` is reported under: "eval/<name>" ("eval/..." kept)."""
    return name if name.startswith("eval/") else f"eval/{name}"


def result_keys(name: str, metric: object) -> tuple[str, ...]:
    """Every key evaluate reports for `metrics[name]`: "eval/<name>", or, for a torchmetrics
    `MetricCollection`, "eval/<entry>" for each of its entries (the name is not used)."""
    if isinstance(metric, TorchMetric) and metric.is_collection:
        return tuple(eval_key(entry) for entry in metric.names())
    if is_torchmetrics(metric) and isinstance(metric, sys.modules["torchmetrics"].MetricCollection):
        return tuple(eval_key(str(entry)) for entry in metric.keys(keep_base=False))
    return (eval_key(name),)


MetricLike = Metric | Callable[[Any, Any], Any]


def as_metric(value: object, name: str = "metric") -> Metric:
    """Return `value` if it is a Metric; wrap a torchmetrics `Metric` or `MetricCollection`
    in `TorchMetric` and a function of (outputs, batch) in `Mean`.

    Raises:
        TypeError: neither, naming the metric.
    """
    if isinstance(value, type):
        raise TypeError(
            f"metrics[{name!r}]={value.__name__}: pass an instance, e.g. {value.__name__}()."
        )
    if isinstance(value, Metric):
        return value
    if is_torchmetrics(value):  # before `callable`: torchmetrics objects are callable modules
        return TorchMetric(value)
    if callable(value):
        return Mean(value)
    raise TypeError(
        f"metrics[{name!r}]={value!r}: expected a metric (an object with update, compute, "
        "reset, state_tensors, e.g. loopkit.Accuracy()) or a function (outputs, batch) "
        "returning a scalar mean or loopkit.Loss(sum, count)."
    )


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert a dict of host numbers and scalar tensors to host floats with one sync per
    device.

    Raises:
        ValueError: a tensor value has more than one element.
        TypeError: a value is neither a number nor a tensor.

    Example:
        >>> to_host({"train/loss": torch.tensor(2.5), "train/lr": 0.1})
        {'train/loss': 2.5, 'train/lr': 0.1}
    """
    result: dict[str, float] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {key!r}: a tensor of shape {tuple(value.shape)}; metrics must be "
                    "scalars."
                )
            by_device.setdefault(value.device, []).append((key, value))
            result[key] = 0.0  # placeholder keeps the caller's key order
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            result[key] = float(value)
        else:
            raise TypeError(f"metric {key!r}={value!r}: expected a number or a scalar tensor.")
    for device, items in by_device.items():
        dtype = accumulator_dtype(device)
        stacked = torch.stack([t.detach().reshape(()).to(dtype) for _, t in items])
        # host sync: one per device per call (fit calls this at log steps only).
        for (key, _), value in zip(items, stacked.tolist(), strict=True):
            result[key] = value
    return result


__all__ = [
    "Accuracy",
    "Mean",
    "Metric",
    "TopKAccuracy",
    "TorchMetric",
    "as_metric",
    "default_target",
    "eval_key",
    "is_torchmetrics",
    "logits_of",
    "result_keys",
    "to_host",
]
