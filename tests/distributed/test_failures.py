"""A rank that dies or hangs: the others stop with a clear error, and the run resumes.

A rank that is lost (stopped or killed) is named by tests/distributed/test_lost_rank.py; here
a rank that is alive but waits elsewhere (in a callback) is named with where it waits, and a
rank that left fit raising is named with its error.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _ranks import run_ranks
from helpers import mlp

import loopkit as lk
from loopkit.strategies import DDP, DistributedError, SingleDevice

pytestmark = pytest.mark.distributed

STEPS, BATCH, SAVE_EVERY = 8, 4, 2


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)  # 6 steps an epoch on 2 ranks
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def train(strategy: Any, root: Path, batch_size: int = BATCH, **overrides: Any) -> lk.FitResult:
    options = dict(
        loss_fn=loss_fn,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        strategy=strategy,
        batch_size=batch_size,
        max_steps=STEPS,
        progress=False,
        log_every=1,
        checkpoint_dir=root,
        save_every=SAVE_EVERY,
    )
    return lk.fit(mlp(seed=3), dataset(), **{**options, **overrides})


class Fail:
    """On `rank`, at the end of step `at`, die (SIGKILL) or hang until told to stop."""

    def __init__(self, rank: int, at: int, how: str, flag: Path) -> None:
        self.rank, self.at, self.how, self.flag = rank, at, how, flag
        self.step_end_s = 0.0

    def on_step_end(self, state: Any) -> None:
        self.step_end_s = time.monotonic()
        if state.strategy.rank != self.rank or state.step != self.at:
            return
        if self.how == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        while not self.flag.exists():  # hang: alive, but in no collective
            time.sleep(0.05)
        os._exit(0)


def interrupted(
    rank: int, root: str, how: str, timeout_s: float
) -> tuple[str, str, float, tuple[int, ...]]:
    torch.set_num_threads(1)
    flag = Path(root) / f"{how}.done"
    fail = Fail(rank=1, at=5, how=how, flag=flag)
    try:
        train(DDP(timeout_s=timeout_s), Path(root) / how, callbacks=[fail])
    except Exception as error:  # the survivor: how long after the peer stopped, and why
        waited_s = time.monotonic() - fail.step_end_s
        flag.write_text("")
        return type(error).__name__, str(error), waited_s, getattr(error, "lost_ranks", ())
    return "finished", "", 0.0, ()


def resumed(rank: int, root: str) -> list[torch.Tensor]:
    torch.set_num_threads(1)
    never = Fail(rank=1, at=-1, how="die", flag=Path(root))  # the same callbacks as before
    result = train(DDP(timeout_s=30), Path(root) / "die", resume=True, callbacks=[never])
    return [p.detach().clone() for p in result.state.model.parameters()]


def test_a_rank_alive_elsewhere_is_named_with_where_it_waits(tmp_path):
    timeout_s = 2.0
    outcomes = run_ranks(2, interrupted, str(tmp_path), "hang", timeout_s, timeout_s=60)
    name, message, waited_s, lost_ranks = outcomes[0].unwrap()
    assert name == DistributedError.__name__, message
    assert lost_ranks == (), message  # rank 1 is alive: nobody is lost
    assert message.startswith("rank 0 of 2 (pid "), message
    assert "Every rank answered a roll call, so none is lost" in message, message
    # Rank 1 answered from its responder thread: where its main thread waits.
    assert "rank 1 (pid " in message and "in on_step_end (test_failures.py:" in message, message
    assert f"timeout_s={timeout_s}" in message and "resume=True" in message, message
    assert waited_s < timeout_s + 10.0  # the timeout in force after the first step


def raises_on_rank_1(rank: int, root: str) -> tuple[str, str, tuple[int, ...]]:
    torch.set_num_threads(1)
    calls = 0

    def bad_on_rank_1(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if rank == 1 and calls == 3:
            raise ValueError("planted: a batch rank 1 cannot use")
        return loss_fn(model, batch)

    try:
        train(DDP(timeout_s=2.0), Path(root), loss_fn=bad_on_rank_1)
    except Exception as error:
        return type(error).__name__, str(error), getattr(error, "lost_ranks", ())
    return "finished", "", ()


def test_a_rank_that_left_fit_raising_is_named_with_its_error(tmp_path):
    outcomes = run_ranks(2, raises_on_rank_1, str(tmp_path), timeout_s=60)
    assert outcomes[1].unwrap()[0] == "ValueError"  # the rank's own error, as raised
    name, message, lost_ranks = outcomes[0].unwrap()
    assert name == DistributedError.__name__ and lost_ranks == (1,), message
    # Its last words, written to the store as fit left that rank, reach the survivor.
    assert "Rank 1 is lost" in message, message
    assert "it left fit raising ValueError: planted: a batch rank 1 cannot use" in message


def test_run_resumes_from_the_last_checkpoint_after_a_rank_died(tmp_path):
    outcomes = run_ranks(2, interrupted, str(tmp_path), "die", 30.0, timeout_s=60)
    assert outcomes[0].unwrap()[0] == DistributedError.__name__
    assert (tmp_path / "die" / "latest").read_text() == "step-00000004"
    final = [o.unwrap() for o in run_ranks(2, resumed, str(tmp_path), timeout_s=60)]
    for a, b in zip(*final, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the ranks agree exactly
    # Both ranks' batches of a step are, together, one device's batch of twice the size
    # (DistributedSampler deals out one permutation of (seed, epoch)), so one device
    # training uninterrupted must end with the same weights.
    single = train(SingleDevice("cpu"), tmp_path / "single", batch_size=2 * BATCH)
    for a, e in zip(final[0], single.state.model.parameters(), strict=True):
        torch.testing.assert_close(a, e.detach(), rtol=1e-10, atol=1e-12)
