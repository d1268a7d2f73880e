"""Per-step overhead of a loopkit step against a hand-written PyTorch loop.

Runs the same model, optimizer and batches through

- ``raw``: ``opt.zero_grad(set_to_none=True); loss = F.cross_entropy(model(x), y);
  loss.backward(); opt.step()``;
- ``raw_b``: a second, independent copy of ``raw`` (an A/A control: its ratio to ``raw``
  is the noise floor of the measurement);
- ``loopkit``: ``chain(forward(loss_fn), accumulate(1), optimizer_step())`` with a
  ``loss_fn`` returning that same scalar mean;
- ``loopkit_loss``: the same chain with ``loss_fn`` returning ``lk.cross_entropy(...)``, a
  ``Loss(sum, count)`` whose count is a device tensor (the token-loss path);
- ``raw_loss``: the hand-written loop normalising by a device count as that path does,
  ``loss = F.cross_entropy(logits, y, reduction="sum") / (y != -100).sum()`` (what the
  token-loss path costs without loopkit);
- with ``--baseline DIR``: ``loopkit@base`` and ``loopkit_loss@base``, the same two chains
  from another copy of the loopkit package (e.g. the last commit's), for before/after
  figures taken side by side under the same load,

in one process, interleaved: after a warmup, every repeat times one block of N steps of
each variant, rotating their order, and a variant's ratio to ``raw`` is the median of the
per-repeat ratios (paired blocks cancel the drift of a noisy, shared machine).

Timing: wall time (``perf_counter``) and this thread's CPU time (``thread_time``), which
leaves out the time other processes held the core. On CPU the script first makes glibc's
malloc keep freed memory (``mallopt``: no heap trimming, no per-tensor ``mmap``); without
that, which of the four models' activations land on a trimmed heap top is luck, and the
resulting page faults (hundreds per transformer step) move one variant by several percent.
``--default-malloc`` turns this off; the ``faults`` column shows the effect.

Memory: peak bytes allocated during K steps above the level with no gradients and no
activations (the same starting point for both loops), and bytes still allocated after them
(between steps). On CUDA from ``torch.cuda.max_memory_allocated``; on CPU from the
allocation events of ``torch.profiler`` (``profile_memory=True``), which sees every CPU
allocator call. A gc census of live tensor objects checks that loopkit retains no tensors
from step to step (the count must not grow with the number of steps).

Usage:
    python benchmarks/bench_step.py [--quick] [--device cpu|cuda] [--precision fp32|bf16]
        [--workload mlp|transformer|all] [--threads 1] [--json out.json] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import causal_transformer, count_params, tiny_mlp  # noqa: E402

import loopkit as lk  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]
VARIANTS = ("raw", "raw_b", "loopkit", "loopkit_loss", "raw_loss")
BASELINE_VARIANTS = ("loopkit@base", "loopkit_loss@base")
LOOPKIT_VARIANTS = ("loopkit", "loopkit_loss", *BASELINE_VARIANTS)
TARGETS = {"mlp": 1.05, "transformer": 1.01}
LOSS_TARGETS = {"mlp": 1.10}  # the Loss(sum, count) path (issue 17)


def adamw(params: Any) -> torch.optim.Optimizer:
    """The optimizer factory every variant uses (torch picks the implementation)."""
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


def _lm_mean(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _sum_loss(model: torch.nn.Module, batch: Batch) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def _sum_loss_with(module: ModuleType) -> Callable[[torch.nn.Module, Batch], Any]:
    """`_sum_loss` with another copy of loopkit's cross_entropy (for --baseline)."""
    if module is lk:
        return _sum_loss

    def sum_loss(model: torch.nn.Module, batch: Batch) -> Any:
        x, y = batch
        return module.cross_entropy(model(x), y)

    sum_loss.__qualname__ = "_sum_loss"
    return sum_loss


def _raw_token_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """What a hand-written loop writes to normalise by a device-side token count."""
    x, y = batch
    logits = model(x).flatten(0, -2)
    targets = y.flatten()
    return F.cross_entropy(logits, targets, reduction="sum") / (targets != -100).sum()


WORKLOADS = {
    "mlp": Workload(
        name="mlp",
        description="MLP 32->64->10, batch 32, AdamW (overhead-bound)",
        build_model=lambda seed: tiny_mlp(seed),
        make_batches=_mlp_batches,
        mean_loss=_mlp_mean,
        sum_loss=_sum_loss,
        steps_per_block=200,
        repeats=31,
        warmup_steps=200,
        quick_steps_per_block=100,
        quick_repeats=9,
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
        sum_loss=_sum_loss,
        steps_per_block=5,
        repeats=31,
        warmup_steps=10,
        quick_steps_per_block=3,
        quick_repeats=9,
    ),
}


# ---------------------------------------------------------------------------- runners


class RawRunner:
    """The hand-written loop; it keeps its own cursor into the shared batch list."""

    def __init__(
        self,
        work: Workload,
        batches: Sequence[Batch],
        device: torch.device,
        precision: str,
        loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
    ) -> None:
        self.model = work.build_model(0).to(device)
        self.optimizer = adamw(self.model.parameters())
        self.batches = batches
        self.cursor = 0
        self.mean_loss = loss_fn or work.mean_loss
        self.device_type = device.type
        self.precision = precision

    def run(self, n: int) -> None:
        model, opt, batches, loss_fn = self.model, self.optimizer, self.batches, self.mean_loss
        n_batches, cursor = len(batches), self.cursor
        if self.precision == "fp32":
            for i in range(cursor, cursor + n):
                x, y = batches[i % n_batches]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, (x, y))
                loss.backward()
                opt.step()
        else:
            device_type = self.device_type
            for i in range(cursor, cursor + n):
                x, y = batches[i % n_batches]
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                    loss = loss_fn(model, (x, y))
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
        module: ModuleType = lk,
        seed_rng: bool = True,
    ) -> None:
        self.state = module.TrainState.create(
            work.build_model(0),
            optimizer=adamw,
            precision=precision,
            strategy=module.SingleDevice(device),
            seed=0,
        )
        forward = module.forward(loss_fn) if seed_rng else module.forward(loss_fn, seed_rng=False)
        self.step = module.chain(forward, module.accumulate(1), module.optimizer_step())
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


def steady_malloc() -> str:
    """Make glibc malloc keep freed memory: no heap trimming, no mmap below 32 MiB."""
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(
            m_trim_threshold, 2**31 - 1
        )
    except (OSError, AttributeError):
        return "default (no glibc mallopt)"
    return "steady (mallopt: mmap threshold 32 MiB, no trim)" if ok else "default (mallopt failed)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def time_interleaved(
    runners: dict[str, Any], device: torch.device, steps: int, repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Per-step wall s, CPU s and page faults of each variant, one value per repeat.

    The order of the variants rotates from one repeat to the next. CPU time
    (`time.thread_time`, this thread only) leaves out the time the thread waited while
    other processes ran, so on a shared CPU machine it is the steadier figure; on CUDA only
    wall time means anything (the GPU works while the host thread waits).
    """
    for runner in runners.values():
        runner.run(warmup)
    _sync(device)
    names = list(runners)
    out: dict[str, dict[str, list[float]]] = {
        clock: {name: [] for name in names} for clock in ("wall", "cpu", "faults")
    }
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            faults = _minor_faults()
            start, start_cpu = time.perf_counter(), time.thread_time()
            runners[name].run(steps)
            _sync(device)
            out["wall"][name].append((time.perf_counter() - start) / steps)
            out["cpu"][name].append((time.thread_time() - start_cpu) / steps)
            out["faults"][name].append((_minor_faults() - faults) / steps)
    return out


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
    return max(
        float((x.detach().float() - y.detach().float()).abs().max())
        for x, y in zip(a, b, strict=True)
    )


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def summarize(mine: Sequence[float], raw: Sequence[float]) -> dict[str, Any]:
    """Median per-step us, and the median and quartiles of the per-repeat ratios to raw."""
    ratios = [m / r for m, r in zip(mine, raw, strict=True)]
    q1, q3 = _quartiles(ratios)
    return {
        "us_per_step_median": statistics.median(mine) * 1e6,
        "us_per_step_min": min(mine) * 1e6,
        "ratio_median": statistics.median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "overhead_us_median": statistics.median([m - r for m, r in zip(mine, raw, strict=True)])
        * 1e6,
        "us_per_step_all": [m * 1e6 for m in mine],
    }


def load_baseline(path: Path) -> ModuleType:
    """Import another copy of the loopkit package (a directory) as `loopkit_baseline`.

    loopkit imports its own modules relatively, so a copy runs beside this one in the same
    process, e.g. the last commit's: `git archive HEAD loopkit | tar -x -C /tmp/base`.
    """
    init = path / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {path}: not a package directory (no __init__.py).")
    spec = importlib.util.spec_from_file_location(
        "loopkit_baseline", init, submodule_search_locations=[str(path)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["loopkit_baseline"] = module
    spec.loader.exec_module(module)
    return module


def run_workload(
    work: Workload,
    args: argparse.Namespace,
    device: torch.device,
    baseline: ModuleType | None = None,
) -> dict:
    steps = args.steps or (work.quick_steps_per_block if args.quick else work.steps_per_block)
    repeats = args.repeats or (work.quick_repeats if args.quick else work.repeats)
    gen = torch.Generator().manual_seed(1234)
    batches = [(x.to(device), y.to(device)) for x, y in work.make_batches(gen)]
    runners = {
        "raw": RawRunner(work, batches, device, args.precision),
        "raw_b": RawRunner(work, batches, device, args.precision),
        "loopkit": LoopkitRunner(work, batches, device, args.precision, work.mean_loss),
        "loopkit_loss": LoopkitRunner(work, batches, device, args.precision, _sum_loss),
        "raw_loss": RawRunner(work, batches, device, args.precision, _raw_token_loss),
    }
    if baseline is not None:
        runners["loopkit@base"] = LoopkitRunner(
            work, batches, device, args.precision, work.mean_loss, baseline
        )
        runners["loopkit_loss@base"] = LoopkitRunner(
            work, batches, device, args.precision, _sum_loss_with(baseline), baseline
        )
    series = time_interleaved(runners, device, steps, repeats, work.warmup_steps)
    # Same initial weights, same batches in the same order, same number of steps: each
    # loopkit run must end with the raw loop's weights (bitwise on one CPU thread).
    weights_diff = {
        name: max_abs_diff(runners["raw"].parameters(), runners[name].parameters())
        for name in runners
        if name not in ("raw", "raw_b")
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
        "loss_target_ratio": LOSS_TARGETS.get(work.name),
        "weights_max_abs_diff_vs_raw": weights_diff,
        "variants": {},
    }
    for name in runners:
        result["variants"][name] = {
            "wall": summarize(series["wall"][name], series["wall"]["raw"]),
            "cpu": summarize(series["cpu"][name], series["cpu"]["raw"]),
            "faults_per_step_median": statistics.median(series["faults"][name]),
            **memory[name],
            **census[name],
        }
    return result


# ---------------------------------------------------------------------------- reporting


def environment(device: torch.device, threads: int, malloc: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = "unknown"
    here = Path(__file__).resolve().parent
    with contextlib.suppress(Exception):
        git = ["git", "-C", str(here)]
        rev = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "../loopkit"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        rev += "+uncommitted loopkit changes" if dirty else ""
    env = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loopkit": lk.__version__,
        "git": rev,
        "device": str(device),
        "malloc": malloc,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    with contextlib.suppress(OSError):
        env["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
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
        f"cpu: {env['cpu']} ({env['logical_cpus']} logical), malloc: {env['malloc']}, "
        f"load average at start: {env.get('loadavg_1m_at_start', '?')}"
        + (f", gpu: {env['gpu']}" if "gpu" in env else "")
    )
    header = (
        f"{'variant':<18}{'wall us':>10}{'ratio':>7}{'  [q1, q3]':<17}{'+us':>7}"
        f"{'cpu us':>10}{'ratio':>7}{'+us':>7}{'faults':>8}{'peak KiB':>10}{'kept KiB':>10}"
        f"{'tensors+':>10}"
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
                f"{name:<18}{w['us_per_step_median']:>10.1f}{w['ratio_median']:>7.3f}"
                f"{quart:<17}{w['overhead_us_median']:>7.1f}"
                f"{c['us_per_step_median']:>10.1f}{c['ratio_median']:>7.3f}"
                f"{c['overhead_us_median']:>7.1f}{v['faults_per_step_median']:>8.1f}"
                f"{_kib(v['peak_bytes']):>10}{_kib(v['retained_bytes']):>10}"
                f"{v['tensors_gained']:>5} /{v['tensors_gained_3x']:>3}"
            )
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in res["weights_max_abs_diff_vs_raw"].items())
        print(f"weights after the run, max |variant - raw|: {diffs}")
        lkv, control = res["variants"]["loopkit"], res["variants"]["raw_b"]
        wall_ratio = lkv["wall"]["ratio_median"]
        verdict = "meets" if wall_ratio <= res["target_ratio"] else "MISSES"
        print(
            f"loopkit/raw = {wall_ratio:.3f} wall, {lkv['cpu']['ratio_median']:.3f} cpu "
            f"(A/A control raw_b/raw = {control['wall']['ratio_median']:.3f} wall, "
            f"{control['cpu']['ratio_median']:.3f} cpu): {verdict} the target "
            f"<= {res['target_ratio']}"
        )
        loss_v, loss_target = res["variants"]["loopkit_loss"], res.get("loss_target_ratio")
        if loss_target is not None:
            loss_ratio = loss_v["wall"]["ratio_median"]
            print(
                f"loopkit_loss/raw = {loss_ratio:.3f} wall, {loss_v['cpu']['ratio_median']:.3f} "
                f"cpu (raw_loss/raw = {res['variants']['raw_loss']['cpu']['ratio_median']:.3f} "
                f"cpu): {'meets' if loss_ratio <= loss_target else 'MISSES'} the target "
                f"<= {loss_target}"
            )
    print(
        "\nwall/cpu us: median per-step time over repeats (cpu: this thread's CPU time, blind "
        "to time lost to other processes); ratio: median of per-repeat variant/raw ratios "
        "[quartiles]; +us: median per-repeat difference to raw; faults: minor page faults per "
        "step; peak/kept: bytes allocated above the no-gradient level during / after the "
        "memory steps; tensors+: live tensor objects gained after K / 3K steps (must not grow)."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=0, help="steps per block (override)")
    parser.add_argument("--repeats", type=int, default=0, help="repeats (override)")
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc malloc's trimming on"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a copy of the loopkit package directory to time beside this one "
        "(variants loopkit@base, loopkit_loss@base)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available in this torch build.", file=sys.stderr)
        return 2
    malloc = "default" if args.default_malloc or device.type != "cpu" else steady_malloc()
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    env = environment(device, args.threads, malloc)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    baseline = load_baseline(args.baseline) if args.baseline else None
    results = [run_workload(WORKLOADS[name], args, device, baseline) for name in names]
    print_report(env, args, results)
    if args.json:
        payload = {
            "environment": env,
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
