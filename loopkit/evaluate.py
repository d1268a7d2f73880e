"""evaluate: the loss and metrics of a model over a dataset, without touching the record."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ._batch import batch_size
from ._types import LossFn
from .averaging import Weights, averaged_weights, check_weights
from .data import EpochSampler, iterate
from .metrics import (
    Metric,
    TorchMetric,
    accumulator_dtype,
    as_metric,
    eval_key,
    is_torchmetrics,
    result_keys,
    to_host,
)

Predict = Callable[[torch.nn.Module, Any], Any]

_WHERE = "evaluate"


def evaluate(
    state: Any,
    data: Iterable[Any],
    metrics: Mapping[str, Any] | None = None,
    *,
    loss_fn: LossFn | None = None,
    predict: Predict | None = None,
    max_batches: int | None = None,
    weights: Weights = "model",
) -> dict[str, float]:
    """Compute the eval loss and metrics of `state.model` over `data`.

    Runs in eval mode under `torch.no_grad()` and the state's autocast policy (the model's
    previous train/eval mode is restored afterwards), moves each batch with
    `state.strategy.to_device`, and accumulates everything on device: the host syncs once,
    at the end. With several processes (`strategy.world_size > 1` and torch.distributed
    initialised) the loss sums and counts and every metric's `state_tensors()` are summed
    across ranks (one all_reduce) before computing, so each rank returns the global result.
    Ranks may read different numbers of batches (fit's eval loader gives each item to one
    rank, without padding, so each is counted once); under a strategy whose forward is a
    collective (`strategy.is_sharded`: FSDP, Pipeline) a rank that runs out repeats its
    last batch's forward, uncounted, until the busiest rank is done, so the collectives
    stay matched. The record is only read: it is not consumed and stays usable.

    Results:
        "eval/loss": with `loss_fn`, the mean over every item: sum of `Loss.sum` over
            batches divided by the sum of `Loss.count` (a scalar mean counts as
            mean * batch size over batch size items).
        "eval/perplexity": exp("eval/loss"), with `loss_fn`.
        "eval/<name>": each metric's `compute()` (a name that already starts with "eval/"
            is kept as is); a torchmetrics `MetricCollection` gives "eval/<entry>" for
            each of its entries instead (its own name in `metrics` is not used).

    Metric inputs: `metric.update(outputs, batch)`. `outputs` is `predict(model, batch)`
    when given; else, with a `loss_fn`, the output of the last call of the top-level model
    inside `loss_fn` (captured by a forward hook, so each batch runs one forward); else
    `model(batch[0])` for tuple/list batches. A torchmetrics `Metric` or
    `MetricCollection` is fed `update(logits_of(outputs), default_target(batch))` (wrap it
    in `loopkit.metrics.TorchMetric(metric, preds=..., target=...)` to choose), is moved
    to the strategy's device, and syncs itself across ranks in `compute()`, which every
    rank calls; batches a rank repeats only to match collectives never update it.

    Args:
        state: the TrainState (read only).
        data: an iterable of batches (a DataLoader, a list, ...), iterated once.
        metrics: {name: metric}; a metric is a `loopkit.metrics.Metric` (e.g. `Accuracy()`),
            a torchmetrics `Metric` or `MetricCollection`, or a function (outputs, batch)
            returning a scalar mean or `Loss(sum, count)`. A torchmetrics object may also
            be passed alone. Metric objects are reset at the start.
        loss_fn: `loss_fn(model, batch)` as for training, or None for no loss.
        predict: `predict(model, batch) -> outputs` for the metrics.
        max_batches: stop after this many batches (None: all of `data`).
        weights: "model" (the trained weights), or "ema" / "swa": the average that
            `loopkit.ema` / `loopkit.swa` keep in the record, copied into the model for
            the evaluation; the model's weights are restored bitwise afterwards.

    Returns:
        {key: host float}.

    Raises:
        StaleStateError: `state` was already consumed.
        TypeError: a metric name is not a str, a metric is not a metric, loss_fn/predict not
            callable, data not iterable.
        ValueError: nothing to compute, a name collision, max_batches < 1, a torchmetrics
            metric under Pipeline or with per-step sync (or with list states and a rank
            that read no batch), `data` yields no batch, the loss counted no item, or
            `weights` names no average the record holds.

    Example:
        >>> import loopkit as lk
        >>> from loopkit.metrics import Accuracy
        >>> state = lk.TrainState.create(torch.nn.Linear(4, 3),
        ...     optimizer=lambda p: torch.optim.SGD(p, lr=0.1), strategy=lk.SingleDevice("cpu"))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> loss = lambda model, batch: lk.cross_entropy(model(batch[0]), batch[1])
        >>> sorted(evaluate(state, data, {"accuracy": Accuracy()}, loss_fn=loss))
        ['eval/accuracy', 'eval/loss', 'eval/perplexity']
    """
    state.check_fresh()
    named = _check_metrics(metrics, has_loss=loss_fn is not None)
    _check_arguments(data, metrics, named, loss_fn, predict, max_batches)
    _prepare_torchmetrics(named, state.strategy)
    check_weights(state, weights, where=_WHERE)
    with averaged_weights(state, weights, where=_WHERE):
        loss_sum, loss_count, n_batches = _sum_batches(
            state, data, named, loss_fn, predict, max_batches
        )
    return _global_results(
        state.strategy, named, loss_fn is not None, loss_sum, loss_count, n_batches
    )


def _check_arguments(
    data: object,
    metrics: object,
    named: list[tuple[str, Metric]],
    loss_fn: object,
    predict: object,
    max_batches: object,
) -> None:
    """Fail before any work on an argument evaluate() cannot use."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"{_WHERE}(loss_fn={loss_fn!r}): expected a callable loss_fn(model, batch) "
            "returning a scalar mean or loopkit.Loss(sum, count), or None."
        )
    if predict is not None and not callable(predict):
        raise TypeError(
            f"{_WHERE}(predict={predict!r}): expected a callable predict(model, batch) "
            "returning the outputs the metrics read, or None."
        )
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"{_WHERE}(max_batches={max_batches!r}): an int >= 1, or None for all.")
    if loss_fn is None and not named:
        raise ValueError(
            f"{_WHERE}(metrics={metrics!r}, loss_fn=None): nothing to compute. Pass "
            "loss_fn=... and/or metrics={'accuracy': Accuracy()}."
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{_WHERE}(data={type(data).__name__}): expected an iterable of batches, such as "
            "a DataLoader or a list."
        )


def _sum_batches(
    state: Any,
    data: Iterable[Any],
    named: list[tuple[str, Metric]],
    loss_fn: LossFn | None,
    predict: Predict | None,
    max_batches: int | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run this rank's batches; return its (loss sum, item count, batches) and update metrics.

    Everything stays on the device; the model's train/eval mode is restored afterwards.
    """
    model, strategy = state.model, state.strategy
    device = torch.device(strategy.device)
    acc = accumulator_dtype(device)
    for _, metric in named:
        metric.reset()
    loss_sum = torch.zeros((), dtype=acc, device=device)
    loss_count = torch.zeros((), dtype=acc, device=device)
    host_count = 0.0  # int counts add up on the host: no host-to-device copy per batch
    n_batches, batch = 0, None
    target = _forwards_on_every_rank(state, data, max_batches)

    def run(batch: Any) -> tuple[Any, Any]:
        with state.precision.autocast(device):
            return strategy.eval_forward(  # type: ignore[no-any-return]
                model,
                batch,
                loss_fn,
                predict,
                n_samples=batch_size(batch, _WHERE),
                want_outputs=bool(named),
                sum_dtype=acc,
            )

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iterate(data, where="evaluate(data=...)"):
                if max_batches is not None and n_batches >= max_batches:
                    break
                batch = strategy.to_device(batch)
                summed, outputs = run(batch)
                if summed is not None:  # a pipeline's first stages add nothing
                    loss_sum += summed[0]
                    if isinstance(summed[1], torch.Tensor):
                        loss_count += summed[1]
                    else:
                        host_count += summed[1]
                if outputs is not None:
                    for _, metric in named:
                        metric.update(outputs, batch)
                n_batches += 1
            for _ in range(n_batches, target):  # uncounted: only the collectives matter
                run(batch)
    finally:
        model.train(was_training)
    loss_count += host_count
    return loss_sum, loss_count, n_batches


def _forwards_on_every_rank(state: Any, data: Iterable[Any], max_batches: int | None) -> int:
    """How many forwards every rank must run so that forward collectives stay matched; 0: any.

    Only a strategy whose forward is a collective (`is_sharded`: FSDP gathers parameters,
    a pipeline passes activations) reading an uneven EpochSampler share (pad=False) needs
    it: a rank that runs out of batches then repeats its last one, uncounted, up to the
    busiest rank's count. Every rank works it out alike from the sampler: no communication.

    Raises:
        ValueError: some rank would have no batch at all to repeat (fewer items than ranks).
    """
    sampler = getattr(data, "sampler", None)
    strategy = state.strategy
    if not (strategy.is_sharded and isinstance(sampler, EpochSampler) and not sampler.pad):
        return 0
    size, drop_last = data.batch_size, data.drop_last  # type: ignore[attr-defined]
    busiest, idlest = sampler.busiest_share(), sampler.size // sampler.world_size

    def batches(items: int) -> int:
        return items // size if drop_last else -(-items // size)

    target = batches(busiest) if max_batches is None else min(batches(busiest), max_batches)
    if target > 0 and batches(idlest) == 0:
        raise ValueError(
            f"{_WHERE}(data=...): {sampler.size} eval item(s) in batches of {size} over "
            f"{sampler.world_size} ranks leave a rank without a batch, and {strategy!r} "
            "runs a collective in every forward, so the other ranks would wait for it. Use "
            "more eval items (at least one batch per rank) or a smaller eval batch size."
        )
    return target


def _global_results(
    strategy: Any,
    named: list[tuple[str, Metric]],
    has_loss: bool,
    loss_sum: torch.Tensor,
    loss_count: torch.Tensor,
    n_batches: int,
) -> dict[str, float]:
    """Sum this rank's share over every rank, compute the results, and bring them to the host."""
    device = torch.device(strategy.device)
    # [batches read, ranks that read none]: summed over ranks with everything else.
    counters = torch.tensor(
        [float(n_batches), float(n_batches == 0)], dtype=loss_sum.dtype, device=device
    )
    if strategy.world_size > 1 and _distributed():
        _all_reduce_sum([loss_sum, loss_count, counters, *_state_tensors(named)], device)

    values: dict[str, Any] = {"batches": counters[0], "idle_ranks": counters[1]}
    if has_loss:
        values["eval/loss"] = loss_sum / loss_count
        values["items"] = loss_count
    for key, metric in named:
        if not isinstance(metric, TorchMetric):
            values[key] = _computed(metric, key)
    host = to_host(values)  # host sync: once per evaluation
    if host.pop("batches") == 0:
        raise ValueError(
            f"{_WHERE}(data=...): the data yielded no batch. Check the eval dataset is not "
            "empty (and, with drop_last=True, holds at least one full batch)."
        )
    synced = _torchmetrics_results(named, idle_ranks=host.pop("idle_ranks"))
    result: dict[str, float] = {}
    if has_loss:
        items = host.pop("items")
        if not items > 0:
            raise ValueError(
                f"{_WHERE}(loss_fn=...): the loss counted {items} items over the whole eval "
                "data (every target masked?), so the mean loss is undefined."
            )
        loss = host.pop("eval/loss")
        result["eval/loss"] = loss
        result["eval/perplexity"] = math.exp(loss) if loss < 709.0 else math.inf
    for index, (key, _) in enumerate(named):  # in the order given
        result.update(synced[index] if index in synced else {key: host[key]})
    return result


def _torchmetrics_results(
    named: list[tuple[str, Metric]], idle_ranks: float
) -> dict[int, dict[str, float]]:
    """Compute each torchmetrics metric: {its index in `named`: {"eval/...": host float}}.

    torchmetrics syncs inside compute() (collectives), so every rank calls it, for the same
    metrics in the same order, after the checks above that every rank takes alike.

    Raises:
        ValueError: some rank read no batch and a metric keeps list states (its empty
            states cannot be gathered); decided from the global count, so on every rank.
    """
    wrapped = [(i, key, m) for i, (key, m) in enumerate(named) if isinstance(m, TorchMetric)]
    if not wrapped:
        return {}
    lists = [metric for _, _, metric in wrapped if metric.has_list_states()]
    if idle_ranks > 0 and lists:
        raise ValueError(
            f"{_WHERE}(data=...): {int(idle_ranks)} rank(s) read no eval batch, and "
            f"{lists[0]!r} keeps list states (every prediction), which torchmetrics cannot "
            "gather from a rank that added none. Use more eval items (at least one batch "
            "per rank) or a smaller eval batch size."
        )
    values: dict[str, Any] = {}
    groups: dict[int, list[str]] = {}
    for index, key, metric in wrapped:
        value = metric.compute()  # a collective with several ranks
        entries = value if isinstance(value, Mapping) else {key: value}
        groups[index] = [eval_key(str(entry)) for entry in entries]
        for entry_key, entry in zip(groups[index], entries.values(), strict=True):
            values[entry_key] = _computed_value(entry, entry_key, metric)
    host = to_host(values)  # host sync: once more, only with torchmetrics metrics
    return {index: {k: host[k] for k in keys} for index, keys in groups.items()}


def _check_metrics(metrics: object, has_loss: bool) -> list[tuple[str, Metric]]:
    if metrics is None:
        return []
    if is_torchmetrics(metrics):  # one torchmetrics object, named by its class
        metrics = {type(metrics).__name__: metrics}
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{_WHERE}(metrics={metrics!r}): expected a dict of name -> metric, e.g. "
            "{'accuracy': Accuracy(), 'top5': TopKAccuracy(5)}, or one torchmetrics "
            "Metric or MetricCollection."
        )
    named: list[tuple[str, Metric]] = []
    taken = {"eval/loss", "eval/perplexity"} if has_loss else set()
    for name, metric in metrics.items():
        if not isinstance(name, str) or not name or name == "eval/":
            raise TypeError(
                f"{_WHERE}(metrics={{{name!r}: ...}}): metric names must be non-empty str, "
                "e.g. 'accuracy' (reported as 'eval/accuracy')."
            )
        metric = as_metric(metric, name)
        for key in result_keys(name, metric):
            if key in taken:
                why = (
                    "is computed from loss_fn"
                    if key in ("eval/loss", "eval/perplexity")
                    else ("is given twice")
                )
                raise ValueError(
                    f"{_WHERE}(metrics={{{name!r}: ...}}): {key!r} {why}. Rename the metric "
                    "(a MetricCollection's entries: its keys, prefix= or postfix=)."
                )
            taken.add(key)
        named.append((eval_key(name), metric))
    return named


def _prepare_torchmetrics(named: list[tuple[str, Metric]], strategy: Any) -> None:
    """Refuse torchmetrics metrics the strategy's ranks cannot sync; move them to its device."""
    for _, metric in named:
        if isinstance(metric, TorchMetric):
            metric.prepare(strategy, _WHERE)


def _state_tensors(named: list[tuple[str, Metric]]) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for key, metric in named:
        for tensor in metric.state_tensors():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"{key}: {type(metric).__name__}.state_tensors() must return tensors, got "
                    f"{type(tensor).__name__}."
                )
            tensors.append(tensor)
    return tensors


def _computed(metric: Metric, key: str) -> Any:
    return _computed_value(metric.compute(), key, metric)


def _computed_value(value: Any, key: str, metric: Metric) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise TypeError(
        f"{key}: {type(metric).__name__}.compute() returned {type(value).__name__}; expected a "
        "scalar tensor."
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Sum `tensors` across ranks in place, with one all_reduce over a packed float64 buffer.

    Every rank must pass the same shapes in the same order (same metrics, same loss_fn).
    """
    dtype = accumulator_dtype(device)
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(flat[offset : offset + n].view(tensor.shape))
        offset += n


__all__ = ["evaluate"]
