"""The learning-rate range test: `find_lr` sweeps the lr and suggests one.

`find_lr` trains for a few steps while the lr grows exponentially from `min_lr` to
`max_lr` (one value per optimizer step, every param group alike), records each step's
loss and an exponentially smoothed copy of it, and stops early once the smoothed loss
exceeds `diverge_factor` times the best so far or a loss is not finite. The suggestion is
the lr where the smoothed loss falls fastest against log(lr), searched from `skip_start`
to the lowest smoothed loss (the rule Lightning's and fastai's "steepest" finders use).

The sweep is loopkit's own step, `chain(forward(loss_fn), accumulate(k), optimizer_step())`
on a TrainState whose schedule is the sweep, and the data is read by fit's rule
(`loopkit.data.make_loader`). Afterwards the model's parameters, buffers and gradients,
a built optimizer's state and hyperparameters, and torch's RNG states are restored bitwise
from copies kept in memory (no file is written, nothing is pickled). Cost: one copy of the
weights (and of the optimizer state) in memory, and one host sync per step (divergence is
checked on the host).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._types import LossFn, OptimizerFactory
from .compose import chain
from .config import resolve_named
from .data import iterate, make_loader
from .precision import Precision, PrecisionName
from .state import TrainState, Window
from .strategies import SingleDevice, Strategy
from .transforms import accumulate as accumulate_transform
from .transforms import forward, optimizer_step

PLOT_EXTRA = "pip install 'loopkit[plot]'"
"""How to get matplotlib, which `LRFinderResult.plot` needs."""


@dataclass(frozen=True)
class LRFinderResult:
    """What `find_lr` measured: the curve, where it stopped, and the suggested lr.

    Attributes:
        lrs: the lr of each optimizer step taken (every param group had it).
        losses: each step's loss (the mean over its window), measured before that step's
            update, as Lightning and fastai record it.
        smoothed_losses: the exponentially smoothed, bias-corrected losses.
        suggestion: the lr where the smoothed loss falls fastest against log(lr), or None
            when the curve is too short to say (see `reason`).
        min_loss_lr: the lr of the lowest smoothed loss (None: no finite loss).
        stopped_by: "num_steps" (the sweep ran to max_lr), "diverged" (smoothed loss above
            diverge_factor x its best), "nonfinite" (a NaN or infinite loss) or "data"
            (the data ran out: a one-pass iterable).
        reason: why there is no suggestion ("" when there is one).
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed_losses: tuple[float, ...]
    suggestion: float | None
    min_loss_lr: float | None
    stopped_by: str
    reason: str = ""

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw loss and smoothed loss against the lr (log scale) into a PNG at `path`.

        Missing directories are created; a path without a suffix gets ".png". A curve
        without a finite loss is drawn too (the lrs tried, marked "no finite loss").

        Returns:
            The path written.

        Raises:
            ModuleNotFoundError: matplotlib is missing (`pip install 'loopkit[plot]'`).
        """
        _require_matplotlib("LRFinderResult.plot")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4.5))
        try:
            finite = [(lr, x) for lr, x in zip(self.lrs, self.losses) if math.isfinite(x)]
            if finite:
                axis.plot(*zip(*finite), color="0.7", linewidth=1, label="loss")
            axis.plot(self.lrs, self.smoothed_losses, color="tab:blue", label="smoothed loss")
            if not any(math.isfinite(x) for x in self.smoothed_losses):
                # Nothing finite to draw: set the lr axis, which a log scale cannot guess.
                lrs = self.lrs or (1e-7, 10.0)
                axis.set_xlim(min(lrs) / 2, max(lrs) * 2)
                axis.text(0.5, 0.5, "no finite loss", ha="center", transform=axis.transAxes)
            if self.suggestion is not None:
                axis.axvline(
                    self.suggestion,
                    color="tab:red",
                    linestyle="--",
                    label=f"suggestion {self.suggestion:.3g}",
                )
            axis.set_ylim(*_y_range(self.losses, self.smoothed_losses))
            axis.set_xscale("log")
            axis.set_xlabel("learning rate")
            axis.set_ylabel("loss")
            axis.set_title(f"LR range test ({len(self.lrs)} steps, stopped by {self.stopped_by})")
            axis.legend(loc="best", fontsize="small")
            out = Path(path)
            if not out.suffix:  # matplotlib would add ".png" itself; return the real name
                out = out.with_name(out.name + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(out, dpi=100, bbox_inches="tight")
        finally:
            plt.close(figure)
        return out

    def __str__(self) -> str:
        if not self.lrs:
            return f"LRFinderResult: no step taken; stopped by {self.stopped_by}"
        lines = [
            f"LRFinderResult: {len(self.lrs)} steps, lr {self.lrs[0]:.3g} -> "
            f"{self.lrs[-1]:.3g}; stopped by {self.stopped_by}"
        ]
        if self.suggestion is not None:
            lines.append(f"  suggestion: {self.suggestion:.3g} (steepest fall of the loss)")
        else:
            lines.append(f"  no suggestion: {self.reason}")
        if self.min_loss_lr is not None:
            lines.append(f"  lowest smoothed loss at lr {self.min_loss_lr:.3g}")
        return "\n".join(lines)


def _y_range(losses: Sequence[float], smoothed: Sequence[float]) -> tuple[float, float]:
    """The loss axis: the smoothed curve through its minimum, not the divergence's spikes."""
    finite = [i for i, x in enumerate(smoothed) if math.isfinite(x)]
    if not finite:
        return 0.0, 1.0
    low = min(finite, key=lambda i: smoothed[i])
    head = [smoothed[i] for i in finite if i <= low]
    raw = [x for x in losses[: low + 1] if math.isfinite(x)]
    top, bottom = max(head), min(head + raw)
    pad = 0.1 * (top - bottom) or 0.1 * abs(top) or 0.1
    return bottom - pad, top + 3 * pad


@dataclass(frozen=True, slots=True)
class _Sweep:
    """The sweep as a schedule: lr of step k, as a factor of a base lr of 1.0."""

    min_lr: float
    max_lr: float
    num_steps: int

    def __call__(self, step: int) -> float:
        fraction = step / (self.num_steps - 1)
        return self.min_lr * (self.max_lr / self.min_lr) ** fraction

    def __repr__(self) -> str:
        return f"sweep({self.min_lr:g} -> {self.max_lr:g} over {self.num_steps} steps)"


def _require_matplotlib(where: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            f"{where}: drawing the plot needs matplotlib, which is not installed. Install "
            f"the `plot` extra: {PLOT_EXTRA}."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_numbers(
    *,
    min_lr: Any,
    max_lr: Any,
    num_steps: Any,
    accumulate: Any,
    smoothing: Any,
    diverge_factor: Any,
    skip_start: Any,
) -> None:
    """Refuse bad sweep settings, naming the argument, its value and what is allowed."""
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if not (_is_real(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"find_lr({name}={value!r}): must be a positive, finite float.")
    if not max_lr > min_lr:
        raise ValueError(
            f"find_lr(max_lr={max_lr!r}): must be above min_lr={min_lr!r} (the sweep rises "
            "from min_lr to max_lr), e.g. min_lr=1e-7, max_lr=10."
        )
    for name, value, low in (("num_steps", num_steps, 2), ("accumulate", accumulate, 1)):
        if not (_is_int(value) and value >= low):
            raise ValueError(f"find_lr({name}={value!r}): must be an int >= {low}.")
    if not (_is_real(smoothing) and 0 <= smoothing < 1):
        raise ValueError(
            f"find_lr(smoothing={smoothing!r}): the smoothing factor of the loss's moving "
            "average must be a float in [0, 1), e.g. 0.98 (0 turns smoothing off)."
        )
    if not (_is_real(diverge_factor) and diverge_factor > 1):
        raise ValueError(
            f"find_lr(diverge_factor={diverge_factor!r}): must be a float > 1 (the sweep "
            "stops once the smoothed loss exceeds this many times its best), e.g. 4.0; "
            "math.inf never stops early."
        )
    if not (_is_int(skip_start) and 0 <= skip_start <= num_steps - 3):
        raise ValueError(
            f"find_lr(skip_start={skip_start!r}): must be an int in [0, num_steps - 3] = "
            f"[0, {num_steps - 3}] (the first steps left out of the suggestion; default 10). "
            "For a short sweep pass a smaller skip_start, or more num_steps."
        )


def _check_arguments(
    model: object,
    loss_fn: object,
    optimizer: object,
    strategy: object,
    plot_path: object,
) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"find_lr(model={type(model).__name__}): expected a torch.nn.Module.")
    if not callable(loss_fn):
        raise TypeError(
            f"find_lr(loss_fn={loss_fn!r}): expected a function (model, batch) -> loss, e.g. "
            "`lambda model, batch: lk.mse(model(batch[0]), batch[1])`."
        )
    if not (isinstance(optimizer, (torch.optim.Optimizer, dict)) or callable(optimizer)):
        raise TypeError(
            f"find_lr(optimizer={optimizer!r}): expected a torch.optim.Optimizer over the "
            "model's parameters or a factory such as `lambda params: torch.optim.SGD(params, "
            "lr=0.1)` (its lr is replaced by the sweep's)."
        )
    if strategy is not None and not isinstance(strategy, SingleDevice):
        raise TypeError(
            f"find_lr(strategy={strategy!r}): the range test runs in one process, on "
            "SingleDevice (None picks the device). Run it before launching distributed "
            "training: the lr it suggests is the lr of the same global batch size."
        )
    if plot_path is not None:
        if not isinstance(plot_path, (str, os.PathLike)):
            raise TypeError(
                f"find_lr(plot_path={plot_path!r}): expected a file path such as 'lr.png', "
                "or None for no plot."
            )
        _require_matplotlib("find_lr(plot_path=...)")


class _Restorer:
    """In-memory copies of everything the sweep changes, put back bitwise by `restore`.

    Parameters and buffers are kept by (module, name): a strategy that moves the model
    to another device replaces buffer tensors (parameters keep their identity), so a
    restore copies into the tensor in place where it is unchanged in device, dtype and
    shape, and puts the saved tensor back otherwise.
    """

    def __init__(self, model: torch.nn.Module, optimizer: object, device: torch.device) -> None:
        self.entries: list[tuple[torch.nn.Module, str, bool, torch.Tensor, torch.Tensor | None]]
        self.entries = []
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                grad = None if param.grad is None else param.grad.detach().clone()
                self.entries.append((module, name, True, param.detach().clone(), grad))
            for name, buffer in module.named_buffers(recurse=False):
                self.entries.append((module, name, False, buffer.detach().clone(), None))
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        # deepcopy clones the state's tensors; load_state_dict puts state and hyperparameters
        # (the lr the sweep overwrote included) back.
        self.optimizer_state = (
            copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        )
        self.cpu_rng = torch.get_rng_state()
        # The sweep seeds the generators of its device (loopkit._rng): CUDA's too when it runs
        # there, so theirs are kept (reading them starts CUDA, which the sweep would anyway).
        uses_cuda = torch.cuda.is_initialized() or device.type == "cuda"
        self.cuda_rng = torch.cuda.get_rng_state_all() if uses_cuda else None

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, is_param, saved, grad in self.entries:
                live = getattr(module, name)
                if live is None:
                    continue
                same = (live.device, live.dtype, live.shape) == (
                    saved.device,
                    saved.dtype,
                    saved.shape,
                )
                if same:
                    live.copy_(saved)
                elif is_param:
                    live.data = saved
                else:
                    setattr(module, name, saved)
                if is_param:
                    live.grad = grad
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer_state)  # type: ignore[arg-type]
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _batches(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch; stops when an epoch yields none."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        got = False
        for batch in iterate(loader, where="find_lr(data=...)"):
            got = True
            yield batch
        if not got:
            if epoch == 0:
                raise ValueError("find_lr(data=...): the data yielded no batches.")
            return  # a one-pass iterable is spent
        epoch += 1


@dataclass
class _Curve:
    """The sweep's records so far, and the divergence rule."""

    smoothing: float
    diverge_factor: float
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    average: float = 0.0
    best: float = math.inf

    def add(self, lr: float, loss: float) -> str | None:
        """Record one step; return why the sweep must stop, or None to go on."""
        self.lrs.append(lr)
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            return "nonfinite"
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        # Bias correction: the average starts at 0, so early values are divided up. Every
        # earlier loss was finite (the sweep stops at the first one that is not).
        value = self.average / (1 - self.smoothing ** (len(self.smoothed) + 1))
        self.smoothed.append(value)
        self.best = min(self.best, value)
        if len(self.smoothed) > 1 and value > self.diverge_factor * self.best:
            return "diverged"
        return None


def _suggest(
    lrs: Sequence[float], smoothed: Sequence[float], skip_start: int
) -> tuple[float | None, float | None, str]:
    """The lr of the steepest fall of the smoothed loss, the lr of its minimum, and a reason.

    The slope is the loss's central difference against log(lr) (one-sided at the ends),
    searched over [skip_start, the index of the lowest smoothed loss].
    """
    finite = [i for i, x in enumerate(smoothed) if math.isfinite(x)]
    if not finite:
        return None, None, "no finite loss was measured"
    low = min(finite, key=lambda i: smoothed[i])
    window = list(range(skip_start, low + 1))
    if len(window) < 3:
        return (
            None,
            lrs[low],
            f"the lowest smoothed loss is at step {low}, too close to the start (skip_start="
            f"{skip_start}) to find a slope; lower min_lr or skip_start",
        )
    logs = [math.log(lr) for lr in lrs]
    slopes = []
    for i in window:
        a, b = max(i - 1, window[0]), min(i + 1, window[-1])
        slopes.append((smoothed[b] - smoothed[a]) / (logs[b] - logs[a]))
    steepest = window[min(range(len(window)), key=slopes.__getitem__)]
    return lrs[steepest], lrs[low], ""


def _sweep(
    state: TrainState, step: Callable[..., TrainState], loader: Any, curve: _Curve, num_steps: int
) -> str:
    """Train until num_steps optimizer steps, divergence or the end of the data."""
    for batch in _batches(loader):
        taken = state.step
        state = step(state, batch)
        if state.step == taken:
            continue  # a micro-batch inside an open window
        # host sync: once per step, to check the loss for divergence.
        loss = float(state.metrics["train/loss"])
        stop = curve.add(float(state.metrics["train/lr"]), loss)
        if stop is not None:
            return stop
        if state.step >= num_steps:
            return "num_steps"
    return "data"


def find_lr(
    model: torch.nn.Module,
    data: Any,
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer | OptimizerFactory | Mapping[str, Any],
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    batch_size: int | None = None,
    accumulate: int = 1,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    skip_start: int = 10,
    precision: Precision | PrecisionName = "fp32",
    strategy: Strategy | None = None,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
) -> LRFinderResult:
    """Run the LR range test on `model` and return the loss curve and a suggested lr.

    Step k (k = 0 .. num_steps - 1) trains with lr = min_lr * (max_lr / min_lr) **
    (k / (num_steps - 1)) in every param group. The model, a built optimizer and torch's
    RNG states are restored bitwise afterwards, also when the sweep raises.

    Args:
        model: the module to probe (left as it was).
        data: training data, read by fit's rule (loopkit.data): a Dataset or sequence of
            samples with `batch_size` (shuffled), a DataLoader, or an iterable of batches.
            It is read again from the start when it runs out before num_steps.
        loss_fn: `loss_fn(model, batch)` -> Loss or scalar mean, as for fit.
        optimizer: a built optimizer over the model's parameters (its state is used and
            restored) or a factory `params -> Optimizer` or {"name": ..., ...}; the sweep
            sets every group's lr.
        min_lr: the first lr of the sweep.
        max_lr: the last lr of the sweep.
        num_steps: optimizer steps of a full sweep (>= 2).
        batch_size: samples per micro-batch, for a Dataset or sequence of samples.
        accumulate: micro-batches per optimizer step.
        smoothing: factor of the loss's exponential moving average (0.98: about the last
            50 steps; 0: raw losses).
        diverge_factor: stop once the smoothed loss exceeds this many times its best.
        skip_start: steps at the start left out of the suggestion (their smoothed loss
            still carries the first losses' noise).
        precision: "fp32", "bf16", "fp16" or a Precision, as for fit.
        strategy: SingleDevice (the default picks cuda > mps > cpu).
        seed: the data order's and the steps' randomness.
        collate_fn: how samples become a batch (with batch_size).
        plot_path: write the curve as a PNG here (needs matplotlib: the `plot` extra).

    Returns:
        LRFinderResult: `lrs`, `losses`, `smoothed_losses`, `suggestion`, `min_loss_lr`,
        `stopped_by`; `str()` summarises it, `.plot(path)` draws it.

    Raises:
        TypeError: model is no Module, loss_fn is not callable, optimizer is neither an
            optimizer nor a factory, strategy is not SingleDevice, plot_path is no path.
        ValueError: a number out of range (each is named), or data without batches.
        ModuleNotFoundError: plot_path given and matplotlib missing (the `plot` extra).

    Example:
        >>> result = lk.find_lr(model, data, loss_fn=loss_fn, batch_size=32,  # doctest: +SKIP
        ...                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
        >>> print(result.suggestion)  # doctest: +SKIP
    """
    _check_arguments(model, loss_fn, optimizer, strategy, plot_path)
    _check_numbers(
        min_lr=min_lr,
        max_lr=max_lr,
        num_steps=num_steps,
        accumulate=accumulate,
        smoothing=smoothing,
        diverge_factor=diverge_factor,
        skip_start=skip_start,
    )
    # {"name": "AdamW", ...} -> a factory
    resolved: torch.optim.Optimizer | OptimizerFactory = resolve_named(optimizer, "optimizer")
    loader = make_loader(
        data,
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
        collate_fn=collate_fn,
        where="find_lr(data=...)",
    )
    strategy = SingleDevice() if strategy is None else strategy
    saved = _Restorer(model, resolved, strategy.device)
    curve = _Curve(float(smoothing), float(diverge_factor), [], [], [])
    try:
        state = TrainState.create(
            model,
            optimizer=resolved,
            schedule=_Sweep(float(min_lr), float(max_lr), int(num_steps)),
            precision=precision,
            strategy=strategy,
            seed=seed,
        )
        # Base lrs of 1.0: the schedule's factor is the lr itself, in every group.
        state = state.replace(
            base_lrs=(1.0,) * len(state.optimizer.param_groups), window=Window(size=accumulate)
        )
        step = chain(forward(loss_fn), accumulate_transform(accumulate), optimizer_step())
        stopped_by = _sweep(state, step, loader, curve, num_steps)
    finally:
        saved.restore()
    suggestion, min_loss_lr, reason = _suggest(curve.lrs, curve.smoothed, skip_start)
    result = LRFinderResult(
        lrs=tuple(curve.lrs),
        losses=tuple(curve.losses),
        smoothed_losses=tuple(curve.smoothed),
        suggestion=suggestion,
        min_loss_lr=min_loss_lr,
        stopped_by=stopped_by,
        reason=reason,
    )
    if plot_path is not None:
        result.plot(plot_path)
    return result


__all__ = ["PLOT_EXTRA", "LRFinderResult", "find_lr"]
