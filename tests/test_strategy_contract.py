"""The Strategy contract: a strategy written from the protocol alone trains like SingleDevice.

`HandWritten` below uses nothing of loopkit but the protocol's member list (no shared
helper): if loopkit looked up an undeclared member, or relied on a built-in strategy's
internals, it would fail here.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

import loopkit as lk
from loopkit.strategies import STRATEGY_MEMBERS


class HandWritten:
    """One CPU process: the Strategy protocol implemented by hand."""

    device = torch.device("cpu")
    rank = 0
    world_size = 1
    dp_rank = 0
    dp_world_size = 1
    is_main = True
    is_sharded = False
    timeout_s = None

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def setup(self, model: Any, optimizer: Any, precision: Any) -> tuple[Any, Any]:
        self._count("setup")
        if isinstance(optimizer, torch.optim.Optimizer):
            return model, optimizer
        return model, optimizer([p for p in model.parameters() if p.requires_grad])

    def to_device(self, batch: Any) -> Any:
        self._count("to_device")
        return batch

    def forward_backward(
        self,
        model: Any,
        batch: Any,
        loss_fn: Any,
        *,
        precision: Any,
        n_samples: int,
        ref_count: Any,
        sync: bool,
        loss_scale: Any,
        check_count: bool,
    ) -> tuple[torch.Tensor, Any, Any]:
        self._count("forward_backward")
        out = loss_fn(model, batch)
        if isinstance(out, lk.Loss):
            total, count = out
        else:
            total, count = out * n_samples, n_samples
        ref = count if ref_count is None else ref_count
        loss = total / ref
        (loss if loss_scale is None else loss * loss_scale).backward()
        return loss.detach(), count, ref

    def gradient_sync(self, model: Any, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def backward(self, model: Any, loss: torch.Tensor, *, sync: bool) -> None:
        loss.backward()

    def reduce_count(self, count: Any) -> Any:
        return count

    def reduce_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        self._count("reduce_metrics")
        return dict(metrics)

    def clip_grad_norm_(self, params: Sequence[Any], max_norm: float, norm_type: float) -> Any:
        self._count("clip_grad_norm_")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def eval_forward(
        self,
        model: Any,
        batch: Any,
        loss_fn: Any,
        predict: Any,
        *,
        n_samples: int,
        want_outputs: bool,
        sum_dtype: torch.dtype,
    ) -> tuple[Any, Any]:
        self._count("eval_forward")
        summed = None
        if loss_fn is not None:
            out = loss_fn(model, batch)
            summed = (out.to(sum_dtype) * n_samples, n_samples)
        return summed, (model(batch[0]) if want_outputs else None)

    def full_model_state(self, model: Any) -> dict[str, torch.Tensor]:
        self._count("full_model_state")
        return dict(model.state_dict())

    def snapshot(self, fields: dict[str, Any]) -> dict[str, Any]:
        keep = {k: fields[k] for k in ("strategy", "precision", "params")}
        grads = [p.grad for p in fields["model"].parameters()]
        copied = copy.deepcopy({k: v for k, v in fields.items() if k not in keep})
        for p, g in zip(copied["model"].parameters(), grads):
            p.grad = None if g is None else g.clone()
        return {**copied, **keep}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def _data(n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _fit(strategy: Any, tmp: Any) -> lk.FitResult:
    return lk.fit(
        _model(),
        _data(),
        loss_fn=_loss,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.05),
        strategy=strategy,
        accumulate=2,
        clip=0.5,
        max_steps=3,
        eval_data=_data(16),
        eval_every=1,
        metrics={"accuracy": lk.Accuracy()},
        log_every=1,
        checkpoint_dir=str(tmp / "ckpt"),
        save_every=3,
        progress=False,
    )


def test_a_hand_written_strategy_trains_through_fit_like_single_device(tmp_path: Any) -> None:
    mine = HandWritten()
    theirs = _fit(mine, tmp_path / "a")
    ours = _fit(lk.SingleDevice("cpu"), tmp_path / "b")
    for (name, a), b in zip(
        theirs.state.model.state_dict().items(), ours.state.model.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert theirs.history[-1]["eval/loss"] == pytest.approx(ours.history[-1]["eval/loss"], 1e-12)
    # Every path went through the protocol: the step, the clip, the logs, eval, the save.
    for member in ("setup", "forward_backward", "clip_grad_norm_", "reduce_metrics",
                   "eval_forward", "to_device"):  # fmt: skip
        assert mine.calls.get(member, 0) > 0, member
    lk.save_model(theirs.state, tmp_path / "model")
    assert mine.calls["full_model_state"] == 1


@pytest.mark.parametrize("member", STRATEGY_MEMBERS)
def test_a_strategy_missing_a_member_is_refused_naming_it(member: str) -> None:
    body = {k: v for k, v in vars(HandWritten).items() if k not in (member, "__dict__")}
    strategy = type("Partial", (), body)()
    with pytest.raises(TypeError, match=rf"lacks {member}\b") as caught:
        lk.TrainState.create(_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                             strategy=strategy)  # fmt: skip
    assert "loopkit.Strategy" in str(caught.value)


def test_the_member_list_is_the_protocol() -> None:
    assert set(STRATEGY_MEMBERS) == {
        "device", "rank", "world_size", "dp_rank", "dp_world_size", "is_main", "is_sharded",
        "timeout_s", "setup", "to_device", "forward_backward", "gradient_sync", "backward",
        "reduce_count", "reduce_metrics", "clip_grad_norm_", "eval_forward",
        "full_model_state", "snapshot",
    }  # fmt: skip
    for strategy in (lk.SingleDevice("cpu"), HandWritten()):
        assert isinstance(strategy, lk.Strategy)


def test_the_testing_kit_checks_a_hand_written_strategy() -> None:
    from loopkit.testing import checks

    batches = [torch.cat([b[0] for b in _data(16)]), torch.cat([b[1] for b in _data(16)])]
    batch = (batches[0], batches[1])
    common: dict[str, Any] = {"batches": [batch, batch], "strategy": HandWritten()}
    assert checks.check_accumulation_invariance(_model, _loss, splits=[[4, 12]], **common)
    assert checks.check_determinism(_model, _loss, **common)
    assert checks.check_resume_equivalence(_model, _loss, **common)
    assert checks.check_no_stale_reuse(_model, _loss, **common)
