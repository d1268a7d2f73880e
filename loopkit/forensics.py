"""Where two runs part: compare their step fingerprints and find the first divergent step.

`diff_runs(run_a, run_b)` reads both runs' fingerprints (loopkit.fingerprint) and compares
them step by step over the steps both recorded: bitwise by default (every float64 value
with the same bits), or within `|a - b| <= atol + rtol * max(|a|, |b|)`. The host values
recorded with each step (learning rates, epoch, samples seen, seeds) are compared exactly
(lr within the tolerance); micro-step seeds only when both windows have as many
micro-batches.

At the first divergent step the report separates what *entered* the step — the weights,
the optimizer state, the data position, the seeds and lr — from what the step *computed*
(loss, gradients, grad norm). A difference in what entered is the cause (for instance a
weight changed between two steps); when only computed values differ, the computation
itself differs (another summation order, another batch, a nondeterministic kernel).
`plot_diff` draws both loss curves and the per-step largest relative difference (PNG,
needs matplotlib: `pip install loopkit[plot]`).

Runs of several processes: every rank recorded its own tensors (rank r > 0 under
`fingerprints/rank-<r>/`). Rank 0 and every rank r that both runs recorded are compared
alike; the first divergent step is the earliest over the ranks, and a rank r > 0's values
are named `rank <r>: <name>`. Runs recorded at different world sizes are compared on rank
0 only (a rank's shards or stage depend on the world size), and the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fingerprint import Chunk, fingerprint_ranks, read_fingerprints

_ENTERING_PREFIXES = ("weights/", "optimizer/", "data/", "lr", "seed", "micro_step_seeds")


@dataclass
class _Table:
    """One run's fingerprints as a dense table: a row per step, a column per name."""

    steps: list[int]
    columns: list[str]
    values: torch.Tensor  # float64, NaN where absent
    present: torch.Tensor  # bool
    meta: list[dict[str, Any]]


def _table(chunks: Sequence[Chunk]) -> _Table:
    columns: dict[str, int] = {}
    for chunk in chunks:
        for name in chunk.columns:
            columns.setdefault(name, len(columns))
    rows: dict[int, int] = {}
    for chunk in chunks:
        for step in chunk.steps:
            rows.setdefault(step, len(rows))  # a step recorded twice: the later one wins
    steps = sorted(rows)
    order = {step: i for i, step in enumerate(steps)}
    values = torch.full((len(steps), len(columns)), math.nan, dtype=torch.float64)
    present = torch.zeros((len(steps), len(columns)), dtype=torch.bool)
    meta: list[dict[str, Any]] = [{} for _ in steps]
    for chunk in chunks:
        index = torch.tensor([order[s] for s in chunk.steps], dtype=torch.int64)
        cols = torch.tensor([columns[c] for c in chunk.columns], dtype=torch.int64)
        values[index.unsqueeze(1), cols.unsqueeze(0)] = chunk.values
        present[index.unsqueeze(1), cols.unsqueeze(0)] = True
        for step, m in zip(chunk.steps, chunk.meta):
            meta[order[step]] = m
    return _Table(steps, list(columns), values, present, meta)


@dataclass(frozen=True)
class Difference:
    """One value that differs at a step.

    Attributes:
        name: the tensor or value (`weights/fc.weight`, `loss`, `data/samples_seen`, ...).
        column: the recorded column (`weights/fc.weight/sum`) or the host value's name.
        a, b: the two runs' values (None: not recorded in that run).
        abs_diff, rel_diff: |a - b|, and |a - b| over the largest |value| of that column in
            either run over the compared steps (so a sum that cancels to about 0 does not
            look huge); inf where one is missing.
        entering: True for what entered the step (weights, optimizer state, data, seeds,
            lr), False for what it computed (loss, gradients, grad norm).
        rank: the rank that recorded it; name and column start with `rank <r>: ` when > 0.
    """

    name: str
    column: str
    a: float | None
    b: float | None
    abs_diff: float
    rel_diff: float
    entering: bool
    rank: int = 0


@dataclass
class DiffReport:
    """What `diff_runs` found; `to_json()` is what `loopkit diff --json` prints.

    Attributes:
        run_a, run_b: the runs compared.
        rtol, atol: the tolerance (both 0: bitwise).
        steps_compared: the steps both runs recorded, in order.
        only_in_a, only_in_b: how many steps one run recorded and the other did not.
        first_divergent_step: the first compared step that differs (on any rank compared),
            or None.
        differences: at that step, entering values first, then by relative difference.
        tensors: the names in `differences`, each once, in the same order.
        notes: what was not compared and why (e.g. windows of different sizes).
        max_rel_diff: per compared step, the largest relative difference (rel_diff) of any
            recorded value, over the ranks compared.
        loss_a, loss_b: (step, loss) of every step each run's rank 0 recorded.
        ranks: the ranks compared (rank 0 first); steps_compared, only_in_a and only_in_b
            count rank 0's steps.
        recorded_a, recorded_b: the first and last step each run's rank 0 recorded.
    """

    run_a: str
    run_b: str
    rtol: float
    atol: float
    steps_compared: list[int]
    only_in_a: int
    only_in_b: int
    first_divergent_step: int | None
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_rel_diff: list[float] = field(default_factory=list)
    loss_a: list[tuple[int, float]] = field(default_factory=list)
    loss_b: list[tuple[int, float]] = field(default_factory=list)
    replay: dict[str, Any] | None = None
    plot: str | None = None
    ranks: list[int] = field(default_factory=lambda: [0])
    recorded_a: tuple[int, int] | None = None
    recorded_b: tuple[int, int] | None = None

    @property
    def bitwise(self) -> bool:
        return self.rtol == 0 and self.atol == 0

    @property
    def tensors(self) -> list[str]:
        return list(dict.fromkeys(d.name for d in self.differences))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: first_divergent_step, tensors, differences, ... (no NaN/inf)."""
        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "bitwise": self.bitwise,
            "rtol": self.rtol,
            "atol": self.atol,
            "first_divergent_step": self.first_divergent_step,
            "tensors": self.tensors,
            "ranks": self.ranks,
            "differences": [_json_safe(asdict(d)) for d in self.differences],
            "steps_compared": len(self.steps_compared),
            "first_step": self.steps_compared[0] if self.steps_compared else None,
            "last_step": self.steps_compared[-1] if self.steps_compared else None,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "notes": self.notes,
            "plot": self.plot,
            "replay": self.replay,
        }

    def format(self, *, limit: int = 12) -> str:
        """The report as text (what `loopkit diff` prints)."""
        mode = "bitwise" if self.bitwise else f"rtol={self.rtol:g}, atol={self.atol:g}"
        lines = [f"loopkit diff: {self.run_a} vs {self.run_b} ({mode})"]
        if self.steps_compared:
            lines.append(
                f"compared {len(self.steps_compared)} steps "
                f"({self.steps_compared[0]}..{self.steps_compared[-1]})"
                + (f" on ranks {', '.join(map(str, self.ranks))}" if len(self.ranks) > 1 else "")
                + (f"; only in A: {self.only_in_a}" if self.only_in_a else "")
                + (f"; only in B: {self.only_in_b}" if self.only_in_b else "")
            )
        else:
            spans = (
                "none" if span is None else f"{span[0]}..{span[1]}"
                for span in (self.recorded_a, self.recorded_b)
            )
            lines.append(
                "no step was recorded by both runs (A: steps {}, B: steps {}): nothing "
                "compared".format(*spans)
            )
        lines += [f"note: {note}" for note in self.notes]
        if not self.steps_compared:
            return "\n".join(lines)
        if self.first_divergent_step is None:
            lines.append("no difference" + (" (bitwise equal)" if self.bitwise else ""))
            return "\n".join(lines)
        lines.append(f"first divergent step: {self.first_divergent_step}")
        entering = [d for d in self.differences if d.entering]
        computed = [d for d in self.differences if not d.entering]
        if entering:
            lines.append(f"  the state entering step {self.first_divergent_step} differs in:")
            lines += [f"    {_describe(d)}" for d in entering[:limit]]
        else:
            lines.append(
                f"  the state entering step {self.first_divergent_step} is equal; the step "
                "computed different values:"
            )
        names = list(dict.fromkeys(d.name for d in computed))
        if entering and names:
            shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
            lines.append(f"  computed differently as a consequence ({len(names)}): {shown}")
        elif names:
            lines += [f"    {_describe(d)}" for d in computed[:limit]]
        if self.replay is not None:
            lines += ["replay:", *("  " + line for line in _replay_lines(self.replay))]
        if self.plot:
            lines.append(f"plot: {self.plot}")
        return "\n".join(lines)


def _describe(d: Difference) -> str:
    a = "missing" if d.a is None else f"{d.a:.17g}"
    b = "missing" if d.b is None else f"{d.b:.17g}"
    return f"{d.column}: a={a} b={b} |diff|={d.abs_diff:.3g} (rel {d.rel_diff:.3g})"


def _replay_lines(replay: dict[str, Any]) -> list[str]:
    module = replay.get("module")
    if module is None:
        return [str(replay.get("message", "no module output or gradient differs"))]
    return [
        f"first differing module: {module or '(the model)'} ({replay['type']}), its "
        f"{replay['what']} of shape {replay['shape']}, largest |diff| "
        f"{replay['max_abs_diff']:.3g} (micro-batch {replay['micro_batch']})",
        str(replay.get("message", "")),
    ]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _is_entering(name: str) -> bool:
    return name.startswith(_ENTERING_PREFIXES)


def _tensor_name(column: str) -> str:
    for suffix in ("/sum", "/wsum"):
        if column.endswith(suffix):
            return column[: -len(suffix)]
    return column


def _differs(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Elementwise: a and b differ (bitwise, or beyond the tolerance; NaN equals NaN)."""
    if rtol == 0 and atol == 0:
        return a.view(torch.int64) != b.view(torch.int64)
    both_nan = torch.isnan(a) & torch.isnan(b)
    close = (a - b).abs() <= atol + rtol * torch.maximum(a.abs(), b.abs())
    return ~(close | (a == b) | both_nan)


def _scales(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per column, the largest finite |value| either run recorded over the compared steps."""
    both = torch.maximum(a.abs(), b.abs()).nan_to_num(0.0, posinf=0.0)
    return both.amax(dim=0) if both.shape[0] else torch.zeros(both.shape[1], dtype=both.dtype)


def _relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|a - b| relative to each column's scale: a sum that cancels to ~0 stays comparable."""
    rel = (a - b).abs() / scale
    rel = torch.where((a == b) | (torch.isnan(a) & torch.isnan(b)), 0.0, rel)
    return torch.nan_to_num(rel, nan=math.inf)


def _meta_values(meta: dict[str, Any], with_seeds: bool) -> dict[str, Any]:
    values: dict[str, Any] = {
        "data/epoch": meta.get("epoch"),
        "data/samples_seen": meta.get("samples_seen"),
        "seed": meta.get("seed"),
    }
    for i, lr in enumerate(meta.get("lr") or []):
        values[f"lr/{i}"] = lr
    if with_seeds:
        values["micro_step_seeds"] = tuple(meta.get("micro_step_seeds") or ())
    return values


def _meta_differences(
    ma: dict[str, Any], mb: dict[str, Any], rtol: float, atol: float
) -> list[Difference]:
    seeds_a, seeds_b = ma.get("micro_step_seeds") or [], mb.get("micro_step_seeds") or []
    va = _meta_values(ma, len(seeds_a) == len(seeds_b))
    vb = _meta_values(mb, len(seeds_a) == len(seeds_b))
    out = []
    for key in dict.fromkeys([*va, *vb]):
        a, b = va.get(key), vb.get(key)
        if key.startswith("lr/") and isinstance(a, float) and isinstance(b, float):
            same = a == b if rtol == atol == 0 else abs(a - b) <= atol + rtol * max(abs(a), abs(b))
        else:
            same = a == b
        if same:
            continue
        numeric = isinstance(a, (int, float)) and isinstance(b, (int, float))
        diff = abs(float(a) - float(b)) if numeric else math.inf  # type: ignore[arg-type]
        scale = max(abs(float(a)), abs(float(b))) if numeric else 0.0  # type: ignore[arg-type]
        out.append(
            Difference(
                name=key,
                column=key,
                a=float(a) if numeric else None,  # type: ignore[arg-type]
                b=float(b) if numeric else None,  # type: ignore[arg-type]
                abs_diff=diff,
                rel_diff=diff / scale if scale else math.inf,
                entering=True,
            )
        )
    return out


def _column_differences(
    ta: _Table,
    tb: _Table,
    ra: int,
    rb: int,
    columns: list[str],
    differs: torch.Tensor,
    scales: torch.Tensor,
) -> list[Difference]:
    out = []
    for j in differs.nonzero().flatten().tolist():
        column = columns[j]
        ia, ib = _col(ta, column), _col(tb, column)
        a = None if ia is None or not ta.present[ra, ia] else float(ta.values[ra, ia])
        b = None if ib is None or not tb.present[rb, ib] else float(tb.values[rb, ib])
        if a is None or b is None:
            diff = rel = math.inf
        else:
            diff = abs(a - b)
            scale = float(scales[j])
            rel = diff / scale if scale else (0.0 if diff == 0 else math.inf)
            if math.isnan(diff):
                diff = rel = math.inf
        name = _tensor_name(column)
        out.append(Difference(name, column, a, b, diff, rel, _is_entering(name)))
    return out


def _col(table: _Table, column: str) -> int | None:
    try:
        return table.columns.index(column)
    except ValueError:
        return None


def _aligned(
    table: _Table, rows: list[int], columns: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`table`'s values and presence at `rows`, in the order of `columns` (absent: NaN/False)."""
    index = {c: j for j, c in enumerate(table.columns)}
    values = torch.full((len(rows), len(columns)), math.nan, dtype=torch.float64)
    present = torch.zeros((len(rows), len(columns)), dtype=torch.bool)
    take = [(k, index[c]) for k, c in enumerate(columns) if c in index]
    if take and rows:
        dst = torch.tensor([k for k, _ in take])
        src = torch.tensor([j for _, j in take])
        row_index = torch.tensor(rows)
        values[:, dst] = table.values[row_index][:, src]
        present[:, dst] = table.present[row_index][:, src]
    return values, present


def diff_runs(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> DiffReport:
    """Compare two runs' fingerprints; find the first step where they differ.

    Every rank both runs recorded is compared (see the module docstring); the first
    divergent step is the earliest over the ranks.

    Args:
        run_a: a fit log_dir (with fingerprints/) or a FingerprintRecorder directory.
        run_b: the run to compare with, of the same kind.
        rtol: relative tolerance; 0 with atol 0 (the default) compares bitwise.
        atol: absolute tolerance.

    Returns:
        A DiffReport (first_divergent_step None when every compared step agrees).

    Raises:
        ValueError: a run has no readable fingerprints, or rtol/atol is negative or not finite.
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"diff_runs({name}={value!r}): must be a finite float >= 0.")
    ta, tb = _table(read_fingerprints(run_a)), _table(read_fingerprints(run_b))
    main = _diff_tables(ta, tb, 0, rtol, atol)
    ranks, notes = _ranks_to_compare(run_a, run_b, ta, tb, main)
    diffs = [main] + [
        _diff_tables(
            _table(read_fingerprints(run_a, rank=r)),
            _table(read_fingerprints(run_b, rank=r)),
            r,
            rtol,
            atol,
        )
        for r in ranks[1:]
    ]
    first = min((d.first for d in diffs if d.first is not None), default=None)
    found = [x for d in diffs if d.first == first and first is not None for x in d.differences]
    report = DiffReport(
        run_a=str(run_a),
        run_b=str(run_b),
        rtol=float(rtol),
        atol=float(atol),
        steps_compared=main.common,
        only_in_a=len(ta.steps) - len(main.common),
        only_in_b=len(tb.steps) - len(main.common),
        first_divergent_step=first,
        differences=sorted(found, key=lambda d: (not d.entering, -d.rel_diff)),
        notes=notes,
        max_rel_diff=[max(d.max_rel.get(step, 0.0) for d in diffs) for step in main.common],
        loss_a=_losses(ta),
        loss_b=_losses(tb),
        ranks=ranks,
        recorded_a=(ta.steps[0], ta.steps[-1]) if ta.steps else None,
        recorded_b=(tb.steps[0], tb.steps[-1]) if tb.steps else None,
    )
    report.notes += _window_notes(ta, tb, main.row_a, main.row_b, main.common)
    report.notes += [
        f"rank {d.rank}: {len(d.common)} steps recorded by both runs, rank 0: {len(main.common)}"
        for d in diffs[1:]
        if d.common != main.common
    ]
    return report


@dataclass
class _RankDiff:
    """One rank's comparison: the steps both runs recorded and the first that differs."""

    rank: int
    common: list[int]
    row_a: dict[int, int]
    row_b: dict[int, int]
    first: int | None
    differences: list[Difference]
    max_rel: dict[int, float]  # per compared step, the largest relative difference


def _diff_tables(ta: _Table, tb: _Table, rank: int, rtol: float, atol: float) -> _RankDiff:
    """Compare one rank's tables step by step; its differences are named with the rank."""
    common = sorted(set(ta.steps) & set(tb.steps))
    row_a = {s: i for i, s in enumerate(ta.steps)}
    row_b = {s: i for i, s in enumerate(tb.steps)}
    columns = list(dict.fromkeys([*ta.columns, *tb.columns]))
    va, pa = _aligned(ta, [row_a[s] for s in common], columns)
    vb, pb = _aligned(tb, [row_b[s] for s in common], columns)
    differs = _differs(va, vb, rtol, atol) | (pa != pb)
    scales = _scales(va, vb)
    rel = torch.where(pa & pb, _relative(va, vb, scales), torch.where(pa != pb, math.inf, 0.0))
    max_rel = rel.max(dim=1).values.tolist() if columns else [0.0] * len(common)
    result = _RankDiff(rank, common, row_a, row_b, None, [], dict(zip(common, max_rel)))
    for k, step in enumerate(common):
        ma, mb = ta.meta[row_a[step]], tb.meta[row_b[step]]
        meta = _meta_differences(ma, mb, rtol, atol)
        if meta or bool(differs[k].any()):
            found = meta + _column_differences(
                ta, tb, row_a[step], row_b[step], columns, differs[k], scales
            )
            result.first = step
            result.differences = [_on_rank(d, rank) for d in found]
            break
    return result


def _on_rank(difference: Difference, rank: int) -> Difference:
    """`difference` as rank `rank` recorded it: `rank <r>: ` before its names when r > 0."""
    if rank == 0:
        return difference
    return dataclasses.replace(
        difference,
        name=f"rank {rank}: {difference.name}",
        column=f"rank {rank}: {difference.column}",
        rank=rank,
    )


def _world_sizes(table: _Table, steps: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """The world sizes a run was recorded at over `steps` (all steps if none), in order."""
    rows = {s: i for i, s in enumerate(table.steps)}
    metas = [table.meta[rows[s]] for s in steps] or table.meta
    sizes = dict.fromkeys(m["world_size"] for m in metas if m.get("world_size") is not None)
    # Fingerprints recorded before the world size was: one process per rank that recorded.
    return tuple(sizes) or (max(ranks) + 1,)


def _ranks_to_compare(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    ta: _Table,
    tb: _Table,
    main: _RankDiff,
) -> tuple[list[int], list[str]]:
    """The ranks to compare (0 first) and notes on those that are not."""
    ranks_a, ranks_b = fingerprint_ranks(run_a), fingerprint_ranks(run_b)
    sizes_a = _world_sizes(ta, main.common, ranks_a)
    sizes_b = _world_sizes(tb, main.common, ranks_b)
    if sizes_a != sizes_b or len(sizes_a) > 1:
        what = "different world sizes" if sizes_a != sizes_b else "a world size that changed"
        a, b = (" then ".join(map(str, sizes)) for sizes in (sizes_a, sizes_b))
        return [0], [f"recorded at {what} (A: {a}, B: {b}): compared rank 0 only"]
    ranks, notes = [0], []
    for rank in range(1, sizes_a[0]):
        if rank in ranks_a and rank in ranks_b:
            ranks.append(rank)
        elif rank in ranks_a or rank in ranks_b:
            where = "A" if rank in ranks_a else "B"
            notes.append(f"rank {rank}: fingerprints in {where} only, not compared")
        else:
            notes.append(f"rank {rank}: no fingerprints in either run, not compared")
    return ranks, notes


def recorded_world_size(run: str | os.PathLike[str]) -> int:
    """How many processes recorded `run`'s fingerprints (the most, if it changed on resume).

    Raises:
        ValueError: `run` has no readable fingerprints.
    """
    ranks = fingerprint_ranks(run)
    return max(*_world_sizes(_table(read_fingerprints(run)), (), ranks), max(ranks) + 1)


def check_replayable(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str]) -> None:
    """Refuse `loopkit diff --replay` on runs of several processes, before any work.

    Raises:
        ValueError: either run was recorded by several processes (the replay runs one).
    """
    for name, run in (("RUN_A", run_a), ("RUN_B", run_b)):
        if (size := recorded_world_size(run)) > 1:
            raise ValueError(
                f"--replay: {name}={str(run)!r} was recorded by {size} processes; the replay "
                "reruns a step in one process only. Leave out --replay: the diff compares "
                "every rank's fingerprints and names the tensor and rank that differ first."
            )


def _window_notes(
    ta: _Table, tb: _Table, row_a: dict[int, int], row_b: dict[int, int], common: list[int]
) -> list[str]:
    for step in common:
        na = len(ta.meta[row_a[step]].get("micro_step_seeds") or [])
        nb = len(tb.meta[row_b[step]].get("micro_step_seeds") or [])
        if na != nb:
            return [
                f"windows of {na} and {nb} micro-batches (from step {step}): micro-step seeds "
                "not compared"
            ]
    return []


def _losses(table: _Table) -> list[tuple[int, float]]:
    j = _col(table, "loss")
    if j is None:
        return []
    return [
        (step, float(table.values[i, j]))
        for i, step in enumerate(table.steps)
        if table.present[i, j]
    ]


def plot_diff(report: DiffReport, path: str | os.PathLike[str]) -> Path:
    """Draw both loss curves and the per-step largest relative difference into a PNG.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (`pip install loopkit[plot]`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for label, points, style in (("A", report.loss_a, "-"), ("B", report.loss_b, "--")):
        if points:
            steps, losses = zip(*points)
            top.plot(steps, losses, style, label=f"{label}: {_short(report, label)}")
    top.set_ylabel("loss")
    top.legend(loc="upper right", fontsize="small")
    rel = [r if r > 0 else math.nan for r in report.max_rel_diff]
    if report.steps_compared:
        finite = [min(r, 1e300) for r in rel]
        bottom.semilogy(report.steps_compared, finite, ".-", color="tab:red")
    bottom.set_ylabel("largest relative difference")
    bottom.set_xlabel("step")
    if report.first_divergent_step is not None:
        for axis in (top, bottom):
            axis.axvline(report.first_divergent_step, color="gray", linestyle=":")
    title = (
        "no difference"
        if report.first_divergent_step is None
        else f"first divergent step {report.first_divergent_step}"
    )
    top.set_title(f"loopkit diff: {title}")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _short(report: DiffReport, label: str) -> str:
    text = report.run_a if label == "A" else report.run_b
    return text if len(text) <= 40 else "..." + text[-37:]


__all__ = [
    "DiffReport",
    "Difference",
    "check_replayable",
    "diff_runs",
    "plot_diff",
    "recorded_world_size",
]
