"""Weight averages under FSDP and DDP (2 gloo ranks) equal one device's, resume bitwise.

Both ranks train 6 steps of BlockLM (float64, 2 micro-batches per step) with an ema and
an swa in the chain, evaluating with the ema at step 3 (between steps, as fit does) and
saving a sharded checkpoint there. The test process runs the same steps on one device
(SingleDevice, each micro-batch being the two ranks' shares together). Checked:

- the averages are DTensors sharded like the parameters, and gathered they equal the
  single-device averages (to 1e-12: the ranks sum their gradients in another order);
- evaluate(weights="ema"), right after a plain evaluate, gives the single-device loss and
  leaves every shard bitwise as it was, and the steps after it train on the model's
  weights (FSDP's root keeps its gathered parameters after a forward: they must hold
  neither the model's weights during the ema evaluation nor the ema afterwards);
- save_model(weights="ema") gathers the averaged weights into one file;
- a fresh FSDP state loading the step-3 checkpoint ends with the same averages bitwise.

The same run under DDP (whole averages on every rank, rank 0's checkpoint) too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from _models import TIMEOUT_S, BlockLM, adamw, token_loss, token_micro_batch
from _ranks import run_ranks
from helpers import prefixed

import loopkit as lk
from loopkit import checkpoint as ckpt
from loopkit.strategies import DDP, FSDP, SingleDevice
from loopkit.strategies.env import init_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
]

K, STEPS, EVAL_AT = 2, 6, 3
KINDS = ("ema", "swa")
STEP = lk.chain(
    lk.forward(token_loss),
    lk.accumulate(K),
    lk.clip(0.5),
    lk.optimizer_step(),
    lk.ema(0.8, start=2),
    lk.swa(start=1, every=2),
)


def rank_part(s: int, i: int, rank: int) -> dict[str, torch.Tensor]:
    return token_micro_batch(2000 + 100 * s + 10 * i + rank, [7, 2, 5] if rank == 0 else [1, 3])


def micro_batch(s: int, i: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    if world_size == 2:
        return rank_part(s, i, rank)
    parts = [rank_part(s, i, r) for r in range(2)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def fresh(strategy: Any, seed: int = 0) -> lk.TrainState:
    state = lk.TrainState.create(BlockLM(seed=seed), optimizer=adamw, strategy=strategy)
    return state.replace(window=lk.Window(size=K))


def full(tensors: Any) -> list[torch.Tensor]:
    """Whole tensors (DTensor shards gathered: a collective)."""
    out = []
    for t in tensors:
        out.append((t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone())
    return out


def train(
    state: lk.TrainState,
    steps: range,
    rank: int,
    world_size: int,
    out: dict[str, Any],
    save_to: Path | None = None,
) -> lk.TrainState:
    """Train `steps`; at EVAL_AT evaluate with the ema (and save, with `save_to`)."""
    for s in steps:
        for i in range(K):
            state = STEP(state, micro_batch(s, i, rank, world_size))
        if state.step == EVAL_AT and save_to is not None:
            shards = [p.detach().clone() for p in _locals(state.params)]
            data = [micro_batch(9, 0, rank, world_size)]
            # A plain evaluation first: FSDP's root keeps the model's weights gathered.
            out["plain"] = lk.evaluate(state, data, loss_fn=token_loss)
            out["eval"] = lk.evaluate(state, data, loss_fn=token_loss, weights="ema")
            restored = _locals(state.params)
            out["restored"] = all(torch.equal(a, b) for a, b in zip(shards, restored, strict=True))
            lk.save_checkpoint(state, save_to)
    return state


def _locals(tensors: Any) -> list[torch.Tensor]:
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def two_ranks(rank: int, root: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    init_distributed(timeout_s=TIMEOUT_S)
    from torch.distributed.tensor import DTensor

    root_path, out = Path(root), dict[str, Any]()
    state = train(fresh(FSDP(timeout_s=TIMEOUT_S)), range(STEPS), rank, 2, out, root_path / "ck")
    for kind in KINDS:
        for p, a in zip(state.params, state.averages[kind].tensors, strict=True):
            assert isinstance(p, DTensor) and isinstance(a, DTensor), kind
            assert a.placements == p.placements, kind
            assert a.to_local().shape == p.to_local().shape, kind
    out["params"] = full(state.params)
    out["averages"] = {kind: full(state.averages[kind].tensors) for kind in KINDS}
    out["counts"] = {kind: state.averages[kind].count for kind in KINDS}
    lk.save_model(state, root_path / "ema", weights="ema")  # a collective
    path = root_path / "ck" / ckpt.step_dir_name(EVAL_AT)
    resumed = lk.load_checkpoint(path, fresh(FSDP(timeout_s=TIMEOUT_S), seed=5))
    resumed = train(resumed, range(EVAL_AT, STEPS), rank, 2, {})
    out["resumed"] = {kind: full(resumed.averages[kind].tensors) for kind in KINDS}
    # DDP: every rank holds the whole average; rank 0 writes it, every rank resumes it.
    ddp: dict[str, Any] = {}
    state = train(fresh(DDP(timeout_s=TIMEOUT_S)), range(STEPS), rank, 2, ddp, root_path / "ddp")
    out["ddp"] = {kind: full(state.averages[kind].tensors) for kind in KINDS}
    path = root_path / "ddp" / ckpt.step_dir_name(EVAL_AT)
    resumed = lk.load_checkpoint(path, fresh(DDP(timeout_s=TIMEOUT_S), seed=5))
    resumed = train(resumed, range(EVAL_AT, STEPS), rank, 2, {})
    out["ddp_resumed"] = {kind: full(resumed.averages[kind].tensors) for kind in KINDS}
    out["ddp_restored"] = ddp["restored"]
    return out


def test_fsdp_averages_equal_single_device_and_resume_bitwise(tmp_path: Path) -> None:
    outcomes = run_ranks(2, two_ranks, str(tmp_path), timeout_s=120.0)
    values = [o.unwrap() for o in outcomes]
    single: dict[str, Any] = {}
    state = train(fresh(SingleDevice("cpu")), range(STEPS), 0, 1, single, tmp_path / "one")
    expected = {kind: list(state.averages[kind].tensors) for kind in KINDS}
    tol: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-12}
    for value in values:
        assert value["restored"], "evaluate(weights='ema') changed the shards"
        for key in ("plain", "eval"):
            assert value[key]["eval/loss"] == pytest.approx(single[key]["eval/loss"], rel=1e-12)
        assert value["eval"]["eval/loss"] != pytest.approx(value["plain"]["eval/loss"])
        # The steps after the evaluation trained on the model's weights, not the ema.
        for a, p in zip(value["params"], state.params, strict=True):
            torch.testing.assert_close(a, p.detach(), **tol)
        for kind in KINDS:
            assert value["counts"][kind] == state.averages[kind].count
            for i, (a, e) in enumerate(zip(value["averages"][kind], expected[kind], strict=True)):
                torch.testing.assert_close(a, e, **tol, msg=prefixed(f"{kind} {i}"))
            for a, e in zip(value["resumed"][kind], value["averages"][kind], strict=True):
                assert torch.equal(a, e), f"{kind}: the resumed average differs"
            for a, e in zip(value["ddp"][kind], expected[kind], strict=True):
                torch.testing.assert_close(a, e, **tol)
            for a, e in zip(value["ddp_resumed"][kind], value["ddp"][kind], strict=True):
                assert torch.equal(a, e), f"{kind}: the resumed DDP average differs"
        assert value["ddp_restored"]
    saved = safetensors.torch.load_file(tmp_path / "ema" / "model.safetensors")
    names = [name for name, _ in state.model.named_parameters()]
    for name, e in zip(names, expected["ema"], strict=True):
        torch.testing.assert_close(saved[name], e, **tol)
