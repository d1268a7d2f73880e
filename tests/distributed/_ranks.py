"""Start a few processes on this machine as torchrun would, and collect what each returns.

Processes are forked from the test process (no interpreter start, no re-import of torch:
a launch costs a few milliseconds), get torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), run `fn(rank, *args)` and send back
its return value or its traceback. The gloo backend on CPU joins them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_ID",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Outcome:
    """What one rank did: its return value, or the traceback of what it raised."""

    rank: int
    value: Any = None
    error: str | None = None
    exitcode: int | None = None
    seconds: float = 0.0

    def unwrap(self) -> Any:
        assert self.error is None, f"rank {self.rank} failed:\n{self.error}"
        assert self.exitcode == 0, f"rank {self.rank} exited with {self.exitcode}"
        return self.value


def _child(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, conn: Any
) -> None:
    for name in _LAUNCHER_VARS:
        os.environ.pop(name, None)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    start = time.perf_counter()
    try:
        value = fn(rank, *args)
        message = ("ok", value, time.perf_counter() - start)
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        message = ("error", traceback.format_exc(), time.perf_counter() - start)
    try:
        # Plain pickle into bytes: multiprocessing's own pickler would share tensor memory
        # through file descriptors that die with this process.
        try:
            data = pickle.dumps(message)
        except Exception:  # noqa: BLE001
            data = pickle.dumps(("error", traceback.format_exc(), message[2]))
        conn.send_bytes(data)
    finally:
        conn.close()
        # Leave without running the parent's atexit handlers or a process-group teardown.
        os._exit(0)


def run_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0
) -> list[Outcome]:
    """Run `fn(rank, *args)` in `world_size` forked processes; return each rank's outcome.

    A rank still running after `timeout_s` is killed and reported as hung.
    """
    context = mp.get_context("fork")
    port = free_port()
    procs, pipes = [], []
    for rank in range(world_size):
        receiver, sender = context.Pipe(duplex=False)
        proc = context.Process(target=_child, args=(rank, world_size, port, fn, args, sender))
        proc.start()
        sender.close()
        procs.append(proc)
        pipes.append(receiver)
    deadline = time.monotonic() + timeout_s
    outcomes = [Outcome(rank) for rank in range(world_size)]
    pending = set(range(world_size))
    while pending and time.monotonic() < deadline:
        for rank in list(pending):
            if pipes[rank].poll(0.01):
                try:
                    status, value, seconds = pickle.loads(pipes[rank].recv_bytes())
                except EOFError:  # died without a word (killed)
                    status, value, seconds = "error", "no result: the process died", 0.0
                outcome = outcomes[rank]
                outcome.seconds = seconds
                if status == "ok":
                    outcome.value = value
                else:
                    outcome.error = value
                pending.discard(rank)
            elif not procs[rank].is_alive() and not pipes[rank].poll(0):
                outcomes[rank].error = f"no result: exit code {procs[rank].exitcode}"
                pending.discard(rank)
    for rank in pending:
        outcomes[rank].error = f"hung: still running after {timeout_s} s"
        pid = procs[rank].pid
        assert pid is not None  # every process was started above
        os.kill(pid, signal.SIGKILL)
    for rank, proc in enumerate(procs):
        proc.join(5)
        outcomes[rank].exitcode = proc.exitcode
    return outcomes
