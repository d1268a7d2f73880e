"""A NaN or inf loss on one rank: every rank takes the same decision at the same step.

Two ranks (gloo, CPU) run fit; rank 1's loss becomes NaN or inf at a drawn step. Under
nonfinite="raise" both ranks must raise the same FloatingPointError naming rank 1 and that
step, at about the same moment (each rank stays alive after catching it, so a rank left
waiting in a collective would show as a gap of the collective timeout), with finite
weights, equal on both ranks under DDP, and the last checkpoint saved before the bad step
still the latest and valid. Under nonfinite="skip" both ranks skip that step and end with
identical, finite weights.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _models import TIMEOUT_S, full_params
from _ranks import run_ranks
from helpers import mlp

import loopkit as lk
from loopkit.checkpoint import latest_checkpoint, step_dir_name, validate_checkpoint
from loopkit.strategies import DDP, FSDP

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
]

MAX_STEPS, SAVE_EVERY, LOG_EVERY, BATCH = 9, 2, 3, 4
BAD_RANK = 1
BAD_STEPS = random.Random(16).sample(range(MAX_STEPS - 1), 3)  # drawn steps, one per case
LINGER_S = 2 * TIMEOUT_S  # a rank that caught the error waits this long for the other


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * BATCH * MAX_STEPS, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def poison(loss: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-finite loss: NaN or inf gradients too ("nan", "inf"), or the loss alone."""
    if kind == "nan":
        return loss * float("nan")
    if kind == "inf":
        return loss * float("inf")
    return loss + float("inf")  # "inf-loss": the gradients stay finite


def linger(root: Path, rank: int) -> None:
    """Stay alive (as a process whose user caught the error would) until the other rank ends."""
    (root / f"ended-{rank}").touch()
    deadline = time.monotonic() + LINGER_S
    while not (root / f"ended-{1 - rank}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def train(rank: int, root: Path, case: dict[str, Any]) -> dict[str, Any]:
    """fit on this rank, rank 1's loss poisoned at step case["bad_step"]; what happened."""
    torch.set_num_threads(1)
    calls = 0

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        out = model(batch[0])
        if case.get("d_out") == 1:  # one output: a bias of one element, an empty shard on rank 1
            loss = F.mse_loss(out.squeeze(1), batch[1].to(out.dtype))
        else:
            loss = F.cross_entropy(out, batch[1])
        bad = rank == BAD_RANK and calls == case["bad_step"]  # accumulate=1: call i is step i
        calls += 1
        return poison(loss, case["kind"]) if bad else loss

    strategy = FSDP if case["strategy"] == "fsdp" else DDP
    model = mlp(seed=3, d_out=case.get("d_out", 3))
    out: dict[str, Any] = {"error": None}
    try:
        result = lk.fit(
            model,
            dataset(),
            loss_fn=loss_fn,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
            strategy=strategy(timeout_s=TIMEOUT_S),
            batch_size=BATCH,
            clip=case["clip"],
            nonfinite=case["policy"],
            max_steps=MAX_STEPS,
            log_every=LOG_EVERY,
            checkpoint_dir=root / "ckpt",
            save_every=SAVE_EVERY,
            progress=False,
        )
        out["skipped_steps"] = result.state.skipped_steps
        model = result.state.model
    except FloatingPointError as error:  # caught: this process stays alive
        out["error"], out["raised_at"] = str(error), time.monotonic()
        linger(root, rank)
    out["weights"] = full_params(model)  # FSDP: a collective, as after any fit
    return out


def run(tmp_path: Path, **case: Any) -> list[dict[str, Any]]:
    outcomes = run_ranks(2, train, tmp_path, case, timeout_s=LINGER_S + 2 * TIMEOUT_S)
    return [outcome.unwrap() for outcome in outcomes]


RAISE_CASES = [
    pytest.param("ddp", "nan", 1.0, BAD_STEPS[0], 3, id="strategy(DDP)-nan-clip"),
    pytest.param("ddp", "inf", None, BAD_STEPS[1], 3, id="strategy(DDP)-inf-noclip"),
    pytest.param("ddp", "inf-loss", None, BAD_STEPS[2], 3, id="strategy(DDP)-inf-loss-only"),
    pytest.param("fsdp", "nan", 1.0, BAD_STEPS[0], 3, id="strategy(FSDP)-nan-clip"),
    # No clip: the guard takes each rank's own gradient norms, and a one-element bias leaves
    # rank 1 an empty shard, which has none (this failed at the first step).
    pytest.param("fsdp", "nan", None, BAD_STEPS[1], 1, id="strategy(FSDP)-nan-noclip-bias1"),
]


@pytest.mark.parametrize(("strategy", "kind", "clip", "bad_step", "d_out"), RAISE_CASES)
def test_raise_both_ranks_raise_the_same_error_with_finite_weights(
    tmp_path: Path, strategy: str, kind: str, clip: float | None, bad_step: int, d_out: int
) -> None:
    ranks = run(
        tmp_path,
        strategy=strategy,
        kind=kind,
        clip=clip,
        bad_step=bad_step,
        policy="raise",
        d_out=d_out,
    )
    errors = [r["error"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert f"NaN or infinite at step {bad_step} on rank 1 (of 2 ranks)." in errors[0]
    # Together: a rank left waiting in a collective would lag by the timeout (30 s).
    assert abs(ranks[0]["raised_at"] - ranks[1]["raised_at"]) < TIMEOUT_S / 3
    for rank, r in enumerate(ranks):
        bad = [i for i, w in enumerate(r["weights"]) if not bool(torch.isfinite(w).all())]
        assert not bad, f"rank {rank}: parameters {bad} hold NaN or inf"
    if strategy == "ddp":  # replicas: the same weights on both ranks
        for a, b in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
            assert torch.equal(a, b)
    ckpt = tmp_path / "ckpt"
    good = bad_step - bad_step % SAVE_EVERY  # the last save at or before the bad step
    saved = sorted(p.name for p in ckpt.glob("step-*"))
    assert saved == [step_dir_name(s) for s in range(SAVE_EVERY, good + 1, SAVE_EVERY)]
    if good:
        assert latest_checkpoint(ckpt) == ckpt / step_dir_name(good)
        validate_checkpoint(ckpt / step_dir_name(good))


@pytest.mark.parametrize("kind", ["nan", "inf-loss"])
def test_skip_both_ranks_skip_the_step_and_end_with_the_same_weights(
    tmp_path: Path, kind: str
) -> None:
    # "inf-loss" leaves the gradients finite: only rank 1 sees that the step is bad.
    ranks = run(tmp_path, strategy="ddp", kind=kind, clip=1.0, bad_step=BAD_STEPS[0], policy="skip")
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    for a, b in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        assert bool(torch.isfinite(a).all())
        assert torch.equal(a, b)
