"""The compiled whole step (`lk.compile_step`) against a raw loop, raw + torch.compile and eager.

Runs the same model, optimizer (AdamW, lr 1e-3, weight decay 0.01), clipping (global norm
1.0, foreach) and batches through

- ``raw``: per optimizer step, k micro-batches of ``(F.cross_entropy(model(x), y) / k)
  .backward()``, then ``clip_grad_norm_``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``;
- ``raw_b``: a second, independent ``raw`` (the A/A control: the noise floor);
- ``raw_compile``: ``raw`` with the usual torch.compile recipe: ``model.compile()`` and
  ``torch.compile(opt.step)`` (``fullgraph=False``: ``Optimizer.step`` holds graph breaks),
  the optimizer built with a tensor ``lr`` so an lr change does not recompile;
- ``loopkit``: ``chain(forward(loss_fn), accumulate(k), clip(1.0), optimizer_step())``;
- ``compiled``: ``lk.compile_step`` of that chain,

on the tiny MLP at k=1 and k=4 and on the einops transformer at k=1 (benchmarks/models.py).
Per-step times come from ``bench_step.time_interleaved`` (blocks rotated over repeats, the
median of per-repeat ratios to ``raw``, wall and thread CPU time), memory from
``bench_step.measure_memory``. Besides, per variant: the seconds of its first optimizer step
less a steady step (the compile warm-up), the steps that pay that back against ``raw`` and
against ``loopkit`` (warm-up / per-step saving), graphs compiled during the first step and
during the timed steps (recompiles), and torch's graph-break counter over both.

Warm-up depends on torch's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``, by default under
/tmp): ``--cold-cache`` points them at a fresh directory, so every graph is compiled from
scratch as on a first run.

Usage:
    python benchmarks/bench_compile.py [--quick] [--cold-cache] [--workload NAME|all]
        [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if "--cold-cache" in sys.argv:  # before torch reads it
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_cache_")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import (  # noqa: E402
    WORKLOADS,
    Workload,
    environment,
    max_abs_diff,
    measure_memory,
    steady_malloc,
    summarize,
    time_interleaved,
)

import loopkit as lk  # noqa: E402

VARIANTS = ("raw", "raw_b", "raw_compile", "loopkit", "compiled")
MAX_NORM = 1.0


@dataclass(frozen=True)
class Case:
    """One workload at one accumulation k, with its block sizes."""

    name: str
    work: Workload
    k: int
    steps: int
    repeats: int
    warmup: int
    quick_steps: int
    quick_repeats: int


CASES = {
    "mlp-k1": Case("mlp-k1", WORKLOADS["mlp"], 1, 200, 21, 100, 100, 7),
    "mlp-k4": Case("mlp-k4", WORKLOADS["mlp"], 4, 50, 21, 25, 25, 7),
    "transformer": Case("transformer", WORKLOADS["transformer"], 1, 5, 31, 4, 3, 5),
}
TARGETS = {"mlp-k1": 1.0, "mlp-k4": 1.0, "transformer": 0.97}


# ---------------------------------------------------------------------------- runners


class _Cursor:
    """A shared batch list read in order, k micro-batches per optimizer step."""

    def __init__(self, batches: Sequence[Any], k: int) -> None:
        self.batches, self.k, self.cursor = batches, k, 0

    def window(self) -> list[Any]:
        n = len(self.batches)
        out = [self.batches[(self.cursor + i) % n] for i in range(self.k)]
        self.cursor += self.k
        return out


class RawRunner:
    """The hand-written loop; `compiled` applies the usual torch.compile recipe."""

    def __init__(self, case: Case, batches: Sequence[Any], device: torch.device, compiled: bool):
        self.model = case.work.build_model(0).to(device)
        lr: float | torch.Tensor = 1e-3
        if compiled:
            self.model.compile()
            lr = torch.tensor(1e-3, device=device)  # the recipe: no recompile on lr changes
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        self.params = list(self.model.parameters())
        self.opt_step: Callable[[], Any] = self.optimizer.step
        if compiled:
            self.opt_step = torch.compile(self.optimizer.step, fullgraph=False)
        self.loss_fn, self.k = case.work.mean_loss, case.k
        self.cursor = _Cursor(batches, case.k)

    def run(self, n: int) -> None:
        model, loss_fn, k, params = self.model, self.loss_fn, self.k, self.params
        for _ in range(n):
            for batch in self.cursor.window():
                loss = loss_fn(model, batch)
                (loss / k if k > 1 else loss).backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            self.opt_step()
            self.optimizer.zero_grad(set_to_none=True)

    def release_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def parameters(self) -> list[torch.Tensor]:
        return self.params


class LoopkitRunner:
    """The loopkit chain on a TrainState, eager or through `lk.compile_step`."""

    def __init__(self, case: Case, batches: Sequence[Any], device: torch.device, compiled: bool):
        self.state = lk.TrainState.create(
            case.work.build_model(0),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
            strategy=lk.SingleDevice(device),
        )
        step = lk.chain(
            lk.forward(case.work.mean_loss),
            lk.accumulate(case.k),
            lk.clip(MAX_NORM),
            lk.optimizer_step(),
        )
        self.step = lk.compile_step(step) if compiled else step
        self.cursor = _Cursor(batches, case.k)

    def run(self, n: int) -> None:
        state, step = self.state, self.step
        for _ in range(n):
            for batch in self.cursor.window():
                state = step(state, batch)
        self.state = state

    def release_grads(self) -> None:
        """Nothing to do: optimizer_step() already set the gradients to None."""

    def parameters(self) -> list[torch.Tensor]:
        return list(self.state.params)


# ---------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compile_counts() -> tuple[int, int]:
    """(graphs torch compiled, graph breaks) so far in this process."""
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def import_compiler() -> float:
    """Import inductor once, up front: seconds that whichever variant compiled first would
    otherwise pay (a one-time cost per process, in neither variant's warm-up)."""
    start = time.perf_counter()
    import torch._inductor.compile_fx  # noqa: F401

    return time.perf_counter() - start


def first_steps(runners: dict[str, Any], device: torch.device) -> dict[str, dict[str, float]]:
    """Each variant's first optimizer step (where compiling happens), alone: s, graphs, breaks."""
    out = {}
    for name, runner in runners.items():
        graphs, breaks = _compile_counts()
        _sync(device)
        start = time.perf_counter()
        runner.run(1)
        _sync(device)
        seconds = time.perf_counter() - start
        graphs2, breaks2 = _compile_counts()
        out[name] = {
            "first_step_s": seconds,
            "graphs": graphs2 - graphs,
            "breaks": breaks2 - breaks,
        }
    return out


def timed_counts(
    runners: dict[str, Any], fn: Callable[[], Any]
) -> tuple[Any, dict[str, dict[str, int]]]:
    """Run `fn` (the timed blocks) counting each variant's new graphs and breaks."""
    counts = {name: {"graphs": 0, "breaks": 0} for name in runners}
    originals = {name: r.run for name, r in runners.items()}

    def counting(name: str, run: Callable[[int], None]) -> Callable[[int], None]:
        def wrapped(n: int) -> None:
            graphs, breaks = _compile_counts()
            run(n)
            graphs2, breaks2 = _compile_counts()
            counts[name]["graphs"] += graphs2 - graphs
            counts[name]["breaks"] += breaks2 - breaks

        return wrapped

    for name, runner in runners.items():
        runner.run = counting(name, originals[name])
    try:
        result = fn()
    finally:
        for name, runner in runners.items():
            runner.run = originals[name]
    return result, counts


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    steps = args.steps or (case.quick_steps if args.quick else case.steps)
    repeats = args.repeats or (case.quick_repeats if args.quick else case.repeats)
    gen = torch.Generator().manual_seed(1234)
    batches = [tuple(t.to(device) for t in b) for b in case.work.make_batches(gen)]
    runners: dict[str, Any] = {
        "raw": RawRunner(case, batches, device, compiled=False),
        "raw_b": RawRunner(case, batches, device, compiled=False),
        "raw_compile": RawRunner(case, batches, device, compiled=True),
        "loopkit": LoopkitRunner(case, batches, device, compiled=False),
        "compiled": LoopkitRunner(case, batches, device, compiled=True),
    }
    first = first_steps(runners, device)
    series, timed = timed_counts(
        runners, lambda: time_interleaved(runners, device, steps, repeats, case.warmup)
    )
    weights = {
        name: max_abs_diff(runners["loopkit"].parameters(), runners[name].parameters())
        for name in ("raw", "raw_compile", "compiled")
    }
    memory = {
        name: measure_memory(r, device, max(2, min(steps, 10))) for name, r in runners.items()
    }
    variants = {}
    for name in VARIANTS:
        wall = summarize(series["wall"][name], series["wall"]["raw"])
        cpu = summarize(series["cpu"][name], series["cpu"]["raw"])
        variants[name] = {"wall": wall, "cpu": cpu, **first[name], **memory[name]}
        variants[name]["timed_graphs"] = timed[name]["graphs"]
        variants[name]["timed_breaks"] = timed[name]["breaks"]
        variants[name]["warmup_s"] = first[name]["first_step_s"] - wall["us_per_step_median"] / 1e6
    for name in ("raw_compile", "compiled"):
        v = variants[name]
        for ref in ("raw", "loopkit"):
            saving = variants[ref]["wall"]["us_per_step_median"] - v["wall"]["us_per_step_median"]
            v[f"payback_steps_vs_{ref}"] = v["warmup_s"] * 1e6 / saving if saving > 0 else None
    step = runners["compiled"].step
    return {
        "case": case.name,
        "description": case.work.description,
        "k": case.k,
        "steps_per_block": steps,
        "repeats": repeats,
        "target_ratio": TARGETS[case.name],
        "weights_max_abs_diff_vs_loopkit": weights,
        "compiled_fallbacks": list(step.fallback_causes),
        "compiled_graphs": step.graphs_compiled,
        "variants": variants,
    }


# ---------------------------------------------------------------------------- reporting


def _payback(value: float | None) -> str:
    return "never" if value is None else f"{value:,.0f}"


def verdict(res: dict[str, Any]) -> str:
    """The targets, met or missed: compiled < raw (<= target), and < raw_compile."""
    v = res["variants"]
    ratio = v["compiled"]["wall"]["ratio_median"]
    versus = ratio / v["raw_compile"]["wall"]["ratio_median"]
    target = res["target_ratio"]
    meets = ratio <= target if target < 1 else ratio < target
    return (
        f"compiled/raw = {ratio:.3f} wall, {v['compiled']['cpu']['ratio_median']:.3f} cpu "
        f"({'meets' if meets else 'MISSES'} {'<=' if target < 1 else '<'} {target}); "
        f"compiled/raw_compile = {versus:.3f} ({'beats' if versus < 1 else 'does NOT beat'} "
        f"it); A/A raw_b/raw = {v['raw_b']['wall']['ratio_median']:.3f}"
    )


def print_report(env: dict[str, Any], args: argparse.Namespace, results: list[dict]) -> None:
    print(
        f"\nloopkit compile_step benchmark: device={env['device']} threads={env['torch_threads']} "
        f"torch={env['torch']} python={env['python']} git={env['git']} "
        f"inductor cache={'cold' if args.cold_cache else 'as found'}"
    )
    print(
        f"cpu: {env['cpu']} ({env['logical_cpus']} logical), malloc: {env['malloc']}, "
        f"load average at start: {env.get('loadavg_1m_at_start', '?')}; importing the "
        f"compiler (once per process, before any warm-up): {env['compiler_import_s']:.2f} s"
    )
    header = (
        f"{'variant':<12}{'wall us':>10}{'ratio':>7}{'  [q1, q3]':<17}{'cpu ratio':>10}"
        f"{'warm-up s':>10}{'payback/raw':>12}{'/loopkit':>10}{'graphs':>7}{'+timed':>7}"
        f"{'breaks':>7}{'peak KiB':>10}"
    )
    for res in results:
        print(
            f"\n== {res['case']}: {res['description']}; k={res['k']}, clip 1.0; "
            f"{res['repeats']} repeats x {res['steps_per_block']} steps; "
            f"target: compiled < raw and < raw_compile"
            + (f", <= {res['target_ratio']}x raw" if res["target_ratio"] < 1 else "")
        )
        print(header)
        for name, v in res["variants"].items():
            w = v["wall"]
            quart = "" if name == "raw" else f"  [{w['ratio_q1']:.3f}, {w['ratio_q3']:.3f}]"
            compiled = name in ("raw_compile", "compiled")
            print(
                f"{name:<12}{w['us_per_step_median']:>10.1f}{w['ratio_median']:>7.3f}{quart:<17}"
                f"{v['cpu']['ratio_median']:>10.3f}{v['warmup_s']:>10.2f}"
                f"{_payback(v.get('payback_steps_vs_raw')) if compiled else '':>12}"
                f"{_payback(v.get('payback_steps_vs_loopkit')) if compiled else '':>10}"
                f"{v['graphs']:>7}{v['timed_graphs']:>7}{v['breaks'] + v['timed_breaks']:>7}"
                f"{v['peak_bytes'] / 1024:>10,.1f}"
            )
        d = res["weights_max_abs_diff_vs_loopkit"]
        print(
            f"weights vs loopkit eager, max |diff|: compiled {d['compiled']:.2e}, "
            f"raw {d['raw']:.2e}, raw_compile {d['raw_compile']:.2e}; compile_step "
            f"fallbacks: {res['compiled_fallbacks'] or 'none'}"
        )
        print(verdict(res))
    print(
        "\nwall us: median per-step time; ratio: median of per-repeat ratios to raw [quartiles]; "
        "warm-up s: first optimizer step less a steady one; payback: warm-up / per-step saving "
        "(steps); graphs: compiled in the first step / +timed: during the timed steps "
        "(recompiles); breaks: torch's graph-break counter; peak: bytes above the no-gradient "
        "level during the memory steps."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--cold-cache", action="store_true", help="fresh inductor cache dir")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--workload", choices=(*CASES, "all"), default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=0, help="steps per block (override)")
    parser.add_argument("--repeats", type=int, default=0, help="repeats (override)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available in this torch build.", file=sys.stderr)
        return 2
    malloc = steady_malloc() if device.type == "cpu" else "default"
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    env = environment(device, args.threads, malloc)
    env["compiler_import_s"] = import_compiler()
    names = list(CASES) if args.workload == "all" else [args.workload]
    results = []
    for name in names:
        start = time.perf_counter()
        results.append(run_case(CASES[name], args, device))
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print_report(env, args, results)
    if args.json:
        payload = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({**payload, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
