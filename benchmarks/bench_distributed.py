"""Per-step cost of DDP and FSDP against one device, on CPU with 2 processes (gloo).

Every configuration does the same work per process (the same micro-batch size per rank,
one micro-batch per optimizer step, AdamW), so a ratio to `single` is what the strategy
adds: wrapping, hooks, the gradient all-reduce or reduce-scatter, FSDP's all-gathers.

| config | processes | step |
| --- | --- | --- |
| `single` | 1 | loopkit, SingleDevice |
| `ddp-1`, `fsdp-1` | 1 | loopkit, DDP / FSDP on a one-process group (wrapper cost, no peer) |
| `ddp-2`, `fsdp-2` | 2 | loopkit, DDP / FSDP |
| `raw-ddp-2`, `raw-fsdp-2` | 2 | a hand-written loop on torch's DistributedDataParallel / fully_shard |

The loopkit step is `chain(forward(loss_fn), accumulate(1), optimizer_step())`; the raw
loop is `zero_grad; loss.backward(); step`. Processes are forked from this script (one
torch thread each) and join a gloo group on a free port.

Method: the configurations run in rounds, in a rotated order each round; in each run,
after a warmup, R blocks of N steps are timed on rank 0 (ranks move in lockstep), and the
run's figure is the median block time per step. A configuration's figure is the median
over rounds. Wall time (`perf_counter`) and the process's CPU time (`thread_time`: time
spent waiting for the peer is not CPU time) are both reported. The machine may be shared:
read the ratios, not the absolute times.

Usage:
    python benchmarks/bench_distributed.py [--quick] [--workload mlp|transformer|all]
        [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import causal_transformer, count_params, tiny_mlp  # noqa: E402

import loopkit as lk  # noqa: E402

CONFIGS = ("single", "ddp-1", "fsdp-1", "ddp-2", "fsdp-2", "raw-ddp-2", "raw-fsdp-2")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    steps: int
    repeats: int
    warmup: int


def _mlp_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)


def _lm_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (8, 65), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


WORKLOADS = {
    "mlp": Workload("mlp", "MLP 32->64->10, batch 32 per rank", lambda: tiny_mlp(0),
                    _mlp_batch, steps=100, repeats=9, warmup=50),
    "transformer": Workload(
        "transformer",
        "causal transformer (benchmarks/models.py): 2 layers, d_model 128, seq 64, "
        "batch 8 per rank",
        lambda: causal_transformer(0), _lm_batch, steps=4, repeats=7, warmup=3),
}


def mean_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _loopkit_runner(work: Workload, strategy: Any) -> Callable[[Any], None]:
    state = lk.TrainState.create(work.build(), optimizer=adamw, strategy=strategy, seed=0)
    state = state.replace(window=lk.Window(size=1))
    step = lk.chain(lk.forward(mean_loss), lk.accumulate(1), lk.optimizer_step())
    holder = [state]

    def run(batch: Any) -> None:
        holder[0] = step(holder[0], batch)

    return run


def _raw_runner(work: Workload, kind: str) -> Callable[[Any], None]:
    model = work.build()
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = adamw(model.parameters())

    def run(batch: Any) -> None:
        opt.zero_grad(set_to_none=True)
        mean_loss(model, batch).backward()
        opt.step()

    return run


def _worker(config: str, work: Workload, rank: int, steps: int, repeats: int, warmup: int
            ) -> dict[str, Any]:
    torch.set_num_threads(1)
    from loopkit.strategies import DDP, FSDP, SingleDevice
    from loopkit.strategies.env import init_distributed

    if config == "single":
        run = _loopkit_runner(work, SingleDevice("cpu"))
    elif config.startswith("raw-"):
        init_distributed("cpu", timeout_s=120)
        run = _raw_runner(work, config.split("-")[1])
    else:
        kind = config.split("-")[0]
        strategy = (DDP if kind == "ddp" else FSDP)("cpu", timeout_s=120)
        run = _loopkit_runner(work, strategy)
    g = torch.Generator().manual_seed(1000 + rank)
    batches = [work.batch(g) for _ in range(8)]
    for i in range(warmup):
        run(batches[i % 8])
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        for i in range(steps):
            run(batches[i % 8])
        wall.append((time.perf_counter() - w0) / steps)
        cpu.append((time.thread_time() - c0) / steps)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def _child(config: str, work_name: str, rank: int, world: int, port: int, sizes: tuple,
           conn: Any) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    if world > 1 or config.startswith("raw-"):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        result: Any = ("ok", _worker(config, WORKLOADS[work_name], rank, *sizes))
    except BaseException:  # noqa: BLE001
        result = ("error", traceback.format_exc())
    conn.send_bytes(pickle.dumps(result))
    conn.close()
    os._exit(0)


def run_config(config: str, work: Workload, sizes: tuple[int, int, int]) -> dict[str, Any]:
    world = 2 if config.endswith("-2") else 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    for rank in range(world):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(config, work.name, rank, world, port, sizes,
                                                sender))
        proc.start()
        sender.close()
        procs.append(proc)
        pipes.append(receiver)
    results = [pickle.loads(p.recv_bytes()) for p in pipes]
    for proc in procs:
        proc.join()
    for status, value in results:
        if status != "ok":
            raise RuntimeError(f"{config} failed:\n{value}")
    return results[0][1]  # rank 0 (ranks move in lockstep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    rounds = 1 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {rounds} round(s)")
    report: dict[str, Any] = {"torch": torch.__version__, "cpus": os.cpu_count(),
                              "load_1min_start": os.getloadavg()[0], "workloads": {}}
    for name in names:
        work = WORKLOADS[name]
        steps, repeats = (max(2, work.steps // 4), 3) if args.quick else (work.steps,
                                                                           work.repeats)
        sizes = (steps, repeats, work.warmup)
        runs: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
        for r in range(rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[: r % len(CONFIGS)]
            for config in order:
                runs[config].append(run_config(config, work, sizes))
        summary = {
            c: {k: statistics.median(run[k] for run in runs[c]) for k in ("wall_s", "cpu_s")}
            for c in CONFIGS
        }
        base = summary["single"]
        print(f"\n{name}: {work.description}, {count_params(work.build()):,} parameters")
        print(f"{'config':<12}{'wall ms':>10}{'x single':>10}{'cpu ms':>10}{'x single':>10}")
        for c in CONFIGS:
            wall, cpu = summary[c]["wall_s"], summary[c]["cpu_s"]
            print(f"{c:<12}{wall * 1e3:>10.3f}{wall / base['wall_s']:>10.2f}"
                  f"{cpu * 1e3:>10.3f}{cpu / base['cpu_s']:>10.2f}")
        report["workloads"][name] = {"description": work.description, "configs": summary,
                                     "rounds": runs}
    report["load_1min_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
