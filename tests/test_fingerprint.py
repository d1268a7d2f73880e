"""Step fingerprints: what fit records, when, and that they see what they claim to see."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from forensics_parts import build_data, build_model, loss_fn

import loopkit as lk
from loopkit.fingerprint import _SIGN_SEED, BLOCK, _Cache, step_fingerprint


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


def _reference(tensor: torch.Tensor) -> tuple[float, float]:
    """The documented definition: blocks of BLOCK elements (the last one zero-padded) summed
    in float32 (float64 for float64), the block sums added in float64, plainly and with the
    fixed signs."""
    flat = tensor.detach().reshape(-1)
    n_blocks = max(1, -(-flat.numel() // BLOCK))
    padded = torch.zeros(n_blocks * BLOCK, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    accumulator = torch.float64 if flat.dtype == torch.float64 else torch.float32
    sums = padded.view(n_blocks, BLOCK).sum(1, dtype=accumulator).double()
    generator = torch.Generator().manual_seed(_SIGN_SEED)
    signs = torch.randint(0, 2, (n_blocks,), generator=generator).double() * 2 - 1
    return float(sums.sum()), float((sums * signs).sum())


class _Mixed(torch.nn.Module):
    """Every kind of tensor the reduction treats apart (big, ragged, small, single), 3 dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.big = torch.nn.Parameter(torch.randn(64, BLOCK))  # 8192 elements: summed alone
        self.ragged = torch.nn.Parameter(torch.randn(4100))  # packed, zero-padded
        self.small = torch.nn.Parameter(torch.randn(7))
        self.one = torch.nn.Parameter(torch.randn(()))
        self.wide = torch.nn.Parameter(torch.randn(40, BLOCK, dtype=torch.float64))
        self.brain = torch.nn.Parameter(torch.randn(3 * BLOCK + 1).to(torch.bfloat16))


def test_the_columns_follow_the_block_definition_for_every_kind_of_tensor():
    torch.manual_seed(0)
    model = _Mixed()
    state = lk.TrainState.create(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), seed=0)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    columns, values = step_fingerprint(state)
    got = dict(zip(columns, values.tolist()))
    for name, param in model.named_parameters():
        for kind, tensor in (("weights", param), ("grads", param.grad)):
            plain, signed = _reference(tensor)  # type: ignore[arg-type]
            assert got[f"{kind}/{name}/sum"] == pytest.approx(plain, rel=1e-12, abs=1e-12)
            assert got[f"{kind}/{name}/wsum"] == pytest.approx(signed, rel=1e-12, abs=1e-12)


def test_a_fingerprint_reads_nothing_on_the_host():
    """No `.item()` (a host sync on a GPU) in a step's fingerprint, plan made or reused."""
    torch.manual_seed(0)
    state = lk.TrainState.create(build_model(8), optimizer=_adamw, seed=0)
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.clip(1.0), lk.optimizer_step())
    x, y = build_data(64).tensors
    for i in range(2):
        state = step(state, (x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]))
    state = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.clip(1.0))(state, (x[:16], y[:16]))
    cache = _Cache()
    step_fingerprint(state, cache)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_fingerprint(state, cache)
    names = {event.name for event in prof.events()}
    assert not names & {"aten::item", "aten::_local_scalar_dense"}, names


def test_a_reused_layout_sees_every_replaced_tensor():
    torch.manual_seed(0)
    model = build_model(8)
    state = lk.TrainState.create(model, optimizer=_adamw, seed=0)
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step())
    x, y = build_data(64).tensors
    state = step(state, (x[:16], y[:16]))
    state = lk.chain(lk.forward(loss_fn), lk.accumulate(1))(state, (x[16:32], y[16:32]))
    cache = _Cache()
    step_fingerprint(state, cache)
    weight, bias = model[2].weight, model[4].bias
    optimizer = state.optimizer

    def columns(fingerprint: tuple[tuple[str, ...], torch.Tensor]) -> dict[str, float]:
        return dict(zip(fingerprint[0], fingerprint[1].tolist()))

    def replace_state() -> None:
        optimizer.state[weight]["exp_avg"] = torch.full_like(weight, 0.5)

    def move_weight() -> None:
        weight.data = weight.data + 1.0  # the same parameter object, new storage

    def drop_grad() -> None:
        bias.grad = None

    for change in (replace_state, move_weight, drop_grad):  # one at a time, each seen
        with torch.no_grad():
            change()
        reused, fresh = columns(step_fingerprint(state, cache)), columns(step_fingerprint(state))
        assert reused == fresh, change.__name__
    assert fresh["optimizer/2.weight/exp_avg/sum"] == pytest.approx(0.5 * weight.numel())
    assert fresh["weights/2.weight/sum"] == pytest.approx(float(weight.detach().double().sum()))
    assert "grads/4.bias/sum" not in fresh


class _Sharded(torch.nn.Parameter):
    """A parameter with a `to_local()`, as a DTensor has (here a new copy at each call)."""

    def to_local(self) -> torch.Tensor:
        return self.detach().clone()


def test_a_sharded_model_is_read_through_to_local_at_every_step():
    torch.manual_seed(0)
    plain = build_model(8)
    sharded = build_model(8)
    sharded.load_state_dict(plain.state_dict())
    for module in (sharded[0], sharded[2]):
        module.weight = _Sharded(module.weight.detach().clone())
    prints = []
    for model in (plain, sharded):
        state = lk.TrainState.create(model, optimizer=_adamw, seed=0)
        cache = _Cache()
        step_fingerprint(state, cache)
        with torch.no_grad():
            model[0].weight.add_(1.0)
        prints.append(step_fingerprint(state, cache))
    assert prints[0][0] == prints[1][0]
    assert torch.equal(prints[0][1], prints[1][1])
