"""Strategies decide how forward/backward, gradient sync, norms and snapshots run.

The contract every strategy implements is `loopkit.Strategy` (declared in loopkit._types,
the lowest layer); the built-in ones share their usual behaviour through the free
functions of `loopkit.strategies.common`.
"""

from __future__ import annotations

from .._types import STRATEGY_MEMBERS, Strategy, check_strategy
from . import liveness as liveness
from .common import unwrap
from .ddp import DDP
from .env import DistributedError
from .fsdp import FSDP
from .pipeline import Pipeline
from .single import SingleDevice

__all__ = [
    "STRATEGY_MEMBERS",
    "DDP",
    "FSDP",
    "DistributedError",
    "Pipeline",
    "SingleDevice",
    "Strategy",
    "check_strategy",
    "liveness",
    "unwrap",
]
