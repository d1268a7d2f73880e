"""Per-step time of `loopkit.fit()` against a hand-written loop, with logging and a bar.

Both loops train the same model (same initial weights), with the same optimizer, on the
same `TensorDataset`, in batches of the same samples in the same order (no shuffling):

- ``raw``: a plain Python loop over ``torch.utils.data.DataLoader(dataset, batch_size,
  shuffle=False)`` doing ``opt.zero_grad(set_to_none=True); loss = loss_fn(model, batch);
  loss.backward(); opt.step()``, a tqdm bar updated every step, and
  ``print(f"step ... loss {loss.item():.4f}")`` every 50 steps (the logging);
- ``raw_b``: an independent second copy of ``raw`` (A/A control: its ratio to ``raw`` is
  the noise floor of the measurement);
- ``fit``: ``fit(model, dataset, loss_fn=..., optimizer=..., max_steps=N, batch_size=B,
  log_every=50, progress=True, shuffle=False)``, i.e. loopkit builds its own
  StatefulDataLoader (the way fit() is meant to be called).

``--breakdown`` adds two variants that split fit's overhead into its parts:

- ``chain``: the raw loop (same DataLoader, bar and prints) with the four raw statements
  replaced by fit's default step, ``chain(forward(loss_fn), accumulate(1),
  optimizer_step())`` on a TrainState: what the transforms cost;
- ``fit_dataloader``: fit() given the raw loop's plain DataLoader instead of the dataset:
  ``fit_dataloader - chain`` is fit's own per-step work (its loop, callback dispatch, the
  device-side non-finite check, the progress bar and log steps) and ``fit -
  fit_dataloader`` what loopkit's StatefulDataLoader + DistributedSampler cost over a
  plain DataLoader.

Method. Every run builds a fresh model and optimizer, runs W + N optimizer steps and
timestamps (``perf_counter`` and ``thread_time``) the end of optimizer step W and of step
W + N from inside the loop: in the raw loop right after ``opt.step()``, in fit() from a
callback's ``on_step_end`` (the first callback, so before the progress bar's). Per-step
time is (t[W + N] - t[W]) / N: fit's setup (config validation, TrainState.create, loader
construction, ``on_fit_start``), the first, slow steps and the teardown fall outside the
window, and the window holds exactly N steps, N / 50 log steps (W and N are multiples of
50: the log of step W runs after its timestamp, the log of step W + N after the last) and
N bar updates. The dataset holds more than W + N batches, so no epoch ends inside the
window. The timestamp check costs both loops one Python call per step. The time from the
call to the end of the first step (``startup``) is reported separately.

The variants run interleaved in one process: every repeat runs each variant once, in an
order that rotates from one repeat to the next, and a variant's ratio to ``raw`` is the
median of the per-repeat ratios. ``raw_b`` measures how far two identical loops disagree.

Output stream: during the runs ``sys.stdout`` is replaced by a sink that discards what it
is given and, by default (``--stream tty``), says it is a terminal: loopkit's ProgressBar
and the raw loop's tqdm then both draw a real bar (tqdm formats and "prints" a frame at
most every 0.1 s; ``bar.update`` runs every step) and the log lines are formatted and
written. With ``--stream notty`` the sink is not a terminal: loopkit prints a plain line
per log step and no bar, and the raw loop creates its tqdm bar with ``disable=None``
(disabled on a non-terminal, as loopkit's is).

CPU only; one torch thread; glibc malloc pinned as in bench_step.py (``--default-malloc``
turns that off).

Usage:
    python benchmarks/bench_fit.py [--quick] [--workload mlp|transformer|all]
        [--stream tty|notty] [--breakdown] [--repeats R] [--steps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import (  # noqa: E402
    WORKLOADS,
    Workload,
    adamw,
    environment,
    max_abs_diff,
    steady_malloc,
    summarize,
)
from models import count_params  # noqa: E402

import loopkit as lk  # noqa: E402

LOG_EVERY = 50
TARGET = 1.05  # issue 4: fit() <= 1.05x the raw loop per step on the tiny MLP
ALL_VARIANTS = ("raw", "raw_b", "chain", "fit_dataloader", "fit")


# ---------------------------------------------------------------------------- workloads


def _mlp_dataset(gen: torch.Generator, n: int) -> TensorDataset:
    x = torch.randn(n, 32, generator=gen)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=gen))


def _lm_dataset(gen: torch.Generator, n: int) -> TensorDataset:
    tokens = torch.randint(0, 256, (n, 65), generator=gen)
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


@dataclass(frozen=True)
class FitWorkload:
    """bench_step's workload (model, mean loss), a dataset maker and the run lengths."""

    step: Workload
    make_dataset: Callable[[torch.Generator, int], TensorDataset]
    batch_size: int
    warmup: int  # W: steps before the timed window (a multiple of LOG_EVERY)
    steps: int  # N: timed steps (a multiple of LOG_EVERY)
    repeats: int
    quick_steps: int
    quick_repeats: int


FIT_WORKLOADS = {
    "mlp": FitWorkload(
        WORKLOADS["mlp"],
        _mlp_dataset,
        batch_size=32,
        warmup=100,
        steps=500,
        repeats=21,
        quick_steps=200,
        quick_repeats=7,
    ),
    "transformer": FitWorkload(
        WORKLOADS["transformer"],
        _lm_dataset,
        batch_size=8,
        warmup=50,
        steps=100,
        repeats=9,
        quick_steps=50,
        quick_repeats=3,
    ),
}


# ---------------------------------------------------------------------------- the loops


class _Sink(io.TextIOBase):
    """A text stream that discards everything; `isatty()` says what it is told to."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def write(self, text: str) -> int:
        return len(text)

    def isatty(self) -> bool:
        return self._tty

    def writable(self) -> bool:
        return True


class Probe:
    """Timestamps (wall, cpu) at the end of chosen optimizer steps; a fit() callback too."""

    def __init__(self, marks: Sequence[int]) -> None:
        self.marks = frozenset(marks)
        self.stamps: dict[int, tuple[float, float]] = {}

    def mark(self, step: int) -> None:
        if step in self.marks:
            self.stamps[step] = (time.perf_counter(), time.thread_time())

    def on_step_end(self, state: Any) -> None:
        step = state.step
        if step in self.marks:
            self.stamps[step] = (time.perf_counter(), time.thread_time())


def run_raw(
    work: FitWorkload, dataset: TensorDataset, total: int, probe: Probe, stream: Any
) -> list[torch.Tensor]:
    """The hand-written loop; returns the final parameters."""
    model = work.step.build_model(0)
    optimizer = adamw(model.parameters())
    loss_fn = work.step.mean_loss
    loader = DataLoader(dataset, batch_size=work.batch_size, shuffle=False)
    bar = tqdm(total=total, unit="step", file=stream, dynamic_ncols=True, disable=None)
    step = 0
    while step < total:
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            step += 1
            probe.mark(step)
            bar.update(1)
            if step % LOG_EVERY == 0:
                print(f"step {step} | loss {loss.item():.4f}", file=stream, flush=True)
            if step >= total:
                break
    bar.close()
    return list(model.parameters())


def run_chain(
    work: FitWorkload, dataset: TensorDataset, total: int, probe: Probe, stream: Any
) -> list[torch.Tensor]:
    """The raw loop with fit's default step (the loopkit transforms) instead of raw torch."""
    state = lk.TrainState.create(work.step.build_model(0), optimizer=adamw, seed=0)
    train_step = lk.chain(lk.forward(work.step.mean_loss), lk.accumulate(1), lk.optimizer_step())
    loader = DataLoader(dataset, batch_size=work.batch_size, shuffle=False)
    bar = tqdm(total=total, unit="step", file=stream, dynamic_ncols=True, disable=None)
    step = 0
    while step < total:
        for batch in loader:
            state = train_step(state, batch)
            step = state.step
            probe.mark(step)
            bar.update(1)
            if step % LOG_EVERY == 0:
                loss = state.metrics["train/loss"]
                print(f"step {step} | loss {loss.item():.4f}", file=stream, flush=True)
            if step >= total:
                break
    bar.close()
    return list(state.model.parameters())


def _run_fit(
    work: FitWorkload, data: Any, total: int, probe: Probe, **kwargs: Any
) -> list[torch.Tensor]:
    result = lk.fit(
        work.step.build_model(0),
        data,
        loss_fn=work.step.mean_loss,
        optimizer=adamw,
        max_steps=total,
        log_every=LOG_EVERY,
        progress=True,
        shuffle=False,
        seed=0,
        callbacks=[probe],
        **kwargs,
    )
    assert result.state.step == total, result
    return list(result.state.model.parameters())


def run_fit(
    work: FitWorkload, dataset: TensorDataset, total: int, probe: Probe, stream: Any
) -> list[torch.Tensor]:
    """fit() on the dataset: loopkit builds the loader."""
    return _run_fit(work, dataset, total, probe, batch_size=work.batch_size)


def run_fit_dataloader(
    work: FitWorkload, dataset: TensorDataset, total: int, probe: Probe, stream: Any
) -> list[torch.Tensor]:
    """fit() on the raw loop's plain DataLoader."""
    loader = DataLoader(dataset, batch_size=work.batch_size, shuffle=False)
    return _run_fit(work, loader, total, probe)


RUNNERS = {
    "raw": run_raw,
    "raw_b": run_raw,
    "chain": run_chain,
    "fit_dataloader": run_fit_dataloader,
    "fit": run_fit,
}


# ---------------------------------------------------------------------------- measuring


def run_workload(work: FitWorkload, args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps or (work.quick_steps if args.quick else work.steps)
    repeats = args.repeats or (work.quick_repeats if args.quick else work.repeats)
    warmup = work.warmup
    if steps % LOG_EVERY or warmup % LOG_EVERY:
        raise SystemExit(f"--steps {steps}: W and N must be multiples of {LOG_EVERY}")
    total = warmup + steps
    # More batches than steps: no epoch ends inside a run.
    dataset = work.make_dataset(torch.Generator().manual_seed(1234), (total + 8) * work.batch_size)
    names = ["raw", "raw_b", "fit"]
    if args.breakdown:
        names = ["raw", "raw_b", "chain", "fit_dataloader", "fit"]
    sink = _Sink(tty=args.stream == "tty")
    series: dict[str, dict[str, list[float]]] = {
        key: {name: [] for name in names} for key in ("wall", "cpu", "startup")
    }
    weights_diff: dict[str, float] = {}
    # One short untimed run of each variant first: imports, tqdm's monitor thread and the
    # first allocations land there, not in the first repeat.
    for name in names:
        with contextlib.redirect_stdout(sink):
            RUNNERS[name](work, dataset, 2 * LOG_EVERY, Probe([]), sink)
    for repeat in range(repeats):
        shift = repeat % len(names)
        final: dict[str, list[torch.Tensor]] = {}
        for name in names[shift:] + names[:shift]:
            probe = Probe([1, warmup, total])
            start = time.perf_counter()
            with contextlib.redirect_stdout(sink):
                final[name] = RUNNERS[name](work, dataset, total, probe, sink)
            (w0, c0), (w1, c1) = probe.stamps[warmup], probe.stamps[total]
            series["wall"][name].append((w1 - w0) / steps)
            series["cpu"][name].append((c1 - c0) / steps)
            series["startup"][name].append(probe.stamps[1][0] - start)
        if repeat == 0:
            # Same initial weights, batches, order and step count: the same final weights.
            weights_diff = {n: max_abs_diff(final["raw"], final[n]) for n in names if n != "raw"}
        print(
            f"  {work.step.name} repeat {repeat + 1}/{repeats}: "
            + ", ".join(f"{n} {series['cpu'][n][-1] * 1e6:.0f}" for n in names)
            + " us/step (cpu)",
            file=sys.stderr,
            flush=True,
        )
    model = work.step.build_model(0)
    result: dict[str, Any] = {
        "workload": work.step.name,
        "description": work.step.description,
        "params": count_params(model),
        "batch_size": work.batch_size,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "repeats": repeats,
        "stream": args.stream,
        "weights_max_abs_diff_vs_raw": weights_diff,
        "variants": {},
    }
    for name in names:
        result["variants"][name] = {
            "wall": summarize(series["wall"][name], series["wall"]["raw"]),
            "cpu": summarize(series["cpu"][name], series["cpu"]["raw"]),
            "startup_ms_median": statistics.median(series["startup"][name]) * 1e3,
        }
    return result


# ---------------------------------------------------------------------------- reporting


def print_report(env: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(
        f"\nloopkit fit() benchmark: device=cpu threads={env['torch_threads']} "
        f"torch={env['torch']} python={env['python']} git={env['git']}"
    )
    print(
        f"cpu: {env['cpu']} ({env['logical_cpus']} logical), malloc: {env['malloc']}, "
        f"load average at start: {env.get('loadavg_1m_at_start', '?')}"
    )
    header = (
        f"{'variant':<16}{'wall us':>10}{'ratio':>7}{'  [q1, q3]':<17}{'+us':>7}"
        f"{'cpu us':>10}{'ratio':>7}{'  [q1, q3]':<17}{'+us':>7}{'startup ms':>12}"
    )
    for res in results:
        print(
            f"\n== {res['workload']}: {res['description']}; {res['params']:,} params; "
            f"batch {res['batch_size']}; {res['repeats']} repeats x {res['timed_steps']} "
            f"steps (after {res['warmup_steps']}); log every {LOG_EVERY}; bar on, stream "
            f"{res['stream']}"
        )
        print(header)
        for name, v in res["variants"].items():
            w, c = v["wall"], v["cpu"]
            wq = "" if name == "raw" else f"  [{w['ratio_q1']:.3f}, {w['ratio_q3']:.3f}]"
            cq = "" if name == "raw" else f"  [{c['ratio_q1']:.3f}, {c['ratio_q3']:.3f}]"
            print(
                f"{name:<16}{w['us_per_step_median']:>10.1f}{w['ratio_median']:>7.3f}"
                f"{wq:<17}{w['overhead_us_median']:>7.1f}"
                f"{c['us_per_step_median']:>10.1f}{c['ratio_median']:>7.3f}"
                f"{cq:<17}{c['overhead_us_median']:>7.1f}{v['startup_ms_median']:>12.1f}"
            )
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in res["weights_max_abs_diff_vs_raw"].items())
        print(f"final weights, max |variant - raw|: {diffs}")
        fit, control = res["variants"]["fit"], res["variants"]["raw_b"]
        if res["workload"] == "mlp":
            ratio = fit["wall"]["ratio_median"]
            verdict = "meets" if ratio <= TARGET else "MISSES"
            print(
                f"fit/raw = {ratio:.3f} wall, {fit['cpu']['ratio_median']:.3f} cpu (A/A control "
                f"raw_b/raw = {control['wall']['ratio_median']:.3f} wall, "
                f"{control['cpu']['ratio_median']:.3f} cpu): {verdict} the target <= {TARGET}"
            )
    print(
        "\nwall/cpu us: median per-step time over repeats (cpu: this thread's CPU time); "
        "ratio: median of per-repeat variant/raw ratios [quartiles]; +us: median per-repeat "
        "difference to raw; startup: call to the end of step 1 (fit: validation, "
        "TrainState.create, loader; raw: optimizer, loader), median."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--workload", choices=(*FIT_WORKLOADS, "all"), default="mlp")
    parser.add_argument("--stream", choices=("tty", "notty"), default="tty")
    parser.add_argument(
        "--breakdown", action="store_true", help="add the chain and fit_dataloader variants"
    )
    parser.add_argument("--steps", type=int, default=0, help="timed steps N (override)")
    parser.add_argument("--repeats", type=int, default=0, help="repeats (override)")
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc malloc's trimming on"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    malloc = "default" if args.default_malloc else steady_malloc()
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    env = environment(torch.device("cpu"), 1, malloc)
    names = list(FIT_WORKLOADS) if args.workload == "all" else [args.workload]
    results = [run_workload(FIT_WORKLOADS[name], args) for name in names]
    print_report(env, results)
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
