"""compile_step: N steps of the compiled step against the eager chain, graph counts, fallbacks.

Tolerance. Parameters and optimizer state of the compiled run must equal the eager run's
within `rtol=1e-5, atol=1e-6` (float32). Inductor fuses forward, backward, the window's
scaling, the clip and AdamW into a few kernels that add up in another order
(reassociation), and AdamW's step size is computed from the `step` tensor in float32
instead of Python floats: each op may differ by a few ulps (~1e-7 relative). Over these few
steps at lr 1e-3 the measured difference is ~1e-7; a real defect (a missing closing factor,
a wrong lr, a skipped clip) moves the weights by > 1e-4.

The compiled steps are built once per module (`runs`): compiling costs seconds per graph.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from helpers import TinyLM, mlp, token_loss

import loopkit as lk
from loopkit.compiled import CompiledStep, CompileFallbackWarning

RTOL, ATOL = 1e-5, 1e-6
STEPS = 5

pytestmark = pytest.mark.filterwarnings("error::loopkit.compiled.CompileFallbackWarning")


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def mean_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def mlp_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def token_batches(lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    """Token batches of the given sequence lengths, the last positions of each row padded."""
    g = torch.Generator().manual_seed(2)
    out = []
    for length in lengths:
        tokens = torch.randint(0, 11, (4, length), generator=g)
        targets = torch.randint(0, 11, (4, length), generator=g)
        keep = torch.arange(length) < torch.randint(1, length + 1, (4, 1), generator=g)
        out.append({"tokens": tokens, "targets": torch.where(keep, targets, -100)})
    return out


def new_state(model: torch.nn.Module, schedule: Any = None) -> lk.TrainState:
    return lk.TrainState.create(
        model,
        optimizer=adamw,
        schedule=lk.schedules.cosine(2, 10) if schedule is None else schedule,
        strategy=lk.SingleDevice("cpu"),
    )


@dataclass
class Run:
    """An eager and a compiled run of the same step over the same micro-batches."""

    eager: lk.TrainState
    compiled: lk.TrainState
    step: CompiledStep
    graphs_after: list[int]  # graphs compiled after each optimizer step
    graph_breaks: int  # torch's graph-break counter over the compiled run


def run_both(step: lk.Transform, make_model: Callable[[], torch.nn.Module], batches: list) -> Run:
    compiled = lk.compile_step(step)
    assert isinstance(compiled, CompiledStep)
    eager_state, compiled_state = new_state(make_model()), new_state(make_model())
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    graphs_after = []
    for batch in batches:
        eager_state = step(eager_state, batch)
        before = compiled_state.step
        compiled_state = compiled(compiled_state, batch)
        if compiled_state.step != before:
            graphs_after.append(compiled.graphs_compiled)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks
    return Run(eager_state, compiled_state, compiled, graphs_after, breaks)


def chain_of(loss_fn: Any, k: int) -> lk.Transform:
    return lk.chain(lk.forward(loss_fn), lk.accumulate(k), lk.clip(0.5), lk.optimizer_step())


# Lengths vary from window to window (and within one): shapes compile at most twice per
# graph (the second new shape marks the length dynamic), then never again.
LENGTHS = [6, 6, 10, 10, 7, 9, 5, 12, 8, 11]

CASES: dict[str, tuple[Callable[[], lk.Transform], Callable[[], torch.nn.Module], list[Any]]] = {
    "mean-k1": (
        lambda: chain_of(mean_loss, 1),
        lambda: mlp(d_hidden=16, dtype=torch.float32),
        mlp_batches(STEPS),
    ),
    "mean-k2": (
        lambda: chain_of(mean_loss, 2),
        lambda: mlp(d_hidden=16, dtype=torch.float32),
        mlp_batches(2 * STEPS),
    ),
    "tokens-k2": (
        lambda: chain_of(token_loss, 2),
        lambda: TinyLM(dtype=torch.float32),
        token_batches(LENGTHS),
    ),
}


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    return {
        name: run_both(step(), model, batches) for name, (step, model, batches) in CASES.items()
    }


def assert_same_training(eager: lk.TrainState, compiled: lk.TrainState) -> None:
    for p, q in zip(eager.params, compiled.params, strict=True):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)
    for p, q in zip(eager.params, compiled.params, strict=True):
        a, b = eager.optimizer.state[p], compiled.optimizer.state[q]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    for g, h in zip(eager.optimizer.param_groups, compiled.optimizer.param_groups, strict=True):
        assert type(h["lr"]) is float and h["lr"] == g["lr"]  # a float again after the update


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_steps_train_as_the_eager_chain(runs, name):
    run = runs[name]
    eager, compiled = run.eager, run.compiled
    assert compiled.step == eager.step == STEPS
    assert_same_training(eager, compiled)
    for field in ("micro_step", "samples_seen", "skipped_steps", "epoch"):
        assert getattr(compiled, field) == getattr(eager, field), field
    assert int(compiled.tokens_seen) == int(eager.tokens_seen)
    assert compiled.window.size == eager.window.size and compiled.window.ref_count is None
    assert (
        list(compiled.metrics)
        == list(eager.metrics)
        == ["train/loss", "train/grad_norm", "train/lr"]
    )
    assert compiled.metrics["train/lr"] == eager.metrics["train/lr"]
    for key in ("train/loss", "train/grad_norm"):
        torch.testing.assert_close(compiled.metrics[key], eager.metrics[key], rtol=RTOL, atol=ATOL)
    assert run.step.fallback_causes == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mean-k1", "mean-k2"])
def test_no_graph_breaks_and_no_recompiles_after_the_first_step(runs, name):
    run = runs[name]
    assert run.graph_breaks == 0
    k = int(name[-1])
    # micro-batch graph (k > 1: one with gradients absent, one present) + update graph
    assert run.graphs_after[0] == (2 if k == 1 else 3)
    assert run.graphs_after == [run.graphs_after[0]] * STEPS, run.graphs_after


@pytest.mark.slow
def test_new_sequence_lengths_compile_at_most_once_more(runs):
    run = runs["tokens-k2"]
    assert run.graph_breaks == 0
    first, second, *rest = run.graphs_after
    assert first == 3  # two micro-batch graphs and the update, for length 6
    assert second <= first + 2  # length 10: each micro-batch graph once more, now dynamic
    assert rest == [second] * len(rest), run.graphs_after  # lengths 7, 9, 5, 12, 8, 11: none


def test_a_consumed_record_is_refused_before_any_work():
    state = new_state(mlp(dtype=torch.float32))
    weights = [p.detach().clone() for p in state.params]
    state.replace()  # consumes `state`
    with pytest.raises(lk.StaleStateError, match="consumed by replace"):
        lk.compile_step(chain_of(mean_loss, 1))(state, mlp_batches(1)[0])
    assert all(torch.equal(p, w) for p, w in zip(state.params, weights, strict=True))
    assert all(p.grad is None for p in state.params)


def _warned_once(record: list[warnings.WarningMessage], match: str) -> None:
    ours = [w for w in record if issubclass(w.category, CompileFallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert match in str(ours[0].message), str(ours[0].message)


def run_fallback(step: lk.Transform, state_of: Callable[[], lk.TrainState], match: str) -> None:
    """Three steps of compile_step(step) warn once, naming `match`, and equal eager bit for bit."""
    batches = mlp_batches(3)
    eager = state_of()
    for batch in batches:
        eager = step(eager, batch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = lk.compile_step(step)
        assert isinstance(compiled, CompiledStep)
        state = state_of()
        for batch in batches:
            state = compiled(state, batch)
    _warned_once(record, match)
    assert compiled.graphs_compiled == 0
    assert state.step == eager.step == 3
    for p, q in zip(eager.params, state.params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
def test_a_step_with_a_host_decision_falls_back_with_one_warning():
    step = lk.chain(
        lk.forward(mean_loss), lk.accumulate(1), lk.skip_nonfinite(), lk.optimizer_step()
    )
    run_fallback(step, lambda: new_state(mlp(dtype=torch.float32)), "skip_nonfinite()")


def note_loss(state: lk.TrainState, batch: Any) -> lk.TrainState:
    """A part of the user's own: it may do anything on the host."""
    return state


@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
def test_a_step_with_a_part_of_the_users_own_falls_back_with_one_warning():
    step = lk.chain(lk.forward(mean_loss), lk.accumulate(1), note_loss, lk.optimizer_step())
    run_fallback(step, lambda: new_state(mlp(dtype=torch.float32)), "note_loss")


@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
def test_a_torch_lr_scheduler_falls_back_with_one_warning():
    def with_scheduler() -> lk.TrainState:
        model = mlp(dtype=torch.float32)
        optimizer = adamw(model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
        return lk.TrainState.create(
            model, optimizer=optimizer, schedule=scheduler, strategy=lk.SingleDevice("cpu")
        )

    run_fallback(chain_of(mean_loss, 1), with_scheduler, "schedule=StepLR")


class Breaks(torch.nn.Module):
    """A model torch.compile cannot capture whole: it asks for a graph break."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = mlp(dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return self.inner(x)


@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
def test_a_model_torch_cannot_capture_falls_back_with_one_warning():
    run_fallback(chain_of(mean_loss, 1), lambda: new_state(Breaks()), "graph_break")


class NotSingleDevice(lk.SingleDevice):
    """Stands in for DDP/FSDP (which need a process group): a strategy compile_step refuses."""

    def __repr__(self) -> str:
        return "NotSingleDevice()"


@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
def test_the_warning_names_the_strategy_not_the_guard_fit_adds_for_it():
    # fit(compile=True) under DDP/FSDP steps chain(..., zero_nonfinite(), optimizer_step()):
    # the guard is there because of the strategy, so the strategy is the cause to name.
    step = lk.chain(
        lk.forward(mean_loss), lk.accumulate(1), lk.zero_nonfinite(), lk.optimizer_step()
    )

    def state_of() -> lk.TrainState:
        return lk.TrainState.create(
            mlp(dtype=torch.float32), optimizer=adamw, strategy=NotSingleDevice("cpu")
        )

    run_fallback(step, state_of, "strategy=NotSingleDevice(): only SingleDevice steps")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = lk.compile_step(step)
        compiled(state_of(), mlp_batches(1)[0])
    assert not any("zero_nonfinite" in str(w.message) for w in record)


def test_import_loopkit_does_not_import_the_compiler():
    """torch._dynamo (~1 s to import, and torch's compiler state) loads with compile_step."""
    code = (
        "import sys, loopkit as lk\n"
        "assert 'torch._dynamo' not in sys.modules, 'import loopkit imported torch._dynamo'\n"
        "lk.compile_step(lk.chain(lk.forward(lambda m, b: m(b).sum()), lk.accumulate(1),"
        " lk.optimizer_step()))\n"
        "assert 'torch._dynamo' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_bad_steps_are_refused_when_built():
    with pytest.raises(TypeError, match="compile_step\\(step=42\\)"):
        lk.compile_step(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="never closes a gradient window"):
        lk.compile_step(lk.chain(lk.forward(mean_loss), lk.optimizer_step()))
    assert repr(lk.compile_step(chain_of(mean_loss, 1))).startswith("compile_step(chain(forward(")


@pytest.mark.slow
def test_fit_with_compile_matches_eager_fit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    kwargs = dict(
        loss_fn=mean_loss,
        optimizer=adamw,
        batch_size=16,
        clip=0.5,
        epochs=2,
        progress=False,
        schedule=lk.schedules.cosine(2, 10),
        shuffle=False,
        strategy=lk.SingleDevice("cpu"),
    )
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    eager = lk.fit(mlp(d_hidden=16, dtype=torch.float32), data, **kwargs)
    assert stats["unique_graphs"] == graphs
    compiled = lk.fit(mlp(d_hidden=16, dtype=torch.float32), data, compile=True, **kwargs)
    assert stats["unique_graphs"] == graphs + 2  # the micro-batch graph and the update graph
    assert compiled.state.step == eager.state.step == 6
    assert_same_training(eager.state, compiled.state)
