"""Checkpoints: round trips, exact resume through fit, corruption, pickle, disk full, rotation."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import pickle
import re
import resource
import shutil
import signal
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import mlp
from hypothesis import given
from hypothesis import strategies as st

import loopkit as lk
from loopkit import _tree
from loopkit import checkpoint as ckpt
from loopkit.run_lock import LOCK_FILE as LOCK

# --- fixtures and comparisons -------------------------------------------------------------


def dataset(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def loss_fn(model, batch):
    x, y = batch
    return lk.cross_entropy(model(x), y)


def big_loss(model, batch):
    """A loss whose fp16 gradients overflow at the default scale: the scaler has to work."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y) * 300


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def model32(dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    return mlp(seed=seed, dropout=dropout, dtype=torch.float32)


BASE = dict(loss_fn=loss_fn, optimizer=adamw, batch_size=8, progress=False, log_every=1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tree(actual, expected, path: str = "") -> None:
    """Exact equality of nested state: types, dict order, tensor dtype/shape/bits, NaN == NaN."""
    where = path or "the root"
    assert type(actual) is type(expected), f"{where}: {type(actual)} vs {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        assert torch.equal(_bits(actual), _bits(expected)), f"{where}: values differ"
    elif isinstance(expected, float):
        same = (math.isnan(actual) and math.isnan(expected)) or (
            actual == expected and math.copysign(1, actual) == math.copysign(1, expected)
        )
        assert same, f"{where}: {actual!r} vs {expected!r}"
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tree(a, e, f"{path}[{i}]")
    elif isinstance(expected, dict):
        assert len(actual) == len(expected), f"{where}: keys {list(actual)} vs {list(expected)}"
        for (ka, va), (ke, ve) in zip(actual.items(), expected.items(), strict=True):
            assert_same_tree(ka, ke, f"{path}.<key {ke!r}>")
            assert_same_tree(va, ve, f"{path}[{ke!r}]")
    else:
        assert actual == expected, f"{where}: {actual!r} vs {expected!r}"


def history(result: lk.FitResult) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in result.history]


def assert_runs_equal(actual: lk.FitResult, expected: lk.FitResult) -> None:
    """Bitwise: parameters, buffers, optimizer state, counters, loss scale and history."""
    a, e = actual.state, expected.state
    assert_same_tree(a.model.state_dict(), e.model.state_dict(), "model")
    assert_same_tree(a.optimizer.state_dict(), e.optimizer.state_dict(), "optimizer")
    for name in ("step", "epoch", "samples_seen", "skipped_steps"):
        assert getattr(a, name) == getattr(e, name), name
    assert float(a.tokens_seen) == float(e.tokens_seen)
    if e.loss_scale is not None:
        assert_same_tree(a.loss_scale, e.loss_scale, "loss_scale")
        assert_same_tree(a.growth_tracker, e.growth_tracker, "growth_tracker")
    assert history(actual) == history(expected)
    assert actual.best == expected.best and actual.stopped_by == expected.stopped_by


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = dataset(8 * n, seed).tensors
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 8 * n, 8)]


def run(state: lk.TrainState, step, data) -> lk.TrainState:
    for batch in data:
        state = step(state, batch)
    return state


def hidden(directory: Path) -> list[str]:
    """Hidden names in `directory` besides the run lock (which stays: see loopkit.run_lock)."""
    return sorted(
        p.name for p in Path(directory).iterdir() if p.name.startswith(".") and p.name != LOCK
    )


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if not p.name.startswith("."))


def rewrite_manifest(path: Path) -> None:
    """Make the manifest agree with the files again, as a careful forger would."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


# --- optimizer state of every torch optimizer round-trips --------------------------------

_OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2, decoupled_weight_decay=True),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2, t0=1),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.5, history_size=3, max_iter=4),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
    # Muon trains matrices only; the biases are left to another optimizer.
    "Muon": lambda p: torch.optim.Muon([q for q in p if q.ndim == 2], lr=1e-2),
}
_NOT_COVERED = {"Optimizer", "SparseAdam"}  # the base class; sparse gradients only


def test_the_table_covers_every_torch_optimizer():
    available = {
        n
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
    }
    assert available - _NOT_COVERED <= set(_OPTIMIZERS), "add the new optimizer to _OPTIMIZERS"


def _train_by_hand(state: lk.TrainState, data) -> None:
    for x, y in data:

        def closure(x=x, y=y):
            state.optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(state.model(x), y)
            loss.backward()
            return loss

        state.optimizer.step(closure)


@pytest.mark.parametrize("name", [n for n in _OPTIMIZERS if hasattr(torch.optim, n)])
def test_optimizer_state_round_trips(tmp_path, name):
    factory = _OPTIMIZERS[name]
    state = lk.TrainState.create(model32(), optimizer=factory)
    _train_by_hand(state, batches(3))
    path = lk.save_checkpoint(state, tmp_path)
    loaded = lk.load_checkpoint(path, lk.TrainState.create(model32(seed=1), optimizer=factory))
    assert state.optimizer.state_dict()["state"], "the optimizer should have state by now"
    assert_same_tree(loaded.optimizer.state_dict(), state.optimizer.state_dict())
    assert_same_tree(loaded.model.state_dict(), state.model.state_dict())
    # ...and it behaves the same from here on.
    more = batches(2, seed=1)
    _train_by_hand(state, more)
    _train_by_hand(loaded, more)
    assert_same_tree(loaded.model.state_dict(), state.model.state_dict())
    assert_same_tree(loaded.optimizer.state_dict(), state.optimizer.state_dict())


def test_nothing_is_pickled_or_unpickled(tmp_path, monkeypatch):
    state = lk.TrainState.create(model32(), optimizer=adamw, precision="fp16")
    state = run(
        state, lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step()), batches(2)
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in [
        (pickle, "dump"),
        (pickle, "dumps"),
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Pickler"),
        (pickle, "Unpickler"),
        (torch, "save"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    path = lk.save_checkpoint(state, tmp_path, extra={"anything": (1, {2: float("nan")})})
    lk.load_checkpoint(path, lk.TrainState.create(model32(), optimizer=adamw, precision="fp16"))
    ckpt.read_extra(path)
    lk.save_model(state, tmp_path / "export")


# --- scaler, schedules, extra, tied weights, save_model ----------------------------------


def test_fp16_scaler_state_round_trips_and_continues(tmp_path):
    def create():
        return lk.TrainState.create(
            model32(), optimizer=adamw, precision=lk.Precision("fp16", growth_interval=2)
        )

    step = lk.chain(lk.forward(big_loss), lk.accumulate(1), lk.optimizer_step())
    state = run(create(), step, batches(7))
    assert state.skipped_steps > 0 and float(state.loss_scale) != 2.0**16  # the scaler moved
    path = lk.save_checkpoint(state, tmp_path)
    loaded = lk.load_checkpoint(path, create())
    assert_same_tree(loaded.loss_scale, state.loss_scale)
    assert_same_tree(loaded.growth_tracker, state.growth_tracker)
    assert loaded.skipped_steps == state.skipped_steps and loaded.step == state.step == 7
    more = batches(5, seed=1)
    state, loaded = run(state, step, more), run(loaded, step, more)
    assert_same_tree(loaded.model.state_dict(), state.model.state_dict())
    assert_same_tree(loaded.loss_scale, state.loss_scale)
    assert loaded.skipped_steps == state.skipped_steps


_SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=20),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=3
    ),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
        ],
        milestones=[3],
    ),
}


@pytest.mark.parametrize("name", list(_SCHEDULERS))
def test_torch_lr_scheduler_round_trips(tmp_path, name):
    def create(seed=0):
        model = model32(seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return lk.TrainState.create(model, optimizer=opt, schedule=_SCHEDULERS[name](opt))

    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.optimizer_step())
    state = run(create(), step, batches(5))
    path = lk.save_checkpoint(state, tmp_path)
    loaded = lk.load_checkpoint(path, create(seed=1))
    assert_same_tree(loaded.schedule.state_dict(), state.schedule.state_dict())
    lrs: dict[str, list[float]] = {"original": [], "loaded": []}
    for key in lrs:
        s = {"original": state, "loaded": loaded}[key]
        for batch in batches(4, seed=1):
            s = step(s, batch)
            lrs[key].append(s.metrics["train/lr"])
        lrs[key].append(s.model.state_dict())
    assert_same_tree(lrs["loaded"], lrs["original"])


def test_schedule_kind_must_match(tmp_path):
    state = lk.TrainState.create(model32(), optimizer=adamw, schedule=lk.schedules.cosine(2, 10))
    path = lk.save_checkpoint(state, tmp_path)
    model = model32()
    opt = adamw(model.parameters())
    other = lk.TrainState.create(
        model, optimizer=opt, schedule=torch.optim.lr_scheduler.StepLR(opt, 2)
    )
    with pytest.raises(lk.CheckpointError, match="same kind of schedule"):
        lk.load_checkpoint(path, other)


def _tensor(draw_seed: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw_seed)
    values = torch.randn(shape, generator=g) * 100
    if dtype.is_floating_point:
        values = values.to(dtype)
        if values.numel():
            values.view(-1)[0] = float("nan")  # NaN bits must survive too
        return values
    if dtype == torch.bool:
        return values > 0
    return values.clamp(-100, 100).to(dtype)


tensors = st.builds(
    _tensor,
    st.integers(0, 2**16),
    st.sampled_from(
        [
            torch.float32,
            torch.float64,
            torch.float16,
            torch.bfloat16,
            torch.int64,
            torch.int32,
            torch.int8,
            torch.uint8,
            torch.bool,
        ]
    ),
    st.lists(st.integers(0, 3), max_size=3),
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=4)
    | tensors
)
keys = (
    st.text(max_size=4)
    | st.integers(-3, 3)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=True)
    | st.tuples(st.integers(0, 2), st.text(max_size=2))
    | st.sampled_from(["__tensor__", "__tuple__", "__dict__", "__float__"])
)
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(keys, children, max_size=3)
    ),
    max_leaves=12,
)


@given(tree=trees)
def test_tree_split_join_round_trips_through_json_and_safetensors(tree):
    skeleton, tensor_dict = _tree.split(tree, prefix="t")
    text = json.dumps(skeleton)  # JSON-able: no pickle fallback anywhere
    stored = safetensors.torch.load(safetensors.torch.save(tensor_dict))
    assert_same_tree(_tree.join(json.loads(text), stored), tree)


def test_tree_handles_shared_storage_and_rejects_objects():
    base = torch.arange(6.0)
    tree = {"a": base, "b": base, "view": base[2:], "empty": base[0:0]}
    skeleton, tensor_dict = _tree.split(tree)
    joined = _tree.join(skeleton, safetensors.torch.load(safetensors.torch.save(tensor_dict)))
    assert_same_tree(joined, {k: v.clone() for k, v in tree.items()})
    with pytest.raises(TypeError, match=r"cannot store object at \.a\[1\]"):
        _tree.split({"a": [1, object()]})


def test_extra_round_trips_through_a_checkpoint(tmp_path):
    extra = {
        "nested": (1, (2.5, "x"), [None, True]),
        7: {(1, 2): float("nan")},
        "inf": -math.inf,
        "t": torch.arange(3, dtype=torch.int16),
        "same": None,
    }
    extra["same"] = extra["t"]  # one tensor twice
    state = lk.TrainState.create(model32(), optimizer=adamw)
    path = lk.save_checkpoint(state, tmp_path, extra=extra)
    assert_same_tree(ckpt.read_extra(path), {**extra, "same": extra["t"].clone()})


class Tied(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(11, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def test_tied_weights_round_trip_and_stay_tied(tmp_path):
    def lm_loss(model, batch):
        return lk.cross_entropy(model(batch).reshape(-1, 11), batch.roll(1, 1).reshape(-1))

    tokens = [
        torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    state = run(
        lk.TrainState.create(Tied(), optimizer=adamw),
        lk.chain(lk.forward(lm_loss), lk.accumulate(1), lk.optimizer_step()),
        tokens,
    )
    path = lk.save_checkpoint(state, tmp_path / "ck")
    loaded = lk.load_checkpoint(path, lk.TrainState.create(Tied(seed=1), optimizer=adamw))
    assert loaded.model.head.weight is loaded.model.embed.weight
    assert_same_tree(loaded.model.state_dict(), state.model.state_dict())
    assert_same_tree(loaded.optimizer.state_dict(), state.optimizer.state_dict())
    # Weights only, read back without loopkit.
    file = lk.save_model(state, tmp_path / "export")
    fresh = Tied(seed=2)
    fresh.load_state_dict(safetensors.torch.load_file(str(file)), strict=True)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, state.model.embed.weight)


def test_save_model_loads_with_plain_safetensors(tmp_path):
    result = lk.fit(model32(), dataset(), max_steps=3, **BASE)
    file = lk.save_model(result.state, tmp_path)
    assert file == tmp_path / "model.safetensors"
    fresh = model32(seed=5)
    fresh.load_state_dict(safetensors.torch.load_file(str(file)), strict=True)
    x = dataset(8, seed=3).tensors[0]
    assert torch.equal(fresh(x), result.state.model(x))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "loopkit-model/1" and config["step"] == 3
    assert config["tensors"]["0.weight"] == {"shape": [8, 4], "dtype": "torch.float32"}
    assert lk.save_model(model32(), tmp_path / "module").name == "model.safetensors"
    assert hidden(tmp_path) == []


def test_save_refuses_an_open_window(tmp_path):
    state = lk.TrainState.create(model32(), optimizer=adamw)
    state = lk.chain(lk.forward(loss_fn), lk.accumulate(2))(state, batches(1)[0])
    with pytest.raises(ValueError, match="micro_step 1.*window is open"):
        lk.save_checkpoint(state, tmp_path)
    assert not list(tmp_path.iterdir())


# --- exact resume through fit -------------------------------------------------------------


def interrupted(tmp_path: Path, stop: int, total: int, model=model32, data=dataset, **kw):
    """fit to `stop` with a checkpoint there, then a fresh process-like fit resumed to `total`."""
    first = lk.fit(model(), data(), max_steps=stop, checkpoint_dir=tmp_path, save_every=stop, **kw)
    assert first.state.step == stop
    fresh = model()
    with torch.no_grad():  # the resumed run must not depend on the weights it starts from
        for p in fresh.parameters():
            p.add_(1.0)
    return lk.fit(fresh, data(), max_steps=total, checkpoint_dir=tmp_path, resume=True, **kw)


@given(
    k=st.integers(1, 3),
    shuffle=st.booleans(),
    dropout=st.sampled_from([0.0, 0.5]),
    total=st.integers(2, 14),
    data=st.data(),
)
def test_interrupted_fit_equals_uninterrupted_bitwise(
    tmp_path_factory, k, shuffle, dropout, total, data
):
    stop = data.draw(st.integers(1, total - 1), label="stop")
    # 40 samples = 5 micro-batches per epoch: windows of k > 1 straddle epoch ends.
    kw = dict(BASE, accumulate=k, shuffle=shuffle, seed=3, schedule=lk.schedules.cosine(2, total))
    expected = lk.fit(model32(dropout), dataset(40), max_steps=total, **kw)
    actual = interrupted(
        tmp_path_factory.mktemp("ck"),
        stop,
        total,
        model=lambda: model32(dropout),
        data=lambda: dataset(40),
        **kw,
    )
    assert_runs_equal(actual, expected)


@pytest.mark.parametrize(
    ("k", "stop"), [(1, 8), (1, 16), (2, 4), (1, 3), (4, 6)], ids=lambda v: str(v)
)
def test_resume_at_and_around_epoch_ends(tmp_path, k, stop):
    kw = dict(BASE, accumulate=k, shuffle=True, seed=1)
    expected = lk.fit(model32(0.3), dataset(), max_steps=20, **kw)
    actual = interrupted(tmp_path, stop, 20, model=lambda: model32(0.3), **kw)
    assert_runs_equal(actual, expected)


@pytest.mark.parametrize("k", [1, 2])
def test_resume_from_epoch_end_checkpoints(tmp_path, k, capsys):
    kw = dict(BASE, accumulate=k, shuffle=True)
    expected = lk.fit(model32(0.3), dataset(), epochs=4, **kw)
    lk.fit(model32(0.3), dataset(), epochs=2, checkpoint_dir=tmp_path, save_on_epoch_end=True, **kw)
    assert visible(tmp_path) == ["latest", ckpt.step_dir_name(8 // k), ckpt.step_dir_name(16 // k)]
    actual = lk.fit(model32(0.3), dataset(), epochs=4, checkpoint_dir=tmp_path, resume=True, **kw)
    assert f"resumed from {tmp_path / ckpt.step_dir_name(16 // k)} (step {16 // k}, epoch 2)" in (
        capsys.readouterr().out
    )
    assert_runs_equal(actual, expected)


def test_a_step_saved_twice_is_written_once(tmp_path):
    # save_every lands on the epoch's last step and save_on_epoch_end fires right after it:
    # re-writing step-8 in place is not atomic, and resuming from the first copy is exact.
    saved: list[int] = []

    class Saves:
        def on_checkpoint_saved(self, state, path):
            saved.append(state.step)

    kw = dict(BASE, shuffle=True)
    lk.fit(
        model32(),
        dataset(),
        epochs=2,
        checkpoint_dir=tmp_path,
        save_every=8,
        save_on_epoch_end=True,
        callbacks=[Saves()],
        **kw,
    )
    assert saved == [8, 16]
    expected = lk.fit(model32(), dataset(), epochs=3, **kw)
    saved.clear()
    actual = lk.fit(
        model32(),
        dataset(),
        epochs=3,
        checkpoint_dir=tmp_path,
        save_every=8,
        save_on_epoch_end=True,
        resume=True,
        callbacks=[Saves()],
        **kw,
    )
    assert saved == [24]  # step 16 is where it resumed from: not written again
    assert_runs_equal(actual, expected)


@pytest.mark.parametrize("stop", [2, 5, 9])
def test_resume_with_fp16_scaler_state(tmp_path, stop):
    kw = dict(BASE, loss_fn=big_loss, precision="fp16", shuffle=True)
    expected = lk.fit(model32(), dataset(), max_steps=12, **kw)
    assert expected.state.skipped_steps > 0 and float(expected.state.loss_scale) < 2.0**16
    assert_runs_equal(interrupted(tmp_path, stop, 12, **kw), expected)


def test_resume_with_a_torch_lr_scheduler(tmp_path):
    def make(seed=0):
        model = model32(seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=12)
        return model, dict(BASE, optimizer=opt, schedule=sched)

    model, kw = make()
    expected = lk.fit(model, dataset(), max_steps=12, **kw)
    model, kw = make()
    lk.fit(model, dataset(), max_steps=5, checkpoint_dir=tmp_path, save_every=5, **kw)
    model, kw = make(seed=1)
    actual = lk.fit(model, dataset(), max_steps=12, checkpoint_dir=tmp_path, resume=True, **kw)
    assert_runs_equal(actual, expected)


@pytest.mark.parametrize("when", ["wait=2", "one eval before stopping"])
def test_resume_continues_early_stopping_state(tmp_path, when):
    waits: list[tuple[int, int]] = []

    def run_fit(max_steps, seed=0, **kw):
        stopper = lk.EarlyStopping("eval/loss", patience=4)

        class Waits:
            def on_eval_end(self, state, metrics):
                waits.append((state.step, stopper.wait))

        optimizer = lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9)  # noqa: E731
        return lk.fit(
            model32(0.2, seed=seed),
            dataset(),
            max_steps=max_steps,
            eval_data=dataset(32, 1),
            eval_every=2,
            callbacks=[stopper, Waits()],
            **{**BASE, "optimizer": optimizer, **kw},
        )

    expected = run_fit(100)
    assert expected.stopped_by.startswith("EarlyStopping") and expected.state.step < 100
    reference = list(waits)
    stop = {
        "wait=2": next(s for s, w in reference if w == 2),
        "one eval before stopping": reference[-2][0],
    }[when]
    run_fit(stop, checkpoint_dir=tmp_path, save_every=2)
    waits.clear()
    actual = run_fit(100, seed=5, checkpoint_dir=tmp_path, resume=True)
    # A fresh counter would need 4 more evals without improvement: it would stop later.
    assert waits == [(s, w) for s, w in reference if s > stop]
    assert_runs_equal(actual, expected)


def test_keep_best_and_keep_last_rotation_and_resume(tmp_path):
    # The lr drops to 0 after step 5, so the best eval is early and rotation must keep it.
    kw = dict(
        BASE,
        eval_data=dataset(32, 1),
        eval_every=1,
        save_every=3,
        keep_last=2,
        keep_best=True,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
        schedule=lambda step: 1.0 if step < 5 else 0.0,
    )
    expected = lk.fit(model32(), dataset(), max_steps=15, checkpoint_dir=tmp_path / "a", **kw)
    evals = [(h["step"], h["eval/loss"]) for h in expected.history if "eval/loss" in h]
    improved = [s for i, (s, v) in enumerate(evals) if all(v < w for _, w in evals[:i])]
    saved = sorted({s for s in range(1, 16) if s % 3 == 0} | set(improved))
    best = min(evals, key=lambda e: e[1])[0]
    assert expected.best["step"] == best and best not in saved[-2:], "pick a case that rotates"
    kept = sorted(set(saved[-2:]) | {best})
    assert sorted(ckpt.list_checkpoints(tmp_path / "a")) == [
        tmp_path / "a" / ckpt.step_dir_name(s) for s in kept
    ]
    # Interrupted at step 10, then resumed: same files, same best, same weights and history.
    lk.fit(model32(), dataset(), max_steps=10, checkpoint_dir=tmp_path / "b", **kw)
    actual = lk.fit(
        model32(seed=4), dataset(), max_steps=15, checkpoint_dir=tmp_path / "b", resume=True, **kw
    )
    assert_runs_equal(actual, expected)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        p.name for p in (tmp_path / "a").iterdir()
    )


def test_latest_pointer_names_the_newest_checkpoint(tmp_path):
    lk.fit(model32(), dataset(), max_steps=6, checkpoint_dir=tmp_path, save_every=2, **BASE)
    assert (tmp_path / "latest").read_text() == ckpt.step_dir_name(6)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.step_dir_name(6)
    assert hidden(tmp_path) == []


# --- corruption: detected, skipped with a reason, explicit paths raise ----------------------


def _corrupt_truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-7])


def _corrupt_flip(path: Path) -> None:
    file = path / "state.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def _corrupt_garbage_json(path: Path) -> None:
    (path / "state.json").write_text('{"format": "loopkit-checkpoint/1", "step": 4, "tre')
    rewrite_manifest(path)  # checksums agree: the JSON parse itself must catch it


def _corrupt_wrong_json(path: Path) -> None:
    (path / "state.json").write_text('{"format": "loopkit-checkpoint/1", "tree": [1]}')
    rewrite_manifest(path)


def _other_model(path: Path) -> None:
    shutil.rmtree(path)
    state = lk.TrainState.create(mlp(d_hidden=5, dtype=torch.float32), optimizer=adamw)
    lk.save_checkpoint(state.replace(step=4), path.parent)


CORRUPTIONS = {
    "truncated": (_corrupt_truncate, r"model\.safetensors has \d+ bytes, the manifest says \d+"),
    "flipped-byte": (_corrupt_flip, r"state\.safetensors fails its sha256 checksum"),
    "no-manifest": (lambda p: (p / "manifest.json").unlink(), r"manifest\.json is missing"),
    "no-tensor-file": (
        lambda p: (p / "model.safetensors").unlink(),
        r"model\.safetensors is missing",
    ),
    "garbage-json": (_corrupt_garbage_json, r"state\.json: unreadable JSON"),
    "wrong-json": (_corrupt_wrong_json, r"state\.json lacks \['step'"),
    "other-model": (
        _other_model,
        r"does not fit this model; shape mismatches: \[.*"
        r"'0\.weight: checkpoint \(5, 4\), model \(8, 4\)'",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_detected_and_resume_falls_back(tmp_path, capsys, kind):
    corrupt, message = CORRUPTIONS[kind]
    lk.fit(model32(), dataset(), max_steps=4, checkpoint_dir=tmp_path, save_every=2, **BASE)
    bad = tmp_path / ckpt.step_dir_name(4)
    corrupt(bad)
    fresh = lk.TrainState.create(model32(seed=3), optimizer=adamw)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    before = type(fresh.model.state_dict())(before)
    with pytest.raises(lk.CheckpointError, match=message):
        lk.load_checkpoint(bad, fresh)
    fresh.check_fresh()  # not consumed, and nothing was loaded into it
    assert_same_tree(fresh.model.state_dict(), before)
    capsys.readouterr()
    if kind == "other-model":
        # Valid, but of another model: an error, never a fallback or a fresh start over it
        # (tests/test_run_safety.py checks that every file stays byte-identical).
        with pytest.raises(ckpt.CheckpointMismatchError, match=r"fit\(resume=True\).*" + message):
            lk.fit(model32(), dataset(), max_steps=6, checkpoint_dir=tmp_path, resume=True, **BASE)
        return
    # resume=True skips it, says why, and continues exactly from step 2.
    actual = lk.fit(
        model32(),
        dataset(),
        max_steps=6,
        checkpoint_dir=tmp_path,
        resume=True,
        save_every=2,
        **BASE,
    )
    out = capsys.readouterr().out
    assert f"skipping checkpoint {bad.name}: {bad}" in out
    assert any(
        line.startswith("loopkit: skipping") and re.search(message, line)
        for line in out.splitlines()
    )
    assert f"resumed from {tmp_path / ckpt.step_dir_name(2)} (step 2" in out
    assert_runs_equal(actual, lk.fit(model32(), dataset(), max_steps=6, **BASE))
    ckpt.validate_checkpoint(bad)  # step 4 was written again, whole
    # An explicit path that is bad raises: no fallback.
    corrupt(bad)
    with pytest.raises(lk.CheckpointError, match=message):
        lk.fit(model32(), dataset(), max_steps=6, checkpoint_dir=tmp_path, resume=str(bad), **BASE)


def test_resume_from_a_missing_path_raises_before_writing(tmp_path):
    with pytest.raises(lk.CheckpointError, match="no such checkpoint directory"):
        lk.fit(
            model32(),
            dataset(),
            max_steps=2,
            checkpoint_dir=tmp_path / "ck",
            resume=str(tmp_path / "nope"),
            **BASE,
        )
    assert not (tmp_path / "ck").exists()


def test_resume_with_nothing_valid_starts_fresh_and_says_so(tmp_path, capsys):
    lk.fit(model32(), dataset(), max_steps=2, checkpoint_dir=tmp_path, save_every=2, **BASE)
    (tmp_path / ckpt.step_dir_name(2) / "manifest.json").unlink()
    capsys.readouterr()
    result = lk.fit(model32(), dataset(), max_steps=3, checkpoint_dir=tmp_path, resume=True, **BASE)
    out = capsys.readouterr().out
    assert "skipping checkpoint step-00000002" in out and "starting fresh" in out
    assert_runs_equal(result, lk.fit(model32(), dataset(), max_steps=3, **BASE))


# --- a hand-made malicious checkpoint -----------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: proof that something was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _payloads(marker: Path) -> dict[str, bytes]:
    import io

    buffer = io.BytesIO()
    torch.save({"weight": _Payload(str(marker))}, buffer)  # torch's zip + pickle format
    return {"pickle": pickle.dumps(_Payload(str(marker))), "torch.save": buffer.getvalue()}


@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
@pytest.mark.parametrize("target", ["model.safetensors", "state.safetensors", "state.json"])
def test_a_pickle_payload_is_rejected_without_running(tmp_path, capsys, target, fmt):
    live = tmp_path / "live-marker"
    pickle.loads(_payloads(live)["pickle"])  # the payload is armed: unpickling runs it
    assert live.exists()
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    lk.fit(model32(), dataset(), max_steps=4, checkpoint_dir=run_dir, save_every=2, **BASE)
    bad = run_dir / ckpt.step_dir_name(4)
    (bad / target).write_bytes(_payloads(marker)[fmt])
    rewrite_manifest(bad)
    ckpt.validate_checkpoint(bad)  # the checksums agree; the content is what's wrong
    with pytest.raises(
        lk.CheckpointError, match=rf"{target}: (not a readable safetensors|unreadable JSON)"
    ):
        lk.load_checkpoint(bad, lk.TrainState.create(model32(), optimizer=adamw))
    if target.startswith("state"):
        with pytest.raises(lk.CheckpointError, match=target):
            ckpt.read_extra(bad)
    result = lk.fit(model32(), dataset(), max_steps=5, checkpoint_dir=run_dir, resume=True, **BASE)
    assert f"skipping checkpoint {bad.name}" in capsys.readouterr().out
    assert result.state.step == 5
    assert not marker.exists()


# --- disk full ----------------------------------------------------------------------------


def _fail_writes_of(where, monkeypatch):
    """Make the save of step 4 fail at file `where` as the real libraries do on a full disk.

    safetensors raises its own SafetensorError ("... (os error 28)"), open() an OSError.
    """
    real_save_file, real_open = safetensors.torch.save_file, open

    def save_file(tensors, filename, metadata=None):
        if "step-00000004" in filename and filename.endswith(where):
            Path(filename).write_bytes(b"\0" * 10)  # a partial write, then the disk is full
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real_save_file(tensors, filename, metadata)

    def fake_open(file, mode="r", *args, **kwargs):
        if "step-00000004" in str(file) and str(file).endswith(where) and "w" in mode:
            real_open(file, mode).close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)


def _assert_step_2_survives(tmp_path):
    assert hidden(tmp_path) == []  # the partial tmp dir was removed
    assert visible(tmp_path) == ["latest", ckpt.step_dir_name(2)]
    assert (tmp_path / "latest").read_text() == ckpt.step_dir_name(2)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.step_dir_name(2)


@pytest.mark.parametrize(
    "where", ["model.safetensors", "state.safetensors", "state.json", "manifest.json"]
)
def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_survives(
    tmp_path, monkeypatch, capsys, where
):
    _fail_writes_of(where, monkeypatch)
    with pytest.raises(
        lk.CheckpointError,
        match="could not write step 4: .* .the disk is full; errno 28 ENOSPC.; earlier "
        "checkpoints are untouched",
    ) as error:
        lk.fit(model32(), dataset(), max_steps=6, checkpoint_dir=tmp_path, save_every=2, **BASE)
    assert error.value.errno == errno.ENOSPC
    assert error.value.path == tmp_path / ckpt.step_dir_name(4) / where
    assert str(error.value.path) in str(error.value)
    _assert_step_2_survives(tmp_path)
    # Space freed: the run resumes from step 2 and ends where an unbroken run does.
    monkeypatch.undo()
    capsys.readouterr()
    actual = lk.fit(model32(), dataset(), max_steps=6, checkpoint_dir=tmp_path, resume=True, **BASE)
    assert "skipping" not in capsys.readouterr().out
    assert_runs_equal(actual, lk.fit(model32(), dataset(), max_steps=6, **BASE))


@pytest.mark.parametrize(
    "where", ["model.safetensors", "state.safetensors", "state.json", "manifest.json"]
)
def test_a_real_write_failure_rlimit_fsize_is_a_checkpoint_error(tmp_path, monkeypatch, where):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG) inside the real libraries."""
    real_tensors, real_bytes = ckpt._write_tensors, ckpt._write_bytes

    def limited(real, path_index):
        def write(*args):
            path = str(args[path_index])
            if "step-00000004" not in path or not path.endswith(where):
                return real(*args)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (8, hard))
            try:
                return real(*args)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                signal.signal(signal.SIGXFSZ, handler)

        return write

    monkeypatch.setattr(ckpt, "_write_tensors", limited(real_tensors, 1))
    monkeypatch.setattr(ckpt, "_write_bytes", limited(real_bytes, 0))
    with pytest.raises(lk.CheckpointError, match="errno 27 EFBIG") as error:
        lk.fit(model32(), dataset(), max_steps=6, checkpoint_dir=tmp_path, save_every=2, **BASE)
    assert error.value.errno == errno.EFBIG
    assert error.value.path == tmp_path / ckpt.step_dir_name(4) / where
    _assert_step_2_survives(tmp_path)


# --- rotation -----------------------------------------------------------------------------


def _checkpoints(directory: Path, steps) -> None:
    state = lk.TrainState.create(model32(), optimizer=adamw)
    for s in steps:
        state = state.replace(step=s)
        lk.save_checkpoint(state, directory)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in ckpt.list_checkpoints(directory))


def test_rotation_keeps_the_newest_n_plus_the_protected_one(tmp_path):
    _checkpoints(tmp_path, range(1, 7))
    deleted = ckpt.rotate_checkpoints(tmp_path, 2, keep=[tmp_path / ckpt.step_dir_name(3)])
    assert sorted(p.name for p in deleted) == [ckpt.step_dir_name(s) for s in (1, 2, 4)]
    assert _names(tmp_path) == [ckpt.step_dir_name(s) for s in (3, 5, 6)]
    assert hidden(tmp_path) == []
    with pytest.raises(ValueError, match="keep_last=0"):
        ckpt.rotate_checkpoints(tmp_path, 0)


@pytest.mark.parametrize("damage", [_corrupt_flip, _corrupt_truncate], ids=["flip", "truncate"])
def test_rotation_never_deletes_the_only_valid_checkpoint(tmp_path, damage):
    _checkpoints(tmp_path, range(1, 5))
    for s in (3, 4):  # the newer two are corrupt
        damage(tmp_path / ckpt.step_dir_name(s))
    ckpt.rotate_checkpoints(tmp_path, 1)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.step_dir_name(2)
    assert ckpt.step_dir_name(1) not in _names(tmp_path)


def test_resume_past_a_corrupt_newer_checkpoint_with_keep_last_1(tmp_path, capsys):
    kw = dict(BASE, checkpoint_dir=tmp_path, save_every=1, keep_last=1)
    lk.fit(model32(), dataset(), max_steps=4, **kw)
    assert _names(tmp_path) == [ckpt.step_dir_name(4)]
    lk.fit(model32(), dataset(), max_steps=2, **{**kw, "checkpoint_dir": tmp_path / "old"})
    shutil.move(tmp_path / "old" / ckpt.step_dir_name(2), tmp_path / ckpt.step_dir_name(2))
    _corrupt_flip(tmp_path / ckpt.step_dir_name(4))
    actual = lk.fit(model32(), dataset(), max_steps=6, resume=True, **kw)
    assert "skipping checkpoint step-00000004" in capsys.readouterr().out
    assert_runs_equal(actual, lk.fit(model32(), dataset(), max_steps=6, **BASE))
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.step_dir_name(6)


# --- NaN / Inf policy ---------------------------------------------------------------------


def nan_on_calls(calls: set[int]):
    """loss_fn returning NaN on the given calls (with accumulate=1, call i is step i)."""
    counter = itertools.count()

    def f(model, batch):
        loss = loss_fn(model, batch)
        return loss.sum * float("nan") if next(counter) in calls else loss

    return f


@pytest.mark.parametrize(
    ("bad_step", "save_every", "log_every"), [(0, 2, 50), (3, 2, 50), (4, 2, 50), (5, 3, 1)]
)
def test_nonfinite_raise_names_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, bad_step, save_every, log_every
):
    with pytest.raises(FloatingPointError, match=rf"NaN or infinite at step {bad_step}\. "):
        lk.fit(
            model32(),
            dataset(),
            max_steps=12,
            checkpoint_dir=tmp_path,
            save_every=save_every,
            **{**BASE, "loss_fn": nan_on_calls({bad_step}), "log_every": log_every},
        )
    good = bad_step - bad_step % save_every  # the last save at or before the bad step
    assert _names(tmp_path) == [
        ckpt.step_dir_name(s) for s in range(save_every, good + 1, save_every)
    ]
    assert hidden(tmp_path) == []
    if good:
        last = ckpt.latest_checkpoint(tmp_path)
        assert last == tmp_path / ckpt.step_dir_name(good)
        state = lk.load_checkpoint(last, lk.TrainState.create(model32(), optimizer=adamw))
        clean = lk.fit(model32(), dataset(), max_steps=good, **BASE)
        assert_same_tree(state.model.state_dict(), clean.state.model.state_dict())


@pytest.mark.parametrize("bad_step", [0, 3, 4, 9, 11])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("log_every", [None, 5])
def test_nonfinite_raise_names_the_first_bad_step_whenever_it_is_checked(
    monkeypatch, bad_step, chunk, log_every
):
    # fit keeps the losses since the last check and reads them at log steps and at the
    # end; runs without a check for _NONFINITE_CHUNK steps fold them on the device.
    monkeypatch.setattr(sys.modules["loopkit.fit"], "_NONFINITE_CHUNK", chunk)
    with pytest.raises(FloatingPointError, match=rf"NaN or infinite at step {bad_step}\. "):
        lk.fit(
            model32(),
            dataset(),
            max_steps=12,
            **{
                **BASE,
                "loss_fn": nan_on_calls({bad_step, bad_step + 1, 11}),
                "log_every": log_every,
            },
        )


def test_nonfinite_raise_checks_a_custom_step_too():
    step = lk.chain(lk.forward(nan_on_calls({6})), lk.accumulate(1), lk.optimizer_step())
    with pytest.raises(FloatingPointError, match=r"NaN or infinite at step 6\. "):
        lk.fit(model32(), dataset(), max_steps=12, step=step, **{**BASE, "log_every": 4})


def test_nonfinite_skip_drops_the_update_and_counts_it():
    params_after: dict[int, list[torch.Tensor]] = {}

    class Params:
        def on_step_end(self, state):
            params_after[state.step] = [p.detach().clone() for p in state.params]

    bad = {2, 5, 6}
    result = lk.fit(
        model32(),
        dataset(),
        max_steps=9,
        nonfinite="skip",
        callbacks=[Params()],
        **{**BASE, "loss_fn": nan_on_calls(bad)},
    )
    assert result.state.skipped_steps == 3 and result.state.step == 9
    for s in range(1, 9):  # the update of step s turns params_after[s] into params_after[s + 1]
        same = all(
            torch.equal(a, b) for a, b in zip(params_after[s], params_after[s + 1], strict=True)
        )
        assert same == (s in bad), s
    assert all(torch.isfinite(p).all() for p in result.state.params)


def test_nonfinite_skip_stops_after_n_in_a_row():
    with pytest.raises(
        FloatingPointError,
        match=r"3 optimizer steps in a row .*\(last at step 6\)"
        r".*max_nonfinite_skips=3",
    ):
        lk.fit(
            model32(),
            dataset(),
            max_steps=20,
            nonfinite="skip",
            max_nonfinite_skips=3,
            **{**BASE, "loss_fn": nan_on_calls({1} | set(range(4, 100)))},
        )


# --- bad configuration fails before anything is written -----------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(save_every=2), r"save_every=2\): needs checkpoint_dir"),
        (dict(resume=True), r"resume=True\): needs checkpoint_dir"),
        (dict(keep_last=2), r"keep_last=2\): needs checkpoint_dir"),
        (dict(keep_best=True), r"keep_best=True\): needs checkpoint_dir"),
        (dict(save_on_epoch_end=True), r"save_on_epoch_end=True\): needs checkpoint_dir"),
        (
            dict(keep_last=0, checkpoint_dir="CK"),
            r"keep_last=0\): must be None \(keep all\) or an int >= 1",
        ),
        (dict(save_every=0, checkpoint_dir="CK"), r"save_every=0\)"),
        (dict(nonfinite="ignore"), r"nonfinite='ignore'\): must be 'raise' or 'skip'"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]!r}" for k in v) if isinstance(v, dict) else "",
)
def test_bad_checkpoint_config_fails_before_writing(tmp_path, kw, message):
    kw = {k: (tmp_path / "ck" if v == "CK" else v) for k, v in kw.items()}
    model = model32()
    before = type(model.state_dict())((k, v.clone()) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=message):
        lk.fit(model, dataset(), max_steps=2, log_dir=tmp_path / "logs", **{**BASE, **kw})
    assert list(tmp_path.iterdir()) == []
    assert_same_tree(model.state_dict(), before)
