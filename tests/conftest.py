"""Test configuration: hypothesis profiles, deterministic torch, shared fixtures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" is fixed and derandomized (the default, also in CI); "dev" explores more;
# "heavy" is for nox -s tests -- with LOOPKIT_HYPOTHESIS=heavy.
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", parent=settings.get_profile("ci"), derandomize=False)
settings.register_profile(
    "heavy", parent=settings.get_profile("ci"), max_examples=300, derandomize=False
)
settings.load_profile(os.environ.get("LOOPKIT_HYPOTHESIS", "ci"))

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Loggers whose level a test may set process-wide (the Trainer façade's log_level does, as
# HF's does); each test starts from the levels the session began with.
_LEVELLED = ("loopkit", "loopkit.compat", "transformers")


@pytest.fixture(autouse=True)
def _logger_levels() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _LEVELLED}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
