"""Instructions per step of bench_step's variants, counted by valgrind (deterministic).

Wall and CPU time on a shared machine move by several percent from run to run; the number
of instructions a step executes does not. Run under callgrind, this script runs each variant
of `bench_step.py` for N steps in one process, with `time.sleep(0)` between them, and
callgrind writes one profile per part (`--dump-before=time_sleep`); the script then reads
the parts' totals and prints instructions per step and the ratio to `raw`. Instructions leave
out what the loopkit step costs through the caches (see docs/performance.md), so they rank
changes to the step's own work; the timed benchmark gives the figures.

Usage (about 5 minutes on 2 vCPUs; most of it is importing torch under valgrind):
    valgrind --tool=callgrind --dump-before=time_sleep --dump-instr=no \\
        --callgrind-out-file=/tmp/cg/out python benchmarks/instr_step.py run [--loss | --both] \\
        [--baseline DIR]
    python benchmarks/instr_step.py report /tmp/cg/out
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import (  # noqa: E402
    WORKLOADS,
    LoopkitRunner,
    RawRunner,
    _raw_token_loss,
    _sum_loss,
    _sum_loss_with,
    load_baseline,
    steady_malloc,
)

STEPS = 100
WARMUP = 20


def run(args: argparse.Namespace) -> None:
    """Run each variant for STEPS steps, a `time.sleep(0)` before each (a callgrind part)."""
    steady_malloc()
    torch.set_num_threads(1)
    work, device = WORKLOADS["mlp"], torch.device("cpu")
    batches = work.make_batches(torch.Generator().manual_seed(1234))
    runners = {"raw": RawRunner(work, batches, device, "fp32")}
    base = load_baseline(args.baseline) if args.baseline else None
    if not args.loss or args.both:
        runners["loopkit"] = LoopkitRunner(work, batches, device, "fp32", work.mean_loss)
        runners["loopkit_noseed"] = LoopkitRunner(
            work, batches, device, "fp32", work.mean_loss, seed_rng=False
        )
        if base is not None:
            runners["loopkit@base"] = LoopkitRunner(
                work, batches, device, "fp32", work.mean_loss, base
            )
    if args.loss or args.both:
        runners["raw_loss"] = RawRunner(work, batches, device, "fp32", _raw_token_loss)
        runners["loopkit_loss"] = LoopkitRunner(work, batches, device, "fp32", _sum_loss)
        runners["loopkit_loss_noseed"] = LoopkitRunner(
            work, batches, device, "fp32", _sum_loss, seed_rng=False
        )
        if base is not None:
            loss_fn = _sum_loss_with(base)
            runners["loopkit_loss@base"] = LoopkitRunner(
                work, batches, device, "fp32", loss_fn, base
            )
    for runner in runners.values():
        runner.run(WARMUP)
    for runner in runners.values():
        time.sleep(0)  # callgrind starts a new part here
        runner.run(STEPS)
    time.sleep(0)
    Path(args.names).write_text(json.dumps(list(runners)))


def report(args: argparse.Namespace) -> None:
    """Print instructions per step of each variant from callgrind's parts."""
    names = json.loads(Path(args.names).read_text())
    parts = [f for f in glob.glob(f"{args.out}.*") if f.rsplit(".", 1)[1].isdigit()]
    parts.sort(key=lambda f: int(f.rsplit(".", 1)[1]))
    totals = []
    for part in parts:
        for line in Path(part).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                totals.append(int(line.split()[1]))
                break
    per_step = dict(zip(names, (t / STEPS for t in totals[1 : 1 + len(names)]), strict=True))
    raw = per_step["raw"]
    print(f"{'variant':<20}{'instr/step':>14}{'ratio':>8}{'+instr':>10}")
    for name, value in per_step.items():
        print(f"{name:<20}{value:>14,.0f}{value / raw:>8.3f}{value - raw:>+10,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the variants (under callgrind)")
    run_p.add_argument("--loss", action="store_true", help="the Loss(sum, count) path")
    run_p.add_argument("--both", action="store_true", help="both paths, in one process")
    run_p.add_argument("--baseline", type=Path, help="another copy of the loopkit package")
    report_p = sub.add_parser("report", help="read callgrind's parts")
    report_p.add_argument("out", help="the --callgrind-out-file given to valgrind")
    for p in (run_p, report_p):
        p.add_argument("--names", default="/tmp/instr_step_names.json", help="variant list")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
