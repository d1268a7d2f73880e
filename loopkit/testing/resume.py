"""check_resume_equivalence: save, rebuild, load and continue == never stopping."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._types import Strategy, Transform
from ..checkpoint import load_checkpoint, read_extra, save_checkpoint
from ..precision import Precision, PrecisionName
from ..state import TrainState
from .assertions import Tolerance
from .batches import batch_windows, describe_batches, micro_batches, micro_batches_per_window
from .drawn import accepts_search_strategies
from .failures import name_of, raise_if_different, reproduce
from .global_rng import global_rng_guard, seed_globals
from .result import CheckResult
from .runs import clone_tree, run_window
from .setup import CheckSetup, Device, MakeModel, MakeStep
from .trees import optimizer_param_names, state_tree

__all__ = ["ListData", "check_resume_equivalence", "default_resume", "default_save"]

SaveFn = Callable[[TrainState, Any, Path], Path]
ResumeFn = Callable[[Path, TrainState, Any], TrainState]

# What must match right after resume (the rest, gradients and metrics, only at the end).
_AT_RESUME_KEYS = ("model", "optimizer", "counters", "loss_scale", "growth_tracker")


class ListData:
    """A list of micro-batches that remembers its position (a stand-in for a
    StatefulDataLoader): `state_dict()` / `load_state_dict()` save and restore it."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)
        self.position = 0

    def __iter__(self) -> Any:
        while self.position < len(self.items):
            item = self.items[self.position]
            self.position += 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict["position"])

    def __repr__(self) -> str:
        return f"ListData(<{len(self.items)} micro-batches>, position={self.position})"


def default_save(state: TrainState, data: Any, directory: Path) -> Path:
    """Save `state` with loopkit.save_checkpoint, and the data position in `extra`."""
    extra = {"data": data.state_dict()} if hasattr(data, "state_dict") else {}
    return save_checkpoint(state, directory, extra=extra)


def default_resume(path: Path, state: TrainState, data: Any) -> TrainState:
    """Load a checkpoint written by `default_save` into a fresh record and data source."""
    state = load_checkpoint(path, state)
    if hasattr(data, "load_state_dict"):
        data.load_state_dict(read_extra(path)["data"])
    return state


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """The data side of one resume check: where the micro-batches come from and when to save."""

    make_data: Callable[[], Iterable[Any]]
    steps: int
    k: int
    save_at: int
    data_text: str
    where: str

    def repro(
        self, setup: CheckSetup, split: Sequence[int] | None, save: SaveFn, resume: ResumeFn
    ) -> str:
        """The reproduction line of a failure."""
        return reproduce(
            setup.check,
            make_step=setup.step_name,
            batches=self.data_text,
            split=split,
            steps=self.steps,
            save_at=self.save_at,
            precision=repr(setup.precision.name),
            seed=setup.seed,
            save=name_of(save),
            resume=name_of(resume),
        )

    def take(self, iterator: Iterator[Any]) -> list[Any]:
        """The k micro-batches of the next window."""
        out = []
        for _ in range(self.k):
            try:
                out.append(next(iterator))
            except StopIteration:
                raise ValueError(
                    f"{self.where}: the data ran out; it must yield steps * k = "
                    f"{self.steps * self.k} micro-batches."
                ) from None
        return out


def _plan(
    where: str,
    batches: Any,
    split: Sequence[int] | None,
    steps: int | None,
    make_data: Callable[[], Iterable[Any]] | None,
    k: int | None,
    save_at: int | None,
) -> _Plan:
    """Check the data arguments: batches cut by split (served by a ListData), or make_data."""
    if make_data is None:
        windows = batch_windows(batches, steps, where)
        k = micro_batches_per_window(split, windows, where)
        micro = [mb for w in windows for mb in micro_batches(w, split, where)]
        steps = len(windows)
        make_data = functools.partial(ListData, micro)
        data_text = describe_batches(windows)
    else:
        if steps is None:
            raise ValueError(f"{where}(make_data=...): also pass steps= (optimizer steps to run).")
        k = 1 if k is None else k
        data_text = name_of(make_data)
    if save_at is None:
        save_at = max(1, steps // 2) if steps > 1 else 0
    if isinstance(save_at, bool) or not isinstance(save_at, int) or not 0 <= save_at < steps:
        raise ValueError(f"{where}(save_at={save_at!r}): must be an int in [0, steps={steps}).")
    return _Plan(
        make_data=make_data, steps=steps, k=k, save_at=save_at, data_text=data_text, where=where
    )


@accepts_search_strategies("batches", "save_at", "seed")
def check_resume_equivalence(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any = None,
    split: Sequence[int] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int | None = None,
    save_at: int | None = None,
    precision: Precision | PrecisionName = "fp32",
    schedule: Any = None,
    seed: int = 0,
    device: Device = "cpu",
    strategy: Strategy | None = None,
    make_data: Callable[[], Iterable[Any]] | None = None,
    k: int | None = None,
    save: SaveFn = default_save,
    resume: ResumeFn = default_resume,
    directory: str | Path | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check that save at step `save_at`, rebuild, load and continue == never stopping.

    The uninterrupted run trains `steps` optimizer steps. The interrupted one trains
    `save_at` steps, calls `save(state, data, directory)`, drops everything, rebuilds a
    fresh record (make_model, optimizer factory, same settings) and data source, calls
    `resume(path, state, data)` and trains the remaining steps. The records must match right
    after resume (weights, optimizer state, counters, fp16 loss scale) and at the end
    (everything); bitwise on CPU.

    Data: `batches` (one full batch per step, cut by `split`) are served by a ListData that
    remembers its position; or pass `make_data` (a factory of iterables of micro-batches
    with `state_dict` / `load_state_dict`, e.g. a torchdata StatefulDataLoader) with `steps`
    and `k` (micro-batches per step).

    Arguments not listed here are as in check_accumulation_invariance.

    Args:
        save_at: the optimizer step to save at (default: half way).
        save: `(state, data, directory) -> checkpoint path`; default `default_save`
            (save_checkpoint plus the data position).
        resume: `(path, fresh_state, fresh_data) -> state`; default `default_resume`.
        directory: where checkpoints go (default: a temporary directory).
        rtol: relative tolerance; default bitwise on CPU, by dtype elsewhere.
        atol: absolute tolerance; default bitwise on CPU, by dtype elsewhere.

    Raises:
        AssertionError: the resumed run differs, right after resume or at the end.
    """
    setup = CheckSetup.from_arguments("check_resume_equivalence", locals())
    setup.check_same_init()
    plan = _plan(setup.check, batches, split, steps, make_data, k, save_at)
    tol = setup.tolerance(rtol, atol, bitwise=True)
    step = setup.step(plan.k)
    repro = plan.repro(setup, split, save, resume)
    with global_rng_guard(), tempfile.TemporaryDirectory() as tmp:
        saved, uninterrupted = _run_straight(setup, step, plan)
        path = _run_and_save(setup, step, plan, save, Path(tmp if directory is None else directory))
        _resume_and_compare(setup, step, plan, resume, path, saved, uninterrupted, tol, repro)
    return CheckResult(
        setup.check,
        tol,
        2,
        f"saved at step {plan.save_at} of {plan.steps} ({plan.k} micro-batch(es) per step); "
        "resumed run matched.",
    )


def _run_straight(setup: CheckSetup, step: Transform, plan: _Plan) -> tuple[Any, Any]:
    """The uninterrupted run: (its record at save_at without grads, its final record)."""
    seed_globals(0)
    state, data = setup.new_state(), plan.make_data()
    iterator = iter(data)
    saved = clone_tree(state_tree(state, grads=False)) if plan.save_at == 0 else None
    for i in range(plan.steps):
        state = run_window(state, step, plan.take(iterator), setup.check)
        if i + 1 == plan.save_at:
            saved = clone_tree(state_tree(state, grads=False))
    return saved, clone_tree(state_tree(state))


def _run_and_save(
    setup: CheckSetup, step: Transform, plan: _Plan, save: SaveFn, directory: Path
) -> Path:
    """The interrupted run up to save_at, saved with `save`; then the "crash": nothing
    survives but the checkpoint."""
    seed_globals(0)
    state, data = setup.new_state(), plan.make_data()
    iterator = iter(data)
    for _ in range(plan.save_at):
        state = run_window(state, step, plan.take(iterator), setup.check)
    return Path(save(state, data, directory))


def _resume_and_compare(
    setup: CheckSetup,
    step: Transform,
    plan: _Plan,
    resume: ResumeFn,
    path: Path,
    saved: Any,
    uninterrupted: Any,
    tol: Tolerance,
    repro: str,
) -> None:
    """Rebuild, resume from `path`, compare with the saved record, continue, compare again."""
    where = setup.check
    state, data = setup.new_state(), plan.make_data()
    state = resume(path, state, data)
    if not isinstance(state, TrainState):
        raise TypeError(f"{where}: resume returned {type(state).__name__}, not a TrainState.")
    notes = {
        f"optimizer.state[{i}]": f"parameter {n!r}" for i, n in optimizer_param_names(state).items()
    }
    tree = state_tree(state, grads=False)
    raise_if_different(
        {key: tree[key] for key in _AT_RESUME_KEYS},
        {key: saved[key] for key in _AT_RESUME_KEYS},
        tol,
        names=("resumed", "saved"),
        notes=notes,
        header=f"{where} failed: right after resuming at optimizer step {plan.save_at}, the "
        "record differs from the one that was saved.",
        explanation="save/resume must restore the weights, the optimizer state, the counters "
        "and (fp16) the loss scale and its growth tracker.",
        repro=repro,
    )
    iterator = iter(data)
    for _ in range(plan.save_at, plan.steps):
        state = run_window(state, step, plan.take(iterator), where)
    raise_if_different(
        state_tree(state),
        uninterrupted,
        tol,
        names=("resumed", "uninterrupted"),
        notes=notes,
        header=f"{where} failed: saving at optimizer step {plan.save_at}, rebuilding and "
        f"resuming gives a different record at step {plan.steps} than training straight "
        "through.",
        explanation="The record matched right after resume, so the continued run saw "
        "different inputs: the data position was not restored (the resumed run re-reads or "
        "skips batches), or randomness or state outside the record was lost.",
        repro=repro,
    )
