"""Logs that continue: a resumed fit's CSV, JSONL and TensorBoard logs equal an uninterrupted run's.

Run A trains N steps without a break. Run B trains past its last checkpoint (so it logs
steps whose work is then lost), stops (max_steps, or a real SIGKILL in a child process),
and resumes with resume=True to step N. B's logs must equal A's record for record, the
times aside, and TensorBoard's own reader must see each step once, with A's values. A fresh
run into a used log_dir must leave the earlier run's files byte for byte.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import mlp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import loopkit as lk

N = 20  # steps of the whole run
SAVE_EVERY = 4
STOP_AT = 15  # B's first part stops here: the checkpoint is at 12, steps 13-15 are lost
TESTS = Path(__file__).parent


def _data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> lk.Loss:
    return lk.cross_entropy(model(batch[0]), batch[1])


class KillAt:
    """Kill this process with SIGKILL right after the log record of step `step`."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_log(self, state: object, metrics: object) -> None:
        if state.step == self.step:  # type: ignore[attr-defined]
            os.kill(os.getpid(), signal.SIGKILL)


def fit_run(root: str, max_steps: int, eval_every: int, *, resume: bool, kill_at: int | None):
    """One fit into root/logs and root/ckpt, logging every step (also run by the child)."""
    return lk.fit(
        mlp(),
        _data(96, 0),  # 12 batches of 8: the run crosses epochs
        loss_fn=_loss,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        batch_size=8,
        shuffle=True,
        progress=False,
        max_steps=max_steps,
        log_every=1,
        eval_data=_data(24, 1),
        eval_every=eval_every,
        save_every=SAVE_EVERY,
        log_dir=Path(root) / "logs",
        checkpoint_dir=Path(root) / "ckpt",
        resume=resume,
        callbacks=[KillAt(kill_at)],
    )


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from test_logs_resume import fit_run
fit_run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), resume=False, kill_at=int(sys.argv[3]))
raise SystemExit("not killed")
"""


def _interrupted_by_sigkill(root: Path, eval_every: int) -> None:
    """B's first part in a child process that SIGKILLs itself after logging step STOP_AT."""
    args = [str(TESTS), str(root), str(STOP_AT), str(eval_every)]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def _csv(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(root / "logs" / "metrics.csv", newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def _jsonl(root: Path) -> list[dict[str, float]]:
    lines = (root / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _untimed(rows: list) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def _scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar as TensorBoard's own reader sees it: tag -> [(step, value), ...]."""
    reader = EventAccumulator(str(root / "logs"), size_guidance={"scalars": 0})
    reader.Reload()
    return {
        tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]
    }


@pytest.mark.parametrize("stop", ["max_steps", "sigkill"])
@pytest.mark.parametrize("eval_every", [5, 14], ids=lambda n: f"eval_every({n})")
def test_a_resumed_runs_logs_equal_the_uninterrupted_runs(tmp_path, stop, eval_every):
    """eval_every=5: evals before the checkpoint; 14: the eval columns first come after it
    in A, while B's lost part had already widened its CSV header at its final eval (15)."""
    a, b = tmp_path / "A", tmp_path / "B"
    fit_run(str(a), N, eval_every, resume=False, kill_at=None)
    if stop == "sigkill":
        _interrupted_by_sigkill(b, eval_every)
    else:
        fit_run(str(b), STOP_AT, eval_every, resume=False, kill_at=None)
    lost = [r for r in _jsonl(b) if r["step"] > STOP_AT - STOP_AT % SAVE_EVERY]
    assert lost, "the interrupted run must have logged steps after its last checkpoint"
    result = fit_run(str(b), N, eval_every, resume=True, kill_at=None)
    assert result.state.step == N

    header_a, rows_a = _csv(a)
    header_b, rows_b = _csv(b)
    assert header_b == header_a
    assert _untimed(rows_b) == _untimed(rows_a)  # exact strings: the values are bitwise equal
    assert _untimed(_jsonl(b)) == _untimed(_jsonl(a))

    tb_a, tb_b = _scalars(a), _scalars(b)
    assert sorted(tb_b) == sorted(tb_a)
    for tag, points in tb_b.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: steps seen twice in {steps}"
        assert points == tb_a[tag], tag


def _files(log_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(log_dir.iterdir()) if path.is_file()}


def test_a_fresh_run_into_a_used_log_dir_keeps_the_earlier_runs_files(tmp_path, caplog):
    log_dir = tmp_path / "logs"

    def fresh(max_steps: int) -> dict[str, bytes]:
        lk.fit(
            mlp(),
            _data(64, 0),
            loss_fn=_loss,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            batch_size=8,
            progress=False,
            max_steps=max_steps,
            log_every=1,
            log_dir=log_dir,
        )
        return _files(log_dir)

    first = fresh(3)
    with caplog.at_level(logging.INFO, logger="loopkit"):
        second = fresh(2)  # the same second, often: event file names must not collide
    third = fresh(1)

    events = lambda files: {n: b for n, b in files.items() if "tfevents" in n}  # noqa: E731
    assert len(events(first)) == 1 and len(events(second)) == 2 and len(events(third)) == 3
    for name, data in events(first).items():
        assert third[name] == data  # earlier event files: untouched
    for name in ("metrics.csv", "metrics.jsonl"):
        assert third[f"{name}.1"] == first[name]
        assert third[f"{name}.2"] == second[name]
        assert name + ".3" not in third
    assert [r["step"] for r in _jsonl(tmp_path)] == [1]
    assert [r["step"] for r in _csv(tmp_path)[1]] == ["1"]
    said = caplog.text
    assert f"moved it to {log_dir / 'metrics.csv'}.1" in said
    assert f"moved it to {log_dir / 'metrics.jsonl'}.1" in said
    assert "holds 1 event file(s) of an earlier run" in said
