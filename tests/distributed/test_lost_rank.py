"""A lost rank is named: one of two DDP ranks is stopped (SIGSTOP) or killed (SIGKILL) in the
forward of a drawn step; the survivor raises a DistributedError naming that rank, its pid and
its host, within timeout_s + 10 s; a resume from the last checkpoint on two fresh ranks then
ends bitwise equal to an uninterrupted two-rank run.

The step is drawn from 2..STEPS (seeded): the first step runs under the start-up timeout, on
purpose (loopkit.strategies.liveness). A stopped rank that the test would otherwise leave
behind is killed by the survivor, by run_ranks' hang guard, and by the fixture below.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _ranks import run_ranks
from helpers import mlp

import loopkit as lk
from loopkit.strategies import DDP, DistributedError, liveness
from loopkit.strategies.env import DEFAULT_STARTUP_TIMEOUT_S, init_distributed

pytestmark = pytest.mark.distributed

STEPS, BATCH = 6, 4  # 48 items: 6 steps an epoch on 2 ranks
TIMEOUT_S = 2.0  # the steady-state collective timeout under test
HANG_GUARD_S = 60.0  # run_ranks kills what is still running after this (a hang fails)


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class TimeoutsSeen:
    """The collective timeout in force (seconds) at each step's end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_end(self, state: Any) -> None:
        timeout = liveness.group_timeout()
        self.seconds.append(timeout.total_seconds() if timeout else -1.0)


def train(rank: int, root: str, lose: str = "", lost_rank: int = 1, at: int = -1) -> Any:
    """One rank's fit; rank `lost_rank` sends itself SIG`lose` in the forward of step `at`.

    Returns (the final weights, the timeouts seen at each step's end and after fit), or, on
    the survivor, (error type, message, lost_ranks, seconds from the loss to the error, the
    lost rank's pid).
    """
    torch.set_num_threads(1)
    base = Path(root)
    (base / f"pid-{rank}").write_text(str(os.getpid()))
    calls, seen = 0, TimeoutsSeen()

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1  # the forward of optimizer step `calls` (one micro-batch a step)
        if lose and rank == lost_rank and calls == at:
            (base / "lost_at").write_text(repr(time.monotonic()))  # one clock for all
            os.kill(os.getpid(), signal.SIGSTOP if lose == "stop" else signal.SIGKILL)
        return F.cross_entropy(model(batch[0]), batch[1])

    try:
        result = lk.fit(
            mlp(seed=3),
            dataset(),
            loss_fn=loss_fn,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
            strategy=DDP(timeout_s=TIMEOUT_S),
            batch_size=BATCH,
            max_steps=STEPS,
            checkpoint_dir=base / "ckpt",
            save_every=1,
            progress=False,
            resume=not lose,
            callbacks=[seen],
        )
    except DistributedError as error:
        waited_s = time.monotonic() - float((base / "lost_at").read_text())
        lost_pid = int((base / f"pid-{lost_rank}").read_text())
        if lose == "stop":
            os.kill(lost_pid, signal.SIGKILL)  # no need to wait for run_ranks' guard
        return type(error).__name__, str(error), error.lost_ranks, waited_s, lost_pid
    after = liveness.group_timeout()
    seen.seconds.append(after.total_seconds() if after else -1.0)
    return (
        {k: v.detach().clone() for k, v in result.state.model.state_dict().items()},
        seen.seconds,
    )


@pytest.fixture
def reaper(tmp_path: Path) -> Iterator[Path]:
    """Yield the runs' root; afterwards continue and kill any rank still alive there."""
    yield tmp_path
    for pid_file in tmp_path.rglob("pid-*"):
        pid = int(pid_file.read_text())
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone
        if f"\nPPid:\t{os.getpid()}\n" in status:  # still ours, not a reused pid
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    outcomes = run_ranks(2, train, str(root), timeout_s=HANG_GUARD_S)
    for outcome in outcomes:
        # Start-up timeout through the first step's end, then timeout_s, then start-up again.
        startup, short = DEFAULT_STARTUP_TIMEOUT_S, TIMEOUT_S
        assert outcome.unwrap()[1] == [startup] + [short] * (STEPS - 1) + [startup]
    weights: dict[str, torch.Tensor] = outcomes[0].unwrap()[0]
    return weights


CASES = [  # (how, which rank, at which step: None draws one from 2..STEPS)
    ("stop", 1, None),
    ("kill", 1, None),
    ("stop", 0, None),  # rank 0 hosts the rendezvous store here: the store goes silent too
    # DDP's forward of step 2 rebuilds its gradient buckets, a collective that no strategy
    # member wraps: fit explains it on the way out (loopkit._interrupts).
    ("kill", 1, 2),
]


@pytest.mark.parametrize(
    "lose, lost_rank, at",
    CASES,
    ids=[f"{how}-rank({r})" + (f"-step({at})" if at else "") for how, r, at in CASES],
)
def test_the_survivor_names_the_lost_rank_and_the_run_resumes_exactly(
    reaper: Path,
    uninterrupted: dict[str, torch.Tensor],
    lose: str,
    lost_rank: int,
    at: int | None,
) -> None:
    at = at or random.Random(f"16-{lose}-{lost_rank}").randint(2, STEPS)
    root = str(reaper)
    outcomes = run_ranks(2, train, root, lose, lost_rank, at, timeout_s=HANG_GUARD_S)
    survivor = outcomes[1 - lost_rank].unwrap()
    name, message, lost_ranks, waited_s, lost_pid = survivor
    assert name == "DistributedError", message
    assert lost_ranks == (lost_rank,), message
    assert f"Rank {lost_rank} is lost" in message, message
    assert f"pid {lost_pid} on {socket.gethostname()}" in message, message
    # A killed rank is a zombie until its parent (this test's run_ranks) reaps it, then it
    # is gone: which of the two the survivor's roll call sees depends on that race.
    states = (
        ["its process is stopped"]
        if lose == "stop"
        else ["its process has exited", "no such process runs on this host any more"]
    )
    assert any(state in message for state in states), message
    assert f"timeout_s={TIMEOUT_S}" in message and "resume=True" in message, message
    assert waited_s < TIMEOUT_S + 10.0, (waited_s, message)
    assert outcomes[lost_rank].exitcode == -signal.SIGKILL

    # Both ranks restart and resume from the last checkpoint: the step before the loss.
    assert (reaper / "ckpt" / "latest").read_text() == f"step-{at - 1:08d}"
    for pid_file in reaper.glob("pid-*"):
        pid_file.unlink()
    resumed = [o.unwrap()[0] for o in run_ranks(2, train, root, timeout_s=HANG_GUARD_S)]
    for rank in (0, 1):
        for key, expected in uninterrupted.items():
            assert torch.equal(resumed[rank][key], expected), (rank, key)


def test_timeouts_are_checked_before_anything_starts() -> None:
    with pytest.raises(ValueError, match=r"init_distributed\(startup_timeout_s=0\): seconds"):
        init_distributed(startup_timeout_s=0, environ={})


def test_a_message_names_every_lost_rank() -> None:
    found = liveness.RollCall(
        lost=(
            liveness.Peer(1, "node07", 4242, step=12, local_state="stopped"),
            liveness.Peer(3, "node09", 77, left="ValueError: bad batch"),
        )
    )
    text = liveness.explain(found)
    assert text.startswith("Ranks 1, 3 are lost (no answer to a roll call within 3 s): ")
    assert "rank 1: pid 4242 on node07, its process is stopped" in text
    assert "last past step 12" in text
    assert "rank 3: pid 77 on node09, it left fit raising ValueError: bad batch" in text
