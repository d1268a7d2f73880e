"""Step fingerprints from every rank, and `loopkit diff` over ranks.

The process tests: one launch of 2 gloo ranks fits BlockLM under FSDP five times with
fingerprints at every step (each rank holds half of every weight's rows), each saving at
step SAVE_AT: run A; run B, the same, then resumed from its step-SAVE_AT checkpoint (so
each rank drops and records the later steps again); run N, the same as A but with a
callback that nudges, on rank 1 only, an element of rank 1's shard of `blocks.0.fc.weight`
after step NUDGE_AT; and run A again from scratch into the same log_dir (the earlier run
moves aside, with its rank-1 directory). Rank 0 alone never sees that weight change enter
a step: only its gradients, computed from it.

Run C is A with other log and save steps: under several processes fit sums samples_seen
and tokens_seen over ranks only where it syncs (log, eval, save), so those counts are not
recorded there, and C must show no difference from A.

The recorder and diff tests without processes write fingerprints of made-up steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import TIMEOUT_S, BlockLM, adamw
from _ranks import run_ranks

import loopkit as lk
from loopkit import cli
from loopkit.fingerprint import fingerprint_ranks, read_fingerprints
from loopkit.forensics import diff_runs, recorded_world_size
from loopkit.strategies import FSDP

STEPS, NUDGE_AT, SAVE_AT = 8, 5, 4
NUDGED = "blocks.0.fc.weight"  # 6 x 6: rank 1 holds rows 3..5


class NudgeOnRank1:
    """Adds 1e-3 to the first element of rank 1's shard of NUDGED after step NUDGE_AT."""

    def on_step_end(self, state: Any) -> None:
        if state.step == NUDGE_AT and state.strategy.rank == 1:
            weight = dict(state.model.named_parameters())[NUDGED]
            with torch.no_grad():
                weight.to_local().view(-1)[0] += 1e-3


def _fit(
    log_dir: Path,
    checkpoint_dir: Path,
    *,
    log_every: int = 3,
    save_every: int = SAVE_AT,
    **options: Any,
) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 11, (64, 5), generator=g), torch.randint(0, 11, (64, 5), generator=g)
    )
    lk.fit(
        BlockLM(),
        data,
        loss_fn=lambda model, batch: lk.cross_entropy(model(batch[0]), batch[1]),
        optimizer=adamw,
        strategy=FSDP(timeout_s=TIMEOUT_S),
        batch_size=2,
        progress=False,
        log_every=log_every,
        log_dir=log_dir,
        checkpoint_dir=checkpoint_dir,
        save_every=save_every,
        max_steps=STEPS,
        **options,
    )


def four_fits(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    runs = Path(root)
    _fit(runs / "a", runs / "a-ckpt")
    _fit(runs / "b", runs / "b-ckpt")
    _fit(runs / "b", runs / "b-ckpt", resume=runs / "b-ckpt" / f"step-{SAVE_AT:08d}")
    _fit(runs / "n", runs / "n-ckpt", callbacks=[NudgeOnRank1()])
    _fit(runs / "a", runs / "a-ckpt-2")  # a fresh run into a used log_dir
    _fit(runs / "c", runs / "c-ckpt", log_every=2, save_every=5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fingerprint-ranks")
    for outcome in run_ranks(2, four_fits, str(root), timeout_s=180.0):
        outcome.unwrap()
    return root


def _chunks(directory: Path) -> list[tuple[int, int]]:
    index = json.loads((directory / "index.json").read_text())
    return [(c["first_step"], c["last_step"]) for c in index["chunks"]]


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_every_rank_records_its_own_shards(runs):
    fingerprints = runs / "a" / "fingerprints"
    assert fingerprint_ranks(runs / "a") == [0, 1]
    assert not (fingerprints / "rank-0").exists()  # rank 0 writes where one process does
    for rank in (0, 1):
        (chunk, *_) = read_fingerprints(runs / "a", rank=rank)
        assert {m["rank"] for m in chunk.meta} == {rank}
        assert {m["world_size"] for m in chunk.meta} == {2}
    row0, row1 = (read_fingerprints(runs / "a", rank=r)[1] for r in (0, 1))
    column = f"weights/{NUDGED}/sum"
    assert row0.values[0, row0.columns.index(column)] != row1.values[0, row1.columns.index(column)]
    # The fresh rerun moved the first run aside whole: its rank-1 directory with it.
    assert _chunks(runs / "a" / "fingerprints.1" / "rank-1")[0] == (0, 0)
    assert recorded_world_size(runs / "a") == 2


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_a_resumed_run_drops_each_ranks_steps_after_the_checkpoint(runs):
    for rank in (0, 1):
        directory = runs / "b" / "fingerprints" / ("rank-1" if rank else "")
        chunks = _chunks(directory)
        steps = [s for first, last in chunks for s in range(first, last + 1)]
        assert steps == list(range(STEPS)), (rank, chunks)  # 4..7 once: the first ones dropped
        assert any(last == SAVE_AT - 1 for _, last in chunks), (rank, chunks)
    report = diff_runs(runs / "a", runs / "b")  # resume is exact on every rank
    assert report.ranks == [0, 1] and report.first_divergent_step is None, report.format()


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_runs_that_sync_at_other_steps_show_no_difference(runs):
    report = diff_runs(runs / "a", runs / "c")
    assert report.first_divergent_step is None, report.differences[:3]
    assert report.ranks == [0, 1]


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_identical_runs_show_no_difference_on_any_rank(runs):
    report = diff_runs(runs / "a", runs / "a" / "fingerprints.1")
    assert report.first_divergent_step is None and report.tensors == []
    assert report.ranks == [0, 1] and report.steps_compared == list(range(STEPS))
    assert max(report.max_rel_diff) == 0.0 and report.notes == []
    assert "on ranks 0, 1" in report.format()


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_a_change_in_rank_1s_shard_is_named_with_its_rank_at_its_step(runs):
    report = diff_runs(runs / "a", runs / "n")
    assert report.first_divergent_step == NUDGE_AT
    entering = {d.name for d in report.differences if d.entering}
    assert entering == {f"rank 1: weights/{NUDGED}"}, report.format()
    assert report.tensors[0] == f"rank 1: weights/{NUDGED}"
    assert "loss" in report.tensors  # rank 0 computed with the gathered, changed weight
    assert all(d.rank == 1 for d in report.differences if d.name.startswith("rank 1: "))
    text = report.format()
    assert f"rank 1: weights/{NUDGED}/sum: a=" in text


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_the_command_reports_ranks_and_refuses_replay(runs, capsys):
    a, n = str(runs / "a"), str(runs / "n")
    assert cli.main(["diff", a, n, "--json", "--no-plot"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_divergent_step"] == NUDGE_AT and out["ranks"] == [0, 1]
    assert out["tensors"][0] == f"rank 1: weights/{NUDGED}"
    assert cli.main(["diff", a, n, "--replay", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert f"RUN_A={a!r} was recorded by 2 processes" in err
    assert "one process only" in err


# ------------------------------------------------------------------ without processes


def _record(root: Path, rank: int, world_size: int, values: dict[int, float]) -> None:
    """Fingerprints of made-up steps, as rank `rank` of `world_size` records them."""
    recorder = lk.FingerprintRecorder(root, rank=rank)
    for step, value in values.items():
        meta = {"step": step, "rank": rank, "world_size": world_size, "lr": [0.1], "seed": 0}
        recorder.add(step, ("weights/w/sum", "loss"), torch.tensor([value, 1.0]), meta)
    recorder.flush()


def test_rank_r_records_under_rank_r_and_only_its_own_steps(tmp_path):
    _record(tmp_path, 1, 2, {0: 1.0})
    assert (tmp_path / "rank-1" / "index.json").is_file()
    assert not (tmp_path / "index.json").exists()
    recorder = lk.FingerprintRecorder(tmp_path, rank=1)
    assert repr(recorder) == f"FingerprintRecorder({str(tmp_path)!r}, rank=1)"
    with pytest.raises(ValueError, match="records rank 1's steps, not rank 0's"):
        recorder.add(0, ("loss",), torch.ones(1), {"rank": 0})
    with pytest.raises(ValueError, match=r"FingerprintRecorder\(rank=-1\): must be an int >= 0"):
        lk.FingerprintRecorder(tmp_path, rank=-1)


def test_a_fresh_start_moves_aside_on_rank_0_only_and_resume_trims_each_rank(tmp_path):
    _record(tmp_path / "fp", 0, 2, dict.fromkeys(range(6), 1.0))
    _record(tmp_path / "fp", 1, 2, dict.fromkeys(range(6), 1.0))
    lk.FingerprintRecorder(tmp_path / "fp", rank=1).start(3)
    assert _chunks(tmp_path / "fp" / "rank-1") == [(0, 2)]
    assert _chunks(tmp_path / "fp") == [(0, 5)]  # rank 1 touched rank 0's files not
    lk.FingerprintRecorder(tmp_path / "fp", rank=1).start(0)  # rank 0 may be moving fp/
    assert _chunks(tmp_path / "fp" / "rank-1") == [(0, 2)]
    lk.FingerprintRecorder(tmp_path / "fp").start(0)
    assert not (tmp_path / "fp").exists()
    assert _chunks(tmp_path / "fp.1" / "rank-1") == [(0, 2)]


def test_the_first_divergent_step_is_the_earliest_over_ranks(tmp_path):
    for run, rank1 in (("a", {0: 1.0, 1: 1.0, 2: 1.0}), ("b", {0: 1.0, 1: 2.0, 2: 1.0})):
        _record(tmp_path / run, 0, 2, {0: 1.0, 1: 1.0, 2: 5.0 if run == "b" else 1.0})
        _record(tmp_path / run, 1, 2, rank1)
    report = diff_runs(tmp_path / "a", tmp_path / "b")
    assert report.ranks == [0, 1] and report.first_divergent_step == 1
    assert report.tensors == ["rank 1: weights/w"]
    assert report.to_json()["differences"][0]["rank"] == 1


def test_runs_at_different_world_sizes_are_compared_on_rank_0_only(tmp_path):
    _record(tmp_path / "a", 0, 2, {0: 1.0, 1: 1.0})
    _record(tmp_path / "a", 1, 2, {0: 1.0, 1: 1.0})
    _record(tmp_path / "b", 0, 1, {0: 1.0, 1: 1.0})
    report = diff_runs(tmp_path / "a", tmp_path / "b")
    assert report.ranks == [0] and report.first_divergent_step is None
    assert report.notes == ["recorded at different world sizes (A: 2, B: 1): compared rank 0 only"]
    assert "note: recorded at different world sizes" in report.format()
    _record(tmp_path / "c", 0, 2, {0: 1.0, 1: 1.0})  # rank 1 recorded nothing
    report = diff_runs(tmp_path / "a", tmp_path / "c")
    assert report.ranks == [0] and report.notes == ["rank 1: fingerprints in A only, not compared"]
    with pytest.raises(ValueError, match="rank 1 recorded no fingerprints"):
        read_fingerprints(tmp_path / "c", rank=1)
