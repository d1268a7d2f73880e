"""Step fingerprints: what fit records, when, and that they see what they claim to see."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from forensics_parts import build_data, build_model, loss_fn

import loopkit as lk
from loopkit.fingerprint import BLOCK, step_fingerprint


def _fit(log_dir: Path | None, **kwargs: Any) -> lk.FitResult:
    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "loss_fn": loss_fn,
        "optimizer": {"name": "AdamW", "lr": 1e-2},
        "max_steps": 12,
        "batch_size": 16,
        "clip": 1.0,
        "log_every": 5,
        "progress": False,
        "log_dir": log_dir,
        **kwargs,
    }
    return lk.fit(build_model(8), build_data(256), **settings)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def _rows(run: Path) -> dict[int, dict[str, float]]:
    return {
        step: dict(zip(chunk.columns, row.tolist()))
        for chunk in lk.read_fingerprints(run)
        for step, row in zip(chunk.steps, chunk.values)
    }


def test_fit_with_a_log_dir_records_every_step_in_chunks_written_at_log_steps(tmp_path):
    _fit(tmp_path)
    index = json.loads((tmp_path / "fingerprints" / "index.json").read_text())
    # steps 0..11; written at log steps 5 and 10 and at the end; step 0 has no optimizer
    # state yet, so it is a chunk of its own columns.
    assert [(c["first_step"], c["last_step"]) for c in index["chunks"]] == [
        (0, 0),
        (1, 4),
        (5, 9),
        (10, 11),
    ]
    rows = _rows(tmp_path)
    assert sorted(rows) == list(range(12))
    names = set(rows[3])
    for kind in ("weights", "grads"):
        assert {f"{kind}/0.weight/sum", f"{kind}/0.weight/wsum", f"{kind}/4.bias/sum"} <= names
    assert {"optimizer/2.weight/exp_avg/sum", "optimizer/2.weight/exp_avg_sq/wsum"} <= names
    assert {"loss", "grad_norm"} <= names
    assert not any(n.startswith("optimizer/") for n in rows[0])
    meta = lk.read_fingerprints(tmp_path)[1].meta[0]
    assert meta["step"] == 1 and meta["lr"] == [1e-2] and meta["samples_seen"] == 32
    assert len(meta["micro_step_seeds"]) == 1


def test_fingerprints_read_the_weights_entering_and_the_gradients_before_the_update(tmp_path):
    """Against exact float64 sums taken by a probe at the fingerprint's place in the chain."""
    truth: list[dict[str, float]] = []

    def probe(state: lk.TrainState, batch: Any) -> lk.TrainState:
        if state.window.closed:
            named = dict(state.model.named_parameters())
            truth.append(
                {
                    **{
                        f"weights/{n}/sum": float(p.detach().double().sum())
                        for n, p in named.items()
                    },
                    **{f"grads/{n}/sum": float(p.grad.double().sum()) for n, p in named.items()},  # type: ignore[union-attr]
                }
            )
        return state

    torch.manual_seed(0)
    state = lk.TrainState.create(build_model(8), optimizer=_adamw, seed=0)
    recorder = lk.FingerprintRecorder(tmp_path)
    step = lk.chain(
        lk.forward(loss_fn), lk.accumulate(1), lk.clip(0.5), probe, lk.fingerprint(recorder),
        lk.optimizer_step(),
    )  # fmt: skip
    x, y = build_data(64).tensors
    for i in range(4):
        state = step(state, (x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]))
    recorder.flush()
    rows = _rows(tmp_path)
    for s, expected in enumerate(truth):
        for column, value in expected.items():
            assert rows[s][column] == pytest.approx(value, rel=1e-6, abs=1e-9), (s, column)


def test_identical_runs_have_bitwise_identical_fingerprints(tmp_path):
    _fit(tmp_path / "a")
    _fit(tmp_path / "b")
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a == b


def test_a_one_element_change_shows_in_the_step_it_enters(tmp_path):
    class Nudge:
        def on_step_end(self, state: Any) -> None:
            if state.step == 7:
                with torch.no_grad():
                    state.model[2].weight.view(-1)[3] += 1e-4

    _fit(tmp_path / "a")
    _fit(tmp_path / "b", callbacks=[Nudge()])
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert all(a[s] == b[s] for s in range(7))
    changed = {k for k in a[7] if a[7][k] != b[7][k]}
    assert {"weights/2.weight/sum", "weights/2.weight/wsum"} <= changed
    assert not any(k.startswith(("weights/0", "weights/4", "optimizer/")) for k in changed)


@pytest.mark.parametrize(("every", "steps"), [(0, None), (3, [0, 3, 6, 9])])
def test_fingerprint_every_sets_which_steps_are_recorded(tmp_path, every, steps):
    _fit(tmp_path, fingerprint_every=every)
    if steps is None:
        assert not (tmp_path / "fingerprints").exists()
    else:
        assert sorted(_rows(tmp_path)) == steps


def test_no_log_dir_no_fingerprints_and_bad_values_are_refused(tmp_path):
    result = _fit(None)
    assert "fingerprint" not in result.state.metrics
    with pytest.raises(ValueError, match="fingerprint_every=-1"):
        lk.FitConfig(fingerprint_every=-1)
    with pytest.raises(ValueError, match=r"fingerprint_every=2\): needs log_dir"):
        lk.FitConfig(fingerprint_every=2)
    with pytest.raises(ValueError, match="every=0"):
        lk.fingerprint(lk.FingerprintRecorder(tmp_path), every=0)
    with pytest.raises(TypeError, match="recorder="):
        lk.fingerprint("runs/a")  # type: ignore[arg-type]


def test_fingerprints_are_written_at_log_steps_only(tmp_path, monkeypatch):
    flushed_at: list[int] = []
    original = lk.FingerprintRecorder.flush

    def spy(self: lk.FingerprintRecorder) -> Any:
        flushed_at.append(sum(len(p.steps) for p in self._pending))
        return original(self)

    monkeypatch.setattr(lk.FingerprintRecorder, "flush", spy)
    _fit(tmp_path, log_every=5, max_steps=12)
    assert flushed_at == [5, 5, 2]  # steps 0-4 at log step 5, 5-9 at 10, 10-11 at the end


def test_a_resumed_run_continues_the_fingerprints_and_drops_the_lost_steps(tmp_path):
    straight = tmp_path / "straight"
    _fit(straight, max_steps=12)
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    _fit(run, max_steps=10, checkpoint_dir=ckpt, save_every=4)  # steps 8, 9 are "lost"
    _fit(run, max_steps=12, checkpoint_dir=ckpt, save_every=4, resume=str(ckpt / "step-00000008"))
    assert _rows(run) == _rows(straight)
    files = sorted(p.name for p in (run / "fingerprints").iterdir())
    index = json.loads((run / "fingerprints" / "index.json").read_text())
    assert sorted(c["file"] for c in index["chunks"]) == [f for f in files if f != "index.json"]


def test_a_fresh_run_sets_an_earlier_runs_fingerprints_aside(tmp_path):
    _fit(tmp_path, max_steps=3)
    before = _rows(tmp_path)
    _fit(tmp_path, max_steps=2)
    assert sorted(_rows(tmp_path)) == [0, 1]
    assert _rows(tmp_path / "fingerprints.1") == before


def test_the_transform_in_a_custom_loop(tmp_path):
    torch.manual_seed(0)
    state = lk.TrainState.create(build_model(8), optimizer=_adamw, seed=0)
    with lk.FingerprintRecorder(tmp_path / "fp") as recorder:
        step = lk.chain(
            lk.forward(loss_fn), lk.accumulate(2), lk.fingerprint(recorder), lk.optimizer_step()
        )
        assert repr(step).endswith("fingerprint(), optimizer_step())")
        x, y = build_data(64).tensors
        for i in range(8):
            state = step(state, (x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]))
    chunks = lk.read_fingerprints(tmp_path / "fp")  # step 0 alone: Adam has no state yet
    assert [c.steps for c in chunks] == [[0], [1, 2, 3]]
    assert [len(m["micro_step_seeds"]) for c in chunks for m in c.meta] == [2, 2, 2, 2]


def test_block_sums_cover_ragged_and_single_element_tensors():
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = torch.nn.Parameter(torch.randn(3 * BLOCK))
            self.ragged = torch.nn.Parameter(torch.randn(BLOCK + 5))
            self.small = torch.nn.Parameter(torch.randn(7))
            self.one = torch.nn.Parameter(torch.randn(()))

    torch.manual_seed(0)
    model = Odd().double()
    state = lk.TrainState.create(model, optimizer=_adamw, seed=0)
    columns, values = step_fingerprint(state)
    got = dict(zip(columns, values.tolist()))
    for name, param in model.named_parameters():
        assert got[f"weights/{name}/sum"] == pytest.approx(float(param.detach().sum()), rel=1e-12)
