"""What step fingerprints (loopkit.fingerprint) add to a loopkit step.

Runs, on the same model, optimizer and batches, in one process, interleaved (the method of
bench_step.py: after a warmup every repeat times one block of N steps of each variant in a
rotating order; a variant's ratio is the median of its per-repeat ratios to ``chain``):

- ``chain``: ``chain(forward(loss_fn), accumulate(1), clip(1.0), optimizer_step())``, fit's
  default step without fingerprints;
- ``chain_b``: a second, independent ``chain`` (A/A control: the noise floor);
- ``fp_every_1``: the same chain with ``fingerprint(recorder)`` before ``optimizer_step``
  (fit's default step with a log_dir), flushed to disk at the end of every timed block, as
  fit would with ``log_every`` = the block length (10 transformer steps: five times fit's
  default, so the cost of writing is counted generously);
- ``fp_every_10``: the same with ``fingerprint(recorder, every=10)``;
- with ``--baseline DIR`` (another copy of the loopkit package, e.g. the last commit's:
  ``git archive HEAD loopkit | tar -x -C /tmp/base``): ``chain@base``, ``fp_every_1@base``
  and ``fp_every_10@base``, the same three from that copy, whose ratios are taken to
  ``chain@base`` (before/after figures under the same load).

It also times the fingerprint alone (``step_fingerprint`` + ``step_meta``, what the
transform does at a recorded step) interleaved with whole steps, and gives the median of
the per-repeat ratios: far less noisy than a difference of two steps.

Targets (issue 18): at most 2 % over ``chain`` at every step and 0.5 % every 10 steps, on
the transformer. All variants end with the same weights (checked: fingerprints only read).

Usage:
    python benchmarks/bench_fingerprint.py [--quick] [--workload transformer|mlp|all]
        [--device cpu|cuda] [--steps N] [--repeats R] [--json out.json] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import (  # noqa: E402
    WORKLOADS,
    Batch,
    Workload,
    _sync,
    adamw,
    environment,
    load_baseline,
    max_abs_diff,
    steady_malloc,
    summarize,
    time_interleaved,
)

import loopkit as lk  # noqa: E402

VARIANTS = ("chain", "chain_b", "fp_every_1", "fp_every_10")
BASE_VARIANTS = ("chain@base", "fp_every_1@base", "fp_every_10@base")
TARGETS = {"fp_every_1": 1.02, "fp_every_10": 1.005}
STEPS_PER_BLOCK = {"mlp": 50, "transformer": 10}
"""Multiples of 10, so every block holds the same number of every-10th fingerprints."""


class Runner:
    """One variant: its own record, step chain and (for fingerprints) recorder."""

    def __init__(
        self,
        work: Workload,
        batches: Sequence[Batch],
        device: torch.device,
        every: int,
        directory: Path,
        module: ModuleType = lk,
    ) -> None:
        self.state = module.TrainState.create(
            work.build_model(0), optimizer=adamw, strategy=module.SingleDevice(device), seed=0
        )
        self.recorder = module.FingerprintRecorder(directory) if every else None
        parts: list[Any] = [module.forward(work.mean_loss), module.accumulate(1), module.clip(1.0)]
        if self.recorder is not None:
            parts.append(module.fingerprint(self.recorder, every=every))
        self.step = module.chain(*parts, module.optimizer_step())
        self.batches = batches
        self.cursor = 0

    def run(self, n: int) -> None:
        state, step, batches, recorder = self.state, self.step, self.batches, self.recorder
        n_batches, cursor = len(batches), self.cursor
        for i in range(cursor, cursor + n):
            state = step(state, batches[i % n_batches])
        if recorder is not None:
            recorder.flush()  # a log step at the end of each block: the one host sync
        self.state = state
        self.cursor = cursor + n

    def parameters(self) -> list[torch.Tensor]:
        return list(self.state.model.parameters())


def _closed_window(
    work: Workload, batches: Sequence[Batch], device: torch.device, module: Any
) -> tuple[Any, Any]:
    """A record at a closed window (forward, accumulate, clip done; Adam's state present)."""
    state = module.TrainState.create(
        work.build_model(0), optimizer=adamw, strategy=module.SingleDevice(device)
    )
    head = [module.forward(work.mean_loss), module.accumulate(1), module.clip(1.0)]
    full = module.chain(*head, module.optimizer_step())
    for batch in batches[:2]:
        state = full(state, batch)
    return module.chain(*head)(state, batches[2]), full


def direct_cost(
    work: Workload,
    batches: Sequence[Batch],
    device: torch.device,
    repeats: int,
    modules: dict[str, ModuleType],
) -> dict[str, dict[str, float]]:
    """The fingerprint's own time, interleaved with whole steps: per repeat, in a rotating
    order, one step and 5 fingerprints of each module (`step_fingerprint` + `step_meta` on
    a closed window: what the transform does each recorded step); the ratios are medians
    of the per-repeat ratios to the step. A flush of 10 buffered steps (file writes, mostly
    fixed cost) is timed apart; the percentages assume a flush every 50 steps (fit's
    default log_every).
    """

    def timed(fn: Any, n: int) -> float:
        _sync(device)
        start = time.thread_time()
        for _ in range(n):
            fn()
        _sync(device)
        return (time.thread_time() - start) / n

    full = _closed_window(work, batches, device, lk)[1]
    step_state = lk.TrainState.create(
        work.build_model(0), optimizer=adamw, strategy=lk.SingleDevice(device)
    )
    calls: dict[str, Any] = {}
    for name, module in modules.items():
        fp = sys.modules[module.__name__ + ".fingerprint"]
        state = _closed_window(work, batches, device, module)[0]
        cache = fp._Cache()
        calls[name] = lambda fp=fp, state=state, cache=cache: (
            fp.step_fingerprint(state, cache),
            fp.step_meta(state),
        )

    def one_step() -> None:
        nonlocal step_state
        step_state = full(step_state, batches[0])

    names = ["step", *calls]
    times: dict[str, list[float]] = {name: [] for name in names}
    for fn in calls.values():
        fn()
    for repeat in range(3 * repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(one_step, 1) if name == "step" else timed(calls[name], 5))
    out: dict[str, dict[str, float]] = {}
    for name, module in modules.items():
        fp = sys.modules[module.__name__ + ".fingerprint"]
        state = _closed_window(work, batches, device, module)[0]
        cache = fp._Cache()
        with tempfile.TemporaryDirectory(prefix="bench-fp-flush-") as tmp:
            recorder = module.FingerprintRecorder(tmp)
            columns, values = fp.step_fingerprint(state, cache)
            meta = fp.step_meta(state)

            def flush() -> None:
                for step in range(10):
                    recorder.add(step, columns, values.clone(), meta)  # noqa: B023
                recorder.flush()  # noqa: B023

            flush_us = statistics.median(timed(flush, 1) for _ in range(repeats)) * 1e6
        ratios = [f / s for f, s in zip(times[name], times["step"], strict=True)]
        flush_share = flush_us / 50 / (statistics.median(times["step"]) * 1e6)
        out[name] = {
            "fingerprint_us": statistics.median(times[name]) * 1e6,
            "flush_10_steps_us": flush_us,
            "step_us": statistics.median(times["step"]) * 1e6,
            "every_1_percent": 100 * (statistics.median(ratios) + flush_share),
            "every_10_percent": 100 * (statistics.median(ratios) / 10 + flush_share),
        }
    return out


def run_workload(
    work: Workload, args: argparse.Namespace, device: torch.device, base: ModuleType | None
) -> dict:
    steps = args.steps or STEPS_PER_BLOCK[work.name]
    repeats = args.repeats or (work.quick_repeats if args.quick else 21)
    gen = torch.Generator().manual_seed(1234)
    batches = [(x.to(device), y.to(device)) for x, y in work.make_batches(gen)]
    plan = [("chain", 0, lk), ("chain_b", 0, lk), ("fp_every_1", 1, lk), ("fp_every_10", 10, lk)]
    if base is not None:
        plan += [(f"{name}@base", every, base) for name, every, _ in plan if name != "chain_b"]
    with tempfile.TemporaryDirectory(prefix="bench-fp-") as tmp:
        runners = {
            name: Runner(work, batches, device, every, Path(tmp) / name, module)
            for name, every, module in plan
        }
        series = time_interleaved(runners, device, steps, repeats, work.warmup_steps)
        for runner in runners.values():
            if runner.recorder is not None:
                runner.recorder.flush()
        recorded = {
            name: sum(len(c.steps) for c in module.read_fingerprints(Path(tmp) / name))
            for name, every, module in plan
            if every
        }
    modules = {"now": lk} if base is None else {"now": lk, "base": base}
    direct = direct_cost(work, batches, device, repeats, modules)
    weights = {
        name: max_abs_diff(runners["chain"].parameters(), runners[name].parameters())
        for name in runners
    }

    def reference(name: str) -> str:
        return "chain@base" if name.endswith("@base") else "chain"

    return {
        "workload": work.name,
        "description": work.description,
        "steps_per_block": steps,
        "repeats": repeats,
        "steps_recorded": recorded,
        "direct_us": direct,
        "weights_max_abs_diff_vs_chain": weights,
        "variants": {
            name: {
                "reference": reference(name),
                "wall": summarize(series["wall"][name], series["wall"][reference(name)]),
                "cpu": summarize(series["cpu"][name], series["cpu"][reference(name)]),
            }
            for name in runners
        },
    }


def print_report(env: dict[str, Any], results: list[dict]) -> None:
    print(
        f"device {env['device']} ({env['cpu']}), torch {env['torch']}, "
        f"threads {env['torch_threads']}, malloc {env['malloc']}, git {env['git']}, "
        f"load average at start {env.get('loadavg_1m_at_start')}"
    )
    print(
        "| workload | variant | vs | wall us | wall ratio [q1, q3] | cpu us | cpu ratio [q1, q3] "
        "| +us |"
    )
    print("| --- | --- | --- | ---: | --- | ---: | --- | ---: |")
    for result in results:
        for name, v in result["variants"].items():
            w, c = v["wall"], v["cpu"]
            print(
                f"| {result['workload']} | {name} | {v['reference']} | "
                f"{w['us_per_step_median']:,.1f} | "
                f"{w['ratio_median']:.4f} [{w['ratio_q1']:.3f}, {w['ratio_q3']:.3f}] | "
                f"{c['us_per_step_median']:,.1f} | {c['ratio_median']:.4f} "
                f"[{c['ratio_q1']:.3f}, {c['ratio_q3']:.3f}] | {c['overhead_us_median']:+,.1f} |"
            )
        print(
            f"{result['workload']}: {result['repeats']} repeats x {result['steps_per_block']} "
            f"steps; recorded steps {result['steps_recorded']}; final weights max |diff| vs "
            f"chain {result['weights_max_abs_diff_vs_chain']}"
        )
        for version, d in result["direct_us"].items():
            print(
                f"  measured alone ({version}): fingerprint {d['fingerprint_us']:,.0f} us, flush "
                f"of 10 steps {d['flush_10_steps_us']:,.0f} us, step {d['step_us']:,.0f} us "
                f"(cpu medians): {d['every_1_percent']:.2f} % at every step, "
                f"{d['every_10_percent']:.2f} % every 10 steps (median per-repeat ratios; a "
                "flush every 50 steps, as fit's default log_every)"
            )
        for name, target in TARGETS.items():
            ratio = result["variants"][name]["cpu"]["ratio_median"]
            verdict = "meets" if ratio <= target else "misses"
            print(f"  {name}: cpu ratio {ratio:.4f} {verdict} the target {target}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="transformer")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=0, help="steps per block (override)")
    parser.add_argument("--repeats", type=int, default=0, help="repeats (override)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--baseline", type=Path, help="another copy of the loopkit package")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available in this torch build.", file=sys.stderr)
        return 2
    malloc = steady_malloc() if device.type == "cpu" else "default"
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    env = environment(device, args.threads, malloc)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    base = load_baseline(args.baseline) if args.baseline else None
    results = [run_workload(WORKLOADS[name], args, device, base) for name in names]
    print_report(env, results)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
