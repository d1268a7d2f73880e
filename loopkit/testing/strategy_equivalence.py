"""check_strategy_equivalence: a distribution strategy on local gloo ranks == SingleDevice."""

from __future__ import annotations

import json
import pickle
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..precision import Precision, PrecisionName
from ..strategies import unwrap
from .assertions import Tolerance, first_difference
from .batches import batch_windows, common_batch_size, describe_batches, leading_size, split_batch
from .drawn import accepts_search_strategies
from .failures import failure, name_of, reproduce
from .global_rng import global_rng_guard, seed_globals
from .processes import StartMethod, run_ranks
from .result import CheckResult
from .runs import run_window
from .setup import CheckSetup, MakeModel, MakeStep
from .trees import full_tensor

__all__ = ["check_strategy_equivalence", "default_rank_split"]

RankResult = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""What one rank wrote: its metadata and `{"<step index>/<name>": tensor}`."""


def default_rank_split(total: int, world_size: int, k: int) -> list[int]:
    """Items per rank: as even as possible, then made uneven where it can be (rank 0 gets one
    more), so a per-rank normalisation bug cannot hide behind equal shares."""
    base, extra = divmod(total, world_size)
    sizes = [base + (1 if r < extra else 0) for r in range(world_size)]
    if world_size > 1 and len(set(sizes)) == 1 and sizes[-1] > k:
        sizes[0] += 1
        sizes[-1] -= 1
    return sizes


def _resolve_rank_split(
    where: str, n: int, world_size: int, k: int, rank_split: Sequence[int] | None
) -> list[int]:
    """The items of each full batch per rank: given (checked) or default_rank_split."""
    if rank_split is None:
        if n < world_size * k:
            raise ValueError(
                f"{where}: batches of {n} items cannot give {world_size} ranks {k} "
                "micro-batch(es) each; use bigger batches or a smaller k."
            )
        rank_split = default_rank_split(n, world_size, k)
    sizes = [int(s) for s in rank_split]
    if len(sizes) != world_size or sum(sizes) != n or min(sizes) < k:
        raise ValueError(
            f"{where}(rank_split={sizes}): needs {world_size} sizes, each >= k={k}, "
            f"summing to the batch size {n}."
        )
    return sizes


def _check_picklable(setup: CheckSetup, strategy: Any, windows: list[Any]) -> None:
    """Fail with the fix unless every piece the ranks receive can be pickled."""
    pieces = {
        "make_model": setup.make_model,
        "loss_fn": setup.loss_fn,
        "make_step": setup.step_maker(),
        "optimizer": setup.optimizer,
        "strategy": strategy,
        "schedule": setup.schedule,
        "batches": windows,
    }
    for name, value in pieces.items():
        try:
            pickle.dumps(value)
        except Exception as error:  # noqa: BLE001 - reported with the fix
            raise ValueError(
                f"{setup.check}({name}={name_of(value)}): spawned processes receive it pickled, "
                f"and it cannot be ({type(error).__name__}: {error}). Define it at module level "
                "(not a lambda or a function inside a test), or use a frozen dataclass / "
                "functools.partial of module-level functions."
            ) from error


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the model's floating-point state, gathered where sharded."""
    return {
        name: full_tensor(value).detach().cpu().clone()
        for name, value in unwrap(model).state_dict().items()
        if value.is_floating_point() or value.is_complex()
    }


def _rank_share(window: Any, sizes: Sequence[int], dp_rank: int, where: str) -> Any:
    """This data-parallel rank's rows of `window`: `sizes[dp_rank]` of them, after the rows
    of the ranks before it."""
    before, after = sum(sizes[:dp_rank]), sum(sizes[dp_rank + 1 :])
    pieces = split_batch(window, [s for s in (before, sizes[dp_rank], after) if s], where)
    return pieces[1 if before else 0]


def _train_rank(rank: int, out: Path, pieces: dict[str, Any]) -> None:
    """One rank: build the strategy, train its share of every window, write its parameters."""
    setup, k = pieces["setup"], pieces["k"]
    where = setup.check
    strategy = pieces["strategy"]()
    seed_globals(0)
    state = setup.new_state(strategy)
    # The data-parallel degree and index (a pipeline's stages share one replica's data).
    dp_size, dp_rank = int(strategy.dp_world_size), int(strategy.dp_rank)
    step = setup.step(k)
    tensors: dict[str, torch.Tensor] = {}
    for i, window in enumerate(pieces["windows"]):
        share = window
        if dp_size > 1:
            share = _rank_share(window, pieces["rank_split"], dp_rank, where)
        base, extra = divmod(leading_size(share, where), k)
        micro = split_batch(share, [base + (1 if j < extra else 0) for j in range(k)], where)
        state = run_window(state, step, micro, where)
        tensors.update({f"{i}/{name}": v for name, v in _float_state(state.model).items()})
    safetensors.torch.save_file(tensors, str(out / f"rank{rank}.safetensors"))
    meta = {"strategy": repr(strategy), "dp_size": dp_size, "dp_rank": dp_rank}
    (out / f"rank{rank}.json").write_text(json.dumps(meta))


def _read_ranks(out: Path, world_size: int) -> list[RankResult]:
    return [
        (
            json.loads((out / f"rank{rank}.json").read_text()),
            safetensors.torch.load_file(str(out / f"rank{rank}.safetensors")),
        )
        for rank in range(world_size)
    ]


@dataclass(frozen=True, kw_only=True)
class _RankRun:
    """The distributed side of one check: what every rank trains, and how it is compared."""

    setup: CheckSetup
    strategy: Callable[[], Any]
    windows: list[Any]
    rank_split: list[int]
    k: int
    world_size: int

    @classmethod
    def prepare(
        cls,
        setup: CheckSetup,
        strategy: Callable[[], Any],
        batches: Any,
        steps: int | None,
        world_size: int,
        rank_split: Sequence[int] | None,
        k: int,
    ) -> _RankRun:
        """Check the pieces and the data; fail before any process starts."""
        setup.check_same_init()
        windows = batch_windows(batches, steps, setup.check)
        n = common_batch_size(windows, setup.check)
        sizes = _resolve_rank_split(setup.check, n, world_size, k, rank_split)
        _check_picklable(setup, strategy, windows)
        return cls(
            setup=setup,
            strategy=strategy,
            windows=windows,
            rank_split=sizes,
            k=k,
            world_size=world_size,
        )

    @property
    def repro(self) -> str:
        return reproduce(
            self.setup.check,
            make_step=self.setup.step_name,
            batches=describe_batches(self.windows),
            strategy=name_of(self.strategy),
            world_size=self.world_size,
            rank_split=self.rank_split,
            k=self.k,
            precision=repr(self.setup.precision.name),
            seed=self.setup.seed,
        )

    def execute(self, timeout_s: float, start_method: StartMethod | None) -> list[RankResult]:
        """Train on `world_size` local gloo ranks; what each rank wrote, by rank."""
        payload = {
            "setup": self.setup,
            "strategy": self.strategy,
            "k": self.k,
            "windows": self.windows,
            "rank_split": self.rank_split,
        }
        with tempfile.TemporaryDirectory() as tmp:
            run_ranks(
                _train_rank,
                pickle.dumps(payload),
                world_size=self.world_size,
                out_dir=Path(tmp),
                timeout_s=timeout_s,
                start_method=start_method,
                what=f"{self.setup.check} failed",
                footer=self.repro,
            )
            return _read_ranks(Path(tmp), self.world_size)

    def compare(
        self, expected: list[dict[str, torch.Tensor]], results: list[RankResult], tol: Tolerance
    ) -> None:
        """Fail at the first optimizer step and rank whose parameters differ from
        SingleDevice, or if some parameter lives on no rank."""
        text = results[0][0]["strategy"]
        for i, ref in enumerate(expected):
            per_rank = [_step_tensors(tensors, i) for _, tensors in results]
            for rank, got in enumerate(per_rank):
                diff = first_difference(
                    {"model": got},
                    {"model": _held_part(ref, got)},
                    tolerance=lambda _: tol,
                    names=(f"rank {rank}", "SingleDevice"),
                )
                if diff is not None:
                    raise failure(
                        f"{self.setup.check} failed: {text} on {self.world_size} processes "
                        f"(rank split {self.rank_split}, k={self.k}) differs from SingleDevice "
                        f"after optimizer step {i + 1} of {len(expected)} on rank {rank}.",
                        diff,
                        _EXPLANATION + _drift(per_rank, got),
                        self.repro,
                    )
        held = {key.split("/", 1)[1] for _, tensors in results for key in tensors}
        missing = sorted(set(expected[-1]) - held) if expected else []
        if missing:
            raise AssertionError(
                f"{self.setup.check} failed: no rank of {text} holds {missing[:8]} after "
                "training; every parameter of the SingleDevice model must live on some rank."
                f"\n  {self.repro}"
            )


_EXPLANATION = (
    "A data-parallel strategy must sum gradients over ranks once per window and "
    "normalise by the global item count; a sharded one must gather and clip by "
    "the global norm."
)


def _step_tensors(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """A rank's tensors after optimizer step i, by parameter name."""
    prefix = f"{i}/"
    return {key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)}


def _held_part(
    ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The reference restricted to what a rank holds, if it holds part of the model (a
    pipeline stage); else the whole reference."""
    if got and set(got) < set(ref):
        return {key: v for key, v in ref.items() if key in got}
    return ref


def _drift(per_rank: list[dict[str, torch.Tensor]], got: dict[str, torch.Tensor]) -> str:
    """A sentence if the replicas holding the same parameters as `got` disagree."""
    replicas = [r for r in per_rank if set(r) == set(got)]
    if any(not torch.equal(r[key], got[key]) for r in replicas for key in got):
        return (
            " The ranks also disagree with each other (replicas drifted apart): "
            "gradients are not synchronised across ranks."
        )
    return ""


@accepts_search_strategies("batches", "rank_split", "seed")
def check_strategy_equivalence(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    strategy: Callable[[], Any],
    world_size: int = 2,
    rank_split: Sequence[int] | None = None,
    k: int = 1,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int | None = None,
    precision: Precision | PrecisionName = "fp32",
    schedule: Any = None,
    seed: int = 0,
    timeout_s: float = 120.0,
    start_method: StartMethod | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check that a strategy in `world_size` spawned gloo processes trains like SingleDevice.

    The reference trains in this process on the CPU with SingleDevice, one micro-batch per
    full batch. Each spawned rank builds `strategy()` inside a gloo process group on
    127.0.0.1 (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK set), takes its data-parallel
    share of every full batch (`rank_split`; the whole batch when `dp_world_size` is 1),
    cuts it into `k` micro-batches and runs `make_step(k)`. After every optimizer step each
    rank's full (gathered) parameters must match the reference's. Catches gradients that
    are never synchronised, normalised by the local instead of the global item count, or
    clipped by a local norm.

    Every piece is pickled into the spawned processes: define them at module level
    (classes, functions, frozen dataclasses and functools.partial work; lambdas do not).

    Arguments not listed here are as in check_accumulation_invariance.

    Args:
        strategy: a factory called in each process, e.g. `loopkit.strategies.DDP` or
            `functools.partial(FSDP, ...)`. Data is split by its `dp_world_size` /
            `dp_rank` (the stages of one pipeline replica see the same batch).
        world_size: processes to spawn.
        rank_split: items of each full batch per data-parallel rank (default: as even as
            possible, then made uneven by one item).
        k: micro-batches per window on each rank.
        timeout_s: give up (and fail) after this long.
        start_method: "forkserver" (the default where available: torch is imported once
            per session, so later calls start in well under a second) or "spawn".

    Raises:
        AssertionError: a rank's parameters differ from the reference (or ranks disagree),
            or a rank crashed (its traceback is included).
        ValueError: a piece cannot be pickled, or the split does not fit.
    """
    setup = CheckSetup.create(
        "check_strategy_equivalence",
        make_model,
        loss_fn,
        make_step=make_step,
        optimizer=optimizer,
        precision=precision,
        schedule=schedule,
        seed=seed,
    )
    run = _RankRun.prepare(setup, strategy, batches, steps, world_size, rank_split, k)
    tol = setup.tolerance(rtol, atol)
    expected = _reference(setup, run.windows)
    results = run.execute(timeout_s, start_method)
    run.compare(expected, results, tol)
    return CheckResult(
        setup.check,
        tol,
        len(expected) * world_size,
        f"{results[0][0]['strategy']} on {world_size} ranks (split {run.rank_split}, k={k}) "
        f"matched SingleDevice for {len(run.windows)} step(s).",
    )


def _reference(setup: CheckSetup, windows: list[Any]) -> list[dict[str, torch.Tensor]]:
    """SingleDevice on the CPU in this process, one micro-batch per window: the model's
    floating-point state after every optimizer step."""
    expected = []
    with global_rng_guard():
        seed_globals(0)
        state, step = setup.new_state(), setup.step(1)
        for window in windows:
            state = run_window(state, step, [window], setup.check)
            expected.append(_float_state(state.model))
    return expected
