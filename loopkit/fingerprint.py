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
  loss counts items on the device, `tokens_seen` (one process only, as `samples_seen`);
- as host values (no device work): the learning rates of step s, the epoch, `samples_seen`,
  the root seed, the rank, the world size and the micro-step seeds of the window
  (loopkit._rng).

What the two reductions are. Each tensor is cut into blocks of `BLOCK` elements (the
last one zero-padded), each block is summed with float32 accumulation (float64 for
float64 tensors), and the block sums are added in float64 — plainly (`/sum`) and with a
fixed pseudo-random sign per block (`/wsum`, which a permutation of the blocks changes).
A change to one element shows whenever it changes its block's float32 sum (for an element
of a block of 128 similar values, a change of a few ulps or more).

Cost and order. One pass over each tensor gives both: a tensor of whole blocks with at
least `PACK_BELOW` elements is summed by one call, in place, into a buffer kept from step
to step; all smaller (and ragged) tensors of a device and dtype are copied, padded, into
one buffer by one `cat` and summed by one call; then one copy to float64, one stack (the
single-element tensors, e.g. Adam's step counts, and the scalars), one multiply by the
signs and one `segment_reduce` (its checks off: they would read the offsets on the host)
give every column. The walk over the parameters and the optimizer state is made once and
checked at each step (the same tensors, the same storage). Everything stays on the
device: the recorder keeps the per-step vectors and stacks them, with one copy to the
host, when it is flushed (fit: at log steps, before each checkpoint and at the end). No
step syncs.

On disk, under the recorder's directory (fit: `<log_dir>/fingerprints/`):

    steps-<first>-<last>.safetensors   "values" (steps x columns, float64) and "steps"
                                        (int64); its metadata holds the column names and
                                        the per-step host values as JSON
    index.json                          the chunk files in step order (replaced atomically)

Under several processes every rank records its own tensors (its shards under FSDP, its
stage under Pipeline) and its own data position and seeds: rank 0 into the directory, rank
r > 0 into `<directory>/rank-<r>/`, in the same format (`FingerprintRecorder(rank=r)`).

A resumed run continues the fingerprints of the run it resumes: `start(step)` drops those
of steps >= step (recorded by work the checkpoint does not hold), each rank in its own
directory. A fresh run (step 0) moves an earlier run's directory aside, unchanged and with
every rank's, to `<directory>.N`; rank 0 does that, and the other ranks touch nothing on
disk until their first flush (see `FingerprintRecorder.flush` for why that comes after).
"""

from __future__ import annotations

import json
import logging
import operator
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

FORMAT = "loopkit-fingerprints/2"
"""Version 2 packs small tensors, zero-padded, into blocks of their own (version 1 summed a
ragged tail apart); runs recorded in different versions are not compared."""
INDEX = "index.json"
RANK_PREFIX = "rank-"
"""Rank r > 0 records into `<directory>/rank-<r>/`."""
BLOCK = 128
"""Elements per block sum (see the module docstring)."""
PACK_BELOW = 4096
"""Tensors with fewer elements, and ragged ones, are packed into one buffer per device and
dtype and summed by one call; larger ones are summed by one call each, in place."""
MAX_BUFFERED_STEPS = 1024
"""A recorder that is not flushed for this many recorded steps flushes itself (a host sync)."""
_SIGN_SEED = 0x5EED_F1A6


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded, DTensor) tensor."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Block sums are float32 (float64 for float64 tensors)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks_of(numel: int) -> int:
    return max(1, -(-numel // BLOCK))


def _is_big(numel: int) -> bool:
    return numel >= PACK_BELOW and numel % BLOCK == 0


@dataclass
class _Group:
    """The tensors of one device and dtype, summed in blocks into one buffer (`sums`).

    A big tensor (whole blocks, at least PACK_BELOW elements) is summed by one call into
    its slot (`big`); the others are copied, each zero-padded to whole blocks, into `pack`
    by one `cat` (`pieces` holds the pads; the tensors go in their places each step) and
    summed by one more call. Zeros change no float sum: a block sum is that of the
    tensor's own elements. One more call copies the sums, as float64, to `destination`.
    """

    accumulator: torch.dtype
    sums: torch.Tensor
    big: list[tuple[int, torch.Tensor]]  # (tensor index, its slot of `sums`)
    packed: list[tuple[int, int]]  # (tensor index, its place in `pieces`)
    pieces: list[torch.Tensor]
    pack: torch.Tensor | None  # (blocks, BLOCK), flat in `pack_flat`
    pack_flat: torch.Tensor | None
    pack_sums: torch.Tensor | None  # the packed blocks' slot of `sums`
    destination: torch.Tensor  # the group's slot of the plan's `work`


@dataclass
class _Plan:
    """How one list of named tensors (fixed sizes, dtypes, devices) is reduced; built once.

    `work` (float64, on the first tensor's device) holds every block sum, then the
    single-element tensors and the scalars (`direct`), then all of that times one fixed
    sign each; one segment sum over it gives the `/sum` columns, the scalars and the
    `/wsum` columns, in this order (`columns`).
    """

    columns: tuple[str, ...]
    kinds: list[tuple[int, torch.dtype, torch.device]]  # per tensor: the plan holds for these
    shapes: list[tuple[int, ...]]  # per tensor, the shape it is reduced in (validates it)
    groups: list[_Group]
    direct: list[int]  # the single-element tensors, put with the scalars
    floats: torch.Tensor  # their slot and the leading floating-point scalars'
    others: list[torch.Tensor]  # one slot per later scalar (an integer count)
    work: torch.Tensor
    plain: torch.Tensor  # the first half of `work`
    signed: torch.Tensor  # the second half
    signs: torch.Tensor  # one fixed sign per entry of `plain`
    offsets: torch.Tensor  # segment boundaries in `work` (int64)


def _make_group(
    tensors: Sequence[torch.Tensor],
    indices: list[int],
    shapes: list[tuple[int, ...]],
    destination: torch.Tensor,
) -> _Group:
    """Plan one device's and dtype's tensors (big ones first, in `indices` order)."""
    first = tensors[indices[0]]
    accumulator = _accumulator(first.dtype)
    sums = torch.empty(destination.numel(), dtype=accumulator, device=first.device)
    big, at = [], 0
    for i in indices:
        if _is_big(n := tensors[i].numel()):
            shapes[i] = (n // BLOCK, BLOCK)
            big.append((i, sums[at : at + n // BLOCK]))
            at += n // BLOCK
    zeros = torch.zeros(BLOCK, dtype=first.dtype, device=first.device)
    packed: list[tuple[int, int]] = []
    pieces: list[torch.Tensor] = []
    for i in indices:
        if not _is_big(n := tensors[i].numel()):
            shapes[i] = (n,)
            packed.append((i, len(pieces)))
            pieces.append(zeros[:0])  # the tensor goes here
            if n % BLOCK or not n:
                pieces.append(zeros[: _blocks_of(n) * BLOCK - n])
    pack = pack_flat = pack_sums = None
    if packed:
        pack = torch.empty(sums.numel() - at, BLOCK, dtype=first.dtype, device=first.device)
        pack_flat, pack_sums = pack.view(-1), sums[at:]
    return _Group(accumulator, sums, big, packed, pieces, pack, pack_flat, pack_sums, destination)


def _make_plan(
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    scalars: Sequence[str],
    scalar_dtypes: Sequence[torch.dtype],
) -> _Plan:
    device = tensors[0].device if tensors else torch.device("cpu")
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    direct = []
    for i, t in enumerate(tensors):
        if t.numel() == 1 and t.device == device:  # e.g. Adam's step counts on the CPU
            direct.append(i)
        else:
            by_kind.setdefault((t.device, t.dtype), []).append(i)
    order = []  # per group: the big tensors, then the packed ones
    for indices in by_kind.values():
        order += [i for i in indices if _is_big(tensors[i].numel())]
        order += [i for i in indices if not _is_big(tensors[i].numel())]
    n_direct = len(direct) + len(scalars)
    lengths = [_blocks_of(tensors[i].numel()) for i in order] + [1] * n_direct
    work = torch.empty(2 * sum(lengths), dtype=torch.float64, device=device)
    plain, signed = work[: sum(lengths)], work[sum(lengths) :]
    shapes: list[tuple[int, ...]] = [()] * len(tensors)
    groups, at = [], 0
    for indices in by_kind.values():
        width = sum(_blocks_of(tensors[i].numel()) for i in indices)
        groups.append(_make_group(tensors, indices, shapes, plain[at : at + width]))
        at += width
    n_floats = next(
        (i for i, d in enumerate(scalar_dtypes) if not d.is_floating_point), len(scalars)
    )
    generator = torch.Generator().manual_seed(_SIGN_SEED)
    base = torch.randint(0, 2, (max(lengths, default=1),), generator=generator) * 2 - 1
    signs = torch.cat([base[:c] for c in lengths]) if lengths else base[:0]
    offsets = torch.tensor([0, *lengths, *lengths], dtype=torch.int64).cumsum(0)
    ordered = [names[i] for i in order + direct]
    return _Plan(
        columns=(
            tuple(f"{n}/sum" for n in ordered)
            + tuple(scalars)
            + tuple(f"{n}/wsum" for n in ordered)
        ),
        kinds=[(t.numel(), t.dtype, t.device) for t in tensors],
        shapes=shapes,
        groups=groups,
        direct=direct,
        floats=plain[at : at + len(direct) + n_floats],
        others=[plain[i] for i in range(at + len(direct) + n_floats, len(plain))],
        work=work,
        plain=plain,
        signed=signed,
        signs=signs.to(device=device, dtype=torch.float64),
        offsets=offsets.to(device),
    )


def _reduce(plan: _Plan, views: list[torch.Tensor], scalars: list[torch.Tensor]) -> torch.Tensor:
    """Every column of `plan` from `views` (each tensor in `plan.shapes[i]`) and the scalars.

    Per group: one call per big tensor, a `cat` and a sum for the others, a copy to
    float64; then a stack and a copy (the direct entries), a multiply, a segment sum.
    """
    for group in plan.groups:
        accumulator = group.accumulator
        for i, out in group.big:
            torch.sum(views[i], 1, dtype=accumulator, out=out)
        if group.pack is not None:
            pieces = group.pieces.copy()
            for i, at in group.packed:
                pieces[at] = views[i]
            torch.cat(pieces, out=group.pack_flat)
            torch.sum(group.pack, 1, dtype=accumulator, out=group.pack_sums)
        group.destination.copy_(group.sums)  # float32 block sums, exactly, as float64
    floats = [views[i] for i in plan.direct] + scalars[: len(scalars) - len(plan.others)]
    if floats:  # stacked in the widest of their types (exact), then cast exactly to float64
        plan.floats.copy_(torch.stack(floats))
    for out, value in zip(plan.others, scalars[len(scalars) - len(plan.others) :], strict=True):
        out.copy_(value)  # an integer count, exactly (below 2**53)
    torch.mul(plan.plain, plan.signs, out=plan.signed)
    # unsafe: the offsets are the plan's own (checking them would read them on the host)
    values = torch.segment_reduce(plan.work, "sum", offsets=plan.offsets, unsafe=True)
    return values[: len(plan.columns)]


@dataclass
class _Layout:
    """What a walk over the parameters and optimizer state found; reused while it holds.

    Each step checks, with a few list comprehensions, that it still holds: the same
    parameters, optimizer state dicts and state tensors, gradients on the same parameters
    and the same scalars. The reshaped views of the weights and the state tensors (which
    keep their storage) are made once; only the gradients are new each step.
    """

    params: tuple[torch.Tensor, ...]
    pointers: list[int]  # where each weight's data is (`param.data = ...` moves it)
    state_dicts: list[Any]  # optimizer.state.get(param), per parameter
    state_sizes: list[int]
    state_keys: list[tuple[int, Any]]  # (parameter index, key) of each state tensor
    state_tensors: list[torch.Tensor]
    grads_at: list[int | None]  # per parameter, its gradient's tensor index
    grad_shapes: list[tuple[int, ...] | None]  # the shape to reshape it to, if it differs
    scalar_key: tuple[Any, ...]  # the scalars' names and dtypes
    plan: _Plan
    views: list[torch.Tensor | None]  # stable tensors in their plan shapes; None for grads


@dataclass
class _Cache:
    """The transform's caches (names of parameters, plans, layout); never in its identity."""

    names: dict[int, str] = field(default_factory=dict)
    model_id: int = -1
    plans: dict[tuple[Any, ...], _Plan] = field(default_factory=dict)  # names, scalar dtypes
    layout: _Layout | None = None


def _param_names(state: TrainState, cache: _Cache) -> dict[int, str]:
    model = state.model
    if cache.model_id != id(model):
        by_id: dict[int, str] = {}
        for name, p in unwrap(model).named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), name)  # a tied weight keeps its first name
        cache.names = {id(p): by_id.get(id(p), f"param{i}") for i, p in enumerate(state.params)}
        cache.model_id = id(model)
        cache.layout = None
    return cache.names


def _walk(
    state: TrainState, cache: _Cache
) -> tuple[list[str], list[torch.Tensor], list[Any], bool]:
    """The named tensors of a closed window: weights, gradients, optimizer state.

    The third list says what each is: "weight", "grad" or the (parameter index, key) of a
    state tensor; the flag, whether any is sharded (a DTensor: its local part is listed).
    """
    names_of = _param_names(state, cache)
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    kinds: list[Any] = []
    optimizer_state = state.optimizer.state
    sharded = False
    for index, param in enumerate(state.params):
        name = names_of[id(param)]
        weight = _local(param)
        sharded = sharded or weight is not param
        names.append(f"weights/{name}")
        tensors.append(weight)
        kinds.append("weight")
        if param.grad is not None:
            names.append(f"grads/{name}")
            tensors.append(_local(param.grad))
            kinds.append("grad")
        for key, value in optimizer_state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = _local(value)
                if value.device == weight.device:  # Adam's CPU step counts are left out
                    names.append(f"optimizer/{name}/{key}")
                    tensors.append(value)
                    kinds.append((index, key))
    return names, tensors, kinds, sharded


def _scalars(state: TrainState) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    metrics = state.metrics
    names, values = [], []
    for name, key in (("loss", "train/loss"), ("grad_norm", "train/grad_norm")):
        value = metrics.get(key)
        if isinstance(value, torch.Tensor):
            names.append(name)
            values.append(value if value.dim() == 0 else value.reshape(()))
    tokens = state.tokens_seen
    if isinstance(tokens, torch.Tensor) and state.strategy.world_size == 1:  # see step_meta
        names.append("tokens_seen")
        values.append(tokens if tokens.dim() == 0 else tokens.reshape(()))
    return tuple(names), values


def _make_layout(
    state: TrainState, cache: _Cache, scalar_key: tuple[Any, ...]
) -> tuple[_Layout | None, _Plan, list[torch.Tensor]]:
    """Walk the parameters: the layout to reuse (None for a sharded model), plan and views."""
    names, tensors, kinds, sharded = _walk(state, cache)
    key = (*names, "|", *scalar_key)
    scalar_names, scalar_dtypes = (
        scalar_key[: len(scalar_key) // 2],
        scalar_key[len(scalar_key) // 2 :],
    )
    plan = cache.plans.get(key)
    if plan is None or plan.kinds != [(t.numel(), t.dtype, t.device) for t in tensors]:
        plan = cache.plans[key] = _make_plan(names, tensors, scalar_names, scalar_dtypes)
    views = [t.reshape(s) for t, s in zip(tensors, plan.shapes, strict=True)]
    if sharded:  # DTensor.to_local() gives new tensors each step: walk each step
        return None, plan, views
    params = state.params
    state_dicts = [state.optimizer.state.get(p) for p in params]
    grads_at: list[int | None] = [None] * len(params)
    grad_shapes: list[tuple[int, ...] | None] = [None] * len(params)
    param_index = -1
    for i, kind in enumerate(kinds):
        if kind == "weight":
            param_index += 1
        elif kind == "grad":
            grads_at[param_index] = i
            shape = plan.shapes[i]
            grad_shapes[param_index] = shape if tuple(tensors[i].shape) != shape else None
    states = [(i, k) for i, k in enumerate(kinds) if isinstance(k, tuple)]
    layout = _Layout(
        params=params,
        pointers=[p.data_ptr() for p in params],
        state_dicts=state_dicts,
        state_sizes=[len(d) if d is not None else -1 for d in state_dicts],
        state_keys=[k for _, k in states],
        state_tensors=[tensors[i] for i, _ in states],
        grads_at=grads_at,
        grad_shapes=grad_shapes,
        scalar_key=scalar_key,
        plan=plan,
        views=[None if k == "grad" else v for v, k in zip(views, kinds, strict=True)],
    )
    return layout, plan, views


def _views(state: TrainState, layout: _Layout) -> list[torch.Tensor] | None:
    """The step's tensors in their plan shapes, or None when `layout` no longer holds."""
    params = state.params
    if params is not layout.params or layout.pointers != [p.data_ptr() for p in params]:
        return None
    get = state.optimizer.state.get
    state_dicts: list[Any] = [get(p) for p in params]
    if not all(map(operator.is_, state_dicts, layout.state_dicts)) or layout.state_sizes != [
        len(d) if d is not None else -1 for d in state_dicts
    ]:
        return None
    state_tensors = [state_dicts[i][k] for i, k in layout.state_keys]
    if not all(map(operator.is_, state_tensors, layout.state_tensors)):
        return None
    grads = [p.grad for p in params]
    views = layout.views.copy()
    for grad, at, shape in zip(grads, layout.grads_at, layout.grad_shapes, strict=True):
        if (grad is None) != (at is None):
            return None
        if at is not None:  # a gradient has its parameter's shape (autograd checks that)
            views[at] = grad if shape is None else grad.reshape(shape)  # type: ignore[union-attr]
    return views  # type: ignore[return-value]


def step_fingerprint(
    state: TrainState, cache: _Cache | None = None
) -> tuple[tuple[str, ...], torch.Tensor]:
    """The fingerprint of a closed window's state: (column names, float64 device vector).

    Reads only; no host sync. See the module docstring for what the columns are.
    """
    cache = cache if cache is not None else _Cache()
    with torch.no_grad():
        scalar_names, scalar_values = _scalars(state)
        scalar_key = (*scalar_names, *[v.dtype for v in scalar_values])
        _param_names(state, cache)  # another model: forget the layout
        layout, views = cache.layout, None
        if layout is not None and layout.scalar_key == scalar_key:
            views = _views(state, layout)
        if layout is None or views is None:
            cache.layout, plan, views = _make_layout(state, cache, scalar_key)
        else:
            plan = layout.plan
        return plan.columns, _reduce(plan, views, scalar_values)


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
        # Under several processes fit sums the counts over ranks only where it syncs (log,
        # eval, save), so between those steps they depend on when the run last synced: a
        # resumed run would differ from a straight one. Each rank's loss and gradients
        # witness its data instead.
        "samples_seen": state.samples_seen if state.strategy.world_size == 1 else None,
        "lr": lrs,
        "seed": state.seed,
        "rank": rank,
        "world_size": state.strategy.world_size,
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


def rank_directory(directory: str | os.PathLike[str], rank: int) -> Path:
    """Where rank `rank` records a run's fingerprints: `directory` or `directory/rank-<r>`."""
    return Path(directory) if rank == 0 else Path(directory) / f"{RANK_PREFIX}{rank}"


def _is_count(value: object, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


class FingerprintRecorder:
    """Buffer step fingerprints on the device; write them as safetensors chunks + a JSON index.

    fit() makes one per rank (`<log_dir>/fingerprints/`, rank r > 0 in its `rank-<r>/`). In
    a loop of your own, pass it to `fingerprint(recorder)` and call `flush()` where you log,
    or use it as a context manager (flushes on exit); under several processes make one on
    every rank, each with its `rank`. It has fit's callback hooks too, so fit(step=...,
    callbacks=[recorder]) keeps it in step with fit's log steps, checkpoints and resumes.

    Args:
        directory: the run's fingerprint directory; rank 0's chunk files and index.json go
            here, rank r's under `rank-<r>/` (created at the first flush).
        rank: the process's rank (`state.strategy.rank`); the steps it records must be this
            rank's.
        max_buffered_steps: flush by itself after this many unflushed steps (a host sync).

    Raises:
        ValueError: rank is not an int >= 0, or max_buffered_steps not an int >= 1.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        rank: int = 0,
        max_buffered_steps: int = MAX_BUFFERED_STEPS,
    ) -> None:
        if not _is_count(rank, 0):
            raise ValueError(
                f"FingerprintRecorder(rank={rank!r}): must be an int >= 0, this process's rank "
                "(state.strategy.rank)."
            )
        if not _is_count(max_buffered_steps, 1):
            raise ValueError(
                f"FingerprintRecorder(max_buffered_steps={max_buffered_steps!r}): must be an "
                "int >= 1."
            )
        self.root = Path(directory)  # the run's; rank 0 records here
        self.rank = rank
        self.directory = rank_directory(self.root, rank)  # where this rank records
        self.max_buffered_steps = max_buffered_steps
        self._pending: list[_Pending] = []
        self._buffered = 0
        self._started = False
        self._chunks: list[dict[str, Any]] | None = None  # the index's, as last written

    def __repr__(self) -> str:
        rank = f", rank={self.rank}" if self.rank else ""
        return f"FingerprintRecorder({str(self.root)!r}{rank})"

    def add(
        self, step: int, columns: tuple[str, ...], values: torch.Tensor, meta: Mapping[str, Any]
    ) -> None:
        """Buffer one step's fingerprint (a device vector: no sync unless the buffer is full).

        Raises:
            ValueError: `meta` names another rank than this recorder's.
        """
        self._check_rank(meta.get("rank", self.rank))
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
        """Begin recording at `step`: continue a run (drop steps >= step) or set one aside.

        A fresh run (step 0): rank 0 moves an earlier run's directory aside, every rank's
        fingerprints with it; another rank touches nothing (rank 0 may be moving its
        parent directory). A continued run: each rank trims its own directory only.
        """
        self._started = True
        self._pending, self._buffered = [], 0
        self._chunks = []
        if step == 0:
            if self.rank == 0 and _holds_fingerprints(self.root):
                self._set_aside()
            return
        if not (self.directory / INDEX).exists():
            return
        index = _read_index(self.directory)
        kept = []
        for chunk in index["chunks"]:
            if chunk["last_step"] < step:
                kept.append(chunk)
            elif chunk["first_step"] < step:
                kept.append(self._truncate(chunk, step))
            else:
                (self.directory / chunk["file"]).unlink(missing_ok=True)
        self._write_index(kept)
        if self.rank == 0:  # messages come from the main rank only
            logger.info("%s: continued before step %s.", self.directory, step)

    def flush(self) -> list[Path]:
        """Write the buffered fingerprints (one host copy per chunk); the files written.

        The host copies come before anything is created on disk: on rank r > 0 they wait
        for the recorded steps' collectives, which rank 0 joined after its `start` had
        moved an earlier run aside, so this rank never writes into a directory being moved.
        """
        if not self._pending:
            return []
        # host sync: the one per flush (stacked per chunk of the same columns)
        hosts = [torch.stack(pending.values).cpu() for pending in self._pending]
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._chunks is not None:  # kept since the last write: no read back
            chunks = list(self._chunks)
        else:
            index = _read_index(self.directory) if (self.directory / INDEX).exists() else None
            chunks = list(index["chunks"]) if index else []
        written = []
        for pending, values in zip(self._pending, hosts, strict=True):
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
        self._check_rank(state.strategy.rank)  # before any work
        self.start(state.step)

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        self.flush()

    def on_checkpoint_saved(self, state: Any, path: str) -> None:
        self.flush()

    def on_fit_end(self, state: Any, reason: str = "") -> None:
        self.flush()

    def _check_rank(self, rank: int) -> None:
        if rank != self.rank:
            raise ValueError(
                f"{self!r} records rank {self.rank}'s steps, not rank {rank}'s: make one "
                f"recorder per process, FingerprintRecorder({str(self.root)!r}, "
                "rank=state.strategy.rank)."
            )

    def _write_index(self, chunks: list[dict[str, Any]]) -> None:
        data = json.dumps({"format": FORMAT, "block": BLOCK, "chunks": chunks}, indent=1)
        _write_atomically(self.directory / INDEX, data.encode())
        self._chunks = chunks

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
        base = self.root
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


def _holds_fingerprints(root: Path) -> bool:
    """Whether any rank of a run recorded fingerprints under `root`."""
    if (root / INDEX).exists():
        return True
    return any((d / INDEX).exists() for d in root.glob(f"{RANK_PREFIX}*"))


def _chunk_entry(path: Path, steps: Sequence[int]) -> dict[str, Any]:
    return {"file": path.name, "first_step": steps[0], "last_step": steps[-1], "steps": len(steps)}


def _write_chunk(
    path: Path,
    steps: torch.Tensor,
    values: torch.Tensor,
    columns: Sequence[str],
    meta: Sequence[Mapping[str, Any]],
) -> None:
    # A new name is written in place: no index lists it until it is whole. An existing one
    # (listed, perhaps) is replaced by a rename, so a reader sees it whole or not at all.
    target = path.with_name(f".{path.name}.tmp-{os.getpid()}") if path.exists() else path
    safetensors.torch.save_file(
        {"steps": steps.contiguous(), "values": values.contiguous()},
        str(target),
        metadata={"format": FORMAT, "columns": json.dumps(list(columns)), "meta": json.dumps(meta)},
    )
    if target != path:
        os.replace(target, path)


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
    if isinstance(index, dict) and index.get("format") == "loopkit-fingerprints/1":
        raise ValueError(
            f"{path}: recorded by an earlier loopkit (loopkit-fingerprints/1: a ragged "
            f"tensor's sums may differ from {FORMAT}'s in the last bits); record both runs "
            "with this version to compare them."
        )
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


def fingerprint_ranks(run: str | os.PathLike[str]) -> list[int]:
    """The ranks that recorded fingerprints in `run`, in order: 0, then each `rank-<r>/`.

    Raises:
        ValueError: `run` holds no fingerprints (see `fingerprints_dir`).
    """
    directory = fingerprints_dir(run)
    ranks = [0]
    for path in directory.glob(f"{RANK_PREFIX}*"):
        number = path.name[len(RANK_PREFIX) :]
        if number.isdigit() and int(number) > 0 and (path / INDEX).is_file():
            ranks.append(int(number))
    return sorted(ranks)


def read_fingerprints(run: str | os.PathLike[str], *, rank: int = 0) -> list[Chunk]:
    """Every chunk `rank` recorded in `run` (a fit log_dir or a recorder's directory), in order.

    Raises:
        ValueError: no fingerprints there (of that rank), or a file is unreadable or malformed.
    """
    directory = rank_directory(fingerprints_dir(run), rank)
    if rank and not (directory / INDEX).is_file():
        raise ValueError(
            f"{str(run)!r}: rank {rank} recorded no fingerprints (no {directory / INDEX}); "
            f"the ranks that did: {fingerprint_ranks(run)}."
        )
    index = _read_index(directory)
    return [_read_chunk(directory / str(chunk["file"])) for chunk in index["chunks"]]


__all__ = [
    "BLOCK",
    "Chunk",
    "FORMAT",
    "FingerprintRecorder",
    "fingerprint",
    "fingerprint_ranks",
    "fingerprints_dir",
    "rank_directory",
    "read_fingerprints",
    "step_fingerprint",
    "step_meta",
]
