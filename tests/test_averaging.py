"""Weight averages (lk.ema, lk.swa): against a float64 oracle, resumed exactly, used by eval.

The oracle is a hand-written float64 loop (SGD with momentum, one batch per step) whose
weights after each step feed a hand-written average: ema `a = d * a + (1 - d) * w` (the
first update copies), swa the plain mean of the weights taken. Steps taken: s >= max(start,
1) with (s - start) % every == 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F  # noqa: N812
from helpers import mlp, prefixed

import loopkit as lk
from loopkit.averaging import average_kind_of, averaged_weights

STEPS = 7


def batches(n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(n)
    ]


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.3, momentum=0.9)


def fresh(seed: int = 0) -> lk.TrainState:
    return lk.TrainState.create(mlp(seed=seed), optimizer=sgd, strategy=lk.SingleDevice("cpu"))


def reference_weights(data: list[Any]) -> list[list[torch.Tensor]]:
    """The weights after each step 1..n of a hand-written float64 loop."""
    model = mlp(seed=0)
    optimizer = sgd(model.parameters())
    out = []
    for batch in data:
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def taken(step: int, start: int, every: int) -> bool:
    return step >= max(start, 1) and (step - start) % every == 0


def reference_ema(
    weights: list[list[torch.Tensor]], decay: float, start: int, every: int
) -> list[torch.Tensor]:
    average: list[torch.Tensor] | None = None
    for step, w in enumerate(weights, start=1):
        if not taken(step, start, every):
            continue
        if average is None:
            average = [t.clone() for t in w]
        else:
            average = [decay * a + (1 - decay) * t for a, t in zip(average, w, strict=True)]
    assert average is not None
    return average


def reference_swa(weights: list[list[torch.Tensor]], start: int, every: int) -> list[torch.Tensor]:
    chosen = [w for step, w in enumerate(weights, start=1) if taken(step, start, every)]
    return [sum(ts) / len(chosen) for ts in zip(*chosen, strict=True)]  # type: ignore[misc]


def assert_tensors(actual: Any, expected: Any, *, exact: bool = False) -> None:
    rtol, atol = (0.0, 0.0) if exact else (1e-12, 1e-13)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=prefixed(f"tensor {i}"))


@pytest.mark.parametrize(
    ("decay", "start", "every"),
    [(0.9, 0, 1), (0.5, 3, 2), (0.99, 1, 3)],
    ids=lambda v: str(v),
)
def test_ema_and_swa_equal_a_float64_average_of_the_reference_weights(
    decay: float, start: int, every: int
) -> None:
    data = batches()
    step = lk.chain(
        lk.forward(loss_fn),
        lk.accumulate(1),
        lk.optimizer_step(),
        lk.ema(decay, start=start, every=every),
        lk.swa(start=start, every=every),
    )
    state = fresh()
    for batch in data:
        state = step(state, batch)
    weights = reference_weights(data)
    assert_tensors(state.params, weights[-1])  # the training itself matches the oracle
    expected_count = sum(taken(s, start, every) for s in range(1, STEPS + 1))
    assert state.averages["ema"].count == state.averages["swa"].count == expected_count
    assert_tensors(state.averages["ema"].tensors, reference_ema(weights, decay, start, every))
    assert_tensors(state.averages["swa"].tensors, reference_swa(weights, start, every))


def test_an_accumulation_window_updates_the_average_once_per_optimizer_step() -> None:
    """Three micro-batches per step: the average takes each step's weights once."""
    seen: list[list[torch.Tensor]] = []

    def record(state: lk.TrainState, batch: Any) -> lk.TrainState:
        if state.micro_step == 0 and state.step > len(seen):
            seen.append([p.detach().clone() for p in state.params])
        return state

    step = lk.chain(
        lk.forward(loss_fn), lk.accumulate(3), lk.optimizer_step(), record, lk.ema(0.8, every=2)
    )
    state = fresh()
    for batch in batches(12):
        state = step(state, batch)
    assert state.step == 4 and len(seen) == 4
    assert state.averages["ema"].count == 2
    assert_tensors(state.averages["ema"].tensors, reference_ema(seen, 0.8, 0, 2))


def trained(decay: float = 0.7) -> lk.TrainState:
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step(), lk.ema(decay))
    state = fresh()
    for batch in batches(4):
        state = step(state, batch)
    return state


def test_evaluate_with_the_ema_uses_it_and_restores_the_weights_bitwise() -> None:
    state = trained()
    before = [p.detach().clone() for p in state.params]
    data = batches(3, seed=9)
    with_ema = lk.evaluate(state, data, loss_fn=loss_fn, weights="ema")
    assert_tensors(state.params, before, exact=True)
    # The oracle: a plain model holding the averaged weights.
    model = mlp(seed=0)
    with torch.no_grad():
        for p, a in zip(model.parameters(), state.averages["ema"].tensors, strict=True):
            p.copy_(a)
    expected = float(sum(loss_fn(model, b).item() * 6 for b in data) / 18)
    assert with_ema["eval/loss"] == pytest.approx(expected, rel=1e-12)
    assert lk.evaluate(state, data, loss_fn=loss_fn)["eval/loss"] != with_ema["eval/loss"]
    # An error inside the block restores the weights too.
    with pytest.raises(RuntimeError, match="boom"), averaged_weights(state, "ema"):
        raise RuntimeError("boom")
    assert_tensors(state.params, before, exact=True)


def test_evaluate_refuses_weights_it_cannot_use() -> None:
    state = trained()
    with pytest.raises(ValueError, match=r"evaluate\(weights='swa'\): the record holds no 'swa'"):
        lk.evaluate(state, batches(1), loss_fn=loss_fn, weights="swa")
    with pytest.raises(ValueError, match=r"evaluate\(weights='best'\): must be 'model', 'ema'"):
        lk.evaluate(state, batches(1), loss_fn=loss_fn, weights="best")  # type: ignore[arg-type]


def test_a_consumed_record_cannot_lend_its_average() -> None:
    state = trained()
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step(), lk.ema(0.7))
    step(state, batches(1)[0])  # consumes `state`: its average has moved on in place
    with pytest.raises(lk.StaleStateError, match=r"consumed by forward\(loss_fn\)"):
        lk.evaluate(state, batches(1), loss_fn=loss_fn, weights="ema")
    with pytest.raises(lk.StaleStateError), averaged_weights(state, "ema"):
        pass


def test_save_model_writes_the_averaged_weights(tmp_path: Path) -> None:
    state = trained()
    path = lk.save_model(state, tmp_path / "ema", weights="ema")
    saved = safetensors.torch.load_file(path)
    names = [name for name, _ in state.model.named_parameters()]
    assert_tensors([saved[n] for n in names], state.averages["ema"].tensors, exact=True)
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["weights"] == "ema"
    plain = safetensors.torch.load_file(lk.save_model(state, tmp_path / "model"))
    assert not torch.equal(plain[names[0]], saved[names[0]])
    assert_tensors([plain[n] for n in names], state.params, exact=True)
    with pytest.raises(TypeError, match="pass the state"):
        lk.save_model(state.model, tmp_path / "x", weights="ema")


def test_save_model_before_the_first_update_writes_and_records_the_models_weights(
    tmp_path: Path,
) -> None:
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step(), lk.swa(start=9))
    state = fresh()
    for batch in batches(3):  # before step 9: the average holds no update yet
        state = step(state, batch)
    saved = safetensors.torch.load_file(lk.save_model(state, tmp_path / "swa", weights="swa"))
    names = [name for name, _ in state.model.named_parameters()]
    assert_tensors([saved[n] for n in names], state.params, exact=True)
    assert "weights" not in json.loads((tmp_path / "swa" / "config.json").read_text())


def test_snapshot_copies_the_average_and_checkpoints_keep_it(tmp_path: Path) -> None:
    state = trained()
    copy = state.snapshot()
    assert copy.averages["ema"].tensors[0] is not state.averages["ema"].tensors[0]
    kept = [t.clone() for t in copy.averages["ema"].tensors]
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step(), lk.ema(0.7))
    state = step(state, batches(1)[0])
    assert_tensors(copy.averages["ema"].tensors, kept, exact=True)  # the copy is independent
    path = lk.save_checkpoint(copy, tmp_path)
    loaded = lk.load_checkpoint(path, fresh(seed=3))
    assert (loaded.averages["ema"].count, loaded.averages["ema"].updated_at) == (4, 4)
    assert_tensors(loaded.averages["ema"].tensors, kept, exact=True)
    # A checkpoint without an average loads without one (and drops the state's).
    plain = lk.save_checkpoint(fresh(), tmp_path / "plain")
    assert dict(lk.load_checkpoint(plain, trained()).averages) == {}


def dataset(n: int = 40) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def run_fit(root: Path, max_steps: int, resume: bool, **options: Any) -> lk.FitResult:
    """fit on a shuffled dataset (its position resumes exactly), saving every 3 steps."""
    return lk.fit(
        mlp(seed=0),
        dataset(),
        loss_fn=loss_fn,
        optimizer=sgd,
        batch_size=4,
        max_steps=max_steps,
        epochs=None,
        checkpoint_dir=root,
        save_every=3,
        resume=resume,
        progress=False,
        log_every=None,
        **options,
    )


@pytest.mark.parametrize(
    "average", [lk.ema(0.8, start=2), lk.swa(start=2, every=2)], ids=["ema", "swa"]
)
def test_fit_resumed_mid_run_ends_with_the_same_average_bitwise(
    tmp_path: Path, average: Any
) -> None:
    kind = str(average_kind_of(average))
    whole = run_fit(tmp_path / "whole", 8, False, average=average).state
    # Interrupted after step 4, saved at step 3: resumes mid-epoch, between two swa updates.
    run_fit(tmp_path / "cut", 4, False, average=average)
    resumed = run_fit(tmp_path / "cut", 8, True, average=average).state
    assert resumed.averages[kind].count == whole.averages[kind].count > 0
    assert_tensors(resumed.averages[kind].tensors, whole.averages[kind].tensors, exact=True)
    assert_tensors(resumed.params, whole.params, exact=True)


def test_resuming_an_average_without_average_says_it_is_not_updated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_fit(tmp_path, 3, False, average=lk.ema(0.8))
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        state = run_fit(tmp_path, 5, True).state  # no average=: the ema stays as saved
    assert state.averages["ema"].updated_at == 3
    (message,) = [r.getMessage() for r in caplog.records if "does not update" in r.getMessage()]
    assert "'ema' average (3 updates, the last at step 3)" in message
    assert "average=loopkit.ema(...)" in message


def test_fit_evaluates_with_the_average_it_keeps(tmp_path: Path) -> None:
    result = lk.fit(
        mlp(seed=0),
        batches(6),
        loss_fn=loss_fn,
        optimizer=sgd,
        batch_size=None,
        eval_data=batches(2, seed=5),
        eval_batch_size=None,
        average=lk.ema(0.6),
        eval_weights="ema",
        progress=False,
        log_every=None,
    )
    state = result.state
    last = [row for row in result.history if "eval/loss" in row][-1]
    ema_loss = lk.evaluate(state, batches(2, seed=5), loss_fn=loss_fn, weights="ema")
    assert last["eval/loss"] == ema_loss["eval/loss"]
    assert last["eval/loss"] != lk.evaluate(state, batches(2, seed=5), loss_fn=loss_fn)["eval/loss"]
    assert state.averages["ema"].count == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eval_weights": "ema"}, r"eval_weights='ema'\): average=None, so there is no 'ema'"),
        (
            {"eval_weights": "swa", "average": lk.ema(0.9)},
            r"eval_weights='swa'\): average=ema\(0.9, start=0, every=1\)",
        ),
        ({"eval_weights": "best"}, r"eval_weights='best'\): must be 'model', 'ema' or 'swa'"),
        ({"average": "ema"}, r"average='ema'\): must be None, loopkit.ema"),
        (
            {"average": lk.ema(0.9), "step": lk.chain(lk.forward(loss_fn), lk.optimizer_step())},
            r"fit appends the average to its own step only",
        ),
        (
            {
                "eval_weights": "ema",
                "loss_fn": None,
                "step": lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step()),
            },
            r"eval_weights='ema'\): the step chain keeps no average",
        ),
    ],
    ids=["no-average", "other-kind", "bad-weights", "not-a-transform", "with-step", "step-lacks"],
)
def test_fit_refuses_averaging_settings_that_cannot_work(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        lk.fit(
            mlp(),
            batches(2),
            **{"loss_fn": loss_fn, "optimizer": sgd, "batch_size": None, **options},
        )


def test_a_custom_step_with_the_average_may_evaluate_with_it() -> None:
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step(), lk.swa(start=1))
    result = lk.fit(
        mlp(),
        batches(3),
        step=step,
        optimizer=sgd,
        batch_size=None,
        loss_fn=loss_fn,
        eval_data=batches(1, seed=4),
        eval_batch_size=None,
        eval_weights="swa",
        progress=False,
    )
    assert result.state.averages["swa"].count == 3


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: lk.ema(1.0), ValueError, r"ema\(decay=1.0\): must be a float in \(0, 1\)"),
        (lambda: lk.ema(True), TypeError, r"ema\(decay=True\): expected a float"),
        (lambda: lk.ema(0.9, start=-1), ValueError, r"ema\(start=-1\): must be an int >= 0"),
        (lambda: lk.swa(start=0, every=0), ValueError, r"swa\(every=0\): must be an int >= 1"),
    ],
    ids=["decay-1", "decay-bool", "start", "every"],
)
def test_factories_refuse_bad_settings(build: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        build()


def test_transforms_print_like_their_call() -> None:
    assert repr(lk.ema(0.999)) == "ema(0.999, start=0, every=1)"
    assert lk.swa(start=5) == lk.swa(start=5, every=1)
    assert repr(lk.swa(start=5, every=2)) == "swa(start=5, every=2)"
