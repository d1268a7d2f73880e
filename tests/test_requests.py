"""fit() honours a callback's Request(log / evaluate / save / end_epoch) right then."""

from __future__ import annotations

import pytest
import torch
from helpers import mlp

import loopkit as lk
from loopkit.callbacks import Request, dispatch
from loopkit.checkpoint import list_checkpoints


def dataset(n: int = 32, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def loss_fn(model, batch):
    return lk.cross_entropy(model(batch[0]), batch[1])


BASE = dict(
    loss_fn=loss_fn,
    optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    batch_size=8,
    progress=False,
    shuffle=False,
)


class Asks:
    """Returns the given Request at the given (hook, step)s and records events."""

    def __init__(self, asks: dict[tuple[str, int], Request]) -> None:
        self.asks = asks
        self.events: list[tuple[str, int]] = []

    def on_step_end(self, state):
        self.events.append(("on_step_end", state.step))
        return self.asks.get(("on_step_end", state.step))

    def on_epoch_end(self, state):
        self.events.append(("on_epoch_end", state.step))
        return self.asks.get(("on_epoch_end", state.step))

    def on_log(self, state, metrics):
        self.events.append(("on_log", state.step))

    def on_eval_end(self, state, metrics):
        self.events.append(("on_eval_end", state.step))

    def on_checkpoint_saved(self, state, path):
        self.events.append(("on_checkpoint_saved", state.step))


def test_requests_from_step_and_epoch_end_run_in_fits_order(tmp_path):
    asks = Asks(
        {
            ("on_step_end", 2): Request(save=True, evaluate=True, log=True),
            ("on_epoch_end", 4): Request(log=True, save=True),
        }
    )
    result = lk.fit(
        mlp(),
        dataset(),
        epochs=2,
        log_every=None,
        eval_data=dataset(8, 1),
        eval_every=100,
        checkpoint_dir=tmp_path,
        callbacks=[asks],
        **BASE,
    )
    requested = [e for e in asks.events if e[0] != "on_step_end"]
    assert requested == [
        ("on_log", 2),
        ("on_eval_end", 2),
        ("on_checkpoint_saved", 2),
        ("on_epoch_end", 4),
        ("on_log", 4),
        ("on_checkpoint_saved", 4),
        ("on_epoch_end", 8),
        ("on_eval_end", 8),  # fit's own final evaluation
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000002"]
    assert [row["step"] for row in result.history if "train/loss" in row] == [2, 4]


def test_a_request_adds_to_fits_schedule_and_several_merge(tmp_path):
    asks = [
        Asks({("on_step_end", 3): Request(save=True)}),
        Asks({("on_step_end", 3): Request(save=True)}),
    ]
    lk.fit(
        mlp(), dataset(), max_steps=4, checkpoint_dir=tmp_path, save_every=2, callbacks=asks, **BASE
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000004",
        "step-00000003",
        "step-00000002",
    ]
    assert [e for e in asks[0].events if e[0] == "on_checkpoint_saved"] == [
        ("on_checkpoint_saved", 2),
        ("on_checkpoint_saved", 3),
        ("on_checkpoint_saved", 4),
    ]


def test_end_epoch_ends_the_epoch_after_that_step():
    asks = Asks({("on_step_end", 1): Request(end_epoch=True)})
    result = lk.fit(mlp(), dataset(), epochs=2, log_every=None, callbacks=[asks], **BASE)
    assert [e for e in asks.events if e[0] == "on_epoch_end"] == [
        ("on_epoch_end", 1),
        ("on_epoch_end", 5),
    ]
    assert result.state.epoch == 2 and result.state.step == 1 + 4


@pytest.mark.parametrize(
    ("request_", "fit_kwargs", "match"),
    [
        (Request(evaluate=True), {}, r"Request\(evaluate=True\).*eval_data"),
        (Request(save=True), {}, r"Request\(save=True\).*checkpoint_dir"),
    ],
)
def test_a_request_fit_cannot_serve_fails_clearly(request_, fit_kwargs, match):
    with pytest.raises(ValueError, match=match):
        lk.fit(
            mlp(),
            dataset(),
            max_steps=2,
            callbacks=[Asks({("on_step_end", 1): request_})],
            **fit_kwargs,
            **BASE,
        )


def test_a_request_from_another_hook_is_a_type_error():
    class LogAsks:
        def on_log(self, state, metrics):
            return Request(save=True)

    with pytest.raises(
        TypeError, match=r"LogAsks\.on_log returned Request.*on_step_end and on_epoch_end"
    ):
        lk.fit(mlp(), dataset(), max_steps=2, log_every=1, callbacks=[LogAsks()], **BASE)
    # dispatch without a requests list (a user's own loop) refuses them too
    with pytest.raises(TypeError, match="returned Request"):
        dispatch(
            [Asks({("on_step_end", 0): Request(log=True)})],
            "on_step_end",
            type("S", (), {"step": 0})(),
        )


def test_request_fields_are_bools_and_merge_with_or():
    assert Request(save=True) | Request(log=True) == Request(log=True, save=True)
    with pytest.raises(TypeError, match=r"Request\(save=1\)"):
        Request(save=1)  # type: ignore[arg-type]


def test_log_every_none_logs_only_on_request():
    result = lk.fit(mlp(), dataset(), max_steps=4, log_every=None, **BASE)
    assert not [row for row in result.history if "train/loss" in row]
