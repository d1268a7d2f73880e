"""fit() as a newcomer from HF Trainer / Lightning might call it: configurations that cannot
train are refused (or, for an lr of 0, said aloud) instead of ending quietly with the
weights as they were.

- a run too short for one optimizer step (accumulate larger than the run's micro-batches);
- a loss that does not depend on the parameters the optimizer trains;
- an lr of 0 for the whole run, from the optimizer or the schedule (a warning: fit with
  SGD(lr=0) is also a way to evaluate through fit's loop).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

import loopkit as lk


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def dataset(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    )


def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
    return torch.nn.functional.mse_loss(m(batch[0]), batch[1])


def run(m: torch.nn.Module | None = None, **kwargs: Any) -> lk.FitResult:
    settings: dict[str, Any] = {
        "loss_fn": loss_fn,
        "optimizer": {"name": "SGD", "lr": 0.1},
        "batch_size": 16,
        "progress": False,
        **kwargs,
    }
    return lk.fit(m or model(), dataset(), **settings)


def weights(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def test_a_run_too_short_for_one_step_is_refused_before_any_work():
    """4 micro-batches in the one epoch, 10 per step: it used to end with 0 steps, no error."""
    m = model()
    before = weights(m)
    with pytest.raises(ValueError, match=r"fit\(accumulate=10, epochs=1\): the run reads 4 "):
        run(m, accumulate=10)
    with pytest.raises(ValueError, match="set max_steps=N instead"):
        run(m, accumulate=9, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(m)))
    assert run(m, accumulate=8, epochs=2).state.step == 1  # 8 micro-batches: one step


def test_data_without_a_batch_is_refused_before_any_work():
    """drop_last=True with fewer items than batch_size: no batch at all."""
    loader = torch.utils.data.DataLoader(dataset(8), batch_size=16, drop_last=True)
    seen = []

    class Watch(lk.Callback):
        def on_fit_start(self, state: Any, hparams: Any) -> None:
            seen.append(state.step)

    with pytest.raises(ValueError, match=r"fit\(train_data=\.\.\.\): the data has no batches"):
        lk.fit(model(), loader, loss_fn=loss_fn, optimizer={"name": "SGD", "lr": 0.1},
               progress=False, callbacks=[Watch()])  # fmt: skip
    assert seen == []  # refused before fit started


class Other(torch.nn.Module):
    """A model of its own, whose output a loss may use by mistake."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 1)


OTHER = Other()


@pytest.mark.parametrize(
    "bad_loss",
    [
        lambda m, batch: torch.tensor(1.0, requires_grad=True),
        lambda m, batch: torch.nn.functional.mse_loss(OTHER.head(batch[0]), batch[1]),
    ],
    ids=["a-constant", "another-models-output"],
)
def test_a_loss_that_does_not_depend_on_the_parameters_is_an_error(bad_loss):
    m = model()
    before = weights(m)
    with pytest.raises(ValueError, match=r"fit\(loss_fn=\.\.\.\): the first optimizer step's "):
        run(m, loss_fn=bad_loss, max_steps=5)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(m)))
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())  # none left behind


def test_the_gradient_probe_leaves_no_hook_and_a_normal_run_trains():
    m = model()
    before = weights(m)
    result = run(m, max_steps=3, accumulate=2)
    assert result.state.step == 3
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(m)))
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())


def test_a_run_that_fails_in_its_first_window_leaves_no_hook_on_the_model():
    def failing(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise RuntimeError("out of memory, say")

    m = model()
    with pytest.raises(RuntimeError, match="out of memory, say"):
        run(m, loss_fn=failing, max_steps=2)
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"optimizer": {"name": "AdamW", "lr": 0.0}}, "every parameter group's lr is 0"),
        ({"schedule": lambda step: 0.0}, "the lr factor is 0 at steps 0..3"),
        (
            {"schedule": lk.schedules.cosine(warmup_steps=10, total_steps=20), "max_steps": 1},
            "the lr factor is 0 at steps 0..0",
        ),
    ],
    ids=["optimizer-lr-0", "schedule-0", "warmup-longer-than-the-run"],
)
def test_an_lr_of_0_for_the_whole_run_is_said(caplog, settings, message):
    with caplog.at_level(logging.WARNING, logger="loopkit.fit"):
        run(**settings)
    said = [r.getMessage() for r in caplog.records if "changes no weight" in r.getMessage()]
    assert len(said) == 1 and message in said[0], said


def test_an_lr_that_is_0_only_at_some_steps_is_not_flagged(caplog):
    with caplog.at_level(logging.WARNING, logger="loopkit.fit"):
        run(schedule=lk.schedules.cosine(warmup_steps=2, total_steps=4), max_steps=3)
    assert not [r for r in caplog.records if "changes no weight" in r.getMessage()]


def test_micro_batches_left_in_an_open_window_at_the_end_are_said(caplog):
    """80 samples in batches of 16, accumulate=2: the fifth micro-batch's gradients are
    never applied. That used to pass without a word (HF would take a short last step)."""
    caplog.set_level(logging.WARNING, logger="loopkit.fit")
    result = lk.fit(
        model(),
        dataset(80),
        loss_fn=loss_fn,
        optimizer={"name": "SGD", "lr": 0.1},
        batch_size=16,
        accumulate=2,
        progress=False,
    )
    assert result.state.step == 2 and result.state.micro_step == 1
    said = [r.getMessage() for r in caplog.records if "open gradient window" in r.getMessage()]
    assert said == [
        "fit: the run ended with 1 micro-batch(es) in an open gradient window (accumulate=2): "
        "their gradients were never applied, so that data was not trained on. Make the run's "
        "micro-batches a multiple of 2 (batch_size, drop_last, epochs) or end it by max_steps."
    ]
    caplog.clear()
    run(accumulate=2)  # 64 samples: 4 micro-batches, 2 whole windows
    assert not [r for r in caplog.records if "open gradient window" in r.getMessage()]
