"""Pipeline on 2 gloo processes (and 4: pipeline x data parallel) against a float64 loop.

One launch of 2 ranks runs every check (schedules x micro-batch counts, errors, eval,
checkpoints, fit, snapshot); each test below reads its check's outcome. The model is an
nn.Sequential language model cut at "layers.2"; token batches are padded unevenly, so a
per-chunk or per-stage normalisation would fail. The oracle is a hand-written loop on the
unsplit model: zero_grad, backward of the window's mean loss over every item, clip, step.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import traceback
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F  # noqa: N812
from _ranks import run_ranks
from helpers import prefixed
from torch import nn

import loopkit as lk
from loopkit import checkpoint as ckpt
from loopkit.strategies import Pipeline, SingleDevice
from loopkit.strategies.env import init_distributed
from loopkit.strategies.pipeline import NEEDS_FACTORY, schedule_names

pytestmark = pytest.mark.distributed

TIMEOUT_S = 30.0
RTOL, ATOL = 1e-10, 1e-12
VOCAB, D, T = 11, 6, 5
ROOT = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h))


class CumSum(nn.Module):
    """Causal mixing without parameters: position t sees the tokens up to t."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.cumsum(dim=1)


def seq_lm(seed: int = 0, n_layers: int = 4) -> nn.Sequential:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            embed=nn.Embedding(VOCAB, D),
            mix=CumSum(),
            layers=nn.Sequential(*(Block(D) for _ in range(n_layers))),
            head=nn.Linear(D, VOCAB),
        )
    ).double()
    torch.random.set_rng_state(state)
    return model


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> lk.Loss:
    return lk.cross_entropy(model(batch["tokens"]), batch["targets"])


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A scalar mean: counts rows (batch size), as loopkit's contract says."""
    logits = model(batch["tokens"])
    return F.cross_entropy(logits[:, -1], batch["targets"][:, 0].clamp(min=0))


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-2, weight_decay=0.01)


def tokens(seed: int, rows: int = 8) -> dict[str, torch.Tensor]:
    """Padded rows: about a third of the targets are ignore_index, unevenly per row."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, VOCAB, (rows, T), generator=g)
    targets = torch.randint(0, VOCAB, (rows, T), generator=g)
    targets[torch.rand(rows, T, generator=g) < 0.35] = -100
    targets[:, 0] = torch.randint(0, VOCAB, (rows,), generator=g)  # every row counts
    return {"tokens": toks, "targets": targets}


def windows(k: int, steps: int, replicas: int = 1, rows: int = 8, base: int = 0) -> list:
    """windows[s][i][r]: micro-batch i of step s for data-parallel replica r."""
    return [
        [[tokens(base + 1000 * s + 10 * i + r, rows) for r in range(replicas)] for i in range(k)]
        for s in range(steps)
    ]


def reference(
    loss_fn: Callable[..., Any], wins: list, max_norm: float | None, seed: int = 0
) -> dict[str, list]:
    """The hand-written float64 loop on the unsplit model (all replicas' items together)."""
    model = seq_lm(seed)
    opt = adamw(model.parameters())
    params, losses, norms = [], [], []
    for window in wins:
        opt.zero_grad()
        total: torch.Tensor | float = 0.0
        count = 0
        for micro in window:
            for part in micro:
                if loss_fn is token_loss:
                    s, c = token_loss(model, part)
                    total, count = total + s, count + int(c)
                else:
                    total = total + mean_loss(model, part) * len(part["tokens"])
                    count += len(part["tokens"])
        loss = total / count
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).detach())
        opt.step()
        losses.append(loss.detach())
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return {"params": params, "losses": losses, "norms": norms}


def train(
    state: lk.TrainState,
    wins: list,
    k: int,
    max_norm: float | None,
    replica: int,
    loss_fn: Callable[..., Any] = token_loss,
    on_step: Callable[..., Any] | None = None,
) -> tuple[lk.TrainState, list[tuple[float, float | None]]]:
    step = lk.chain(
        lk.forward(loss_fn),
        lk.accumulate(k),
        lk.clip(max_norm) if max_norm is not None else lk.identity(),
        lk.optimizer_step(),
    )
    logged = []
    for window in wins:
        for micro in window:
            state = step(state, micro[replica])
        metrics = state.strategy.reduce_metrics(state.metrics)
        norm = metrics.get("train/grad_norm")
        logged.append((float(metrics["train/loss"]), None if norm is None else float(norm)))
        if on_step is not None:
            on_step(state)
    return state, logged


def assert_matches(
    model: nn.Module, expected: dict[str, torch.Tensor], exact: bool = False
) -> None:
    """This rank's stage tensors equal the unsplit model's tensors of the same names."""
    mine = model.state_dict()
    assert mine and set(mine) <= set(expected), sorted(mine)
    for name, value in mine.items():
        torch.testing.assert_close(
            value,
            expected[name],
            rtol=0 if exact else RTOL,
            atol=0 if exact else ATOL,
            msg=prefixed(name),
        )


def fresh(strategy: Any, seed: int = 0, k: int = 2) -> lk.TrainState:
    state = lk.TrainState.create(seq_lm(seed), optimizer=adamw, strategy=strategy)
    return state.replace(window=lk.Window(size=k))


# ------------------------------------------------------------------------------ checks

# name: (schedule, n_microbatches, stages_per_rank, split points, loss, k, max_norm)
EQUIVALENCE: dict[str, tuple] = {
    "GPipe-n1": ("GPipe", 1, 1, ["layers.2"], token_loss, 2, 0.5),
    "GPipe-n2": ("GPipe", 2, 1, ["layers.2"], token_loss, 2, 0.5),
    "GPipe-n4": ("GPipe", 4, 1, ["layers.2"], token_loss, 2, 0.5),
    "1F1B-n2": ("1F1B", 2, 1, ["layers.2"], token_loss, 2, 0.5),
    "1F1B-n4": ("1F1B", 4, 1, ["layers.2"], token_loss, 2, 0.5),
    "1F1B-n8-k3": ("1f1b", 8, 1, {"layers.1": "end"}, token_loss, 3, 0.3),
    "1F1B-n4-mean-k1": ("1F1B", 4, 1, ["layers.2"], mean_loss, 1, None),
    "Interleaved1F1B-n4": (
        "Interleaved1F1B",
        4,
        2,
        ["layers.1", "layers.2", "layers.3"],
        token_loss,
        2,
        0.5,
    ),
    "ZBVZeroBubble-n4": (
        "ZBVZeroBubble",
        4,
        2,
        ["layers.1", "layers.2", "layers.3"],
        token_loss,
        2,
        0.5,
    ),
}


def check_equivalence(rank: int, name: str) -> list[int]:
    schedule, n, spr, splits, loss_fn, k, max_norm = EQUIVALENCE[name]
    strategy = Pipeline(
        splits, schedule=schedule, n_microbatches=n, stages_per_rank=spr, timeout_s=TIMEOUT_S
    )
    wins = windows(k, steps=3)
    expected = reference(loss_fn, wins, max_norm)
    state = fresh(strategy, k=k)
    for s, window in enumerate(wins):
        state, ((loss, norm),) = train(state, [window], k, max_norm, 0, loss_fn)
        assert loss == pytest.approx(float(expected["losses"][s]), rel=RTOL, abs=ATOL)
        if max_norm is not None:
            assert norm == pytest.approx(float(expected["norms"][s]), rel=RTOL, abs=ATOL)
        assert_matches(state.model, expected["params"][s])
    return list(strategy.stage_indices)


def split_in_two(model: nn.Module, stage_index: int, n_stages: int) -> nn.Module:
    """A user's split_fn: stage 0 embeds and runs layers 0-1, stage 1 the rest, with the
    whole model's parameter names."""
    assert n_stages == 2
    layers = list(model.get_submodule("layers").named_children())
    half = layers[:2] if stage_index == 0 else layers[2:]
    parts: list[tuple[str, nn.Module]] = [("layers", nn.Sequential(OrderedDict(half)))]
    if stage_index == 0:
        parts = [
            ("embed", model.get_submodule("embed")),
            ("mix", model.get_submodule("mix")),
            *parts,
        ]
    else:
        parts.append(("head", model.get_submodule("head")))
    return nn.Sequential(OrderedDict(parts))


def check_split_fn(rank: int) -> list[str]:
    strategy = Pipeline(
        split_fn=split_in_two, n_stages=2, schedule="1F1B", n_microbatches=4, timeout_s=TIMEOUT_S
    )
    wins = windows(2, steps=2, base=700)
    expected = reference(token_loss, wins, 0.5)
    state, _ = train(fresh(strategy), wins, 2, 0.5, 0)
    assert_matches(state.model, expected["params"][-1])
    return sorted(state.model.state_dict())


def check_errors(rank: int) -> dict[str, str]:
    out: dict[str, str] = {}

    def message(error_type: type, build: Callable[[], Any]) -> str:
        with pytest.raises(error_type) as raised:
            build()
        return str(raised.value)

    def state_with(splits: Any, **kw: Any) -> Any:
        return lk.TrainState.create(
            seq_lm(), optimizer=adamw, strategy=Pipeline(splits, timeout_s=TIMEOUT_S, **kw)
        )

    out["unknown-module"] = message(ValueError, lambda: state_with(["layers.9"]))
    out["inside-unit"] = message(ValueError, lambda: state_with({"layers.1.fc": "beginning"}))
    out["empty-stage"] = message(ValueError, lambda: state_with({"embed": "beginning"}))
    out["unknown-schedule"] = message(ValueError, lambda: Pipeline(["layers.2"], schedule="Zigzag"))
    out["world-misfit"] = message(ValueError, lambda: Pipeline(["layers.1", "layers.3"]))
    out["schedule-refuses"] = message(
        ValueError, lambda: state_with(["layers.2"], schedule="1F1B", n_microbatches=1)
    )
    out["v-needs-2"] = message(ValueError, lambda: Pipeline(["layers.2"], schedule="ZBVZeroBubble"))
    model = seq_lm()
    out["built-optimizer"] = message(
        TypeError,
        lambda: lk.TrainState.create(
            model, optimizer=adamw(model.parameters()), strategy=Pipeline(["layers.2"])
        ),
    )
    out["not-sequential"] = message(
        ValueError,
        lambda: lk.TrainState.create(
            Wrapped(), optimizer=adamw, strategy=Pipeline(["inner.layers.2"])
        ),
    )
    # n_microbatches that does not divide the batch: refused before the schedule runs.
    state = fresh(Pipeline(["layers.2"], n_microbatches=3, timeout_s=TIMEOUT_S))
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    step = lk.chain(lk.forward(token_loss), lk.accumulate(2), lk.optimizer_step())
    out["indivisible"] = message(ValueError, lambda: step(state, tokens(0)))
    assert all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())
    assert all(p.grad is None for p in state.model.parameters())
    return out


class Wrapped(nn.Module):
    """A model with its own forward: split by tracing, which needs example_inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = seq_lm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def token_accuracy(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> lk.Loss:
    mask = batch["targets"] != -100
    hits = (outputs.argmax(-1) == batch["targets"]) & mask
    return lk.Loss(hits.sum().double(), mask.sum())


def check_eval(rank: int) -> tuple[dict[str, float], dict[str, float]]:
    """evaluate() through the pipeline equals one device, an uneven last batch included."""
    data = [tokens(7000 + i, rows) for i, rows in enumerate([8, 8, 5])]
    state = fresh(Pipeline(["layers.2"], schedule="1F1B", n_microbatches=4, timeout_s=TIMEOUT_S))
    state, _ = train(state, windows(2, 1, base=50), 2, 0.5, 0)  # eval after a train step
    metrics = {"token_accuracy": token_accuracy}
    piped = lk.evaluate(state, data, metrics, loss_fn=token_loss)
    single = fresh(SingleDevice("cpu"))
    single, _ = train(single, windows(2, 1, base=50), 2, 0.5, 0)
    expected = lk.evaluate(single, data, metrics, loss_fn=token_loss)
    # Training continues after an evaluation (the schedules switch back).
    state, _ = train(state, windows(2, 1, base=60), 2, 0.5, 0)
    single, _ = train(single, windows(2, 1, base=60), 2, 0.5, 0)
    assert_matches(state.model, single.model.state_dict())
    return piped, expected


def check_checkpoint(rank: int, root: str) -> dict[str, Any]:
    """Save at step 2 of 4, resume into a fresh state (other weights): same trajectory."""
    k, steps, save_at = 2, 4, 2
    wins = windows(k, steps, base=300)
    directory = Path(root) / "pipe"

    def strategy() -> Pipeline:
        return Pipeline(["layers.2"], schedule="1F1B", n_microbatches=4, timeout_s=TIMEOUT_S)

    def maybe_save(state: lk.TrainState) -> None:
        if state.step == save_at:
            lk.save_checkpoint(state, directory)

    state, logged = train(fresh(strategy()), wins, k, 0.5, 0, on_step=maybe_save)
    final = {k_: v.clone() for k_, v in state.model.state_dict().items()}
    lk.save_model(state, Path(root) / "model")  # a collective: the stages gather on rank 0
    resumed = lk.load_checkpoint(directory / ckpt.step_dir_name(save_at), fresh(strategy(), seed=5))
    assert resumed.step == save_at
    resumed, resumed_logged = train(resumed, wins[save_at:], k, 0.5, 0)
    assert_matches(resumed.model, final, exact=True)
    assert resumed_logged == logged[save_at:]
    assert_matches(state.model, reference(token_loss, wins, 0.5)["params"][-1])
    return {"final": final, "wins": wins}


def check_fit(rank: int, root: str) -> dict[str, Any]:
    """fit() with Pipeline trains, evaluates, logs and resumes like fit() on one device."""
    g = torch.Generator().manual_seed(3)
    n = 48
    toks = torch.randint(0, VOCAB, (n, T), generator=g)
    targets = torch.randint(0, VOCAB, (n, T), generator=g)
    targets[torch.rand(n, T, generator=g) < 0.3] = -100
    data = torch.utils.data.TensorDataset(toks, targets)
    eval_data = torch.utils.data.TensorDataset(toks[:20], targets[:20])

    def loss_fn(model: nn.Module, batch: Any) -> lk.Loss:
        return lk.cross_entropy(model(batch[0]), batch[1])

    def run(
        strategy: Any,
        max_steps: int,
        checkpoint_dir: Path | None = None,
        resume: bool = False,
        seed: int = 0,
    ) -> lk.FitResult:
        return lk.fit(
            seq_lm(seed),
            data,
            loss_fn=loss_fn,
            optimizer=adamw,
            strategy=strategy,
            batch_size=8,
            accumulate=2,
            clip=0.5,
            max_steps=max_steps,
            eval_data=eval_data,
            eval_every=2,
            log_every=1,
            progress=False,
            checkpoint_dir=checkpoint_dir,
            save_every=2 if checkpoint_dir else None,
            resume=resume,
        )

    def pipeline() -> Pipeline:
        return Pipeline(
            {"layers.2": "beginning"}, schedule="GPipe", n_microbatches=2, timeout_s=TIMEOUT_S
        )

    single = run(SingleDevice("cpu"), 3)
    piped = run(pipeline(), 3)
    assert_matches(piped.state.model, single.state.model.state_dict())
    # Interrupted at step 2 and resumed by a new run: ends where an uninterrupted one does.
    shared = Path(root) / "fit"
    run(pipeline(), 2, checkpoint_dir=shared)
    resumed = run(pipeline(), 3, checkpoint_dir=shared, resume=True, seed=9)
    assert resumed.state.step == 3
    assert_matches(resumed.state.model, single.state.model.state_dict())
    keys = ("step", "train/loss", "eval/loss")
    return {
        "single": [{k: h[k] for k in keys if k in h} for h in single.history],
        "piped": [{k: h[k] for k in keys if k in h} for h in piped.history],
        "tokens_seen": [float(r.state.tokens_seen) for r in (single, piped, resumed)],
    }


def check_snapshot(rank: int) -> None:
    """A snapshot is an independent copy: stepping both alike gives the same weights."""
    state = fresh(Pipeline(["layers.2"], schedule="1F1B", n_microbatches=2, timeout_s=TIMEOUT_S))
    wins = windows(2, 2, base=500)
    state, _ = train(state, wins[:1], 2, None, 0)
    copy = state.snapshot()
    before = {k: v.clone() for k, v in copy.model.state_dict().items()}
    state, _ = train(state, wins[1:], 2, None, 0)
    assert_matches(copy.model, before, exact=True)
    copy, _ = train(copy, wins[1:], 2, None, 0)
    assert_matches(copy.model, state.model.state_dict(), exact=True)


CHECKS: dict[str, tuple[Callable[..., Any], tuple]] = {
    **{f"equivalence({name})": (check_equivalence, (name,)) for name in EQUIVALENCE},
    "split_fn": (check_split_fn, ()),
    "errors": (check_errors, ()),
    "eval": (check_eval, ()),
    "snapshot": (check_snapshot, ()),
}


def run_all_checks(rank: int, root: str) -> dict[str, tuple[str, Any]]:
    torch.set_num_threads(1)
    init_distributed(timeout_s=TIMEOUT_S)
    results: dict[str, tuple[str, Any]] = {}
    checks = {**CHECKS, "checkpoint": (check_checkpoint, (root,)), "fit": (check_fit, (root,))}
    for name, (check, args) in checks.items():
        try:
            results[name] = ("ok", check(rank, *args))
        except Exception:  # noqa: BLE001 - reported per check by the tests below
            results[name] = ("failed", traceback.format_exc())
    return results


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def outcomes(root: Path) -> list[dict[str, tuple[str, Any]]]:
    return [o.unwrap() for o in run_ranks(2, run_all_checks, str(root), timeout_s=240)]


def _result(outcomes: list[dict[str, tuple[str, Any]]], name: str) -> list[Any]:
    values = []
    for rank, results in enumerate(outcomes):
        status, value = results[name]
        assert status == "ok", f"rank {rank}, {name}:\n{value}"
        values.append(value)
    return values


@pytest.mark.parametrize("name", list(EQUIVALENCE), ids=[f"case({n})" for n in EQUIVALENCE])
def test_two_stage_ranks_match_the_unsplit_model_on_one_device(outcomes, name):
    stages = _result(outcomes, f"equivalence({name})")
    spr = EQUIVALENCE[name][2]
    assert sorted(s for rank_stages in stages for s in rank_stages) == list(range(2 * spr))


def test_split_fn_builds_stages_of_any_model(outcomes):
    names_0, names_1 = _result(outcomes, "split_fn")
    assert sorted(names_0 + names_1) == sorted(seq_lm().state_dict())


def test_bad_pipelines_fail_before_training_with_the_fix(outcomes):
    errors = _result(outcomes, "errors")[0]
    assert "'layers.9': no such module" in errors["unknown-module"]
    assert "did you mean" in errors["unknown-module"]
    assert "inside 'layers.1' (Block)" in errors["inside-unit"]
    assert "leave the first stage empty" in errors["empty-stage"]
    message = errors["unknown-schedule"]
    assert "schedule='Zigzag'" in message
    for name in ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"):
        assert name in message
    assert "world size 2 is not a multiple of 3" in errors["world-misfit"]
    assert "n_microbatches=1" in errors["schedule-refuses"]
    assert "Schedule1F1B refuses" in errors["schedule-refuses"]
    assert "exactly two stages per rank" in errors["v-needs-2"]
    assert errors["built-optimizer"] == NEEDS_FACTORY
    assert "example_inputs" in errors["not-sequential"]  # it would be traced
    assert "split_fn" in errors["not-sequential"]
    assert "n_microbatches=3 does not divide the batch of 8" in errors["indivisible"]


def test_unknown_schedule_and_bad_split_points_fail_in_one_process():
    with pytest.raises(ValueError, match=r"valid names \(any case\): GPipe, 1F1B"):
        Pipeline(["layers.2"], schedule="2F2B")
    with pytest.raises(ValueError, match=r"'middle'.*'beginning'.*'end'"):
        Pipeline({"layers.2": "middle"})
    with pytest.raises(ValueError, match="exactly one"):
        Pipeline()
    assert {"GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS"} <= set(schedule_names())


def test_eval_through_the_pipeline_matches_one_device(outcomes):
    for piped, expected in _result(outcomes, "eval"):
        assert piped.keys() == expected.keys()
        for key, value in expected.items():
            assert piped[key] == pytest.approx(value, rel=1e-10), key


def test_snapshot_is_an_independent_copy(outcomes):
    _result(outcomes, "snapshot")


def test_checkpoint_resumes_the_trajectory_exactly(outcomes, root):
    _result(outcomes, "checkpoint")
    path = root / "pipe" / ckpt.step_dir_name(2)
    ckpt.validate_checkpoint(path)
    shards = sorted(p.name for p in (path / "shards").iterdir())
    assert len(shards) == 2  # one file per stage, written by its rank
    files = [p for p in path.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors") for p in files), files  # no pickle


def test_pipeline_checkpoint_resumes_on_one_device_with_the_unsplit_model(outcomes, root):
    """The stages' checkpoint is the whole model's: SingleDevice continues from it."""
    saved = _result(outcomes, "checkpoint")[0]
    state = lk.load_checkpoint(
        root / "pipe" / ckpt.step_dir_name(2), fresh(SingleDevice("cpu"), seed=5)
    )
    state, _ = train(state, saved["wins"][2:], 2, 0.5, 0)
    full = {**_result(outcomes, "checkpoint")[1]["final"], **saved["final"]}
    assert_matches(state.model, full)


def test_save_model_gathers_every_stage_into_the_unsplit_module(outcomes, root):
    finals = [value["final"] for value in _result(outcomes, "checkpoint")]
    tensors = safetensors.torch.load_file(str(root / "model" / "model.safetensors"))
    model = seq_lm(seed=5)
    model.load_state_dict(tensors)  # strict: every name of the unsplit model
    assert_matches(model, {**finals[0], **finals[1]}, exact=True)
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["parameters"] == sum(p.numel() for p in model.parameters())  # all stages


def test_fit_with_pipeline_logs_and_evaluates_like_one_device(outcomes):
    rank_0, rank_1 = _result(outcomes, "fit")
    single, piped = rank_0["single"], rank_0["piped"]
    assert [h.keys() for h in piped] == [h.keys() for h in single]
    for got, want in zip(piped, single, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-10), (key, got, want)
    assert rank_1["piped"] == rank_0["piped"]  # every rank sees the global values
    # tokens_seen: counted by the last stage, summed over ranks by fit; a resumed run
    # continues the uninterrupted run's count on every rank.
    for rank in (rank_0, rank_1):
        one_device, piped_tokens, resumed_tokens = rank["tokens_seen"]
        assert one_device == piped_tokens == resumed_tokens > 0


# ---------------------------------------------------------------- pipeline x data parallel


def pp_dp_equivalence(rank: int) -> tuple[int, int, list[int]]:
    """4 ranks: 2 replicas of a 2-stage 1F1B pipeline, each replica with its own data."""
    torch.set_num_threads(1)
    init_distributed(timeout_s=TIMEOUT_S)
    strategy = Pipeline(["layers.2"], schedule="1F1B", n_microbatches=2, timeout_s=TIMEOUT_S)
    wins = windows(2, 3, replicas=2, base=900)
    # Replica 1 gets fewer rows: its items weigh by count, not by replica.
    for window in wins:
        for micro in window:
            micro[1] = {key: value[:4] for key, value in micro[1].items()}
    expected = reference(token_loss, wins, 0.5)
    state = fresh(strategy)
    for s, window in enumerate(wins):
        state, ((loss, norm),) = train(state, [window], 2, 0.5, strategy.dp_rank)
        assert loss == pytest.approx(float(expected["losses"][s]), rel=RTOL, abs=ATOL)
        assert norm == pytest.approx(float(expected["norms"][s]), rel=RTOL, abs=ATOL)
        assert_matches(state.model, expected["params"][s])
    return strategy.pp_rank, strategy.dp_rank, list(strategy.stage_indices)


def test_pipeline_times_data_parallel_on_4_ranks_matches_one_device():
    results = [o.unwrap() for o in run_ranks(4, pp_dp_equivalence, timeout_s=120)]
    assert results == [(0, 0, [0]), (0, 1, [0]), (1, 0, [1]), (1, 1, [1])]


# ---------------------------------------------------------------------------- the example


def test_example_under_torchrun_matches_one_process(tmp_path):
    script = ROOT / "examples" / "train_pipeline.py"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
    args = ["--steps", "4", "--batch-size", "8"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        "--strategy",
        "pipeline",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--save-model",
        str(tmp_path / "model"),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    found = re.findall(r"final train/loss ([0-9.]+)", done.stdout)
    assert len(found) == 1, done.stdout  # rank 0 prints it, once
    sys.path.insert(0, str(script.parent))
    try:
        example = importlib.import_module("train_pipeline")
    finally:
        sys.path.remove(str(script.parent))
    result = example.main("single", steps=4, batch_size=8, device="cpu")
    single = next(h["train/loss"] for h in reversed(result.history) if "train/loss" in h)
    assert float(found[0]) == pytest.approx(single, abs=2e-4)
    assert len(list((tmp_path / "ckpt" / "step-00000004" / "shards").iterdir())) == 2
    tensors = safetensors.torch.load_file(str(tmp_path / "model" / "model.safetensors"))
    assert any(name.startswith("head.") for name in tensors)
    assert any(name.startswith("embed.") for name in tensors)
