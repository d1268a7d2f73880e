"""Per-step overhead of a loopkit step against a hand-written PyTorch loop.

Runs the same model, optimizer and batches through

- ``raw``: ``opt.zero_grad(set_to_none=True); loss = F.cross_entropy(model(x), y);
  loss.backward(); opt.step()``;
- ``loopkit``: ``chain(forward(loss_fn), accumulate(1), optimizer_step())`` with a
  ``loss_fn`` returning that same scalar mean;
- ``loopkit_loss``: the same chain with ``loss_fn`` returning ``lk.cross_entropy(...)``, a
  ``Loss(sum, count)`` whose count is a device tensor (a token-loss user's path),

in one process, interleaved: after a warmup, every repeat times one block of N steps of
each variant, rotating their order, and the loopkit/raw ratio is the median of the
per-repeat ratios (paired blocks cancel the drift of a noisy, shared machine).

Memory: peak bytes allocated during K steps above the level with no gradients and no
activations (the same starting point for both loops), and bytes still allocated after them
(between steps). On CUDA from ``torch.cuda.max_memory_allocated``; on CPU from the
allocation events of ``torch.profiler`` (``profile_memory=True``), which sees every CPU
allocator call. A gc census of live tensor objects checks that loopkit retains no
tensors from step to step (the count must not grow with the number of steps).

Usage:
    python benchmarks/bench_step.py [--quick] [--device cpu|cuda] [--precision fp32|bf16]
        [--workload mlp|transformer|all] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import causal_transformer, count_params, tiny_mlp  # noqa: E402

import loopkit as lk  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]
VARIANTS = ("raw", "loopkit", "loopkit_loss")
TARGETS = {"mlp": 1.05, "transformer": 1.01}


def adamw(params: Any) -> torch.optim.Optimizer:
    """The optimizer factory every variant uses (torch's default implementation choice)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


# ---------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A model, its data and its two loss functions (scalar mean and Loss(sum, count))."""

    name: str
    description: str
    build_model: Callable[[int], torch.nn.Module]
    make_batches: Callable[[torch.Generator], list[Batch]]
    mean_loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    sum_loss: Callable[[torch.nn.Module, Batch], lk.Loss]
    steps_per_block: int
    repeats: int
    warmup_steps: int
    quick_steps_per_block: int
    quick_repeats: int


def _mlp_batches(gen: torch.Generator, n: int = 16) -> list[Batch]:
    return [
        (torch.randn(32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
        for _ in range(n)
    ]


def _lm_batches(gen: torch.Generator, n: int = 8) -> list[Batch]:
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 256, (8, 65), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _mlp_mean(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _mlp_sum(model: torch.nn.Module, batch: Batch) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def _lm_mean(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _lm_sum(model: torch.nn.Module, batch: Batch) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


WORKLOADS = {
    "mlp": Workload(
        name="mlp",
        description="MLP 32->64->10, batch 32, AdamW (overhead-bound)",
        build_model=lambda seed: tiny_mlp(seed),
        make_batches=_mlp_batches,
        mean_loss=_mlp_mean,
        sum_loss=_mlp_sum,
        steps_per_block=200,
        repeats=21,
        warmup_steps=200,
        quick_steps_per_block=100,
        quick_repeats=7,
    ),
    "transformer": Workload(
        name="transformer",
        description=(
            "causal transformer, 2 layers, d_model 128, 4 heads, seq 64, batch 8, "
            "vocab 256, AdamW (compute-bound)"
        ),
        build_model=lambda seed: causal_transformer(seed),
        make_batches=_lm_batches,
        mean_loss=_lm_mean,
        sum_loss=_lm_sum,
        steps_per_block=5,
        repeats=21,
        warmup_steps=10,
        quick_steps_per_block=3,
        quick_repeats=7,
    ),
}


# ---------------------------------------------------------------------------- runners


def _autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class RawRunner:
    """The hand-written loop; it keeps its own cursor into the shared batch list."""

    def __init__(
        self, work: Workload, batches: Sequence[Batch], device: torch.device, precision: str
    ) -> None:
        self.model = work.build_model(0).to(device)
        self.optimizer = adamw(self.model.parameters())
        self.batches = batches
        self.cursor = 0
        self.mean_loss = work.mean_loss
        self.autocast = _autocast(device, precision)
        self.fp32 = precision == "fp32"

    def run(self, n: int) -> None:
        model, opt, batches, loss_fn = self.model, self.optimizer, self.batches, self.mean_loss
        n_batches, cursor = len(batches), self.cursor
        if self.fp32:
            for i in range(cursor, cursor + n):
                batch = batches[i % n_batches]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
        else:
            autocast = self.autocast
            for i in range(cursor, cursor + n):
                batch = batches[i % n_batches]
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
        self.cursor = cursor + n

    def release_grads(self) -> None:
        """Free the gradients, so memory is measured from the state loopkit starts from."""
        self.optimizer.zero_grad(set_to_none=True)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())


class LoopkitRunner:
    """`chain(forward(loss_fn), accumulate(1), optimizer_step())` on a TrainState."""

    def __init__(
        self,
        work: Workload,
        batches: Sequence[Batch],
        device: torch.device,
        precision: str,
        loss_fn: Callable[..., Any],
    ) -> None:
        self.state = lk.TrainState.create(
            work.build_model(0),
            optimizer=adamw,
            precision=precision,
            strategy=lk.SingleDevice(device),
            seed=0,
        )
        self.step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step())
        self.batches = batches
        self.cursor = 0

    def run(self, n: int) -> None:
        state, step, batches = self.state, self.step, self.batches
        n_batches, cursor = len(batches), self.cursor
        for i in range(cursor, cursor + n):
            state = step(state, batches[i % n_batches])
        self.state = state
        self.cursor = cursor + n

    def release_grads(self) -> None:
        """Nothing to do: optimizer_step() already set the gradients to None."""

    def parameters(self) -> list[torch.Tensor]:
        return list(self.state.model.parameters())


# ---------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runners: dict[str, Any], device: torch.device, steps: int, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step wall and CPU seconds of each variant, one value per repeat, rotating order.

    CPU time (`time.thread_time`, this thread only) leaves out the time the thread waited
    while other processes ran, so on a shared CPU machine it is the steadier figure; on
    CUDA only wall time means anything (the GPU works while the host thread waits).
    """
    for runner in runners.values():
        runner.run(warmup)
    _sync(device)
    names = list(runners)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            runners[name].run(steps)
            _sync(device)
            wall[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((time.thread_time() - start_cpu) / steps)
    return wall, cpu


def _profiled_bytes(runner: Any, steps: int) -> tuple[int, int]:
    """(peak, retained) CPU bytes above the start level over `steps`, from profiler events."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.run(steps)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak, level


def measure_memory(runner: Any, device: torch.device, steps: int) -> dict[str, int]:
    """Peak and retained bytes of `steps` steps, from a state with no gradients."""
    runner.release_grads()
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.run(steps)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        retained = torch.cuda.memory_allocated(device) - base
    else:
        peak, retained = _profiled_bytes(runner, steps)
    return {"peak_bytes": peak, "retained_bytes": retained}


def live_tensors() -> tuple[int, int]:
    """(count, bytes) of tensor objects the garbage collector can see."""
    gc.collect()
    count = size = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(): no lazy-module __class__ lookups
            count += 1
            with contextlib.suppress(Exception):
                size += obj.untyped_storage().nbytes()
    return count, size


def tensor_census(runner: Any, steps: int) -> dict[str, int]:
    """Live tensors gained after `steps` and after 2 * `steps` more steps (must not grow)."""
    runner.release_grads()
    count0, bytes0 = live_tensors()
    runner.run(steps)
    runner.release_grads()
    count1, bytes1 = live_tensors()
    runner.run(2 * steps)
    runner.release_grads()
    count2, bytes2 = live_tensors()
    return {
        "tensors_gained": count1 - count0,
        "bytes_gained": bytes1 - bytes0,
        "tensors_gained_3x": count2 - count0,
        "bytes_gained_3x": bytes2 - bytes0,
    }


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- reporting


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def run_workload(work: Workload, args: argparse.Namespace, device: torch.device) -> dict:
    steps = work.quick_steps_per_block if args.quick else work.steps_per_block
    repeats = work.quick_repeats if args.quick else work.repeats
    steps = args.steps or steps
    repeats = args.repeats or repeats
    gen = torch.Generator().manual_seed(1234)
    batches = [(x.to(device), y.to(device)) for x, y in work.make_batches(gen)]
    runners = {
        "raw": RawRunner(work, batches, device, args.precision),
        "loopkit": LoopkitRunner(work, batches, device, args.precision, work.mean_loss),
        "loopkit_loss": LoopkitRunner(work, batches, device, args.precision, work.sum_loss),
    }
    times, cpu_times = time_interleaved(runners, device, steps, repeats, work.warmup_steps)
    # Same initial weights, same batches in the same order, same number of steps: the
    # scalar-mean loopkit run must end with the raw loop's weights (bitwise on one thread).
    weights_diff = {
        name: max_abs_diff(runners["raw"].parameters(), runners[name].parameters())
        for name in ("loopkit", "loopkit_loss")
    }
    mem_steps = max(2, min(steps, 20))
    memory = {name: measure_memory(r, device, mem_steps) for name, r in runners.items()}
    census = {name: tensor_census(r, mem_steps) for name, r in runners.items()}

    result: dict[str, Any] = {
        "workload": work.name,
        "description": work.description,
        "params": count_params(runners["raw"].model),
        "steps_per_block": steps,
        "repeats": repeats,
        "warmup_steps": work.warmup_steps,
        "target_ratio": TARGETS[work.name],
        "weights_max_abs_diff_vs_raw": weights_diff,
        "variants": {},
    }
    for name in VARIANTS:
        entry: dict[str, Any] = {}
        for clock, series in (("wall", times), ("cpu", cpu_times)):
            raw, mine = series["raw"], series[name]
            ratios = [t / r for t, r in zip(mine, raw, strict=True)]
            q1, q3 = _quartiles(ratios)
            entry[clock] = {
                "us_per_step_median": _median(mine) * 1e6,
                "us_per_step_min": min(mine) * 1e6,
                "ratio_median": _median(ratios),
                "ratio_q1": q1,
                "ratio_q3": q3,
                "overhead_us_median": _median([t - r for t, r in zip(mine, raw, strict=True)])
                * 1e6,
                "us_per_step_all": [t * 1e6 for t in mine],
            }
        result["variants"][name] = {**entry, **memory[name], **census[name]}
    return result


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = "unknown"
    with contextlib.suppress(Exception):
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "loopkit"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
        rev += "+dirty(loopkit)" if dirty else ""
    env = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loopkit": lk.__version__,
        "git": rev,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    with contextlib.suppress(OSError):
        env["loadavg_1m_at_start"] = os.getloadavg()[0]
    return env


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def print_report(env: dict, args: argparse.Namespace, results: list[dict]) -> None:
    print(
        f"\nloopkit step benchmark: device={env['device']} precision={args.precision} "
        f"threads={env['torch_threads']} torch={env['torch']} python={env['python']} "
        f"git={env['git']}"
    )
    print(
        f"cpu: {env['cpu']} ({env['logical_cpus']} logical)"
        + (f", gpu: {env['gpu']}" if "gpu" in env else "")
    )
    header = (
        f"{'variant':<14}{'wall us':>10}{'ratio':>7}{'  [q1, q3]':<17}{'+us':>7}"
        f"{'cpu us':>10}{'ratio':>7}{'+us':>7}{'peak KiB':>10}{'kept KiB':>10}{'tensors+':>10}"
    )
    for res in results:
        print(
            f"\n== {res['workload']}: {res['description']}; {res['params']:,} params; "
            f"{res['repeats']} repeats x {res['steps_per_block']} steps "
            f"(+{res['warmup_steps']} warmup); target ratio <= {res['target_ratio']}"
        )
        print(header)
        for name, v in res["variants"].items():
            w, c = v["wall"], v["cpu"]
            quart = "" if name == "raw" else f"  [{w['ratio_q1']:.3f}, {w['ratio_q3']:.3f}]"
            print(
                f"{name:<14}{w['us_per_step_median']:>10.1f}{w['ratio_median']:>7.3f}"
                f"{quart:<17}{w['overhead_us_median']:>7.1f}"
                f"{c['us_per_step_median']:>10.1f}{c['ratio_median']:>7.3f}"
                f"{c['overhead_us_median']:>7.1f}"
                f"{_kib(v['peak_bytes']):>10}{_kib(v['retained_bytes']):>10}"
                f"{v['tensors_gained']:>5} /{v['tensors_gained_3x']:>3}"
            )
        diffs = res["weights_max_abs_diff_vs_raw"]
        print(
            "weights after the run, max |loopkit - raw| = "
            f"{diffs['loopkit']:.3g} (scalar mean), {diffs['loopkit_loss']:.3g} (Loss(sum, count))"
        )
        wall_ratio = res["variants"]["loopkit"]["wall"]["ratio_median"]
        cpu_ratio = res["variants"]["loopkit"]["cpu"]["ratio_median"]
        verdict = "meets" if wall_ratio <= res["target_ratio"] else "MISSES"
        print(
            f"loopkit/raw = {wall_ratio:.3f} wall, {cpu_ratio:.3f} cpu: {verdict} the target "
            f"<= {res['target_ratio']}"
        )
    print(
        "\nwall/cpu us: median per-step time over repeats (cpu: this thread's CPU time, blind "
        "to time lost to other processes); ratio: median of per-repeat variant/raw ratios "
        "[quartiles]; +us: median per-repeat difference to raw; peak/kept: bytes "
        "allocated above the no-gradient level during / after the memory steps; tensors+: "
        "live tensor objects gained after K / 3K steps (must not grow)."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=0, help="steps per block (override)")
    parser.add_argument("--repeats", type=int, default=0, help="repeats (override)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available in this torch build.", file=sys.stderr)
        return 2
    env = environment(device, args.threads)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    results = [run_workload(WORKLOADS[name], args, device) for name in names]
    print_report(env, args, results)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
