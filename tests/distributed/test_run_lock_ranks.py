"""One writer per directory under DDP: rank 0 holds the lock, and every rank fails with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _ranks import run_ranks
from helpers import mlp

import loopkit as lk
from loopkit import checkpoint as ckpt
from loopkit.run_lock import DirectoryLock
from loopkit.strategies import DDP

pytestmark = pytest.mark.distributed


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


class Steps:
    def __init__(self) -> None:
        self.count = 0

    def on_step_end(self, state: Any) -> None:
        self.count += 1


def fit_on(rank: int, root: str) -> tuple[str, str, int, str | None]:
    """One rank's fit on `root`: what it raised (or "finished"), its steps, its run id."""
    torch.set_num_threads(1)
    steps = Steps()
    try:
        result = lk.fit(
            mlp(), dataset(), loss_fn=loss_fn, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            strategy=DDP(timeout_s=30), batch_size=4, max_steps=2, progress=False,
            checkpoint_dir=root, save_every=2, callbacks=[steps],
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - the test compares every rank's error
        return type(error).__name__, str(error), steps.count, None
    return "finished", "", steps.count, result.run_id


def test_every_rank_stops_at_once_when_rank_0_is_refused(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path, run_id="holder"):  # held by this process, not by a rank
        outcomes = [o.unwrap() for o in run_ranks(2, fit_on, str(tmp_path), timeout_s=60)]
    for name, message, steps, _ in outcomes:
        assert name == "DirectoryLockedError", message
        assert f"checkpoint_dir={str(tmp_path)!r} is in use by another run" in message
        assert f"pid {os.getpid()}" in message and "run id holder" in message
        assert steps == 0
    assert "rank 0 was refused" in outcomes[1][1]
    assert ckpt.list_checkpoints(tmp_path) == []


def test_the_ranks_of_one_run_share_its_run_id(tmp_path: Path) -> None:
    outcomes = [o.unwrap() for o in run_ranks(2, fit_on, str(tmp_path), timeout_s=60)]
    assert [o[0] for o in outcomes] == ["finished", "finished"], outcomes
    run_ids = {o[3] for o in outcomes}
    assert len(run_ids) == 1 and None not in run_ids
    (path,) = ckpt.list_checkpoints(tmp_path)
    assert ckpt.read_meta(path)["run_id"] == outcomes[0][3]
