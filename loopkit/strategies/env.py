"""Process-group setup from the launcher's environment: torchrun, SLURM's srun, or none.

loopkit never launches processes. It reads who this process is from the environment that
the launcher set, in this order:

1. torchrun (or any launcher that sets the same variables): RANK, WORLD_SIZE,
   MASTER_ADDR, MASTER_PORT, and LOCAL_RANK (defaults to RANK: right on one node).
2. SLURM's `srun` without torchrun: SLURM_PROCID (rank), SLURM_STEP_NUM_TASKS or
   SLURM_NTASKS (world size), SLURM_LOCALID (local rank). The rendezvous address is
   MASTER_ADDR if set, else the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST /
   SLURM_NODELIST (`node[03-04],gpu7` -> `node03`); the port is MASTER_PORT if set, else
   10000 + SLURM_JOB_ID % 20000, so every task of a job picks the same one.
3. Neither: one process (rank 0 of 1). Strategies still get a process group (an in-memory
   store, no port), so DDP and FSDP run unchanged with world size 1.

A half-set environment (say RANK without WORLD_SIZE) is an error naming the variables:
guessing would start processes that wait for peers that never come.

The backend is nccl when the device is CUDA, gloo otherwise (CPU, also for tests). The
device is `cuda:LOCAL_RANK` when CUDA is available, else cpu.

Two timeouts bound how long a collective waits for a peer. The process group is formed
with the generous `startup_timeout_s` (forming the group, wrapping and loading the model,
compiling, the first step); once the first optimizer step has ended on every rank, fit
shortens every group to the strategy's `timeout_s` (loopkit.strategies.liveness). When a
collective fails, the DistributedError names the rank(s) that did not answer a roll call.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from . import liveness

Source = Literal["torchrun", "slurm", "single"]

_TORCHRUN_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SLURM_REQUIRED = ("SLURM_PROCID", "SLURM_LOCALID")
_SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
_SLURM_NTASKS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")

DEFAULT_TIMEOUT_S = 300.0
"""How long a collective waits for a peer once the first optimizer step is done.

The longest a healthy run makes ranks wait for one another after start-up is one rank
working alone: under DDP, rank 0 writing and hashing a checkpoint while the others wait
in the save's closing collective. 300 s covers a checkpoint of roughly 100 GB; a
stopped rank then holds the others for 300 s plus a roll call (a few seconds)."""

DEFAULT_STARTUP_TIMEOUT_S = 600.0
"""How long a collective (or the rendezvous) waits until the first optimizer step is done.

Start-up is where ranks legitimately drift apart by minutes: nodes that start late,
loading a checkpoint, compiling, the first step's allocations and communicator set-up.
600 s is torch's own NCCL default and loopkit's earlier single timeout, so nothing that
started before waits less now."""


class DistributedError(RuntimeError):
    """A collective failed: another process died, hung past the timeout, or never started.

    Attributes:
        lost_ranks: the ranks that did not answer the roll call made after the failure
            (loopkit.strategies.liveness), sorted; empty when every rank answered or no
            roll call was possible.
    """

    def __init__(self, message: str, *, lost_ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.lost_ranks = tuple(sorted(lost_ranks))


@dataclass(frozen=True, slots=True)
class DistEnv:
    """Who this process is, as the launcher described it.

    Attributes:
        rank: global index of this process, 0 <= rank < world_size.
        world_size: number of processes in the job.
        local_rank: index of this process on its node (selects the GPU).
        master_addr: host of the rendezvous store (rank 0's node).
        master_port: port of the rendezvous store.
        source: "torchrun", "slurm" or "single" (no launcher variables).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: Source


def _int_var(env: Mapping[str, str], name: str, low: int = 0) -> int:
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: expected an integer.") from None
    if value < low:
        raise ValueError(f"environment variable {name}={text!r}: must be >= {low}.")
    return value


def _port(env: Mapping[str, str], name: str) -> int:
    port = _int_var(env, name, low=1)
    if port > 65535:
        raise ValueError(f"environment variable {name}={env[name]!r}: not a TCP port (1-65535).")
    return port


def _check_rank(rank: int, world_size: int, names: str) -> None:
    if world_size < 1 or rank >= world_size:
        raise ValueError(
            f"environment {names}: rank {rank} is not in 0..world_size-1 (world_size "
            f"{world_size}). Check the launcher's settings."
        )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, in SLURM's compressed notation.

    Example:
        >>> first_host("node[03-04,07],gpu7")
        'node03'
        >>> first_host("rack[1-2]-n[009-010]")
        'rack1-n009'
    """
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, char in enumerate(text):  # the first comma outside brackets ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = text[:end]
    if not entry or depth < 0:
        raise ValueError(f"SLURM node list {nodelist!r}: cannot read a host name from it.")
    # Each bracket group stands for a list of ranges; the first host takes the first value.
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)
    if "[" in host or "]" in host or not host:
        raise ValueError(f"SLURM node list {nodelist!r}: cannot read a host name from it.")
    return host


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank and rendezvous address from the environment.

    Args:
        environ: the variables to read; None reads `os.environ`.

    Returns:
        A DistEnv; `source` says which launcher's variables were used.

    Raises:
        ValueError: a half-set environment (naming the variables that are missing), or a
            value that is not a valid rank, size or port.

    Example:
        >>> detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
        ...             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}).source
        'torchrun'
        >>> detect_env({}).world_size
        1
    """
    env = os.environ if environ is None else environ
    torchrun_set = [n for n in (*_TORCHRUN_REQUIRED, "LOCAL_RANK") if n in env]
    if any(n in env for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        missing = [n for n in _TORCHRUN_REQUIRED if n not in env]
        if missing:
            raise ValueError(
                f"environment: {', '.join(torchrun_set)} set but {', '.join(missing)} not: "
                "a launcher such as torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                "and MASTER_PORT together. Launch with `torchrun --nproc_per_node N "
                "script.py`, set the missing variables, or unset all of them for one process."
            )
        rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE", low=1)
        _check_rank(rank, world_size, "RANK / WORLD_SIZE")
        local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        return DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            master_addr=env["MASTER_ADDR"],
            master_port=_port(env, "MASTER_PORT"),
            source="torchrun",
        )
    if "SLURM_PROCID" in env:
        return _slurm_env(env)
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=0,
        source="single",
    )


def _slurm_env(env: Mapping[str, str]) -> DistEnv:
    ntasks = next((n for n in _SLURM_NTASKS if n in env), None)
    nodelist = next((n for n in _SLURM_NODELISTS if n in env), None)
    missing = [n for n in _SLURM_REQUIRED if n not in env]
    if ntasks is None:
        missing.append(" or ".join(_SLURM_NTASKS))
    if nodelist is None and "MASTER_ADDR" not in env:
        missing.append(" or ".join((*_SLURM_NODELISTS, "MASTER_ADDR")))
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" not in env:
        missing.append("SLURM_JOB_ID or MASTER_PORT")
    if missing:
        raise ValueError(
            f"environment: SLURM_PROCID is set but {'; '.join(missing)} not: srun sets "
            "SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST and SLURM_JOB_ID "
            "for every task. Start the processes with `srun python script.py`, or unset "
            "SLURM_PROCID to run one process."
        )
    assert ntasks is not None
    rank, world_size = _int_var(env, "SLURM_PROCID"), _int_var(env, ntasks, low=1)
    _check_rank(rank, world_size, f"SLURM_PROCID / {ntasks}")
    addr = env["MASTER_ADDR"] if "MASTER_ADDR" in env else first_host(env[nodelist])  # type: ignore[index]
    if "MASTER_PORT" in env:
        port = _port(env, "MASTER_PORT")
    else:
        port = 10000 + _int_var(env, "SLURM_JOB_ID") % 20000
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=_int_var(env, "SLURM_LOCALID"),
        master_addr=addr,
        master_port=port,
        source="slurm",
    )


def device_for(env: DistEnv, device: str | torch.device | None, where: str) -> torch.device:
    """`device` as given, else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", env.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{where}(device={device!r}): not a device; use 'cpu', 'cuda', 'cuda:N' or None "
            "(cuda:LOCAL_RANK when CUDA is available, else cpu)."
        ) from error
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count()))
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(
            f"{where}(device={device!r}): distributed training runs on 'cpu' (gloo) or "
            "'cuda' (nccl)."
        )
    return chosen


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    device: str | torch.device | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
    where: str = "init_distributed",
) -> tuple[DistEnv, torch.device]:
    """Join (or create) the default process group described by the environment.

    If torch.distributed is already initialised (by the user or an earlier strategy), that
    group is used as it is (its timeout too), after checking it agrees with the
    environment. Either way this rank publishes its host and pid for roll calls
    (loopkit.strategies.liveness) when there are several ranks.

    Args:
        device: as for `device_for`; decides the backend (nccl for CUDA, gloo otherwise).
        timeout_s: seconds a collective waits for the other processes once the first
            optimizer step is done (fit shortens the groups to it then).
        startup_timeout_s: seconds the rendezvous and every collective wait until then;
            the group is formed with max(timeout_s, startup_timeout_s).
        environ: the variables to read; None reads `os.environ`.
        where: the caller's name for error messages.

    Returns:
        (the environment, this process's device).

    Raises:
        ValueError: a half-set environment, a bad device or timeout, or an initialised
            process group that disagrees with the environment.
        DistributedError: the other processes did not join within the start-up timeout.
    """
    _check_seconds(where, "timeout_s", timeout_s, DEFAULT_TIMEOUT_S)
    _check_seconds(where, "startup_timeout_s", startup_timeout_s, DEFAULT_STARTUP_TIMEOUT_S)
    env = detect_env(environ)
    chosen = device_for(env, device, where)
    if not dist.is_available():
        raise RuntimeError(f"{where}: this build of torch has no torch.distributed.")
    if dist.is_initialized():
        env = _adopt_group(env, where)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        _form_group(env, backend_for(chosen), max(timeout_s, startup_timeout_s), where)
        atexit.register(_destroy)
    liveness.start(env.rank, env.world_size)
    return env, chosen


def _check_seconds(where: str, name: str, value: object, example: float) -> None:
    if not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    ):
        raise ValueError(
            f"{where}({name}={value!r}): seconds a collective waits for the other "
            f"processes, a positive finite number, e.g. {name}={example:g}."
        )


def _adopt_group(env: DistEnv, where: str) -> DistEnv:
    """The environment as the initialised default group says: check it, then use it."""
    if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size) and (
        env.source != "single"
    ):
        raise ValueError(
            f"{where}: torch.distributed is already initialised as rank "
            f"{dist.get_rank()} of {dist.get_world_size()}, but the environment "
            f"({env.source}) says rank {env.rank} of {env.world_size}."
        )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=env.local_rank,
        master_addr=env.master_addr,
        master_port=env.master_port,
        source=env.source,
    )


def _form_group(env: DistEnv, backend: str, timeout_s: float, where: str) -> None:
    """Create the default process group: an in-memory store for one process, else the
    launcher's rendezvous."""
    timeout = datetime.timedelta(seconds=float(timeout_s))
    try:
        if env.source == "single":
            # One process: an in-memory store, so no port is taken and nothing can collide.
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
            return
        init_method = (
            "env://"
            if env.source == "torchrun"  # torchrun's agent may host the store
            else f"tcp://{env.master_addr}:{env.master_port}"
        )
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    except (RuntimeError, dist.DistError) as error:
        raise DistributedError(
            f"{where}: rank {env.rank} of {env.world_size} ({env.source}) could not form the "
            f"process group at {env.master_addr}:{env.master_port} within {timeout_s:g} s "
            f"(the start-up timeout; {type(error).__name__}: {error}). Are all "
            f"{env.world_size} processes started, and is MASTER_ADDR reachable from every "
            "node?"
        ) from error


def _destroy() -> None:
    liveness.stop()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_comm_error(error: BaseException) -> bool:
    """Whether an exception raised inside a collective looks like a lost or hung peer."""
    if isinstance(error, DistributedError):
        return False  # already explained
    return liveness.looks_like_comm_failure(error)


def comm_error(
    error: BaseException, rank: int, world_size: int, what: str, timeout_s: float
) -> DistributedError:
    """A DistributedError explaining a failed collective, to raise `from error`.

    Before it is built, a roll call (loopkit.strategies.liveness, at most ROLL_CALL_S +
    2 s) asks every rank to answer: the message names the ranks that did not (host, pid,
    and on this host whether the process is stopped or gone), or, when every rank
    answered, the ranks that wait elsewhere.
    """
    message, lost_ranks = liveness.describe_failure(error, rank, world_size, what, timeout_s)
    return DistributedError(message, lost_ranks=lost_ranks)


__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "DistEnv",
    "DistributedError",
    "backend_for",
    "detect_env",
    "device_for",
    "first_host",
    "init_distributed",
]
