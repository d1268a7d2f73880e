"""compile_step at its edges: dropout, resume, a sweep of compiled steps in one process, a
param group added mid-run, an average after the step, torch failing or switched off.

Same tolerance as tests/test_compile_step.py (`rtol=1e-5, atol=1e-6`, float32): inductor's
fused kernels add in another order. A different dropout mask moves the weights by ~1e-2.
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from helpers import mlp

import loopkit as lk
from loopkit.compiled import CompiledStep, CompileFallbackWarning

RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.filterwarnings("error::loopkit.compiled.CompileFallbackWarning")


def mean_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def run(step: lk.Transform, state: lk.TrainState, data: list[Any]) -> lk.TrainState:
    for batch in data:
        state = step(state, batch)
    return state


def assert_params_close(eager: lk.TrainState, compiled: lk.TrainState) -> None:
    for p, q in zip(eager.params, compiled.params, strict=True):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)


# The AdamW runs below share their shapes, constants and so their compiled graphs (inductor's
# cache): 16 x 4 batches, an MLP with Dropout(0.3), accumulate 2, clip 0.5.
STEP = lk.chain(lk.forward(mean_loss), lk.accumulate(2), lk.clip(0.5), lk.optimizer_step())


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def dropout_mlp() -> torch.nn.Module:
    return mlp(d_hidden=16, dropout=0.3, dtype=torch.float32)


def fit_setup(**changes: Any) -> tuple[Any, dict[str, Any]]:
    """fit's data (2 batches of 16 per epoch) and keyword arguments, as STEP trains."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    kwargs: dict[str, Any] = dict(
        loss_fn=mean_loss,
        optimizer=adamw,
        batch_size=16,
        accumulate=2,
        clip=0.5,
        max_steps=4,
        progress=False,
        log_every=None,
        strategy=lk.SingleDevice("cpu"),
    )
    return data, {**kwargs, **changes}


@pytest.mark.slow
def test_dropout_draws_the_eager_steps_numbers():
    # Inductor's own random ops draw other numbers than eager's from the same seed: the
    # compiled step would train with other dropout masks (weights ~1e-2 apart after 3
    # steps), silently. compile_step has inductor call torch's random ops (fallback_random).
    def state() -> lk.TrainState:
        return lk.TrainState.create(dropout_mlp(), optimizer=adamw, strategy=lk.SingleDevice("cpu"))

    data = batches(6)
    eager = run(STEP, state(), data)
    compiled = run(lk.compile_step(STEP), state(), data)
    assert compiled.step == eager.step == 3
    assert_params_close(eager, compiled)


def sgd_state(momentum: float) -> lk.TrainState:
    """SGD with momentum over two param groups, the first holding a frozen bias."""
    model = mlp(d_hidden=16, dtype=torch.float32)
    first, last = model.get_submodule("0"), model.get_submodule("3")
    first.bias.requires_grad_(False)
    groups: list[dict[str, Any]] = [
        {"params": [first.weight, first.bias]},
        {"params": list(last.parameters()), "lr": 0.05},
    ]
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=momentum)
    return lk.TrainState.create(model, optimizer=optimizer, strategy=lk.SingleDevice("cpu"))


SGD_STEP = lk.chain(lk.forward(mean_loss), lk.accumulate(1), lk.optimizer_step())


@pytest.mark.slow
def test_a_sweep_compiles_each_step_as_the_first():
    # torch remembers which floats changed between compiles per code *name*. Two
    # compile_steps sharing one name: the second (momentum 0.5 after 0.9) was traced with
    # momentum dynamic, traced twice, and with cold caches torch failed while retracing
    # (SpeculationLogDivergence for this very optimizer). Each compiled step now traces
    # as if it were the process's first.
    step = SGD_STEP
    data = batches(3)
    captured = []
    for momentum in (0.9, 0.5):
        state = functools.partial(sgd_state, momentum)
        stats = torch._dynamo.utils.counters["stats"]
        before = stats["calls_captured"]
        compiled_step = lk.compile_step(step)
        compiled = run(compiled_step, state(), data)
        captured.append(stats["calls_captured"] - before)
        assert_params_close(run(step, state(), data), compiled)
        frozen = compiled.params[1]
        assert not frozen.requires_grad and torch.equal(frozen, state().params[1])  # untouched
    assert captured[1] == captured[0], captured


def torch_fails_while_tracing(fn: Any, **options: Any) -> Any:
    """torch.compile whose compiled function raises torch's own tracing failure, before it runs.

    SpeculationLogDivergence (an AssertionError, not a TorchDynamoException) is what torch
    2.13 raised for the sweep above: its bug, raised while tracing, before anything ran.
    """

    from torch._dynamo.symbolic_convert import SpeculationLogDivergence

    def compiled(*args: Any, **kwargs: Any) -> Any:
        raise SpeculationLogDivergence("SpeculationLog diverged at index 270 (log had 285 entries)")

    return compiled


# The fallback tests: no dropout, no clip; eager and compiled from the same start.
PLAIN_STEP = lk.chain(lk.forward(mean_loss), lk.accumulate(2), lk.optimizer_step())


def plain_state() -> lk.TrainState:
    return lk.TrainState.create(
        mlp(dtype=torch.float32), optimizer=adamw, strategy=lk.SingleDevice("cpu")
    )


@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
def test_a_failure_inside_torchs_tracer_falls_back_with_one_warning(monkeypatch):
    step, state = PLAIN_STEP, plain_state
    data = batches(4)
    eager = run(step, state(), data)
    compiled_step = lk.compile_step(step)
    assert isinstance(compiled_step, CompiledStep)
    monkeypatch.setattr(torch, "compile", torch_fails_while_tracing)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = run(compiled_step, state(), data)
    ours = [str(w.message) for w in record if issubclass(w.category, CompileFallbackWarning)]
    assert len(ours) == 1 and "SpeculationLog" in ours[0], ours
    assert compiled.step == eager.step == 2
    for p, q in zip(eager.params, compiled.params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
def test_the_recompile_limit_is_named_when_it_ends_compiling():
    # With fullgraph=True torch raises "Hard failure due to fullgraph=True" when a graph
    # would recompile past torch._dynamo.config.recompile_limit; the cause it chains is
    # the part that names the limit. The sweep's step and first batch shape (its graphs);
    # the second shape would compile the micro-batch graph a second time.
    step = SGD_STEP
    first, (x, y) = batches(2)
    data = [first, (x[:12], y[:12])]
    state = functools.partial(sgd_state, 0.9)
    eager = run(step, state(), data)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch._dynamo.config.patch(recompile_limit=1):
            compiled = run(lk.compile_step(step), state(), data)
    ours = [str(w.message) for w in record if issubclass(w.category, CompileFallbackWarning)]
    assert len(ours) == 1 and "recompile limit" in ours[0], ours
    assert_params_close(eager, compiled)


def saved_param_groups(step_dir: Any) -> list[dict[str, Any]]:
    """The optimizer's param groups as a checkpoint's state.json holds them."""
    return json.loads((step_dir / "state.json").read_text())["tree"]["optimizer"]["param_groups"]


@pytest.mark.slow
def test_fit_with_compile_and_dropout_resumes_as_it_runs_and_as_eager(tmp_path):
    data, kwargs = fit_setup(schedule=lk.schedules.cosine(1, 4))
    model = dropout_mlp
    eager = lk.fit(model(), data, **kwargs)
    whole = lk.fit(model(), data, compile=True, **kwargs)
    saved = dict(checkpoint_dir=tmp_path / "ck", save_every=2)
    lk.fit(model(), data, compile=True, **saved, **{**kwargs, "max_steps": 2})
    # What the update graph ran with (lr as a tensor, capturable, foreach) is not saved.
    (group,) = saved_param_groups(tmp_path / "ck" / "step-00000002")
    assert type(group["lr"]) is float and group["lr"] == 1e-2 * kwargs["schedule"](1)
    assert group["capturable"] is False and group["foreach"] is None
    resumed = lk.fit(model(), data, compile=True, resume=True, **saved, **kwargs)
    assert resumed.state.step == whole.state.step == eager.state.step == 4
    for p, q in zip(whole.state.params, resumed.state.params, strict=True):
        assert torch.equal(p, q)
    assert_params_close(eager.state, whole.state)


@pytest.mark.slow
def test_a_param_group_added_mid_run_trains_as_eager():
    # Unfreezing layers as training goes (optimizer.add_param_group): the compiled update
    # indexed its per-group settings by the new group (IndexError), and left the new
    # group's gradients to pile up across steps where eager's zero_grad drops them.
    step = lk.chain(lk.forward(mean_loss), lk.accumulate(1), lk.clip(0.5), lk.optimizer_step())

    def state() -> lk.TrainState:
        model = mlp(d_hidden=16, dtype=torch.float32)
        first, last = model.get_submodule("0"), model.get_submodule("3")
        first.requires_grad_(False)
        optimizer = torch.optim.SGD(last.parameters(), lr=0.1)
        return lk.TrainState.create(model, optimizer=optimizer, strategy=lk.SingleDevice("cpu"))

    def unfreeze_at_step_1(step: lk.Transform) -> lk.TrainState:
        current = state()
        for batch in batches(4):
            if current.step == 1:
                first = current.model.get_submodule("0")
                first.requires_grad_(True)
                current.optimizer.add_param_group({"params": first.parameters(), "lr": 0.05})
            current = step(current, batch)
        return current

    # Both steps say that the added group is out of the clip, the normalisation and the lr
    # schedule (the record's params and base_lrs are fixed when it is made).
    with pytest.warns(UserWarning, match="param groups, the TrainState was made with 1"):
        eager = unfreeze_at_step_1(step)
    with pytest.warns(UserWarning, match="param groups, the TrainState was made with 1"):
        compiled = unfreeze_at_step_1(lk.compile_step(step))
    first_weight = eager.model.get_submodule("0").weight
    assert not torch.equal(first_weight, state().model.get_submodule("0").weight)  # trained
    for p, q in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)


def compiler_disabled() -> Any:
    return torch._dynamo.config.patch(disable=True)  # what TORCHDYNAMO_DISABLE=1 sets


def stance_force_eager() -> Any:
    return torch.compiler.set_stance("force_eager")


@pytest.mark.filterwarnings("default::loopkit.compiled.CompileFallbackWarning")
@pytest.mark.parametrize(
    ("off", "named"),
    [
        (compiler_disabled, "torch._dynamo.config.disable"),
        (stance_force_eager, "set_stance('force_eager')"),
    ],
    ids=["config-disable", "stance-force_eager"],
)
def test_a_compiler_switched_off_runs_the_step_eagerly_with_one_warning(off, named):
    # Uncompiled, the update called AdamW with capturable=True on CPU (AdamW refuses), and
    # with torch._dynamo.config.disable fullgraph=True raised after the micro-batch ran.
    step, state = PLAIN_STEP, plain_state
    data = batches(4)
    eager = run(step, state(), data)
    compiled_step = lk.compile_step(step)
    assert isinstance(compiled_step, CompiledStep)
    with warnings.catch_warnings(record=True) as record, off():
        warnings.simplefilter("always")
        compiled = run(compiled_step, state(), data)
    ours = [str(w.message) for w in record if issubclass(w.category, CompileFallbackWarning)]
    assert len(ours) == 1 and named in ours[0], ours
    assert compiled_step.graphs_compiled == 0 and compiled.step == eager.step == 2
    for p, q in zip(eager.params, compiled.params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_fit_with_compile_and_an_average_compiles_the_step_and_averages_as_eager():
    # fit(average=ema(...)) puts the average after optimizer_step; compile_step ran such a
    # chain wholly eagerly (warning that ema "may run anything on the host"). The parts
    # after optimizer_step now run eagerly after the graphs, as the eager chain runs them.
    data, kwargs = fit_setup(average=lk.ema(0.5))
    eager = lk.fit(dropout_mlp(), data, **kwargs)
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    compiled = lk.fit(dropout_mlp(), data, compile=True, **kwargs)
    assert stats["unique_graphs"] > graphs  # compiled, and no fallback warning (an error here)
    assert_params_close(eager.state, compiled.state)
    a, b = eager.state.averages["ema"], compiled.state.averages["ema"]
    assert a.count == b.count == 4
    for p, q in zip(a.tensors, b.tensors, strict=True):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_a_fused_optimizer_is_compiled_through_its_foreach_path():
    # A fused kernel is opaque to torch.compile: AdamW(fused=True) made the whole step fall
    # back to eager ("Skip calling torch.compiler.disable()d function"). The update graph
    # now runs the foreach implementation (inductor fuses it); the group stays fused after.
    def state() -> lk.TrainState:
        model = mlp(d_hidden=16, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        return lk.TrainState.create(model, optimizer=optimizer, strategy=lk.SingleDevice("cpu"))

    eager = run(STEP, state(), batches(8))
    compiled = run(lk.compile_step(STEP), state(), batches(8))  # a fallback warning: an error
    assert_params_close(eager, compiled)
    group = compiled.optimizer.param_groups[0]
    assert group["fused"] is True and not group["capturable"] and group["foreach"] is None
