"""check_strategy_equivalence: a strategy in spawned gloo processes vs SingleDevice."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..checkpoint import unwrap
from ..precision import Precision, as_precision
from ._run import (
    MakeModel,
    MakeStep,
    build_state,
    check_same_init,
    default_optimizer,
    default_step,
    describe_batches,
    global_rng_guard,
    leading_size,
    name_of,
    reproduce,
    run_window,
    seed_globals,
    split_batch,
)
from .assertions import Tolerance, first_difference, tolerance_for
from .checks import CheckResult, _accepts_strategies, _fail, _windows

Device = str | torch.device


# What a spawned rank needs before it can train: importing them in every process costs
# seconds (building the first optimizer imports torch._dynamo), a fork server pays it once.
_PRELOAD = ("torch", "torch.distributed", "torch._dynamo", "loopkit", "loopkit.testing")


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_rank_split(total: int, world_size: int, k: int) -> list[int]:
    """Items per rank: as even as possible, then made uneven where it can be (rank 0 gets one
    more), so a per-rank normalisation bug cannot hide behind equal shares."""
    base, extra = divmod(total, world_size)
    sizes = [base + (1 if r < extra else 0) for r in range(world_size)]
    if world_size > 1 and len(set(sizes)) == 1 and sizes[-1] > k:
        sizes[0] += 1
        sizes[-1] -= 1
    return sizes


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach().cpu().clone()


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    payload: bytes,
) -> None:
    """One spawned rank: set up the process group, train its share, write its parameters."""
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
            }
        )
        pieces = pickle.loads(payload)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=pieces["timeout_s"]),
            )
        strategy = pieces["strategy"]()
        seed_globals(0)
        state = build_state(
            pieces["make_model"],
            optimizer=pieces["optimizer"],
            precision=pieces["precision"],
            schedule=pieces["schedule"],
            seed=pieces["seed"],
            device="cpu",
            strategy=strategy,
        )
        # Data-parallel degree and index: a strategy that is not purely data parallel (a
        # pipeline, hybrid sharding) names them; otherwise every rank is a data replica.
        dp_size = int(getattr(strategy, "dp_world_size", getattr(strategy, "world_size", 1)))
        dp_rank = int(getattr(strategy, "dp_rank", getattr(strategy, "rank", 0)))
        k = pieces["k"]
        step = pieces["make_step"](k)
        tensors: dict[str, torch.Tensor] = {}
        where = "check_strategy_equivalence"
        for i, window in enumerate(pieces["windows"]):
            if dp_size > 1:
                sizes = pieces["rank_split"]
                pieces_of_window = split_batch(window, _cut_sizes(sizes, dp_rank), where)
                share = pieces_of_window[_share_index(sizes, dp_rank)]
            else:
                share = window
            n = leading_size(share, where)
            base, extra = divmod(n, k)
            micro = split_batch(share, [base + (1 if j < extra else 0) for j in range(k)], where)
            state = run_window(state, step, micro, where)
            module = unwrap(state.model)
            for name, value in module.state_dict().items():
                if value.is_floating_point() or value.is_complex():
                    tensors[f"{i}/{name}"] = _full(value)
        safetensors.torch.save_file(tensors, str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(
            json.dumps({"strategy": repr(strategy), "dp_size": dp_size, "dp_rank": dp_rank})
        )
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _cut_sizes(sizes: Sequence[int], rank: int) -> list[int]:
    """Sizes that cut a window into [before this rank, this rank's share, after], dropping
    empty pieces."""
    before = sum(sizes[:rank])
    after = sum(sizes[rank + 1 :])
    return [s for s in (before, sizes[rank], after) if s]


def _share_index(sizes: Sequence[int], rank: int) -> int:
    return 1 if sum(sizes[:rank]) else 0


def _check_picklable(where: str, **pieces: Any) -> None:
    for name, value in pieces.items():
        try:
            pickle.dumps(value)
        except Exception as error:  # noqa: BLE001 - reported with the fix
            raise ValueError(
                f"{where}({name}={name_of(value)}): spawned processes receive it pickled, and "
                f"it cannot be ({type(error).__name__}: {error}). Define it at module level "
                "(not a lambda or a function inside a test), or use a frozen dataclass / "
                "functools.partial of module-level functions."
            ) from error


@_accepts_strategies("batches", "rank_split", "seed")
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
    precision: Precision | str = "fp32",
    schedule: Any = None,
    seed: int = 0,
    timeout_s: float = 120.0,
    start_method: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check that a strategy in `world_size` spawned gloo processes trains like SingleDevice.

    The reference trains in this process on the CPU with SingleDevice, one micro-batch per
    full batch. Each spawned rank builds `strategy()` (inside a gloo process group on
    127.0.0.1, with MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK set), takes its share of
    every full batch (`rank_split` items per rank along dim 0, uneven by default) when the
    strategy's `world_size` is above 1 (else the whole batch), cuts it into `k`
    micro-batches and runs `make_step(k)`. After every optimizer step each rank's full
    (gathered) parameters must match the reference's. Catches gradients that are never
    synchronised, normalised by the local instead of the global item count, or clipped by
    a local norm.

    Every piece is pickled into the spawned processes: define make_model, loss_fn,
    make_step, optimizer and the strategy factory at module level (classes, functions,
    frozen dataclasses and functools.partial work; lambdas do not).

    Args:
        strategy: a factory called in each process, e.g. `loopkit.strategies.DDP` or
            `functools.partial(FSDP, ...)`. Data is split by the strategy's
            `dp_world_size` / `dp_rank` when it has them (a pipeline: the stages of one
            replica see the same batch), else by `world_size` / `rank`.
        world_size: processes to spawn.
        rank_split: items of each full batch per rank (default: as even as possible, then
            made uneven by one item).
        k: micro-batches per window on each rank.
        timeout_s: give up (and fail) after this long.
        start_method: "forkserver" (the default where available) or "spawn". The fork
            server preloads torch once per test session, so later calls start in well under
            a second instead of several seconds; spawn re-imports torch in every process.
        (others as in check_accumulation_invariance)

    Raises:
        AssertionError: a rank's parameters differ from the reference (or ranks disagree),
            or a rank crashed (its traceback is included).
        ValueError: a piece cannot be pickled, or the split does not fit.
    """
    import torch.multiprocessing as mp

    where = "check_strategy_equivalence"
    check_same_init(make_model, where)
    windows = _windows(batches, steps, where)
    n = leading_size(windows[0], where)
    for window in windows[1:]:
        if leading_size(window, where) != n:
            raise ValueError(f"{where}(batches=...): every batch must have the same size ({n}).")
    if rank_split is None:
        if n < world_size * k:
            raise ValueError(
                f"{where}: batches of {n} items cannot give {world_size} ranks {k} "
                "micro-batch(es) each; use bigger batches or a smaller k."
            )
        rank_split = default_rank_split(n, world_size, k)
    rank_split = [int(s) for s in rank_split]
    if len(rank_split) != world_size or sum(rank_split) != n or min(rank_split) < k:
        raise ValueError(
            f"{where}(rank_split={rank_split}): needs {world_size} sizes, each >= k={k}, "
            f"summing to the batch size {n}."
        )
    optimizer = optimizer if optimizer is not None else default_optimizer()
    maker = make_step if make_step is not None else default_step(loss_fn)
    precision = as_precision(precision)
    _check_picklable(
        where,
        make_model=make_model,
        loss_fn=loss_fn,
        make_step=maker,
        optimizer=optimizer,
        strategy=strategy,
        schedule=schedule,
        batches=windows,
    )
    reference_model = make_model()
    dtype = next((p.dtype for p in reference_model.parameters() if p.is_floating_point()), None)
    tol: Tolerance = tolerance_for(dtype or torch.float32, precision, rtol=rtol, atol=atol)

    # The reference: SingleDevice on the CPU in this process, one micro-batch per window.
    expected: list[dict[str, torch.Tensor]] = []
    with global_rng_guard():
        seed_globals(0)
        state = build_state(
            make_model,
            optimizer=optimizer,
            precision=precision,
            schedule=schedule,
            seed=seed,
            device="cpu",
        )
        step = maker(1)
        for window in windows:
            state = run_window(state, step, [window], where)
            expected.append(
                {
                    name: value.detach().cpu().clone()
                    for name, value in unwrap(state.model).state_dict().items()
                    if value.is_floating_point() or value.is_complex()
                }
            )

    payload = pickle.dumps(
        {
            "make_model": make_model,
            "loss_fn": loss_fn,
            "make_step": maker,
            "optimizer": optimizer,
            "strategy": strategy,
            "precision": precision,
            "schedule": schedule,
            "seed": seed,
            "k": k,
            "windows": windows,
            "rank_split": rank_split,
            "timeout_s": timeout_s,
        }
    )
    repro = reproduce(
        where,
        make_step=None if make_step is None else name_of(make_step),
        batches=describe_batches(windows),
        strategy=name_of(strategy),
        world_size=world_size,
        rank_split=rank_split,
        k=k,
        precision=repr(precision.name),
        seed=seed,
    )
    method = start_method or _default_start_method()
    if method == "forkserver":
        # Ignored once the fork server runs; otherwise its children start with these loaded.
        multiprocessing.set_forkserver_preload(list(_PRELOAD))
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), tmp, payload),
            nprocs=world_size,
            join=False,
            start_method=method,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{where} failed: the {world_size} processes did not finish within "
                        f"{timeout_s:g} s (a collective that some rank never reaches?).\n  " + repro
                    )
        except mp.ProcessRaisedException as error:
            errors = sorted(Path(tmp).glob("rank*.error"))
            text = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors) or str(error)
            raise AssertionError(f"{where} failed: a rank raised.\n{text}\n  {repro}") from None
        except mp.ProcessExitedException as error:
            raise AssertionError(f"{where} failed: a rank died ({error}).\n  {repro}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        results = []
        for rank in range(world_size):
            meta = json.loads((Path(tmp) / f"rank{rank}.json").read_text())
            results.append(
                (meta, safetensors.torch.load_file(str(Path(tmp) / f"rank{rank}.safetensors")))
            )

    strategy_text = results[0][0]["strategy"]
    for i, ref in enumerate(expected):
        prefix = f"{i}/"
        per_rank = [
            {key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)}
            for _, tensors in results
        ]
        for rank, got in enumerate(per_rank):
            if got and set(got) < set(ref):  # a rank that holds part of the model (a stage)
                ref_part = {key: v for key, v in ref.items() if key in got}
            else:
                ref_part = ref
            diff = first_difference(
                {"model": got},
                {"model": ref_part},
                tolerance=lambda _: tol,
                names=(f"rank {rank}", "SingleDevice"),
            )
            if diff is None:
                continue
            replicas = [r for r in per_rank if set(r) == set(got)]
            disagree = ""
            if any(not torch.equal(r[key], got[key]) for r in replicas for key in got):
                disagree = (
                    " The ranks also disagree with each other (replicas drifted apart): "
                    "gradients are not synchronised across ranks."
                )
            raise _fail(
                f"{where} failed: {strategy_text} on {world_size} processes (rank split "
                f"{rank_split}, k={k}) differs from SingleDevice after optimizer step "
                f"{i + 1} of {len(windows)} on rank {rank}.",
                diff,
                "A data-parallel strategy must sum gradients over ranks once per window and "
                "normalise by the global item count; a sharded one must gather and clip by "
                "the global norm." + disagree,
                repro,
            )
    held: set[str] = set()
    for _, tensors in results:
        held.update(key.split("/", 1)[1] for key in tensors)
    missing = sorted(set(expected[-1]) - held) if expected else []
    if missing:
        raise AssertionError(
            f"{where} failed: no rank of {strategy_text} holds {missing[:8]} after training; "
            f"every parameter of the SingleDevice model must live on some rank.\n  {repro}"
        )
    return CheckResult(
        where,
        tol,
        len(expected) * world_size,
        f"{strategy_text} on {world_size} ranks (split {rank_split}, k={k}) matched "
        f"SingleDevice for {len(windows)} step(s).",
    )
