"""loopkit: a functional, composable training-loop toolkit for PyTorch."""

from __future__ import annotations

from . import schedules as schedules
from ._types import Batch as Batch
from ._types import LossFn as LossFn
from ._types import OptimizerFactory as OptimizerFactory
from ._types import Schedule as Schedule
from ._types import Transform as Transform
from .compose import chain as chain
from .compose import every as every
from .compose import identity as identity
from .compose import when as when
from .loss import Loss as Loss
from .loss import cross_entropy as cross_entropy
from .loss import mse as mse
from .params import param_groups as param_groups
from .params import freeze as freeze
from .precision import Precision as Precision
from .precision import set_tf32 as set_tf32
from .state import StaleStateError as StaleStateError
from .state import TrainState as TrainState
from .state import Window as Window
from .strategies import SingleDevice as SingleDevice
from .strategies import Strategy as Strategy
from .transforms import accumulate as accumulate
from .transforms import clip as clip
from .transforms import forward as forward
from .transforms import optimizer_step as optimizer_step

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Loss",
    "LossFn",
    "OptimizerFactory",
    "Precision",
    "Schedule",
    "SingleDevice",
    "StaleStateError",
    "Strategy",
    "TrainState",
    "Transform",
    "Window",
    "accumulate",
    "chain",
    "clip",
    "cross_entropy",
    "every",
    "forward",
    "freeze",
    "identity",
    "mse",
    "optimizer_step",
    "param_groups",
    "schedules",
    "set_tf32",
    "when",
]
