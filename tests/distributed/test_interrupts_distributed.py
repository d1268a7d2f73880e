"""A stop signal that reaches one rank stops every rank at the same step, with one checkpoint.

Two DDP ranks (gloo, CPU). One rank sends itself a real SIGTERM inside a drawn micro-batch;
both must exit with status 143 at the end of that window, after one valid checkpoint at
that step and nothing after it, without waiting on each other (a hang fails the test after
run_ranks' timeout). Resuming on two ranks must end bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _models import TIMEOUT_S
from _ranks import run_ranks
from helpers import mlp

import loopkit as lk
from loopkit.checkpoint import validate_checkpoint
from loopkit.strategies import DDP

pytestmark = pytest.mark.distributed

ACCUMULATE, MAX_STEPS, BATCH = 2, 5, 4  # 6 micro-batches an epoch on each of 2 ranks


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class EndSeen:
    """Keeps the reason and step on_fit_end reports."""

    reason, step = "", -1

    def on_fit_end(self, state: Any, reason: str = "") -> None:
        self.reason, self.step = reason, state.step


def train(
    rank: int, root: Path, signal_rank: int = -1, signal_at: int = -1, resume: bool = False
) -> Any:
    """Run fit on this rank; return (how it ended, exit code, reason, step, final weights).

    Rank `signal_rank` sends itself SIGTERM inside its micro-batch `signal_at`.
    """
    torch.set_num_threads(1)
    calls, end = 0, EndSeen()

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        if rank == signal_rank and calls == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # reaches this rank only, mid micro-batch
        calls += 1
        return F.cross_entropy(model(batch[0]), batch[1])

    try:
        result = lk.fit(
            mlp(seed=3, dropout=0.1),
            dataset(),
            loss_fn=loss_fn,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
            strategy=DDP(timeout_s=TIMEOUT_S),
            batch_size=BATCH,
            accumulate=ACCUMULATE,
            max_steps=MAX_STEPS,
            checkpoint_dir=root,
            progress=False,
            callbacks=[end],
            resume=resume,
        )
    except SystemExit as exit_:
        return "SystemExit", exit_.code, end.reason, end.step, None
    weights = {k: v.detach().clone() for k, v in result.state.model.state_dict().items()}
    return "returned", None, end.reason, end.step, weights


SIGNAL_AT = random.Random(15).randrange(MAX_STEPS * ACCUMULATE)  # a drawn micro-batch


@pytest.mark.parametrize("signal_rank", [1, 0], ids=["rank(1)", "rank(0)"])
def test_sigterm_to_one_rank_stops_both_at_one_step_with_one_checkpoint(
    tmp_path: Path, signal_rank: int
) -> None:
    ckpt = tmp_path / "ckpt"
    outcomes = run_ranks(2, train, ckpt, signal_rank, SIGNAL_AT, timeout_s=4 * TIMEOUT_S)
    stop = SIGNAL_AT // ACCUMULATE + 1
    for outcome in outcomes:
        assert outcome.unwrap()[:4] == ("SystemExit", 143, "SIGTERM", stop), outcome.rank
    assert sorted(p.name for p in ckpt.glob("step-*")) == [f"step-{stop:08d}"]
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == [
        ".loopkit.lock"
    ]  # no half-written second copy
    assert (ckpt / "latest").read_text() == f"step-{stop:08d}"
    validate_checkpoint(ckpt / f"step-{stop:08d}")
    if signal_rank == 0:
        return
    resumed = [o.unwrap() for o in run_ranks(2, train, ckpt, -1, -1, True, timeout_s=4 * TIMEOUT_S)]
    plain = run_ranks(2, train, tmp_path / "plain", timeout_s=4 * TIMEOUT_S)[0].unwrap()
    assert resumed[0][2:4] == ("max_steps", MAX_STEPS)
    for key, expected in plain[4].items():
        for rank in (0, 1):
            assert torch.equal(resumed[rank][4][key], expected), (rank, key)
