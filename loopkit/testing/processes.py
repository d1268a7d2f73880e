"""Local gloo process groups for checks: start N ranks on 127.0.0.1, wait, report crashes.

Each rank runs `target(rank, out_dir, args)` inside an initialised gloo process group and
writes its results under `out_dir`; a rank that raises leaves its traceback there as
`rank{r}.error`, which the failure message quotes.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["PRELOAD", "StartMethod", "default_start_method", "free_port", "run_ranks"]

StartMethod = Literal["forkserver", "spawn"]

# What a spawned rank needs before it can train: importing them in every process costs
# seconds (building the first optimizer imports torch._dynamo), a fork server pays it once.
PRELOAD = ("torch", "torch.distributed", "torch._dynamo", "loopkit", "loopkit.testing")

RankTarget = Callable[[int, Path, Any], None]
"""`target(rank, out_dir, args)`: one rank's work, inside its process group."""


def default_start_method() -> StartMethod:
    """ "forkserver" where the platform has it (torch is imported once), else "spawn"."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    timeout_s: float,
    target: RankTarget,
    payload: bytes,
) -> None:
    """One started rank: environment, process group, `target`, barrier, tear-down."""
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
            }
        )
        args = pickle.loads(payload)
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        target(rank, out, args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def run_ranks(
    target: RankTarget,
    payload: bytes,
    *,
    world_size: int,
    out_dir: Path,
    timeout_s: float,
    start_method: StartMethod | None,
    what: str,
    footer: str,
) -> None:
    """Run `target` on `world_size` local gloo ranks and wait for all of them.

    Args:
        target: a module-level function (it is pickled by name into each process).
        payload: the pickled `args` every rank's target receives.
        world_size: processes to start.
        out_dir: where ranks write their results (and tracebacks).
        timeout_s: give up after this long; also each collective's timeout.
        start_method: "forkserver" or "spawn"; None picks default_start_method().
        what: the start of every failure message, e.g. "check_x failed".
        footer: the last line of every failure message (how to reproduce it).

    Raises:
        AssertionError: the ranks did not finish in time, a rank raised (with every rank's
            traceback), or a rank died.
    """
    method = start_method or default_start_method()
    if method == "forkserver":
        # Ignored once the fork server runs; otherwise its children start with these loaded.
        multiprocessing.set_forkserver_preload(list(PRELOAD))
    context = mp.start_processes(
        _rank_main,
        args=(world_size, free_port(), str(out_dir), timeout_s, target, payload),
        nprocs=world_size,
        join=False,
        start_method=method,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: the {world_size} processes did not finish within "
                    f"{timeout_s:g} s (a collective that some rank never reaches?).\n  {footer}"
                )
    except mp.ProcessRaisedException as error:
        errors = sorted(out_dir.glob("rank*.error"))
        text = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors) or str(error)
        raise AssertionError(f"{what}: a rank raised.\n{text}\n  {footer}") from None
    except mp.ProcessExitedException as error:
        raise AssertionError(f"{what}: a rank died ({error}).\n  {footer}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
