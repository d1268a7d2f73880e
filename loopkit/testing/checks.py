"""Property checks that users run on *their own* training steps.

Each check takes the user's pieces (a model factory, a loss_fn, batches, and optionally an
optimizer factory and `make_step(k)` building the step chain), runs them, and raises an
AssertionError saying what differed, by how much, where (parameter path, optimizer step),
which tolerance it used and how to reproduce it. On success it returns a CheckResult.

Conventions shared by every check:
    make_model: `() -> nn.Module`, a fresh model with the same initial weights on every call.
    loss_fn: `loss_fn(model, batch)` returning `Loss(sum, count)` or a scalar mean.
    batches: a list holds one full batch per optimizer step; anything else (a tuple
        `(x, y)`, a dict, a tensor) is one batch. A hypothesis strategy is accepted too:
        the check then runs as its own property test over drawn batches.
    make_step: `k -> transform` for a window of k micro-batches; default
        `chain(forward(loss_fn), accumulate(k), optimizer_step())`.
    optimizer: a factory `params -> Optimizer`; default SGD(lr=0.05, momentum=0.9).
"""

from __future__ import annotations

import functools
import math
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .._batch import move
from .._rng import micro_step_seed, seed_devices_
from ..checkpoint import load_checkpoint, read_extra, save_checkpoint, unwrap
from ..compose import _Chain
from ..loss import as_loss
from ..precision import Precision, as_precision
from ..state import StaleStateError, TrainState
from ._run import (
    MakeModel,
    MakeStep,
    as_batch_list,
    build_state,
    check_same_init,
    clone_tree,
    default_optimizer,
    default_step,
    describe_batches,
    global_rng_guard,
    leading_size,
    model_dtype,
    name_of,
    params_tree,
    reproduce,
    resolve_step,
    run_window,
    seed_globals,
    split_batch,
)
from .assertions import (
    Tolerance,
    first_difference,
    optimizer_param_names,
    state_tree,
    tolerance_for,
)

Device = str | torch.device
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CheckResult:
    """What a passing check compared, and with which tolerance.

    Attributes:
        check: the check's name.
        tolerance: the tolerance used (None where nothing was compared numerically).
        comparisons: how many states (or parameters) were compared.
        details: one line on what was run.
    """

    check: str
    tolerance: Tolerance | None
    comparisons: int
    details: str

    def __str__(self) -> str:
        tol = f"; tolerance {self.tolerance}" if self.tolerance is not None else ""
        return f"{self.check}: passed ({self.comparisons} comparisons{tol}). {self.details}"


# --- shared plumbing ----------------------------------------------------------------------


def _is_strategy(value: object) -> bool:
    module = sys.modules.get("hypothesis.strategies")  # never import hypothesis ourselves
    return module is not None and isinstance(value, module.SearchStrategy)


def _accepts_strategies(*names: str) -> Callable[[F], F]:
    """Let keyword arguments `names` be hypothesis strategies: the check then runs under
    `@given` over drawn values (use `max_examples=` to size it)."""

    def decorate(check: F) -> F:
        @functools.wraps(check)
        def wrapper(*args: Any, max_examples: int | None = None, **kwargs: Any) -> Any:
            drawn = {n: kwargs[n] for n in names if _is_strategy(kwargs.get(n))}
            if not drawn:
                return check(*args, **kwargs)
            from hypothesis import HealthCheck, given, settings

            options: dict[str, Any] = {
                "deadline": None,
                "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
            }
            if max_examples is not None:
                options["max_examples"] = max_examples

            @settings(**options)
            @given(**drawn)
            def property_test(**values: Any) -> None:
                check(*args, **{**kwargs, **values})

            property_test()
            return CheckResult(check.__name__, None, 0, f"ran over drawn {', '.join(drawn)}")

        return wrapper  # type: ignore[return-value]

    return decorate


def _windows(batches: Any, steps: int | None, where: str) -> list[Any]:
    """One full batch per optimizer step: a list as given (cycled to `steps`), or one batch
    repeated (twice by default, so a second step sees the first step's leftovers)."""
    full = as_batch_list(batches, where)
    if steps is None:
        steps = len(full) if len(full) > 1 else 2
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}(steps={steps!r}): must be an int >= 1.")
    return [full[i % len(full)] for i in range(steps)]


def _micro_batches(window: Any, split: Sequence[int] | None, where: str) -> list[Any]:
    return [window] if split is None else split_batch(window, split, where)


def _check_split(split: Sequence[int] | None, windows: Sequence[Any], where: str) -> int:
    """k (micro-batches per window) for `split`, after checking it fits every window."""
    if split is None:
        return 1
    for window in windows:
        n = leading_size(window, where)
        if sum(split) != n or any(int(s) < 1 for s in split):
            raise ValueError(
                f"{where}(split={list(split)}): sizes must be >= 1 and sum to the batch size, {n}."
            )
    return len(split)


def _tolerance(
    make_model: MakeModel,
    precision: Precision,
    rtol: float | None,
    atol: float | None,
    *,
    bitwise: bool = False,
    device: Device = "cpu",
) -> Tolerance:
    if bitwise and rtol is None and atol is None and torch.device(device).type == "cpu":
        return Tolerance(0.0, 0.0, "bitwise: CPU runs must match exactly")
    return tolerance_for(model_dtype(make_model()), precision, rtol=rtol, atol=atol)


def _named(piece: object) -> str | None:
    return None if piece is None else name_of(piece)


def _fail(header: str, difference: str, explanation: str, repro: str) -> AssertionError:
    return AssertionError(f"{header}\n  {difference}\n  {explanation}\n  {repro}")


def _detached_graph_error(where: str, error: RuntimeError) -> AssertionError | None:
    text = str(error)
    if "does not require grad" in text or "does not have a grad_fn" in text:
        return AssertionError(
            f"{where}: backward failed because the loss is not connected to any parameter "
            f"({text.splitlines()[0]}). A detached graph: look for .detach(), .item(), "
            "torch.no_grad() or tensors rebuilt from numpy/Python numbers in loss_fn or "
            "the model's forward."
        )
    return None


# --- accumulation invariance --------------------------------------------------------------


def _resolve_splits(splits: Any, n: int, where: str) -> list[list[int]]:
    if splits is None:
        if n < 2:
            raise ValueError(
                f"{where}: the full batch has {n} item; accumulation invariance needs at least "
                "2 items per batch to split."
            )
        chosen = [[1, n - 1]]
        if n > 2:
            chosen.append([n - 1, 1])
            half = (n - 1) // 2
            chosen.append([1, half, n - 1 - half])
        return [s for s in chosen if all(x >= 1 for x in s)]
    if isinstance(splits, Sequence) and splits and all(isinstance(s, int) for s in splits):
        splits = [splits]
    resolved = [[int(x) for x in s] for s in splits]
    for s in resolved:
        if sum(s) != n or any(x < 1 for x in s):
            raise ValueError(
                f"{where}(splits=[..., {s}, ...]): each split lists micro-batch sizes >= 1 that "
                f"sum to the batch size, {n}; e.g. [1, {n - 1}]."
            )
    if not resolved:
        raise ValueError(f"{where}(splits=[]): pass at least one split, e.g. [[1, {n - 1}]].")
    return resolved


@_accepts_strategies("batches", "splits")
def check_accumulation_invariance(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    splits: Sequence[int] | Sequence[Sequence[int]] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int | None = None,
    precision: Precision | str = "fp32",
    schedule: Any = None,
    seed: int = 0,
    device: Device = "cpu",
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check that splitting each batch into micro-batches leaves training unchanged.

    Runs `make_step(1)` on the full batches, then `make_step(len(split))` on each batch cut
    by every split, and compares the parameters (and `train/loss`) after every optimizer
    step. Catches a loss averaged per micro-batch instead of per item, a forgotten zero_grad
    and transforms that act per micro-batch instead of per window.

    Args:
        make_model: factory of identical fresh models.
        loss_fn: `loss_fn(model, batch)` -> Loss or scalar mean.
        batches: a full batch, or a list of them (one per optimizer step).
        splits: one split (`[3, 5]`) or several (`[[1, 7], [4, 4]]`) of the batch size into
            micro-batch sizes; default `[1, n-1]`, `[n-1, 1]` and an uneven three-way split.
        make_step: `k -> transform`; default loopkit's forward/accumulate/optimizer_step.
        optimizer: optimizer factory; default SGD(lr=0.05, momentum=0.9).
        steps: optimizer steps (default: one per batch in the list, or 2 for one batch).
        precision: "fp32", "bf16", "fp16" or a Precision.
        schedule: lr schedule, as TrainState.create takes it.
        seed: the run seed.
        device: where to run.
        rtol: relative tolerance (default by dtype and precision, see tolerance_for).
        atol: absolute tolerance.

    Returns:
        CheckResult with the tolerance used.

    Raises:
        AssertionError: a split changed the parameters beyond the tolerance.
        ValueError: a split does not fit the batch, or make_model is not reproducible.
    """
    where = "check_accumulation_invariance"
    check_same_init(make_model, where)
    windows = _windows(batches, steps, where)
    n = leading_size(windows[0], where)
    for window in windows[1:]:
        if leading_size(window, where) != n:
            raise ValueError(f"{where}(batches=...): every batch must have the same size ({n}).")
    chosen = _resolve_splits(splits, n, where)
    optimizer = optimizer if optimizer is not None else default_optimizer()
    precision = as_precision(precision)
    tol = _tolerance(make_model, precision, rtol, atol)

    def new_state() -> TrainState:
        return build_state(
            make_model,
            optimizer=optimizer,
            precision=precision,
            schedule=schedule,
            seed=seed,
            device=device,
        )

    with global_rng_guard():
        state, step = new_state(), resolve_step(make_step, loss_fn, 1, where)
        expected = []
        for window in windows:
            state = run_window(state, step, [window], where)
            expected.append(params_tree(state))
        for split in chosen:
            state, step = new_state(), resolve_step(make_step, loss_fn, len(split), where)
            for i, window in enumerate(windows):
                state = run_window(state, step, split_batch(window, split, where), where)
                diff = first_difference(
                    params_tree(state),
                    expected[i],
                    tolerance=lambda _: tol,
                    names=(f"split {split}", "full batch"),
                )
                if diff is not None:
                    raise _fail(
                        f"{where} failed: cutting each batch of {n} items into micro-batches "
                        f"{split} (make_step({len(split)})) changed training at optimizer step "
                        f"{i + 1} of {len(windows)}.",
                        diff,
                        "A window's gradients must be those of the mean loss over every item "
                        "in it, whatever the split. Usual causes: a loss averaged per "
                        "micro-batch (a mean of means), a missing zero_grad, or a transform "
                        "that acts on every micro-batch instead of once per closed window.",
                        reproduce(
                            where,
                            make_step=_named(make_step),
                            batches=describe_batches(windows),
                            splits=[split],
                            steps=len(windows),
                            precision=repr(precision.name),
                            seed=seed,
                        ),
                    )
    return CheckResult(
        where,
        tol,
        len(chosen) * len(windows),
        f"splits {chosen} of {len(windows)} batch(es) of {n} items matched the full batch.",
    )


# --- determinism --------------------------------------------------------------------------


@_accepts_strategies("batches", "seed")
def check_determinism(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    split: Sequence[int] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int | None = None,
    precision: Precision | str = "fp32",
    schedule: Any = None,
    seed: int = 0,
    device: Device = "cpu",
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check that a run is a function of (seed, data) alone: bitwise on CPU.

    Trains three times with the same seed and data: twice from the same global RNG state,
    and once with torch's, Python's and numpy's global generators re-seeded before every
    micro-batch. Every record after every optimizer step (parameters, gradients, optimizer
    state, counters, metrics) must match. Catches randomness drawn from a global generator
    loopkit did not seed for the step (dropout in a custom forward, `torch.manual_seed`
    with a random value, `random.random()` in a transform) and state kept outside the record.
    The caller's global RNG state is restored afterwards.

    Args:
        split: cut each batch into these micro-batch sizes (default: one micro-batch).
        rtol, atol: tolerance; default bitwise on CPU, by dtype elsewhere.
        (others as in check_accumulation_invariance)

    Raises:
        AssertionError: two runs differ.
    """
    where = "check_determinism"
    check_same_init(make_model, where)
    windows = _windows(batches, steps, where)
    k = _check_split(split, windows, where)
    optimizer = optimizer if optimizer is not None else default_optimizer()
    precision = as_precision(precision)
    tol = _tolerance(make_model, precision, rtol, atol, bitwise=True, device=device)

    def run(global_seed: int, scramble: bool) -> list[Any]:
        seed_globals(global_seed)
        state = build_state(
            make_model,
            optimizer=optimizer,
            precision=precision,
            schedule=schedule,
            seed=seed,
            device=device,
        )
        step = resolve_step(make_step, loss_fn, k, where)
        trees = []
        draws = 0
        for window in windows:
            before = state.step
            for micro_batch in _micro_batches(window, split, where):
                if scramble:
                    draws += 1
                    seed_globals(7919 * draws + 104729)
                state = step(state, micro_batch)
            if state.step != before + 1:
                raise AssertionError(
                    f"{where}: make_step({k}) did not take one optimizer step per window of {k} "
                    "micro-batch(es); build the chain with accumulate(k) and optimizer_step()."
                )
            trees.append(clone_tree(state_tree(state)))
        return trees

    repro = reproduce(
        where,
        make_step=_named(make_step),
        batches=describe_batches(windows),
        split=split,
        steps=len(windows),
        precision=repr(precision.name),
        seed=seed,
    )
    with global_rng_guard():
        first = run(1, scramble=False)
        again = run(1, scramble=False)
        scrambled = run(2, scramble=True)
    for other, header, why in (
        (
            again,
            "two runs with the same seed, data and global RNG state differ",
            "The step depends on something besides (seed, step, micro_step, rank) and the data: "
            "the clock, os.urandom, a counter kept in a transform or a global, or a "
            "non-deterministic kernel (torch.use_deterministic_algorithms(True) finds those).",
        ),
        (
            scrambled,
            "a run whose global torch/random/numpy generators were re-seeded before every "
            "micro-batch differs from an undisturbed run with the same seed",
            "Something in the step draws from a global generator loopkit did not seed for it: "
            "dropout in a custom forward that skips loopkit's seeding, "
            "torch.manual_seed(<random>), random.random() or np.random in a transform. "
            "Derive randomness from (state.seed, state.step, state.micro_step, rank), "
            "e.g. a torch.Generator seeded from them.",
        ),
    ):
        for i, (a, b) in enumerate(zip(other, first, strict=True)):
            diff = first_difference(a, b, tolerance=lambda _: tol, names=("rerun", "first run"))
            if diff is not None:
                raise _fail(
                    f"{where} failed: {header}, after optimizer step {i + 1} of {len(windows)}.",
                    diff,
                    why,
                    repro,
                )
    return CheckResult(
        where,
        tol,
        2 * len(windows),
        f"3 runs of {len(windows)} step(s) x {k} micro-batch(es) matched, one with scrambled "
        "global generators.",
    )


# --- resume equivalence -------------------------------------------------------------------


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


@_accepts_strategies("batches", "save_at", "seed")
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
    precision: Precision | str = "fp32",
    schedule: Any = None,
    seed: int = 0,
    device: Device = "cpu",
    make_data: Callable[[], Iterable[Any]] | None = None,
    k: int | None = None,
    save: Callable[[TrainState, Any, Path], Path] = default_save,
    resume: Callable[[Path, TrainState, Any], TrainState] = default_resume,
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

    Args:
        save_at: the optimizer step to save at (default: half way).
        save: `(state, data, directory) -> checkpoint path`; default `default_save`
            (save_checkpoint plus the data position).
        resume: `(path, fresh_state, fresh_data) -> state`; default `default_resume`.
        directory: where checkpoints go (default: a temporary directory).
        rtol, atol: tolerance; default bitwise on CPU, by dtype elsewhere.
        (others as in check_accumulation_invariance)

    Raises:
        AssertionError: the resumed run differs, right after resume or at the end.
    """
    where = "check_resume_equivalence"
    check_same_init(make_model, where)
    if make_data is None:
        windows = _windows(batches, steps, where)
        k = _check_split(split, windows, where)
        micro = [mb for w in windows for mb in _micro_batches(w, split, where)]
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
    optimizer = optimizer if optimizer is not None else default_optimizer()
    precision = as_precision(precision)
    tol = _tolerance(make_model, precision, rtol, atol, bitwise=True, device=device)
    step = resolve_step(make_step, loss_fn, k, where)

    def new_state() -> TrainState:
        return build_state(
            make_model,
            optimizer=optimizer,
            precision=precision,
            schedule=schedule,
            seed=seed,
            device=device,
        )

    def take(iterator: Any, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            try:
                out.append(next(iterator))
            except StopIteration:
                raise ValueError(
                    f"{where}: the data ran out; it must yield steps * k = {steps * k} "
                    "micro-batches."
                ) from None
        return out

    repro = reproduce(
        where,
        make_step=_named(make_step),
        batches=data_text,
        split=split,
        steps=steps,
        save_at=save_at,
        precision=repr(precision.name),
        seed=seed,
        save=name_of(save),
        resume=name_of(resume),
    )
    at_resume_keys = ("model", "optimizer", "counters", "loss_scale", "growth_tracker")

    with global_rng_guard(), tempfile.TemporaryDirectory() as tmp:
        seed_globals(0)
        state, data = new_state(), make_data()
        iterator = iter(data)
        saved_tree = None
        if save_at == 0:
            saved_tree = clone_tree(state_tree(state, grads=False))
        for i in range(steps):
            state = run_window(state, step, take(iterator, k), where)
            if i + 1 == save_at:
                saved_tree = clone_tree(state_tree(state, grads=False))
        uninterrupted = clone_tree(state_tree(state))
        del state, data, iterator

        seed_globals(0)
        state, data = new_state(), make_data()
        iterator = iter(data)
        for _ in range(save_at):
            state = run_window(state, step, take(iterator, k), where)
        path = save(state, data, Path(directory) if directory is not None else Path(tmp))
        del state, data, iterator  # the "crash": nothing survives but the checkpoint

        state, data = new_state(), make_data()
        state = resume(Path(path), state, data)
        if not isinstance(state, TrainState):
            raise TypeError(f"{where}: resume returned {type(state).__name__}, not a TrainState.")
        notes = {
            f"optimizer.state[{i}]": f"parameter {n!r}"
            for i, n in optimizer_param_names(state).items()
        }
        tree = state_tree(state, grads=False)
        diff = first_difference(
            {key: tree[key] for key in at_resume_keys},
            {key: saved_tree[key] for key in at_resume_keys},  # type: ignore[index]
            tolerance=lambda _: tol,
            names=("resumed", "saved"),
            notes=notes,
        )
        if diff is not None:
            raise _fail(
                f"{where} failed: right after resuming at optimizer step {save_at}, the record "
                "differs from the one that was saved.",
                diff,
                "save/resume must restore the weights, the optimizer state, the counters and "
                "(fp16) the loss scale and its growth tracker.",
                repro,
            )
        iterator = iter(data)
        for _ in range(save_at, steps):
            state = run_window(state, step, take(iterator, k), where)
        diff = first_difference(
            state_tree(state),
            uninterrupted,
            tolerance=lambda _: tol,
            names=("resumed", "uninterrupted"),
            notes=notes,
        )
        if diff is not None:
            raise _fail(
                f"{where} failed: saving at optimizer step {save_at}, rebuilding and resuming "
                f"gives a different record at step {steps} than training straight through.",
                diff,
                "The record matched right after resume, so the continued run saw different "
                "inputs: the data position was not restored (the resumed run re-reads or "
                "skips batches), or randomness or state outside the record was lost.",
                repro,
            )
    return CheckResult(
        where,
        tol,
        2,
        f"saved at step {save_at} of {steps} ({k} micro-batch(es) per step); resumed run matched.",
    )


# --- loss decreases -----------------------------------------------------------------------


def _mean_loss(state: TrainState, loss_fn: Any, batch: Any, where: str) -> float:
    """The loss on `batch` in eval mode, no grad: a mean over its items (host sync)."""
    model = state.model
    was_training = model.training
    model.eval()
    try:
        batch = state.strategy.to_device(batch)
        n = leading_size(batch, where)
        with torch.no_grad(), state.precision.autocast(state.strategy.device):
            value, count, is_mean = as_loss(loss_fn(model, batch), n, where)
            mean = value if is_mean else value / count
        return float(mean)  # host sync: the check reads the loss
    finally:
        model.train(was_training)


@_accepts_strategies("batch", "seed")
def check_loss_decreases(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batch: Any,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int = 20,
    min_decrease: float = 0.1,
    precision: Precision | str = "fp32",
    schedule: Any = None,
    seed: int = 0,
    device: Device = "cpu",
) -> CheckResult:
    """Check that `steps` optimizer steps on one fixed batch lower its loss (overfit it).

    The loss is measured in eval mode without gradients before and after; it must fall by
    at least `min_decrease` of its initial magnitude. Catches a dead optimizer (lr 0, a
    chain without optimizer_step, parameters missing from the optimizer) and a detached
    graph.

    Args:
        batch: the batch to overfit (each step is one window of one micro-batch).
        steps: optimizer steps to take.
        min_decrease: the fraction the loss must fall by (0.1: to 90% of its start).
        (others as in check_accumulation_invariance)

    Raises:
        AssertionError: the loss did not fall enough (with a diagnosis), or backward failed
            on a detached graph.
    """
    where = "check_loss_decreases"
    if not (isinstance(min_decrease, (int, float)) and 0 <= min_decrease < 1):
        raise ValueError(f"{where}(min_decrease={min_decrease!r}): must be a float in [0, 1).")
    optimizer = optimizer if optimizer is not None else default_optimizer()
    with global_rng_guard():
        state = build_state(
            make_model,
            optimizer=optimizer,
            precision=precision,
            schedule=schedule,
            seed=seed,
            device=device,
        )
        step = resolve_step(make_step, loss_fn, 1, where)
        initial = _mean_loss(state, loss_fn, batch, where)
        before = [p.detach().clone() for p in unwrap(state.model).parameters()]
        try:
            for _ in range(steps):
                state = step(state, batch)
        except RuntimeError as error:
            detached = _detached_graph_error(where, error)
            if detached is not None:
                raise detached from error
            raise
        final = _mean_loss(state, loss_fn, batch, where)
        after = [p.detach() for p in unwrap(state.model).parameters()]
    target = initial - min_decrease * abs(initial)
    if math.isfinite(final) and final <= target:
        return CheckResult(
            where,
            None,
            1,
            f"loss {initial:.4g} -> {final:.4g} in {steps} steps (needed <= {target:.4g}).",
        )
    moved = max(
        (float((a - b).abs().max()) for a, b in zip(after, before, strict=True)), default=0.0
    )
    if state.step == 0:
        diagnosis = (
            "No optimizer step was taken: make_step(1) must close the window and step "
            "(accumulate(1) and optimizer_step() in the chain)."
        )
    elif moved == 0.0:
        diagnosis = (
            f"{state.step} optimizer steps left every parameter unchanged: a dead optimizer "
            "(lr 0, a schedule at 0, an optimizer over other tensors, or a step that never "
            "calls optimizer.step())."
        )
    elif not math.isfinite(final):
        diagnosis = "The loss became non-finite: the lr is too high or the loss overflows."
    else:
        diagnosis = (
            f"Parameters moved (max |change| {moved:.3g}) but the loss did not fall: a wrong "
            "sign, an lr far too small or too large, or gradients that reach only part of the "
            "model (run check_gradient_flow)."
        )
    raise _fail(
        f"{where} failed: the loss on a fixed batch went from {initial:.6g} to {final:.6g} "
        f"over {steps} optimizer steps; expected at most {target:.6g} "
        f"(a {min_decrease:.0%} decrease).",
        diagnosis,
        "Overfitting one small batch is the cheapest sign that training works at all.",
        reproduce(
            where,
            make_step=_named(make_step),
            batch=describe_batches([batch]),
            steps=steps,
            schedule=_named(schedule),
            seed=seed,
        ),
    )


# --- gradient flow ------------------------------------------------------------------------


@_accepts_strategies("batch", "seed")
def check_gradient_flow(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batch: Any,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    precision: Precision | str = "fp32",
    seed: int = 0,
    device: Device = "cpu",
    allow_no_grad: Iterable[str] = (),
) -> CheckResult:
    """Check that every trainable parameter gets a finite, non-zero gradient.

    Runs one window of `make_step(1)` on `batch` and reads the gradients the optimizer sees
    (captured when the chain calls `optimizer.step()`, so after normalisation and clipping).
    Every trainable parameter must be in the optimizer and get a finite gradient that is not
    all zeros; frozen parameters (requires_grad=False) must get none.

    Args:
        batch: one batch.
        allow_no_grad: parameter-name prefixes exempt from the trainable rules (e.g. an
            embedding table whose rows the batch does not use, or a head trained elsewhere).
        (others as in check_accumulation_invariance)

    Raises:
        AssertionError: listing every parameter that breaks a rule, by name.
    """
    where = "check_gradient_flow"
    exempt = tuple(allow_no_grad)
    optimizer = optimizer if optimizer is not None else default_optimizer()
    with global_rng_guard():
        state = build_state(
            make_model,
            optimizer=optimizer,
            precision=precision,
            schedule=None,
            seed=seed,
            device=device,
        )
        step = resolve_step(make_step, loss_fn, 1, where)
        module = unwrap(state.model)
        named = list(module.named_parameters())
        captured: dict[str, torch.Tensor | None] = {}
        opt = state.optimizer
        original_step = opt.step

        def capturing_step(*args: Any, **kwargs: Any) -> Any:
            if not captured:
                for name, p in named:
                    captured[name] = None if p.grad is None else p.grad.detach().clone()
            return original_step(*args, **kwargs)

        opt.step = capturing_step  # type: ignore[method-assign]
        try:
            state = step(state, batch)
        except RuntimeError as error:
            detached = _detached_graph_error(where, error)
            if detached is not None:
                raise detached from error
            raise
        finally:
            del opt.step  # back to the class's method
    repro = reproduce(
        where, make_step=_named(make_step), batch=describe_batches([batch]), seed=seed
    )
    if not captured:
        cause = (
            "the fp16 window overflowed, so the step was skipped"
            if state.skipped_steps
            else "make_step(1) never called optimizer.step() (is optimizer_step() in the chain?)"
        )
        raise AssertionError(
            f"{where} failed: no gradients reached the optimizer: {cause}.\n  {repro}"
        )
    in_optimizer = {id(p) for p in state.params}
    problems: list[str] = []
    for name, p in named:
        grad = captured[name]
        if not p.requires_grad:
            if grad is not None:
                problems.append(f"{name}: frozen (requires_grad=False) but has a gradient")
            continue
        if name.startswith(exempt) and exempt:
            continue
        if id(p) not in in_optimizer:
            problems.append(f"{name}: trainable but not in the optimizer, so never updated")
        if grad is None:
            problems.append(
                f"{name}: no gradient (not connected to the loss: an unused module, or a "
                ".detach() / no_grad between it and the loss)"
            )
        elif not bool(torch.isfinite(grad).all()):
            bad = int((~torch.isfinite(grad)).sum())
            problems.append(f"{name}: {bad} of {grad.numel()} gradient elements are not finite")
        elif not bool(grad.any()):
            problems.append(f"{name}: gradient is all zeros")
    if problems:
        raise AssertionError(
            f"{where} failed: {len(problems)} parameter(s) break the gradient rules after one "
            "step:\n    " + "\n    ".join(problems) + "\n  Pass allow_no_grad=('name.prefix',) for "
            f"parameters that are meant to get none.\n  {repro}"
        )
    trainable = sum(1 for _, p in named if p.requires_grad)
    return CheckResult(
        where,
        None,
        len(named),
        f"{trainable} trainable parameter(s) got finite non-zero gradients; "
        f"{len(named) - trainable} frozen got none.",
    )


# --- no stale reuse -----------------------------------------------------------------------


def _fingerprint(state: TrainState) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in state.params:
        out.append(p.detach().clone())
        if p.grad is not None:
            out.append(p.grad.detach().clone())
    for values in state.optimizer.state.values():
        out.extend(v.detach().clone() for v in values.values() if isinstance(v, torch.Tensor))
    if state.loss_scale is not None:
        out.append(state.loss_scale.detach().clone())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


@_accepts_strategies("batches")
def check_no_stale_reuse(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    split: Sequence[int] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    steps: int | None = None,
    precision: Precision | str = "fp32",
    seed: int = 0,
    device: Device = "cpu",
) -> CheckResult:
    """Check that every transform of the chain refuses a record it (or another) consumed.

    Walks the chain part by part over every micro-batch. Whenever a part returns a new
    record, calling it again on the record it consumed must raise StaleStateError *before*
    changing any tensor. A part that returns the record it received must not have changed
    its tensors in place (it has to return `state.replace(...)` so the old record goes
    stale). Parts must return a TrainState.

    Args:
        split: cut each batch into these micro-batch sizes (default: one micro-batch).
        (others as in check_accumulation_invariance)

    Raises:
        AssertionError: naming the part, the step and the micro-step.
    """
    where = "check_no_stale_reuse"
    windows = _windows(batches, steps, where)
    k = _check_split(split, windows, where)
    optimizer = optimizer if optimizer is not None else default_optimizer()
    repro = reproduce(
        where,
        make_step=_named(make_step),
        batches=describe_batches(windows),
        split=split,
        seed=seed,
    )
    acted: set[int] = set()
    with global_rng_guard():
        state = build_state(
            make_model,
            optimizer=optimizer,
            precision=precision,
            schedule=None,
            seed=seed,
            device=device,
        )
        step = resolve_step(make_step, loss_fn, k, where)
        parts = step.parts if isinstance(step, _Chain) else (step,)
        for window in windows:
            for micro_batch in _micro_batches(window, split, where):
                for index, part in enumerate(parts):
                    at = (
                        f"part {index} of the chain, {part!r}, at step {state.step}, "
                        f"micro_step {state.micro_step}"
                    )
                    before = _fingerprint(state)
                    out = part(state, micro_batch)
                    if not isinstance(out, TrainState):
                        raise AssertionError(
                            f"{where} failed: {at} returned {type(out).__name__}; a transform "
                            f"must return the new TrainState (or the one it received).\n  {repro}"
                        )
                    if out is state:
                        if not _same(before, _fingerprint(state)):
                            raise AssertionError(
                                f"{where} failed: {at} changed tensors in place but returned the "
                                "record it received, which so stays usable with changed tensors. "
                                "Return `state.replace(...)` (the old record then goes stale).\n  "
                                + repro
                            )
                        continue
                    acted.add(index)
                    after = _fingerprint(out)
                    try:
                        part(state, micro_batch)
                    except StaleStateError:
                        if not _same(after, _fingerprint(out)):
                            raise AssertionError(
                                f"{where} failed: {at} raised StaleStateError on reuse only "
                                "after changing tensors in place. Call state.check_fresh() "
                                f"before touching anything.\n  {repro}"
                            ) from None
                    except Exception as error:  # noqa: BLE001 - reported as the failure
                        raise AssertionError(
                            f"{where} failed: {at} raised {type(error).__name__} ({error}) on "
                            f"a consumed record instead of StaleStateError.\n  {repro}"
                        ) from error
                    else:
                        raise AssertionError(
                            f"{where} failed: {at} accepted the record it had already consumed "
                            "(no StaleStateError): a reused record silently repeats in-place "
                            "updates. Call state.check_fresh() first and return "
                            f"state.replace(...) / a built-in transform's result.\n  {repro}"
                        )
                    state = out
    idle = [repr(p) for i, p in enumerate(parts) if i not in acted]
    note = f" Never acted (passed the record through): {', '.join(idle)}." if idle else ""
    return CheckResult(
        where,
        None,
        len(acted),
        f"{len(acted)} of {len(parts)} part(s) refused a consumed record.{note}",
    )


# --- reference loop -----------------------------------------------------------------------


@_accepts_strategies("batches", "seed")
def check_matches_reference(
    make_model: MakeModel,
    loss_fn: Any,
    *,
    batches: Any,
    split: Sequence[int] | None = None,
    make_step: MakeStep | None = None,
    optimizer: Any = None,
    max_norm: float | None = None,
    schedule: Callable[[int], float] | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: Device = "cpu",
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Check a step chain against a hand-written PyTorch loop, optimizer step by step.

    The reference, per full batch: set each group's lr to `base_lr * schedule(step)`,
    `zero_grad`, backward of the mean loss over the batch's items, `clip_grad_norm_` over
    all trainable parameters (if `max_norm`), `optimizer.step()`. Dropout is seeded as
    loopkit's forward seeds a one-micro-batch window. Catches a clip with per-parameter
    norms, a forgotten zero_grad, a wrong loss normalisation or lr.

    Args:
        max_norm: global gradient-norm clipping in the reference (and in the default chain).
        schedule: lr factor per step (a loopkit.schedules instance or function), used by both.
        split: cut each batch into these micro-batch sizes for the chain (the reference always
            sees the whole batch).
        (others as in check_accumulation_invariance)

    Raises:
        AssertionError: the parameters after some optimizer step differ from the reference.
    """
    where = "check_matches_reference"
    check_same_init(make_model, where)
    windows = _windows(batches, steps, where)
    k = _check_split(split, windows, where)
    optimizer = optimizer if optimizer is not None else default_optimizer()
    maker = make_step if make_step is not None else default_step(loss_fn, max_norm)
    tol = _tolerance(make_model, Precision("fp32"), rtol, atol)
    dev = torch.device(device)
    with global_rng_guard():
        state = build_state(
            make_model,
            optimizer=optimizer,
            precision="fp32",
            schedule=schedule,
            seed=seed,
            device=device,
        )
        step = resolve_step(maker, loss_fn, k, where)
        actual = []
        for window in windows:
            state = run_window(state, step, _micro_batches(window, split, where), where)
            actual.append({"model": params_tree(state)["model"]})

        model = make_model().to(dev)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = optimizer(trainable)
        base_lrs = [group["lr"] for group in opt.param_groups]
        for i, window in enumerate(windows):
            factor = 1.0 if schedule is None else schedule(i)
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            opt.zero_grad(set_to_none=True)
            seed_devices_(micro_step_seed(seed, i, 0, 0), dev)
            batch = move(window, dev, False)
            value, count, is_mean = as_loss(
                loss_fn(model, batch), leading_size(batch, where), where
            )
            (value if is_mean else value / count).backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            opt.step()
            expected = {"model": {n: p.detach().clone() for n, p in model.named_parameters()}}
            diff = first_difference(
                actual[i], expected, tolerance=lambda _: tol, names=("step chain", "reference")
            )
            if diff is not None:
                clip_text = f", clip_grad_norm_(max_norm={max_norm})" if max_norm else ""
                raise _fail(
                    f"{where} failed: after optimizer step {i + 1} of {len(windows)}, "
                    f"make_step({k}) differs from the hand-written loop (zero_grad, backward "
                    f"of the mean loss{clip_text}, step).",
                    diff,
                    "Usual causes: clipping per parameter instead of by the global norm, a "
                    "missing zero_grad, a loss normalised per micro-batch, or an lr that does "
                    "not follow schedule(step).",
                    reproduce(
                        where,
                        make_step=_named(make_step),
                        batches=describe_batches(windows),
                        split=split,
                        max_norm=max_norm,
                        schedule=schedule,
                        seed=seed,
                    ),
                )
    return CheckResult(
        where, tol, len(windows), f"{len(windows)} optimizer step(s) matched the reference loop."
    )


__all__ = [
    "CheckResult",
    "ListData",
    "check_accumulation_invariance",
    "check_determinism",
    "check_gradient_flow",
    "check_loss_decreases",
    "check_matches_reference",
    "check_no_stale_reuse",
    "check_resume_equivalence",
    "default_optimizer",
    "default_resume",
    "default_save",
    "default_step",
]
