"""CheckSetup: the pieces every check builds its runs from, as one frozen record.

A check's keyword arguments (model factory, loss, step factory, optimizer factory,
precision, schedule, seed, device) become a CheckSetup; the check then asks it for fresh
records, step chains and the default tolerance, so no check repeats that set-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from .._types import OptimizerFactory, Schedule, Strategy, Transform
from ..compose import chain, identity
from ..precision import Precision, PrecisionName, as_precision
from ..state import TrainState
from ..strategies import SingleDevice
from ..transforms import accumulate, clip, forward, optimizer_step
from .assertions import Tolerance, tolerance_for
from .failures import name_of

__all__ = [
    "CheckSetup",
    "Device",
    "MakeModel",
    "MakeStep",
    "check_same_init",
    "default_optimizer",
    "default_step",
    "model_dtype",
]

MakeModel = Callable[[], torch.nn.Module]
"""`make_model() -> nn.Module`: a fresh model with the same initial weights on every call."""

MakeStep = Callable[[int], Transform]
"""`make_step(k) -> transform` for a window of k micro-batches."""

Device = str | torch.device
"""Where a check runs: "cpu", "cuda:0", a torch.device."""


@dataclass(frozen=True)
class default_optimizer:  # noqa: N801 - a factory reads like a function
    """The checks' default optimizer factory: SGD with momentum.

    SGD carries a gradient error into the parameters linearly (Adam would normalise a tiny
    error on a near-zero gradient up to the size of an update), so tight tolerances hold.
    """

    lr: float = 0.05
    momentum: float = 0.9

    def __call__(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


@dataclass(frozen=True)
class default_step:  # noqa: N801
    """`make_step` for loopkit's standard chain: `k -> chain(forward, accumulate(k), [clip],
    optimizer_step())`. A frozen record, so it prints and pickles."""

    loss_fn: Any
    max_norm: float | None = None

    def __call__(self, k: int) -> Transform:
        return chain(
            forward(self.loss_fn),
            accumulate(k),
            clip(self.max_norm) if self.max_norm is not None else identity(),
            optimizer_step(),
        )


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_same_init(make_model: MakeModel, where: str) -> None:
    """Fail (ValueError) unless two calls of make_model give bitwise-identical models."""
    if not callable(make_model):
        raise TypeError(
            f"{where}(make_model={make_model!r}): expected a factory `make_model() -> "
            "nn.Module` that returns a fresh, identical model on every call."
        )
    a, b = make_model(), make_model()
    if not isinstance(a, torch.nn.Module):
        raise TypeError(f"{where}: make_model() returned {type(a).__name__}, not an nn.Module.")
    if a is b:
        raise ValueError(
            f"{where}(make_model=...): two calls returned the same module object; the checks "
            "train several copies side by side, so make_model must build a new one per call."
        )
    sa, sb = a.state_dict(), b.state_dict()
    for name, value in sa.items():
        other = sb.get(name)
        if other is None or other.shape != value.shape or not torch.equal(value, other):
            raise ValueError(
                f"{where}(make_model={name_of(make_model)}): two calls returned models with "
                f"different initial weights (first at {name!r}). Seed inside the factory, e.g. "
                "`torch.manual_seed(0)` before building (or loopkit.testing.search."
                "MLPFactory), so every run starts from the same weights."
            )


@dataclass(frozen=True, kw_only=True)
class CheckSetup:
    """The user's pieces one check runs: everything but the data and the check's own knobs.

    Attributes:
        check: the check's name, used in every message (`check_determinism`).
        make_model: factory of identical fresh models.
        loss_fn: `loss_fn(model, batch)` -> Loss or scalar mean.
        make_step: `k -> transform`, or None for loopkit's default chain.
        optimizer: optimizer factory `params -> Optimizer`.
        precision: the precision policy.
        schedule: lr schedule, as TrainState.create takes it (None: constant).
        seed: the run seed.
        device: where SingleDevice runs.
        strategy: the Strategy every run uses (None: SingleDevice(device)).
    """

    check: str
    make_model: MakeModel
    loss_fn: Any
    make_step: MakeStep | None = None
    optimizer: OptimizerFactory = default_optimizer()
    precision: Precision = Precision("fp32")
    schedule: Schedule | None = None
    seed: int = 0
    device: Device = "cpu"
    strategy: Strategy | None = None

    @classmethod
    def create(
        cls,
        check: str,
        make_model: MakeModel,
        loss_fn: Any,
        *,
        make_step: MakeStep | None = None,
        optimizer: OptimizerFactory | None = None,
        precision: Precision | PrecisionName = "fp32",
        schedule: Schedule | None = None,
        seed: int = 0,
        device: Device = "cpu",
        strategy: Strategy | None = None,
    ) -> CheckSetup:
        """A setup from a check's keyword arguments: the default optimizer for None, and
        a precision name coerced to a Precision."""
        return cls(
            check=check,
            make_model=make_model,
            loss_fn=loss_fn,
            make_step=make_step,
            optimizer=optimizer if optimizer is not None else default_optimizer(),
            precision=as_precision(precision),
            schedule=schedule,
            seed=seed,
            device=device,
            strategy=strategy,
        )

    @classmethod
    def from_arguments(cls, check: str, arguments: Mapping[str, Any]) -> CheckSetup:
        """A setup from a check's own arguments: `CheckSetup.from_arguments(name, locals())`
        before the check assigns any variable (locals() then holds its arguments only).

        The checks take the setup's pieces as arguments of the same names (make_model,
        loss_fn, make_step, optimizer, precision, schedule, seed, device, strategy), each
        check those it uses, written out in its signature for its users and their editors.
        A piece the check does not take keeps `create`'s default. (check_strategy_equivalence
        calls `create`: its `strategy` is a factory for its ranks, not the setup's strategy.)
        """
        names = [f.name for f in fields(cls) if f.name != "check"]
        return cls.create(check, **{name: arguments[name] for name in names if name in arguments})

    @property
    def step_name(self) -> str | None:
        """The user's make_step as the reproduction line writes it (None: the default)."""
        return None if self.make_step is None else name_of(self.make_step)

    def check_same_init(self) -> None:
        """Fail unless two calls of make_model give bitwise-identical models."""
        check_same_init(self.make_model, self.check)

    def new_state(self, strategy: Strategy | None = None) -> TrainState:
        """A fresh record: a new model from make_model, on `strategy` (the setup's by
        default, else SingleDevice(device))."""
        return TrainState.create(
            self.make_model(),
            optimizer=self.optimizer,
            precision=self.precision,
            schedule=self.schedule,
            seed=self.seed,
            strategy=strategy or self.strategy or SingleDevice(self.device),
        )

    def step_maker(self, *, max_norm: float | None = None) -> MakeStep:
        """make_step, or loopkit's default chain (clipped at `max_norm` when given)."""
        if self.make_step is not None:
            return self.make_step
        return default_step(self.loss_fn, max_norm)

    def step(self, k: int, *, max_norm: float | None = None) -> Transform:
        """The step chain for windows of k micro-batches: `step_maker(max_norm=...)(k)`.

        Raises:
            TypeError: make_step(k) did not return a callable.
        """
        maker = self.step_maker(max_norm=max_norm)
        step = maker(k)
        if not callable(step):
            raise TypeError(
                f"{self.check}(make_step={name_of(maker)}): make_step({k}) returned {step!r}; it "
                "must return a transform, e.g. `lambda k: lk.chain(lk.forward(loss_fn), "
                "lk.accumulate(k), lk.optimizer_step())`."
            )
        return step

    def tolerance(
        self, rtol: float | None, atol: float | None, *, bitwise: bool = False
    ) -> Tolerance:
        """The comparison tolerance: given, else by the model's dtype and the precision.

        `bitwise`: with neither rtol nor atol given, CPU runs must match exactly.
        """
        if bitwise and rtol is None and atol is None and torch.device(self.device).type == "cpu":
            return Tolerance(0.0, 0.0, "bitwise: CPU runs must match exactly")
        return tolerance_for(model_dtype(self.make_model()), self.precision, rtol=rtol, atol=atol)
