"""Step fingerprints: a few numbers per tensor that tell whether two runs are still one run.

`fingerprint(recorder)` is a transform. Put it after `clip` (and `skip_nonfinite`) and
before `optimizer_step`; fit() does, in its default step, whenever it has a `log_dir`
(`fingerprint_every`). At each closed window it records, for the step about to be taken
(`state.step` = s, the steps taken before it):

- per parameter tensor, two float64 reductions (`/sum`, `/wsum`) of the weights entering
  step s (`weights/<name>`), of the window's gradients after clipping, before the update
  (`grads/<name>`), and of each floating-point optimizer state tensor on the parameter's
  device (`optimizer/<name>/<key>`, e.g. Adam's `exp_avg`);
- the window's loss (`loss`), the grad norm `clip` recorded (`grad_norm`) and, when the
  loss counts items on the device, `tokens_seen`;
- as host values (no device work): the learning rates of step s, the epoch, `samples_seen`,
  the root seed, the rank and the micro-step seeds of the window (loopkit._rng).

Cost and order. The two reductions share one pass over each tensor: it is summed in
blocks of `BLOCK` elements (float32 for float32, bfloat16 and float16 tensors, vectorised),
and the block sums are added in float64 — plainly (`/sum`) and with a fixed pseudo-random
sign per block (`/wsum`, which a permutation of the blocks changes). A change to one
element shows whenever it changes its block's float32 sum (for an element of a block of
128 similar values, a change of a few ulps or more). Everything stays on the device:
the recorder keeps the per-step vectors and stacks them, with one copy to the host, when
it is flushed (fit: at log steps, before each checkpoint and at the end). No step syncs.

On disk, under the recorder's directory (fit: `<log_dir>/fingerprints/`):

    steps-<first>-<last>.safetensors   "values" (steps x columns, float64) and "steps"
                                        (int64); its metadata holds the column names and
                                        the per-step host values as JSON
    index.json                          the chunk files in step order (replaced atomically)

A resumed run continues the fingerprints of the run it resumes: `start(step)` drops those
of steps >= step (recorded by work the checkpoint does not hold). A fresh run (step 0)
moves an earlier run's directory aside, unchanged, to `<directory>.N`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import safetensors
import safetensors.torch
import torch

from ._rng import micro_step_seed
from ._types import Batch, Transform
from .state import TrainState
from .strategies import unwrap

logger = logging.getLogger(__name__)

FORMAT = "loopkit-fingerprints/1"
INDEX = "index.json"
BLOCK = 128
"""Elements per float32 block sum (see the module docstring)."""
MAX_BUFFERED_STEPS = 1024
"""A recorder that is not flushed for this many recorded steps flushes itself (a host sync)."""
_SIGN_SEED = 0x5EED_F1A6


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded, DTensor) tensor."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _blocks(tensor: torch.Tensor) -> torch.Tensor | None:
    """`tensor` as (blocks, BLOCK) without a copy, or None (ragged, small, strided)."""
    n = tensor.numel()
    if n < BLOCK or n % BLOCK or not tensor.is_contiguous():
        return None
    return tensor.view(-1, BLOCK)


def _block_sums(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The block sums of a ragged or strided tensor (the general, slower path)."""
    flat = tensor.reshape(-1)
    n = flat.numel()
    whole = n - n % BLOCK
    parts = []
    if whole:
        parts.append(flat[:whole].view(-1, BLOCK).sum(1, dtype=_accumulator(flat)))
    if whole != n or n == 0:
        parts.append(flat[whole:].sum(0, keepdim=True, dtype=_accumulator(flat)))
    return parts


_HALF = (torch.float16, torch.bfloat16)


def _accumulator(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _blocks_of(numel: int) -> int:
    return max(1, numel // BLOCK + (numel % BLOCK != 0))


@dataclass
class _Plan:
    """How one list of tensors (fixed names and sizes) is reduced; built once, reused.

    The tensors are taken in three groups, in this order: those that view as whole blocks
    (one reduction each), the ragged ones (two), and single elements (one stack for all).
    """

    columns: tuple[str, ...]
    order: list[int]  # tensor indices: blocked, then ragged, then single elements
    n_blocked: int
    n_ragged: int
    lengths: torch.Tensor  # blocks per tensor, in `order` (int64, on the device)
    signs: torch.Tensor  # one fixed sign per block (float64, on the device)


def _make_plan(
    names: Sequence[str], tensors: Sequence[torch.Tensor], scalars: Sequence[str]
) -> _Plan:
    device = tensors[0].device if tensors else torch.device("cpu")
    blocked = [i for i, t in enumerate(tensors) if _blocks(t) is not None]
    single = [i for i, t in enumerate(tensors) if t.numel() == 1 and i not in blocked]
    ragged = [i for i in range(len(tensors)) if i not in blocked and i not in single]
    order = blocked + ragged + single
    counts = [_blocks_of(tensors[i].numel()) for i in order]
    generator = torch.Generator().manual_seed(_SIGN_SEED)
    base = torch.randint(0, 2, (max(counts, default=1),), generator=generator) * 2 - 1
    signs = torch.cat([base[:c] for c in counts]) if counts else base[:0]
    ordered = [names[i] for i in order]
    columns = (
        tuple(f"{n}/sum" for n in ordered) + tuple(f"{n}/wsum" for n in ordered) + tuple(scalars)
    )
    return _Plan(
        columns=columns,
        order=order,
        n_blocked=len(blocked),
        n_ragged=len(ragged),
        lengths=torch.tensor(counts, dtype=torch.int64, device=device),
        signs=signs.to(device=device, dtype=torch.float64),
    )


@dataclass
class _Cache:
    """The transform's caches (names of parameters, plans, views); never part of its identity.

    `views` maps a tensor that keeps its storage from step to step (a weight, an optimizer
    state tensor) to its block view, so a step costs one reduction call per such tensor;
    the source is held with its view, so an id is never reused while cached.
    """

    names: dict[int, str] = field(default_factory=dict)
    model_id: int = -1
    plans: dict[tuple[str, ...], _Plan] = field(default_factory=dict)
    views: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


def _param_names(state: TrainState, cache: _Cache) -> dict[int, str]:
    model = state.model
    if cache.model_id != id(model):
        by_id: dict[int, str] = {}
        for name, p in unwrap(model).named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), name)  # a tied weight keeps its first name
        cache.names = {id(p): by_id.get(id(p), f"param{i}") for i, p in enumerate(state.params)}
        cache.model_id = id(model)
    return cache.names


def _tensors(state: TrainState, cache: _Cache) -> tuple[list[str], list[torch.Tensor], list[bool]]:
    """The named tensors of a closed window: weights, gradients, optimizer state.

    The third list says which keep their storage from step to step (not the gradients).
    """
    names_of = _param_names(state, cache)
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    stable: list[bool] = []
    optimizer_state = state.optimizer.state
    for param in state.params:
        name = names_of[id(param)]
        weight = _local(param)
        names.append(f"weights/{name}")
        tensors.append(weight)
        stable.append(True)
        if param.grad is not None:
            names.append(f"grads/{name}")
            tensors.append(_local(param.grad))
            stable.append(False)
        for key, value in optimizer_state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = _local(value)
                if value.device == weight.device:  # Adam's CPU step counts are left out
                    names.append(f"optimizer/{name}/{key}")
                    tensors.append(value)
                    stable.append(True)
    return names, tensors, stable


def _scalars(state: TrainState) -> tuple[list[str], list[torch.Tensor]]:
    metrics = state.metrics
    names, values = [], []
    for name, key in (("loss", "train/loss"), ("grad_norm", "train/grad_norm")):
        value = metrics.get(key)
        if isinstance(value, torch.Tensor):
            names.append(name)
            values.append(value.reshape(()))
    if isinstance(state.tokens_seen, torch.Tensor):
        names.append("tokens_seen")
        values.append(state.tokens_seen.reshape(()))
    return names, values


def _view(tensor: torch.Tensor, stable: bool, cache: _Cache, seen: dict[int, Any]) -> Any:
    """`_blocks(tensor)`, from the cache for a stable tensor (its view made once)."""
    if not stable:
        return _blocks(tensor)
    cached = cache.views.get(id(tensor))
    if cached is None or cached[0] is not tensor:
        cached = (tensor, _blocks(tensor))
    seen[id(tensor)] = cached
    return cached[1]


def _reduce(
    plan: _Plan, tensors: list[torch.Tensor], stable: list[bool], cache: _Cache
) -> torch.Tensor:
    """Every tensor's block sums, concatenated in the plan's order (float64)."""
    seen: dict[int, Any] = {}
    parts: list[torch.Tensor] = []
    order = plan.order
    for i in order[: plan.n_blocked]:
        view = _view(tensors[i], stable[i], cache, seen)
        if view is None:  # no longer viewable (a strided gradient): the same blocks, copied
            parts.extend(_block_sums(tensors[i]))
        elif view.dtype in _HALF:
            parts.append(view.sum(1, dtype=torch.float32))
        else:
            parts.append(view.sum(1))
    for i in order[plan.n_blocked : plan.n_blocked + plan.n_ragged]:
        parts.extend(_block_sums(tensors[i]))
    singles = [tensors[i] for i in order[plan.n_blocked + plan.n_ragged :]]
    if singles:  # e.g. Adam's step counts on the CPU: one stack for all of them
        parts.append(torch.stack([t if t.dim() == 0 else t.reshape(()) for t in singles]))
    cache.views = seen  # drops the views of tensors no longer in use
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts).to(torch.float64)  # float32 block sums, exactly, as float64


def step_fingerprint(
    state: TrainState, cache: _Cache | None = None
) -> tuple[tuple[str, ...], torch.Tensor]:
    """The fingerprint of a closed window's state: (column names, float64 device vector).

    Reads only; no host sync. See the module docstring for what the columns are.
    """
    cache = cache if cache is not None else _Cache()
    with torch.no_grad():
        names, tensors, stable = _tensors(state, cache)
        scalar_names, scalar_values = _scalars(state)
        key = (*names, "|", *scalar_names)
        plan = cache.plans.get(key)
        if plan is None:
            plan = cache.plans[key] = _make_plan(names, tensors, scalar_names)
        blocks = _reduce(plan, tensors, stable, cache)
        sums = torch.segment_reduce(blocks, "sum", lengths=plan.lengths)
        signed = torch.segment_reduce(blocks * plan.signs, "sum", lengths=plan.lengths)
        parts = [sums, signed]
        if scalar_values:
            parts.append(torch.stack([v.to(torch.float64) for v in scalar_values]))
        return plan.columns, torch.cat(parts)


def step_meta(state: TrainState) -> dict[str, Any]:
    """The host values recorded with a fingerprint: lr, data position, seeds (no sync)."""
    schedule = state.schedule
    if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        lrs = [float(group["lr"]) for group in state.optimizer.param_groups]
    else:
        factor = float(schedule(state.step))
        lrs = [base * factor for base in state.base_lrs]
    rank = state.strategy.rank
    return {
        "step": state.step,
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "lr": lrs,
        "seed": state.seed,
        "rank": rank,
        "micro_step_seeds": [
            micro_step_seed(state.seed, state.step, m, rank) for m in range(state.micro_step)
        ],
    }


@dataclass(frozen=True)
class _Fingerprint:
    recorder: FingerprintRecorder
    every: int = 1
    _cache: _Cache = field(default_factory=_Cache, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.recorder, FingerprintRecorder):
            raise TypeError(
                f"fingerprint(recorder={self.recorder!r}): expected a "
                "loopkit.FingerprintRecorder, e.g. fingerprint(FingerprintRecorder('runs/a/fp'))."
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(
                f"fingerprint(every={self.every!r}): must be an int >= 1 (record every n-th "
                "optimizer step); leave the transform out to record none."
            )

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        state.check_fresh()
        if not state.window.closed or state.step % self.every:
            return state
        columns, values = step_fingerprint(state, self._cache)
        self.recorder.add(state.step, columns, values, step_meta(state))
        return state  # observes only: the record passes through unchanged

    def __repr__(self) -> str:
        return f"fingerprint(every={self.every})" if self.every != 1 else "fingerprint()"


def fingerprint(recorder: FingerprintRecorder, *, every: int = 1) -> Transform:
    """Record a fingerprint of each closed window into `recorder` (see the module docstring).

    Place it after `clip` and before `optimizer_step`: it reads the gradients of the
    window before the update. It never changes the record. Flush the recorder where your
    loop already syncs (when it logs) and at the end, or use it as a context manager.

    Args:
        recorder: where the fingerprints are buffered and written.
        every: record the steps whose number is a multiple of `every`.

    Raises:
        TypeError: recorder is not a FingerprintRecorder.
        ValueError: every is not an int >= 1.

    Example:
        >>> recorder = FingerprintRecorder("runs/a/fingerprints")  # doctest: +SKIP
        >>> step = chain(forward(loss_fn), accumulate(1), clip(1.0),
        ...              fingerprint(recorder), optimizer_step())  # doctest: +SKIP
    """
    return _Fingerprint(recorder, every)


# ---------------------------------------------------------------------------- writing


def _chunk_name(first: int, last: int) -> str:
    return f"steps-{first:08d}-{last:08d}.safetensors"


def _write_atomically(path: Path, data: bytes) -> None:
    """Write then rename: a reader sees the old file or the new one, never a part.

    No fsync (as for the logs): a power cut may lose the last flushes, not corrupt them.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class _Pending:
    columns: tuple[str, ...]
    steps: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)


class FingerprintRecorder:
    """Buffer step fingerprints on the device; write them as safetensors chunks + a JSON index.

    fit() makes one per run (`<log_dir>/fingerprints/`, on the main rank). In a loop of your
    own, pass it to `fingerprint(recorder)` and call `flush()` where you log, or use it as a
    context manager (flushes on exit). It has fit's callback hooks too, so fit(step=...,
    callbacks=[recorder]) keeps it in step with fit's log steps, checkpoints and resumes.

    Args:
        directory: where the chunk files and index.json go (created at the first flush).
        max_buffered_steps: flush by itself after this many unflushed steps (a host sync).

    Raises:
        ValueError: max_buffered_steps is not an int >= 1.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, max_buffered_steps: int = MAX_BUFFERED_STEPS
    ) -> None:
        if (
            isinstance(max_buffered_steps, bool)
            or not isinstance(max_buffered_steps, int)
            or max_buffered_steps < 1
        ):
            raise ValueError(
                f"FingerprintRecorder(max_buffered_steps={max_buffered_steps!r}): must be an "
                "int >= 1."
            )
        self.directory = Path(directory)
        self.max_buffered_steps = max_buffered_steps
        self._pending: list[_Pending] = []
        self._buffered = 0
        self._started = False

    def __repr__(self) -> str:
        return f"FingerprintRecorder({str(self.directory)!r})"

    def add(
        self, step: int, columns: tuple[str, ...], values: torch.Tensor, meta: Mapping[str, Any]
    ) -> None:
        """Buffer one step's fingerprint (a device vector: no sync unless the buffer is full)."""
        if not self._started:
            self.start(step)
        if not self._pending or self._pending[-1].columns != columns:
            self._pending.append(_Pending(columns))
        pending = self._pending[-1]
        pending.steps.append(step)
        pending.values.append(values)
        pending.meta.append(dict(meta))
        self._buffered += 1
        if self._buffered >= self.max_buffered_steps:
            self.flush()

    def start(self, step: int) -> None:
        """Begin recording at `step`: continue a run (drop steps >= step) or set one aside."""
        self._started = True
        self._pending, self._buffered = [], 0
        index = _read_index(self.directory) if (self.directory / INDEX).exists() else None
        if index is None:
            return
        if step == 0:
            self._set_aside()
            return
        kept = []
        for chunk in index["chunks"]:
            if chunk["last_step"] < step:
                kept.append(chunk)
            elif chunk["first_step"] < step:
                kept.append(self._truncate(chunk, step))
            else:
                (self.directory / chunk["file"]).unlink(missing_ok=True)
        self._write_index(kept)
        logger.info("%s: continued before step %s.", self.directory, step)

    def flush(self) -> list[Path]:
        """Write the buffered fingerprints (one host copy per chunk); the files written."""
        if not self._pending:
            return []
        self.directory.mkdir(parents=True, exist_ok=True)
        index = _read_index(self.directory) if (self.directory / INDEX).exists() else None
        chunks = list(index["chunks"]) if index else []
        written = []
        for pending in self._pending:
            values = torch.stack(pending.values).cpu()  # host sync: the one per flush
            steps = torch.tensor(pending.steps, dtype=torch.int64)
            path = self.directory / _chunk_name(pending.steps[0], pending.steps[-1])
            _write_chunk(path, steps, values, pending.columns, pending.meta)
            chunks.append(_chunk_entry(path, pending.steps))
            written.append(path)
        self._pending, self._buffered = [], 0
        self._write_index(sorted(chunks, key=lambda c: c["first_step"]))
        return written

    def close(self) -> None:
        """Flush; the recorder can go on recording afterwards."""
        self.flush()

    def __enter__(self) -> FingerprintRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.flush()

    # fit()'s callback hooks, for a recorder passed in fit(callbacks=[...]).
    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        self.start(state.step)

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        self.flush()

    def on_checkpoint_saved(self, state: Any, path: str) -> None:
        self.flush()

    def on_fit_end(self, state: Any, reason: str = "") -> None:
        self.flush()

    def _write_index(self, chunks: list[dict[str, Any]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"format": FORMAT, "block": BLOCK, "chunks": chunks}, indent=1)
        _write_atomically(self.directory / INDEX, data.encode())

    def _truncate(self, chunk: dict[str, Any], step: int) -> dict[str, Any]:
        old = self.directory / chunk["file"]
        data = _read_chunk(old)
        keep = [i for i, s in enumerate(data.steps) if s < step]
        path = self.directory / _chunk_name(data.steps[keep[0]], data.steps[keep[-1]])
        steps = torch.tensor([data.steps[i] for i in keep], dtype=torch.int64)
        _write_chunk(path, steps, data.values[keep], data.columns, [data.meta[i] for i in keep])
        if path != old:
            old.unlink(missing_ok=True)
        return _chunk_entry(path, steps.tolist())

    def _set_aside(self) -> None:
        base = self.directory
        n = 1
        while base.with_name(f"{base.name}.{n}").exists():
            n += 1
        target = base.with_name(f"{base.name}.{n}")
        os.rename(base, target)
        logger.warning(
            "%s held an earlier run's fingerprints; moved them to %s, unchanged: this fresh run "
            "(step 0) starts anew; to continue a run instead, pass resume=True.",
            base,
            target,
        )


def _chunk_entry(path: Path, steps: Sequence[int]) -> dict[str, Any]:
    return {"file": path.name, "first_step": steps[0], "last_step": steps[-1], "steps": len(steps)}


def _write_chunk(
    path: Path,
    steps: torch.Tensor,
    values: torch.Tensor,
    columns: Sequence[str],
    meta: Sequence[Mapping[str, Any]],
) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(
        {"steps": steps.contiguous(), "values": values.contiguous()},
        str(tmp),
        metadata={"format": FORMAT, "columns": json.dumps(list(columns)), "meta": json.dumps(meta)},
    )
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Chunk:
    """One chunk of recorded fingerprints.

    Attributes:
        steps: the step of each row.
        columns: the column names (`weights/<name>/sum`, ..., `loss`).
        values: float64, one row per step, one column per name.
        meta: per step, the host values (lr, epoch, samples_seen, seeds, ...).
    """

    steps: list[int]
    columns: tuple[str, ...]
    values: torch.Tensor
    meta: list[dict[str, Any]]


def _read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable fingerprint index ({error}).") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} index.")
    if not isinstance(index.get("chunks"), list):
        raise ValueError(f"{path}: the index lists no chunks.")
    return index


def _read_chunk(path: Path) -> Chunk:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            steps = f.get_tensor("steps")
            values = f.get_tensor("values")
        columns = tuple(json.loads(metadata["columns"]))
        meta = json.loads(metadata["meta"])
    except (OSError, ValueError, KeyError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: not a readable fingerprint chunk ({error}).") from error
    if values.shape != (len(steps), len(columns)) or len(meta) != len(steps):
        raise ValueError(f"{path}: its steps, values and columns do not match.")
    return Chunk(steps.tolist(), columns, values.to(torch.float64), meta)


def fingerprints_dir(run: str | os.PathLike[str]) -> Path:
    """The fingerprint directory of `run`: a fit log_dir or the directory itself.

    Raises:
        ValueError: neither holds an index.json.
    """
    path = Path(run)
    for candidate in (path / "fingerprints", path):
        if (candidate / INDEX).is_file():
            return candidate
    raise ValueError(
        f"{str(run)!r}: no fingerprints here (no {INDEX} in it or in its fingerprints/). Pass "
        "the log_dir of a fit run with fingerprints (fingerprint_every >= 1, on by default "
        "with a log_dir) or a FingerprintRecorder's directory."
    )


def read_fingerprints(run: str | os.PathLike[str]) -> list[Chunk]:
    """Every recorded chunk of `run` (a fit log_dir or a recorder's directory), in step order.

    Raises:
        ValueError: no fingerprints there, or a file is unreadable or malformed.
    """
    directory = fingerprints_dir(run)
    index = _read_index(directory)
    return [_read_chunk(directory / str(chunk["file"])) for chunk in index["chunks"]]


__all__ = [
    "BLOCK",
    "Chunk",
    "FORMAT",
    "FingerprintRecorder",
    "fingerprint",
    "fingerprints_dir",
    "read_fingerprints",
    "step_fingerprint",
    "step_meta",
]
