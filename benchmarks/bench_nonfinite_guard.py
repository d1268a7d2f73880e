"""Per-step cost of `zero_nonfinite()` (the non-finite guard in fit's nonfinite="raise" chain).

Runs the same model, optimizer (AdamW) and batches, one process, through

- ``plain`` / ``plain_b``: ``chain(forward, accumulate(1), optimizer_step())``, twice (an A/A
  control: ``plain_b / plain`` is the noise floor);
- ``guard``: the same chain with ``zero_nonfinite()`` before ``optimizer_step()`` (no clip:
  the guard takes a foreach max-abs norm of the gradients itself);
- ``clip`` / ``clip_guard``: with ``clip(1.0)``, without and with the guard (the guard reads
  clip's norm).

Interleaved, like bench_step.py: after a warmup, every repeat times one block of N steps of
each variant, rotating their order; a ratio is the median of the per-repeat ratios (paired
blocks cancel the drift of a shared machine). CPU time (``thread_time``) is reported beside
wall time; on a shared CPU it is the steadier figure.

With ``--ranks 2``: the same variants (tiny MLP) under DDP on 2 forked ranks (gloo, CPU),
where fit puts the guard, timed on rank 0; then the cost of the watch's check at a log
step: ``after_step`` of one step then ``check()`` (a fold, one all-reduce of the 2 x 2
table, one host read), beside ``strategy.reduce_metrics`` of two metrics (what fit already
pays at every log step), median microseconds per call over blocks of calls.

Usage:
    python benchmarks/bench_nonfinite_guard.py [--workload mlp|transformer] [--steps 200]
        [--repeats 15] [--threads 1] [--device cpu|cuda]
    python benchmarks/bench_nonfinite_guard.py --ranks 2 [--steps 100] [--calls 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import causal_transformer, count_params, tiny_mlp  # noqa: E402

import loopkit as lk  # noqa: E402
from loopkit._nonfinite_watch import NonfiniteWatch  # noqa: E402
from loopkit.guards import NONFINITE_METRIC, zero_nonfinite  # noqa: E402
from loopkit.strategies import DDP  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(workload: str, device: torch.device) -> list[Batch]:
    gen = torch.Generator().manual_seed(1234)
    if workload == "mlp":
        out = [
            (torch.randn(32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
            for _ in range(16)
        ]
    else:
        tokens = [torch.randint(0, 256, (8, 65), generator=gen) for _ in range(8)]
        out = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    return [(x.to(device), y.to(device)) for x, y in out]


def _loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


class Runner:
    """One step chain on its own TrainState, with a cursor into the shared batches."""

    def __init__(
        self, build: Callable[[], torch.nn.Module], step: Any, batches: list[Batch], strategy: Any
    ) -> None:
        self.state = lk.TrainState.create(
            build(),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
            strategy=strategy,
        )
        self.step, self.batches, self.cursor = step, batches, 0

    def run(self, n: int) -> None:
        state, step, batches = self.state, self.step, self.batches
        for i in range(self.cursor, self.cursor + n):
            state = step(state, batches[i % len(batches)])
        self.state, self.cursor = state, self.cursor + n


def _chains() -> dict[str, Any]:
    def chain(*middle: Any) -> Any:
        return lk.chain(lk.forward(_loss), lk.accumulate(1), *middle, lk.optimizer_step())

    return {
        "plain": chain(),
        "plain_b": chain(),
        "guard": chain(zero_nonfinite()),
        "clip": chain(lk.clip(1.0)),
        "clip_guard": chain(lk.clip(1.0), zero_nonfinite()),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runners: dict[str, Runner], device: torch.device, steps: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Per-step wall and CPU seconds of each variant, one value per repeat."""
    for runner in runners.values():
        runner.run(max(20, steps // 4))  # warmup
    names = list(runners)
    out: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in ("wall", "cpu")}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            runners[name].run(steps)
            _sync(device)
            out["wall"][name].append((time.perf_counter() - start) / steps)
            out["cpu"][name].append((time.thread_time() - start_cpu) / steps)
    return out


def _timed_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median microseconds per call over `repeats` blocks of `calls` calls."""
    for _ in range(50):
        fn()
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(blocks)


def _check_rank(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    strategy = DDP(timeout_s=60)
    batches = _batches("mlp", strategy.device)
    runners = {name: Runner(tiny_mlp, step, batches, strategy) for name, step in _chains().items()}
    times = time_interleaved(runners, strategy.device, args.steps, args.repeats)
    watch = NonfiniteWatch("raise", strategy, deferred=True, chunk=1024, max_skips=1)
    metrics = {"train/loss": torch.tensor(1.0), NONFINITE_METRIC: torch.tensor(False)}
    state: Any = type("Record", (), {"metrics": metrics})
    steps = iter(range(10**9))

    def check() -> None:  # one step noted since the last check, as at log_every=1
        watch.after_step(state, next(steps), 0)
        watch.check()

    two = {"train/loss": torch.tensor(1.0), "train/grad_norm": torch.tensor(1.0)}
    figures = {
        "check_us": _timed_us(check, args.calls, 5),
        "reduce_metrics_us": _timed_us(lambda: strategy.reduce_metrics(two), args.calls, 5),
    }
    if rank == 0:
        out.send((times, figures))
    os._exit(0)


def two_ranks_main(args: argparse.Namespace) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_check_rank, args=(r, port, args, sender)) for r in range(2)]
    for proc in procs:
        proc.start()
    times, figures = receiver.recv()
    for proc in procs:
        proc.join()
    print(
        f"torch {torch.__version__}, mlp, 2 ranks (DDP, gloo, CPU, 1 thread each), rank 0's "
        f"clock, {args.repeats} x {args.steps} steps; load {os.getloadavg()[0]:.1f}"
    )
    report(times)
    print(f"per call, median of 5 x {args.calls}:")
    for name, value in figures.items():
        print(f"  {name:<18} {value:8.1f} us")


def report(times: dict[str, dict[str, list[float]]]) -> None:
    print(f"{'variant':<11} {'wall us':>8} {'cpu us':>8}  ratio to  wall     cpu")
    pairs = {"plain_b": "plain", "guard": "plain", "clip_guard": "clip"}
    for name in times["wall"]:
        wall = statistics.median(times["wall"][name]) * 1e6
        cpu = statistics.median(times["cpu"][name]) * 1e6
        line = f"{name:<11} {wall:8.1f} {cpu:8.1f}"
        if name in pairs:
            base = pairs[name]
            ratios = [
                statistics.median(a / b for a, b in zip(times[c][name], times[c][base]))
                for c in ("wall", "cpu")
            ]
            line += f"  {base:<8} {ratios[0]:.3f}   {ratios[1]:.3f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["mlp", "transformer"], default="mlp")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, choices=[1, 2], default=1)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if args.ranks == 2:
        two_ranks_main(args)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    build = tiny_mlp if args.workload == "mlp" else causal_transformer
    batches = _batches(args.workload, device)
    strategy = lk.strategies.SingleDevice(device)
    runners = {name: Runner(build, step, batches, strategy) for name, step in _chains().items()}
    n_params = count_params(runners["plain"].state.model)
    n_tensors = len(runners["plain"].state.params)
    times = time_interleaved(runners, device, args.steps, args.repeats)
    print(
        f"torch {torch.__version__}, {args.workload} ({n_params} parameters in {n_tensors} "
        f"tensors), {device}, {args.threads} thread(s), {args.repeats} x {args.steps} steps; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    report(times)


if __name__ == "__main__":
    main()
