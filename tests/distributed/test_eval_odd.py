"""Evaluation over a set the world size does not divide counts each item once.

9 eval items in batches of 2 on 2 ranks: rank 0 reads items 0, 2, 4, 6, 8 (3 batches) and
rank 1 items 1, 3, 5, 7 (2 batches). torch's DistributedSampler used to pad rank 1's share
with item 0, which eval/* then counted twice. fit's evaluation on 2 ranks must equal one
process's `evaluate` over the whole set: under DDP, and under FSDP, whose every forward
gathers the parameters (a collective), so rank 1 repeats its last forward, uncounted.
The model does not change (SGD with lr=0), so both evaluate the same weights; float64,
to 1e-12 (the sums are added in another order), and "eval/id_mean" (the mean item id)
exactly: it is 4.0 only if each of the items 0..8 counts once.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _models import TIMEOUT_S
from _ranks import run_ranks

import loopkit as lk
from loopkit.data import make_loader
from loopkit.evaluate import _forwards_on_every_rank
from loopkit.strategies import DDP, FSDP, SingleDevice

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
]

N_EVAL, BATCH = 9, 2


class Blocks(torch.nn.Module):
    """Two blocks in a ModuleList and a head: FSDP makes each block a unit of its own,
    resharded after every forward, so each forward gathers them again (a collective)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.random.get_rng_state()
        torch.manual_seed(3)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        self.head = torch.nn.Linear(4, 3)
        self.double()
        torch.random.set_rng_state(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def items(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y, torch.arange(n))


def loss_fn(model: torch.nn.Module, batch: Any) -> lk.Loss:
    return lk.Loss(F.cross_entropy(model(batch[0]), batch[1], reduction="sum"), len(batch[1]))


def id_mean(outputs: Any, batch: Any) -> lk.Loss:
    """The mean item id: (0 + 1 + ... + 8) / 9 = 4.0 when each item counts once."""
    return lk.Loss(batch[2].double().sum(), batch[2].numel())


METRICS = {"accuracy": lk.Accuracy(), "id_mean": id_mean}


def fit_and_evaluate(rank: int, kind: str) -> dict[str, float]:
    """fit one step with lr=0 on this rank, then the evaluation at its end."""
    torch.set_num_threads(1)
    strategy = DDP(timeout_s=TIMEOUT_S) if kind == "DDP" else FSDP(timeout_s=TIMEOUT_S)
    result = lk.fit(
        Blocks(),
        items(8, seed=1),
        loss_fn=loss_fn,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        strategy=strategy,
        batch_size=BATCH,
        max_steps=1,
        eval_data=items(N_EVAL, seed=2),
        metrics=METRICS,
        progress=False,
    )
    return {k: v for k, v in result.history[-1].items() if k.startswith("eval/")}


@pytest.mark.parametrize("kind", ["DDP", "FSDP"], ids=["strategy(DDP)", "strategy(FSDP)"])
def test_two_rank_eval_over_an_odd_set_equals_one_process(kind: str) -> None:
    state = lk.TrainState.create(
        Blocks(), optimizer=lambda p: torch.optim.SGD(p, lr=0.0), strategy=SingleDevice("cpu")
    )
    data = items(N_EVAL, seed=2)
    batches = [data[i : i + BATCH] for i in range(0, N_EVAL, BATCH)]
    expected = lk.evaluate(state, batches, METRICS, loss_fn=loss_fn)
    assert expected["eval/id_mean"] == 4.0
    ranks = [o.unwrap() for o in run_ranks(2, fit_and_evaluate, kind, timeout_s=4 * TIMEOUT_S)]
    for values in ranks:
        assert values.keys() == expected.keys()
        assert values["eval/id_mean"] == 4.0  # every item once: none repeated, none left out
        for key, value in expected.items():
            assert values[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_sharded_ranks_agree_on_the_forwards_and_refuse_a_set_too_small() -> None:
    """Every rank works out the busiest rank's batch count alike (no communication)."""
    sharded = SimpleNamespace(strategy=SimpleNamespace(is_sharded=True))
    loaders = [
        make_loader(
            items(N_EVAL, 2),
            batch_size=BATCH,
            shuffle=False,
            seed=0,
            rank=r,
            world_size=2,
            pad=False,
        )
        for r in range(2)
    ]
    assert [len(loader) for loader in loaders] == [3, 2]  # type: ignore[arg-type]
    assert [_forwards_on_every_rank(sharded, loader, None) for loader in loaders] == [3, 3]
    assert _forwards_on_every_rank(sharded, loaders[1], 2) == 2  # eval_batches caps it
    unsharded = SimpleNamespace(strategy=SimpleNamespace(is_sharded=False))
    assert _forwards_on_every_rank(unsharded, loaders[1], None) == 0  # DDP: nothing to match
    tiny = make_loader(
        items(1, 2), batch_size=BATCH, shuffle=False, seed=0, rank=1, world_size=2, pad=False
    )
    with pytest.raises(ValueError, match=r"1 eval item\(s\) in batches of 2 over 2 ranks"):
        _forwards_on_every_rank(sharded, tiny, None)
