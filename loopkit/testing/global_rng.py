"""The process-global random generators (torch, Python, numpy): seed them, and restore them.

A check must not disturb the caller's global RNG state, and the determinism check seeds the
globals on purpose to prove a step does not read them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from types import ModuleType

import torch

np: ModuleType | None
try:  # optional: torch runs without numpy, and so do the checks
    import numpy as np
except ImportError:  # pragma: no cover - depends on the environment
    np = None

__all__ = ["global_rng_guard", "seed_globals"]


@contextlib.contextmanager
def global_rng_guard() -> Iterator[None]:
    """Restore torch's, Python's and numpy's global generators on exit."""
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py_state = random.getstate()
    np_state = None if np is None else np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


def seed_globals(value: int) -> None:
    """Seed torch's (all devices), Python's and numpy's global generators with `value`."""
    torch.manual_seed(value)
    random.seed(value)
    if np is not None:
        np.random.seed(value % 2**32)
