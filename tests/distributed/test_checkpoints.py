"""Sharded FSDP checkpoints resume at another world size; DDP checkpoints are rank 0's.

Three launches: 2 ranks train 6 steps and save at step 3 (the uninterrupted trajectory);
1 process (no launcher variables: the single-process fallback) resumes that checkpoint
with FSDP and with SingleDevice, and saves its own at step 3; 2 ranks resume the
1-process checkpoint. Every resumed run must end where the uninterrupted one did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from _models import TIMEOUT_S, BlockLM, adamw, full_params, token_loss, token_micro_batch
from _ranks import run_ranks
from helpers import prefixed

import loopkit as lk
from loopkit import checkpoint as ckpt
from loopkit.strategies import DDP, FSDP, SingleDevice
from loopkit.strategies.env import detect_env, init_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
]

K, STEPS, SAVE_AT = 2, 6, 3
RTOL, ATOL = 1e-10, 1e-12


def rank_part(s: int, i: int, rank: int) -> dict[str, torch.Tensor]:
    return token_micro_batch(1000 + 100 * s + 10 * i + rank, [7, 2, 5] if rank == 0 else [1, 3])


def micro_batch(s: int, i: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of micro-batch i of step s; one process gets both shares."""
    if world_size == 2:
        return rank_part(s, i, rank)
    parts = [rank_part(s, i, r) for r in range(2)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


STEP = lk.chain(lk.forward(token_loss), lk.accumulate(K), lk.clip(0.5), lk.optimizer_step())


def fresh(strategy: Any, seed: int = 0) -> lk.TrainState:
    state = lk.TrainState.create(BlockLM(seed=seed), optimizer=adamw, strategy=strategy)
    return state.replace(window=lk.Window(size=K))


def train(
    state: lk.TrainState, steps: range, rank: int, world_size: int, save_to: Path | None = None
) -> lk.TrainState:
    for s in steps:
        for i in range(K):
            state = STEP(state, micro_batch(s, i, rank, world_size))
        if save_to is not None and state.step == SAVE_AT:
            lk.save_checkpoint(state, save_to)
    return state


def assert_close(
    actual: list[torch.Tensor], expected: list[torch.Tensor], exact: bool = False
) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(
            a, e, rtol=0 if exact else RTOL, atol=0 if exact else ATOL, msg=prefixed(f"param {i}")
        )


def two_ranks_save(rank: int, root: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    init_distributed(timeout_s=TIMEOUT_S)
    root_path = Path(root)
    out: dict[str, Any] = {}
    # The uninterrupted FSDP run, saving a sharded checkpoint at step 3.
    state = train(
        fresh(FSDP(timeout_s=TIMEOUT_S)), range(STEPS), rank, 2, save_to=root_path / "fsdp2"
    )
    final = full_params(state.model)
    out["final"] = final
    # save_model gathers the full weights into one file (a collective).
    lk.save_model(state, root_path / "model")
    # 2 -> 2: a fresh FSDP state (other weights) resumes and ends bit-for-bit the same.
    path = root_path / "fsdp2" / ckpt.step_dir_name(SAVE_AT)
    resumed = lk.load_checkpoint(path, fresh(FSDP(timeout_s=TIMEOUT_S), seed=5))
    assert resumed.step == SAVE_AT
    assert_close(
        full_params(train(resumed, range(SAVE_AT, STEPS), rank, 2).model), final, exact=True
    )
    # DDP: rank 0 writes an ordinary checkpoint; every rank resumes from it.
    ddp_root = root_path / "ddp"
    state = train(fresh(DDP(timeout_s=TIMEOUT_S)), range(STEPS), rank, 2, save_to=ddp_root)
    ddp_final = full_params(state.model)
    resumed = lk.load_checkpoint(
        ddp_root / ckpt.step_dir_name(SAVE_AT), fresh(DDP(timeout_s=TIMEOUT_S), seed=5)
    )
    assert_close(
        full_params(train(resumed, range(SAVE_AT, STEPS), rank, 2).model), ddp_final, exact=True
    )
    assert_close(ddp_final, final)  # DDP and FSDP train alike
    return out


def one_process_resumes(rank: int, root: str, expected: list[torch.Tensor]) -> str:
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        os.environ.pop(name)
    torch.set_num_threads(1)
    env = detect_env()
    assert (env.source, env.world_size) == ("single", 1)
    root_path = Path(root)
    path = root_path / "fsdp2" / ckpt.step_dir_name(SAVE_AT)
    # 2 -> 1 with FSDP (a one-process group, no port) and with SingleDevice.
    for strategy in (FSDP(timeout_s=TIMEOUT_S), SingleDevice("cpu")):
        state = lk.load_checkpoint(path, fresh(strategy, seed=5))
        assert_close(full_params(train(state, range(SAVE_AT, STEPS), 0, 1).model), expected)
    # A one-process FSDP run writes the checkpoint the next launch resumes at 2 ranks.
    train(fresh(FSDP(timeout_s=TIMEOUT_S)), range(SAVE_AT), 0, 1, save_to=root_path / "fsdp1")
    return env.source


def two_ranks_resume(rank: int, root: str, expected: list[torch.Tensor]) -> None:
    torch.set_num_threads(1)
    init_distributed(timeout_s=TIMEOUT_S)
    path = Path(root) / "fsdp1" / ckpt.step_dir_name(SAVE_AT)
    # 1 -> 2 with FSDP (DCP reshards), and into DDP (every rank reads whole tensors).
    for strategy in (FSDP(timeout_s=TIMEOUT_S), DDP(timeout_s=TIMEOUT_S)):
        state = lk.load_checkpoint(path, fresh(strategy, seed=5))
        assert_close(full_params(train(state, range(SAVE_AT, STEPS), rank, 2).model), expected)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist-ckpt")
    saved = run_ranks(2, two_ranks_save, str(root), timeout_s=120)
    expected = saved[0].unwrap()["final"] if saved[0].error is None else None
    runs: dict[str, Any] = {"root": root, "saved": saved}
    if expected is not None and saved[1].error is None:
        runs["one"] = run_ranks(1, one_process_resumes, str(root), expected, timeout_s=120)
        if runs["one"][0].error is None:
            runs["two"] = run_ranks(2, two_ranks_resume, str(root), expected, timeout_s=120)
    runs["expected"] = expected
    return runs


def test_fsdp_checkpoint_resumes_at_world_size_2_exactly(runs):
    for outcome in runs["saved"]:
        outcome.unwrap()


def test_fsdp_checkpoint_is_sharded_valid_and_pickle_free(runs):
    path = runs["root"] / "fsdp2" / ckpt.step_dir_name(SAVE_AT)
    ckpt.validate_checkpoint(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["layout"] == "sharded"
    shards = sorted(p.name for p in (path / "shards").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    assert sorted(manifest["files"]) == sorted(
        ["state.json", "state.safetensors", *(f"shards/{n}" for n in shards)]
    )
    assert not (path / "model.safetensors").exists()
    files = [p for p in path.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors") for p in files), files  # no pickle
    assert (runs["root"] / "fsdp2" / "latest").read_text() == path.name
    # An extra file in shards/ would be read as state: validation refuses it.
    (path / "shards" / "stray.safetensors").write_bytes(b"")
    with pytest.raises(lk.CheckpointError, match="not in the manifest"):
        ckpt.validate_checkpoint(path)
    (path / "shards" / "stray.safetensors").unlink()


def test_ddp_checkpoint_is_written_by_rank_0_like_single_device(runs):
    path = runs["root"] / "ddp" / ckpt.step_dir_name(SAVE_AT)
    ckpt.validate_checkpoint(path)
    assert json.loads((path / "manifest.json").read_text())["layout"] == "full"
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors",
        "state.safetensors",
        "state.json",
        "manifest.json",
    }
    # A single-device state loads it directly.
    state = lk.load_checkpoint(path, fresh(SingleDevice("cpu"), seed=5))
    assert state.step == SAVE_AT


def test_save_model_gathers_fsdp_weights_into_one_file(runs):
    assert runs["expected"] is not None
    tensors = safetensors.torch.load_file(str(runs["root"] / "model" / "model.safetensors"))
    model = BlockLM()
    model.load_state_dict(tensors)  # strict: every name, full shapes
    assert_close([p.detach() for p in model.parameters()], runs["expected"], exact=True)


def test_fsdp_checkpoint_from_2_ranks_resumes_in_one_process(runs):
    assert "one" in runs, "the 2-rank launch failed first"
    assert runs["one"][0].unwrap() == "single"


def test_fsdp_checkpoint_from_1_process_resumes_on_2_ranks_with_fsdp_and_ddp(runs):
    assert "two" in runs, "an earlier launch failed first"
    for outcome in runs["two"]:
        outcome.unwrap()


def test_fsdp_refuses_an_unsharded_checkpoint(runs, tmp_path):
    """A DDP / SingleDevice checkpoint cannot go into FSDP: the error says what to do."""
    path = runs["root"] / "ddp" / ckpt.step_dir_name(SAVE_AT)

    def load(rank: int) -> str:
        init_distributed(timeout_s=TIMEOUT_S)
        try:
            lk.load_checkpoint(path, fresh(FSDP(timeout_s=TIMEOUT_S)))
        except lk.CheckpointError as error:
            return str(error)
        return "loaded"

    message = run_ranks(1, load, timeout_s=60)[0].unwrap()
    assert "saved unsharded" in message and "loads sharded checkpoints only" in message
