"""Pipeline on models that are not an nn.Sequential: split by tracing, on 2 gloo processes.

One launch of 2 ranks runs every check; each test below reads its check's outcome. The
model keeps its layers in an nn.ModuleList and has its own forward (position embeddings,
causal mixing, a final norm; optionally the head tied to the embedding, which puts one
weight on both stages). The oracle is a hand-written float64 loop on the unsplit model:
zero_grad, backward of the window's mean loss over every item, clip, step.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
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

pytestmark = pytest.mark.distributed

TIMEOUT_S = 30.0
RTOL, ATOL = 1e-10, 1e-12
VOCAB, D, T = 11, 6, 5
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class ListLM(nn.Module):
    """A ModuleList of Linear+tanh layers with its own forward; optionally a tied head."""

    def __init__(self, seed: int = 0, n_layers: int = 4, tie: bool = False) -> None:
        super().__init__()
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(n_layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.double()
        torch.random.set_rng_state(state)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = (self.embed(tokens) + self.pos(positions)).cumsum(dim=1)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(self.norm(h))


class LossInForward(ListLM):
    """HF-style: forward(tokens, targets) returns the loss (a sum), its count and logits."""

    def forward(  # type: ignore[override]
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = super().forward(tokens)
        assert targets is not None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        return {"loss": loss, "count": (targets != -100).sum(), "logits": logits}


class Branchy(ListLM):
    """Data-dependent control flow: torch.export cannot trace it."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if h.sum() > 0:
            h = -h
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> lk.Loss:
    return lk.cross_entropy(model(batch["tokens"]), batch["targets"])


def inner_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> lk.Loss:
    out = model(batch["tokens"], targets=batch["targets"])  # a keyword input
    return lk.Loss(out["loss"], out["count"])


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


def windows(k: int, steps: int, base: int = 0) -> list[list[dict[str, torch.Tensor]]]:
    return [[tokens(base + 1000 * s + 10 * i) for i in range(k)] for s in range(steps)]


def reference(
    make: Callable[[], nn.Module], loss_fn: Callable[..., Any], wins: list, max_norm: float
) -> list[dict[str, torch.Tensor]]:
    """The hand-written float64 loop on the unsplit model; its state after each step."""
    model = make()
    opt = adamw(model.parameters())
    params = []
    for window in wins:
        opt.zero_grad()
        total: Any = 0.0
        count = 0
        for micro in window:
            s, c = loss_fn(model, micro)
            total, count = total + s, count + int(c)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return params


def train(state: lk.TrainState, wins: list, k: int, max_norm: float, loss_fn: Any) -> Any:
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(k), lk.clip(max_norm), lk.optimizer_step())
    for window in wins:
        for micro in window:
            state = step(state, micro)
    return state


def assert_matches(
    model: nn.Module, expected: dict[str, torch.Tensor], exact: bool = False
) -> None:
    """This rank's tensors equal the unsplit model's tensors of the same names."""
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


EXAMPLE = (torch.zeros(2, T, dtype=torch.long, device="meta"),)


def pipeline(splits: Any = ("layers.2",), **kw: Any) -> Pipeline:
    kw.setdefault("example_inputs", EXAMPLE)
    kw.setdefault("timeout_s", TIMEOUT_S)
    return Pipeline(list(splits) if isinstance(splits, tuple) else splits, **kw)


def fresh(strategy: Pipeline, make: Callable[[], nn.Module], k: int) -> lk.TrainState:
    state = lk.TrainState.create(make(), optimizer=adamw, strategy=strategy)
    return state.replace(window=lk.Window(size=k))


# ------------------------------------------------------------------------------ checks

# name: (model factory, loss_fn, schedule, n_microbatches, stages_per_rank, splits, k, clip)
EQUIVALENCE: dict[str, tuple] = {
    "GPipe-n2": (ListLM, token_loss, "GPipe", 2, 1, ("layers.2",), 2, 0.5),
    "1F1B-n4-k3": (ListLM, token_loss, "1F1B", 4, 1, {"layers.1": "end"}, 3, 0.3),
    "1F1B-tied": (lambda: ListLM(tie=True), token_loss, "1F1B", 2, 1, ("layers.2",), 2, 0.5),
    "GPipe-loss-in-forward": (LossInForward, inner_loss, "GPipe", 2, 1, ("layers.2",), 2, 0.5),
    "Interleaved1F1B-tied": (
        lambda: ListLM(tie=True),
        token_loss,
        "Interleaved1F1B",
        4,
        2,
        ("layers.1", "layers.2", "layers.3"),
        2,
        0.5,
    ),
}


def check_equivalence(rank: int, name: str) -> dict[str, Any]:
    make, loss_fn, schedule, n, spr, splits, k, max_norm = EQUIVALENCE[name]
    example: Any = EXAMPLE
    if make is LossInForward:  # the inputs of one call, by keyword
        example = {"tokens": EXAMPLE[0], "targets": EXAMPLE[0]}
    strategy = pipeline(
        splits, schedule=schedule, n_microbatches=n, stages_per_rank=spr, example_inputs=example
    )
    wins = windows(k, steps=3, base=100)
    expected = reference(make, loss_fn, wins, max_norm)
    state = fresh(strategy, make, k)
    for s, window in enumerate(wins):
        state = train(state, [window], k, max_norm, loss_fn)
        assert_matches(state.model, expected[s])
    largest = max(
        float((v - expected[-1][name]).abs().max()) for name, v in state.model.state_dict().items()
    )
    return {
        "stages": list(strategy.stage_indices),
        "names": sorted(state.model.state_dict()),
        "largest_difference": largest,
    }


def check_checkpoint(rank: int, root: str) -> dict[str, Any]:
    """Tied model: save at step 2, save_model at step 3, resume the checkpoint exactly."""
    make = lambda: ListLM(tie=True)  # noqa: E731
    wins = windows(2, 3, base=300)

    def strategy() -> Pipeline:
        return pipeline(schedule="1F1B", n_microbatches=2)

    state = fresh(strategy(), make, 2)
    state = train(state, wins[:2], 2, 0.5, token_loss)
    lk.save_checkpoint(state, Path(root) / "pipe")
    state = train(state, wins[2:], 2, 0.5, token_loss)
    final = {k: v.clone() for k, v in state.model.state_dict().items()}
    lk.save_model(state, Path(root) / "model")  # a collective: the stages gather on rank 0
    resumed = lk.load_checkpoint(
        Path(root) / "pipe" / ckpt.step_dir_name(2),
        fresh(strategy(), lambda: ListLM(5, tie=True), 2),
    )
    resumed = train(resumed, wins[2:], 2, 0.5, token_loss)
    assert_matches(resumed.model, final, exact=True)
    return {"final": final, "wins": wins}


def check_eval(rank: int) -> tuple[dict[str, float], dict[str, float]]:
    """evaluate() through the traced pipeline equals one device, an uneven last batch too."""
    data = [tokens(7000 + i, rows) for i, rows in enumerate([8, 8, 5])]
    state = train(fresh(pipeline(n_microbatches=4), ListLM, 2), windows(2, 1), 2, 0.5, token_loss)
    piped = lk.evaluate(state, data, loss_fn=token_loss)
    single = train(fresh(SingleDevice("cpu"), ListLM, 2), windows(2, 1), 2, 0.5, token_loss)  # type: ignore[arg-type]
    expected = lk.evaluate(single, data, loss_fn=token_loss)
    state = train(state, windows(2, 1, base=60), 2, 0.5, token_loss)  # training goes on
    single = train(single, windows(2, 1, base=60), 2, 0.5, token_loss)
    assert_matches(state.model, single.model.state_dict())
    return piped, expected


def check_errors(rank: int) -> dict[str, str]:
    out: dict[str, str] = {}

    def message(error_type: type, build: Callable[[], Any]) -> str:
        with pytest.raises(error_type) as raised:
            build()
        return str(raised.value)

    def create(model: nn.Module, splits: Any, **kw: Any) -> Any:
        return lk.TrainState.create(model, optimizer=adamw, strategy=pipeline(splits, **kw))

    out["no-example"] = message(
        ValueError, lambda: create(ListLM(), ["layers.2"], example_inputs=None)
    )
    out["unknown-module"] = message(ValueError, lambda: create(ListLM(), ["layers.9"]))
    out["never-runs"] = message(ValueError, lambda: create(ListLM(), {"layers": "end"}))
    out["empty-stage"] = message(ValueError, lambda: create(ListLM(), {"embed": "beginning"}))
    out["untraceable"] = message(TypeError, lambda: create(Branchy(), ["layers.2"]))
    out["example-with-split-fn"] = message(
        ValueError,
        lambda: Pipeline(split_fn=lambda m, i, n: m, n_stages=2, example_inputs=EXAMPLE),
    )
    return out


def check_fit(rank: int, root: str) -> dict[str, Any]:
    """fit() with a traced Pipeline, interrupted and resumed: tokens_seen and weights go on."""
    g = torch.Generator().manual_seed(3)
    n = 48
    toks = torch.randint(0, VOCAB, (n, T), generator=g)
    targets = torch.randint(0, VOCAB, (n, T), generator=g)
    targets[torch.rand(n, T, generator=g) < 0.3] = -100
    data = torch.utils.data.TensorDataset(toks, targets)

    def loss_fn(model: nn.Module, batch: Any) -> lk.Loss:
        return lk.cross_entropy(model(batch[0]), batch[1])

    def run(max_steps: int, checkpoint_dir: Path | None = None, resume: bool = False) -> Any:
        return lk.fit(
            ListLM(tie=True),
            data,
            loss_fn=loss_fn,
            optimizer=adamw,
            strategy=pipeline(schedule="GPipe", n_microbatches=2),
            batch_size=8,
            accumulate=2,
            clip=0.5,
            max_steps=max_steps,
            log_every=1,
            progress=False,
            checkpoint_dir=checkpoint_dir,
            save_every=2 if checkpoint_dir else None,
            resume=resume,
        )

    whole = run(3)
    shared = Path(root) / "fit"
    run(2, checkpoint_dir=shared)
    resumed = run(3, checkpoint_dir=shared, resume=True)
    assert_matches(resumed.state.model, whole.state.model.state_dict())
    lk.save_model(resumed.state, Path(root) / "fit-model")
    return {
        "tokens_seen": float(whole.state.tokens_seen),
        "resumed_tokens_seen": float(resumed.state.tokens_seen),
    }


def check_snapshot(rank: int) -> None:
    """A snapshot of a traced, tied pipeline is an independent copy that trains alike."""
    make = lambda: ListLM(tie=True)  # noqa: E731
    wins = windows(2, 2, base=500)
    state = train(fresh(pipeline(n_microbatches=2), make, 2), wins[:1], 2, 0.5, token_loss)
    copy = state.snapshot()
    before = {k: v.clone() for k, v in copy.model.state_dict().items()}
    state = train(state, wins[1:], 2, 0.5, token_loss)
    assert_matches(copy.model, before, exact=True)
    copy = train(copy, wins[1:], 2, 0.5, token_loss)
    assert_matches(copy.model, state.model.state_dict(), exact=True)


CHECKS: dict[str, tuple[Callable[..., Any], tuple]] = {
    **{f"equivalence({name})": (check_equivalence, (name,)) for name in EQUIVALENCE},
    "errors": (check_errors, ()),
    "eval": (check_eval, ()),
    "snapshot": (check_snapshot, ()),
}


def run_all_checks(rank: int, root: str) -> dict[str, tuple[str, Any]]:
    torch.set_num_threads(1)
    init_distributed(timeout_s=TIMEOUT_S)
    results: dict[str, tuple[str, Any]] = {}
    checks = {
        **CHECKS,
        "checkpoint": (check_checkpoint, (root,)),
        "fit": (check_fit, (root,)),
        "gpt": (check_gpt, (root,)),
    }
    for name, (check, args) in checks.items():
        try:
            results[name] = ("ok", check(rank, *args))
        except Exception:  # noqa: BLE001 - reported per check by the tests below
            results[name] = ("failed", traceback.format_exc())
    return results


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline_trace")


@pytest.fixture(scope="module")
def outcomes(root: Path) -> list[dict[str, tuple[str, Any]]]:
    return [o.unwrap() for o in run_ranks(2, run_all_checks, str(root), timeout_s=300)]


def _result(outcomes: list[dict[str, tuple[str, Any]]], name: str) -> list[Any]:
    values = []
    for rank, results in enumerate(outcomes):
        status, value = results[name]
        assert status == "ok", f"rank {rank}, {name}:\n{value}"
        values.append(value)
    return values


@pytest.mark.parametrize("name", list(EQUIVALENCE), ids=[f"case({n})" for n in EQUIVALENCE])
def test_traced_stages_match_the_unsplit_model_on_one_device(outcomes, name):
    rank_0, rank_1 = _result(outcomes, f"equivalence({name})")
    spr = EQUIVALENCE[name][4]
    assert sorted(rank_0["stages"] + rank_1["stages"]) == list(range(2 * spr))
    whole = set(EQUIVALENCE[name][0]().state_dict())
    assert set(rank_0["names"]) | set(rank_1["names"]) == whole  # the original names


def test_tied_weights_live_on_both_stages_under_both_names(outcomes):
    rank_0, rank_1 = _result(outcomes, "equivalence(1F1B-tied)")
    for names in (rank_0["names"], rank_1["names"]):
        assert {"embed.weight", "head.weight"} <= set(names)


def test_traced_checkpoint_and_save_model_load_into_the_unsplit_model(outcomes, root):
    saved = _result(outcomes, "checkpoint")
    full = {**saved[1]["final"], **saved[0]["final"]}
    # The checkpoint resumes on one device, with the unsplit (tied) model.
    state = lk.load_checkpoint(
        root / "pipe" / ckpt.step_dir_name(2),
        fresh(SingleDevice("cpu"), lambda: ListLM(5, tie=True), 2),  # type: ignore[arg-type]
    )
    state = train(state, saved[0]["wins"][2:], 2, 0.5, token_loss)
    assert_matches(state.model, full)
    # save_model's file loads strictly into the unsplit model.
    model = ListLM(seed=5, tie=True)
    tensors = safetensors.torch.load_file(str(root / "model" / "model.safetensors"))
    model.load_state_dict(tensors)
    assert model.head.weight is model.embed.weight
    assert_matches(model, full, exact=True)
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["parameters"] == sum(p.numel() for p in ListLM(tie=True).parameters())


def test_snapshot_of_traced_stages_is_an_independent_copy(outcomes):
    _result(outcomes, "snapshot")


def test_eval_through_traced_stages_matches_one_device(outcomes):
    for piped, expected in _result(outcomes, "eval"):
        assert piped.keys() == expected.keys()
        for key, value in expected.items():
            assert piped[key] == pytest.approx(value, rel=1e-10), key


def test_models_that_do_not_trace_are_refused_with_the_ways_out(outcomes):
    errors = _result(outcomes, "errors")[0]
    assert "example_inputs=(" in errors["no-example"]
    assert "'layers.9': no such module" in errors["unknown-module"]
    assert "did you mean" in errors["unknown-module"]
    assert "'layers' never runs in ListLM.forward" in errors["never-runs"]
    message = errors["empty-stage"]
    assert "stage 0 of 2, from the start to 'embed' (beginning)" in message
    assert "holds no trainable parameters" in message
    message = errors["untraceable"]
    assert "cannot split Branchy by tracing" in message
    assert "if h.sum() > 0" in message
    assert "nn.Sequential" in message and "split_fn" in message
    assert "example_inputs" in errors["example-with-split-fn"]


def test_fit_resume_continues_tokens_seen_and_save_model_counts_the_whole_model(outcomes, root):
    rank_0, rank_1 = _result(outcomes, "fit")
    # Counted by the last stage, summed over ranks by fit: every rank holds the total.
    assert rank_0["tokens_seen"] == rank_1["tokens_seen"] > 0
    for rank in (rank_0, rank_1):
        assert rank["resumed_tokens_seen"] == rank["tokens_seen"]
    config = json.loads((root / "fit-model" / "config.json").read_text())
    assert config["parameters"] == sum(p.numel() for p in ListLM(tie=True).parameters())


# ---------------------------------------------------------------------------- the demo GPT


def _example(name: str) -> Any:
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def _final_losses(result: lk.FitResult) -> tuple[float, float]:
    train = next(h["train/loss"] for h in reversed(result.history) if "train/loss" in h)
    return train, result.history[-1]["eval/loss"]


GPT_RUN = {"steps": 4, "batch_size": 8, "microbatches": 4, "device": "cpu"}


def check_gpt(rank: int, root: str) -> tuple[float, float]:
    """examples/train_gpt_pipeline.py's GPT on 2 stages (1F1B), as torchrun would run it."""
    example = _example("train_gpt_pipeline")
    result = example.main("pipeline", **GPT_RUN, save_model_to=str(Path(root) / "gpt"))
    return _final_losses(result)


def test_demo_gpt_under_2_stage_1f1b_matches_one_process(outcomes, root):
    """examples/gpt.py's GPT (ModuleList blocks, its own forward, tied head) on 2 stages."""
    piped = _result(outcomes, "gpt")
    single = _final_losses(_example("train_gpt_pipeline").main("single", **GPT_RUN))
    for losses in piped:  # every rank logs the global losses
        assert losses == pytest.approx(single, abs=2e-4)
    # The gathered weights load into an unsplit GPT, the tied head included.
    tensors = safetensors.torch.load_file(str(root / "gpt" / "model.safetensors"))
    model = _example("gpt").GPT(tensors["tok_emb.weight"].shape[0], 32, 64, 4, 4)
    model.load_state_dict(tensors)
    assert torch.equal(tensors["head.weight"], tensors["tok_emb.weight"])
    config = json.loads((root / "gpt" / "config.json").read_text())
    assert config["parameters"] == sum(p.numel() for p in model.parameters())
