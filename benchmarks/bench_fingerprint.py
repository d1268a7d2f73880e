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
- ``fp_every_10``: the same with ``fingerprint(recorder, every=10)``.

Targets (issue 18): at most 2 % over ``chain`` at every step and 0.5 % every 10 steps, on
the transformer. All variants end with the same weights (checked: fingerprints only read).

Usage:
    python benchmarks/bench_fingerprint.py [--quick] [--workload transformer|mlp|all]
        [--device cpu|cuda] [--steps N] [--repeats R] [--json out.json]
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
    max_abs_diff,
    steady_malloc,
    summarize,
    time_interleaved,
)

import loopkit as lk  # noqa: E402
from loopkit.fingerprint import _Cache, step_fingerprint, step_meta  # noqa: E402

VARIANTS = ("chain", "chain_b", "fp_every_1", "fp_every_10")
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
    ) -> None:
        self.state = lk.TrainState.create(
            work.build_model(0), optimizer=adamw, strategy=lk.SingleDevice(device), seed=0
        )
        self.recorder = lk.FingerprintRecorder(directory) if every else None
        parts: list[Any] = [lk.forward(work.mean_loss), lk.accumulate(1), lk.clip(1.0)]
        if self.recorder is not None:
            parts.append(lk.fingerprint(self.recorder, every=every))
        self.step = lk.chain(*parts, lk.optimizer_step())
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


def direct_cost(
    work: Workload, batches: Sequence[Batch], device: torch.device, repeats: int
) -> dict[str, float]:
    """The fingerprint's own time, measured alone: less noisy than a difference of two steps.

    On a record at a closed window (after forward, accumulate, clip; Adam's state present),
    the median CPU time of one `step_fingerprint` + `step_meta` call (what the transform does
    each recorded step), of one flush of 10 buffered steps (file writes: mostly fixed cost),
    and of the step it is part of; the percentages assume a flush every 50 steps.
    """
    state = lk.TrainState.create(
        work.build_model(0), optimizer=adamw, strategy=lk.SingleDevice(device)
    )
    full = lk.chain(lk.forward(work.mean_loss), lk.accumulate(1), lk.clip(1.0), lk.optimizer_step())
    for batch in batches[:2]:
        state = full(state, batch)
    state = lk.chain(lk.forward(work.mean_loss), lk.accumulate(1), lk.clip(1.0))(state, batches[2])
    cache = _Cache()

    def timed(fn: Any, n: int) -> float:
        times = []
        for _ in range(n):
            _sync(device)
            start = time.thread_time()
            fn()
            _sync(device)
            times.append(time.thread_time() - start)
        return statistics.median(times) * 1e6

    fingerprint_us = timed(lambda: (step_fingerprint(state, cache), step_meta(state)), 10 * repeats)
    with tempfile.TemporaryDirectory(prefix="bench-fp-flush-") as tmp:
        recorder = lk.FingerprintRecorder(tmp)
        columns, values = step_fingerprint(state, cache)

        def flush() -> None:
            for step in range(10):
                recorder.add(step, columns, values.clone(), step_meta(state))
            recorder.flush()

        flush_us = timed(flush, repeats)
    step_state = [
        lk.TrainState.create(work.build_model(0), optimizer=adamw, strategy=lk.SingleDevice(device))
    ]

    def one_step() -> None:
        step_state[0] = full(step_state[0], batches[0])

    step_us = timed(one_step, 2 * repeats)
    return {
        "fingerprint_us": fingerprint_us,
        "flush_10_steps_us": flush_us,
        "step_us": step_us,
        # fit flushes at its log steps (log_every=50 by default) and before checkpoints
        "every_1_percent": 100 * (fingerprint_us + flush_us / 50) / step_us,
        "every_10_percent": 100 * (fingerprint_us / 10 + flush_us / 50) / step_us,
    }


def run_workload(work: Workload, args: argparse.Namespace, device: torch.device) -> dict:
    steps = args.steps or STEPS_PER_BLOCK[work.name]
    repeats = args.repeats or (work.quick_repeats if args.quick else 21)
    gen = torch.Generator().manual_seed(1234)
    batches = [(x.to(device), y.to(device)) for x, y in work.make_batches(gen)]
    with tempfile.TemporaryDirectory(prefix="bench-fp-") as tmp:
        runners = {
            name: Runner(work, batches, device, every, Path(tmp) / name)
            for name, every in (
                ("chain", 0),
                ("chain_b", 0),
                ("fp_every_1", 1),
                ("fp_every_10", 10),
            )
        }
        series = time_interleaved(runners, device, steps, repeats, work.warmup_steps)
        for runner in runners.values():
            if runner.recorder is not None:
                runner.recorder.flush()
        recorded = {
            name: sum(len(c.steps) for c in lk.read_fingerprints(Path(tmp) / name))
            for name in ("fp_every_1", "fp_every_10")
        }
    direct = direct_cost(work, batches, device, repeats)
    weights = {
        n: max_abs_diff(runners["chain"].parameters(), runners[n].parameters()) for n in VARIANTS
    }
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
                "wall": summarize(series["wall"][name], series["wall"]["chain"]),
                "cpu": summarize(series["cpu"][name], series["cpu"]["chain"]),
            }
            for name in VARIANTS
        },
    }


def print_report(env: dict[str, Any], results: list[dict]) -> None:
    print(
        f"device {env['device']} ({env['cpu']}), torch {env['torch']}, "
        f"threads {env['torch_threads']}, malloc {env['malloc']}, git {env['git']}, "
        f"load average at start {env.get('loadavg_1m_at_start')}"
    )
    print(
        "| workload | variant | wall us | wall ratio [q1, q3] | cpu us | cpu ratio [q1, q3] | +us |"
    )
    print("| --- | --- | ---: | --- | ---: | --- | ---: |")
    for result in results:
        for name, v in result["variants"].items():
            w, c = v["wall"], v["cpu"]
            print(
                f"| {result['workload']} | {name} | {w['us_per_step_median']:,.1f} | "
                f"{w['ratio_median']:.4f} [{w['ratio_q1']:.3f}, {w['ratio_q3']:.3f}] | "
                f"{c['us_per_step_median']:,.1f} | {c['ratio_median']:.4f} "
                f"[{c['ratio_q1']:.3f}, {c['ratio_q3']:.3f}] | {c['overhead_us_median']:+,.1f} |"
            )
        print(
            f"{result['workload']}: {result['repeats']} repeats x {result['steps_per_block']} "
            f"steps; recorded steps {result['steps_recorded']}; final weights max |diff| vs "
            f"chain {result['weights_max_abs_diff_vs_chain']}"
        )
        d = result["direct_us"]
        print(
            f"  measured alone: fingerprint {d['fingerprint_us']:,.0f} us, flush of 10 steps "
            f"{d['flush_10_steps_us']:,.0f} us, step {d['step_us']:,.0f} us (cpu medians): "
            f"{d['every_1_percent']:.2f} % at every step, {d['every_10_percent']:.2f} % every "
            "10 steps (flushed every 50 steps, as fit's default log_every)"
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
    results = [run_workload(WORKLOADS[name], args, device) for name in names]
    print_report(env, results)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
