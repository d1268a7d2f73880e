"""Cost of fit()'s stop-signal agreement over ranks, on CPU with 2 processes (gloo).

With world_size > 1, fit() all-reduces (MAX) a one-element CPU int64 tensor on a gloo group
at every optimizer-step boundary, so that a signal reaching one rank stops them all at the
same step (loopkit._interrupts). This measures, on each of 2 forked ranks:

| figure | what |
| --- | --- |
| `poll_us` | one `Interrupts.poll()` (the per-step cost fit pays) |
| `raw_all_reduce_us` | a bare `torch.distributed.all_reduce` of one int64 on a gloo group |
| `new_group_ms` | making the gloo group at fit start (once per fit) |
| `pipe_round_trip_us` | a one-byte pipe round trip between two processes, for scale |

Method: after 200 warm-up calls, R blocks of N calls are timed on rank 0 (the ranks move in
lockstep); each figure is the median block time per call. The machine may be shared: the
figures include its scheduling latency.

Usage:
    python benchmarks/bench_interrupts.py [--calls 4000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from loopkit._interrupts import Interrupts
from loopkit.strategies import DDP


def _timed(fn: Any, calls: int, repeats: int) -> float:
    """Median microseconds per call over `repeats` blocks of `calls` calls."""
    for _ in range(200):
        fn()
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(blocks)


def _rank(rank: int, port: int, calls: int, repeats: int, out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    strategy = DDP(timeout_s=60)
    start = time.perf_counter()
    interrupts = Interrupts(strategy).__enter__()
    new_group_ms = (time.perf_counter() - start) * 1e3

    def poll() -> None:
        interrupts.agreed = 0  # as at every step of a run that is not stopping
        interrupts.poll()

    flag = torch.zeros(1, dtype=torch.int64)
    group = dist.new_group(backend="gloo")

    def raw() -> None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)

    figures = {
        "poll_us": _timed(poll, calls, repeats),
        "raw_all_reduce_us": _timed(raw, calls, repeats),
        "new_group_ms": new_group_ms,
    }
    interrupts.__exit__(None, None, None)
    if rank == 0:
        out.send(figures)
    os._exit(0)


def _pipe_round_trip_us(calls: int) -> float:
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(calls):
            os.read(to_child, 1)
            os.write(from_child, b"x")
        os._exit(0)
    start = time.perf_counter()
    for _ in range(calls):
        os.write(from_parent, b"x")
        os.read(to_parent, 1)
    elapsed = time.perf_counter() - start
    os.waitpid(pid, 0)
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    procs = [
        ctx.Process(target=_rank, args=(rank, port, args.calls, args.repeats, sender))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    figures = receiver.recv()
    for proc in procs:
        proc.join()
    figures["pipe_round_trip_us"] = _pipe_round_trip_us(args.calls)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for name, value in figures.items():
        print(f"{name:>20}: {value:8.1f}")


if __name__ == "__main__":
    main()
