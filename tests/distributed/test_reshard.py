"""A run resumed at another world size reads every item of the epoch exactly once.

48 items, one epoch, a fixed global batch (samples_per_step=8, batch_size=2 per rank: 6
steps; accumulate 4 / 2 / 1 at 1 / 2 / 4 ranks). Each stage trains 2 steps and saves; the
next stage resumes that checkpoint at another world size. The loss records the ids of the
items it reads, so the test sees which items each rank read. Every stage logs to a
log_dir: a 2-rank resume then also checks that every rank has as many callbacks as rank
0's checkpoint holds state for (the loggers used to exist on rank 0 only).

The final weights are compared with an uninterrupted 2-rank run's to 1e-12 (float64), not
bitwise: the same items make each step's gradient, but summed in another order (4
micro-batches on one process, 2 per rank and an all-reduce on 2 ranks).

An IterableDataset has no global position: a resume at another world size is refused with
both sizes named, and allowed with allow_data_reshard=True.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _models import TIMEOUT_S
from _ranks import run_ranks
from helpers import mlp

import loopkit as lk
from loopkit.data import EpochSampler, make_loader
from loopkit.strategies import DDP

pytestmark = pytest.mark.distributed

N_ITEMS, BATCH, SAMPLES_PER_STEP, SEED = 48, 2, 8, 5
STEPS = N_ITEMS // SAMPLES_PER_STEP  # one epoch


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ITEMS, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y, torch.arange(N_ITEMS))


class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Items rank, rank + W, ...: sharded by the dataset itself, no global position."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.data, self.rank, self.world_size = dataset(), rank, world_size

    def __iter__(self) -> Any:
        return (self.data[i] for i in range(self.rank, N_ITEMS, self.world_size))


def train(
    rank: int, root: str, max_steps: int, resume: bool, options: dict[str, Any]
) -> dict[str, Any]:
    """fit on this rank for `max_steps` steps (saving at the end); what it read and ended with.

    `options` are more fit arguments; `stream=True` reads a Stream instead of the dataset.
    """
    torch.set_num_threads(1)
    read: list[int] = []

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        read.extend(batch[2].tolist())
        return F.cross_entropy(model(batch[0]), batch[1])

    options = dict(options)
    strategy = DDP(timeout_s=TIMEOUT_S)
    stream = options.pop("stream", False)
    result = lk.fit(
        mlp(seed=3),
        Stream(rank, strategy.world_size) if stream else dataset(),
        loss_fn=loss_fn,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        strategy=strategy,
        batch_size=BATCH,
        samples_per_step=SAMPLES_PER_STEP,
        max_steps=max_steps,
        seed=SEED,
        checkpoint_dir=Path(root) / "ckpt",
        save_every=2,
        log_dir=Path(root) / "logs",
        log_every=1,
        progress=False,
        resume=resume,
        **options,
    )
    state = result.state
    return {
        "read": read,
        "weights": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
        "step": state.step,
        "samples_seen": state.samples_seen,
        "tokens_seen": float(state.tokens_seen),
    }


def stage(world_size: int, root: Path, max_steps: int, resume: bool, **options: Any) -> list:
    """Run `train` on `world_size` ranks; each rank's result."""
    outcomes = run_ranks(
        world_size, train, str(root), max_steps, resume, options, timeout_s=8 * TIMEOUT_S
    )
    return [o.unwrap() for o in outcomes]


@pytest.mark.parametrize("sizes", [(2, 1, 2), (2, 4, 1)], ids=["world(2-1-2)", "world(2-4-1)"])
def test_resume_at_another_world_size_reads_each_item_once(
    tmp_path: Path, sizes: tuple[int, int, int]
) -> None:
    order = EpochSampler(N_ITEMS, rank=0, world_size=1, shuffle=True, seed=SEED).order(0)
    per_stage = N_ITEMS // len(sizes)
    read: list[int] = []
    ends = []
    for i, world_size in enumerate(sizes):
        ranks = stage(world_size, tmp_path / "run", (i + 1) * STEPS // len(sizes), i > 0)
        stage_read = [item for r in ranks for item in r["read"]]
        # The stage read the next items of the same epoch order, each once.
        assert sorted(stage_read) == sorted(order[i * per_stage : (i + 1) * per_stage]), i
        read += stage_read
        ends.append(ranks)
    assert sorted(read) == list(range(N_ITEMS))  # every item of the epoch, exactly once
    plain = stage(2, tmp_path / "plain", STEPS, False)
    last = ends[-1]
    for r in last:
        assert r["step"] == STEPS
        # Global sums, on every rank, however the run was split over world sizes.
        assert r["samples_seen"] == N_ITEMS and r["tokens_seen"] == N_ITEMS
        for key, expected in plain[0]["weights"].items():
            torch.testing.assert_close(r["weights"][key], expected, rtol=1e-12, atol=1e-12)
    assert plain[1]["samples_seen"] == N_ITEMS == plain[0]["samples_seen"]
    # A 2-rank run is bitwise equal on its ranks (DDP), and so is the resumed one's.
    for key, value in last[0]["weights"].items():
        assert all(torch.equal(r["weights"][key], value) for r in last), key


def test_iterable_data_at_another_world_size_is_refused_unless_allowed(tmp_path: Path) -> None:
    stage(2, tmp_path, 2, False, stream=True)
    refused = run_ranks(1, train, str(tmp_path), 4, True, {"stream": True})
    error = refused[0].error or ""
    assert "ValueError" in error, error
    assert "saved by 2 data-parallel rank(s) and this run has 1" in error, error
    assert "allow_data_reshard=True" in error, error
    allowed = stage(1, tmp_path, 4, True, stream=True, allow_data_reshard=True)
    assert allowed[0]["step"] == 4


@pytest.mark.parametrize("drop_last", [False, True], ids=["drop_last(F)", "drop_last(T)"])
@pytest.mark.parametrize("n", [3, 47, 48], ids=lambda n: f"n({n})")
def test_epoch_sampler_from_the_start_deals_as_distributed_sampler(n: int, drop_last: bool) -> None:
    for world_size in (1, 2, 3, 4):
        for rank in range(world_size):
            torch_sampler: torch.utils.data.DistributedSampler[int] = (
                torch.utils.data.DistributedSampler(
                    torch.utils.data.TensorDataset(torch.arange(n)),
                    world_size,
                    rank,
                    shuffle=True,
                    seed=SEED,
                    drop_last=drop_last,
                )
            )
            ours = EpochSampler(
                n, rank=rank, world_size=world_size, shuffle=True, seed=SEED, drop_last=drop_last
            )
            torch_sampler.set_epoch(2)
            ours.set_epoch(2)
            assert list(ours) == list(torch_sampler), (world_size, rank)
            assert len(ours) == len(torch_sampler)


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda n: f"num_workers({n})")
def test_a_loader_state_resumes_the_epoch_order_at_any_world_size(num_workers: int) -> None:
    """Simulated ranks (one loader each): 2 ranks read 3 batches, 3 ranks 2, 1 rank the rest."""
    data = torch.utils.data.TensorDataset(torch.arange(N_ITEMS))
    read: list[int] = []
    state = None
    for world_size, batches in ((2, 3), (3, 2), (1, None)):
        loaders = [
            make_loader(
                data,
                batch_size=BATCH,
                shuffle=True,
                seed=SEED,
                rank=rank,
                world_size=world_size,
                num_workers=num_workers,
            )
            for rank in range(world_size)
        ]
        iterators = []
        for loader in loaders:
            loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
            if state is not None:
                loader.load_state_dict(state)  # type: ignore[attr-defined]
            iterators.append(iter(loader))
        for _ in range(batches or N_ITEMS):
            for iterator in iterators:
                read += next(iterator, [torch.tensor([], dtype=torch.long)])[0].tolist()
        state = loaders[0].state_dict()  # type: ignore[attr-defined]
        del iterators  # stops the workers
    order = EpochSampler(N_ITEMS, rank=0, world_size=1, shuffle=True, seed=SEED).order(1)
    assert sorted(read) == list(range(N_ITEMS))  # each item of the epoch once
    assert sorted(read[:12]) == sorted(order[:12]) and sorted(read[12:24]) == sorted(order[12:24])
