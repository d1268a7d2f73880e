"""DDP and FSDP on 2 gloo processes against a hand-written float64 loop on one device.

One launch of 2 ranks runs every check of the table (strategy x case), then the counting
checks; each test below reads its check's outcome. Per-rank micro-batches are uneven on
purpose (different sample counts, different numbers of padded tokens), so a rank-local
normalisation would fail.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _models import TIMEOUT_S, BlockLM, adamw, full_params, token_loss, token_micro_batch
from _ranks import run_ranks
from helpers import mlp, prefixed

import loopkit as lk
from loopkit.strategies import DDP, FSDP
from loopkit.strategies.env import init_distributed
from loopkit.strategies.fsdp import NEEDS_FACTORY as FSDP_NEEDS_FACTORY

pytestmark = [
    pytest.mark.distributed,
    # FSDP2 warns once per model that returns a view (any LM head does); nothing here
    # modifies outputs in place.
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
]

WORLD = 2
RTOL, ATOL = 1e-10, 1e-12


def mean_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)  # a scalar mean: count = the rank's batch size


def class_micro_batch(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


@dataclass(frozen=True)
class Case:
    """A model, a loss and windows of per-rank micro-batches: windows[s][i][rank]."""

    name: str
    make_model: Callable[[], torch.nn.Module]
    loss_fn: Callable[..., Any]
    windows: list[list[list[Any]]]
    max_norm: float | None = None
    # Tell forward the window size before the first micro-batch (as fit does). Without it
    # the very first micro-batch syncs too: redundant, and the result must not change.
    preseed: bool = True

    def global_mean(self, model: torch.nn.Module, window: list[list[Any]]) -> torch.Tensor:
        """The hand-written oracle: the mean loss over every item of every rank's micro-batch."""
        total: torch.Tensor | float = 0.0
        count = 0
        for micro in window:
            for part in micro:
                if self.loss_fn is token_loss:
                    logits = model(part["tokens"])
                    total = total + F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        part["targets"].reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                    count += int((part["targets"] != -100).sum())
                else:
                    x, y = part
                    total = total + F.cross_entropy(model(x), y, reduction="sum")
                    count += len(y)
        mean = total / count
        assert isinstance(mean, torch.Tensor)
        return mean


def _cases() -> list[Case]:
    tokens = Case(
        name="tokens-k3-clip",
        make_model=BlockLM,
        loss_fn=token_loss,
        # Rank 0 and rank 1 count different numbers of real tokens in every micro-batch.
        windows=[
            [
                [
                    token_micro_batch(100 * s + 10 * i + r, [7, 2, 5] if r == 0 else [1, 3])
                    for r in range(WORLD)
                ]
                for i in range(3)
            ]
            for s in range(3)
        ],
        max_norm=0.5,
    )
    means = Case(
        name="mean-k2",
        make_model=lambda: mlp(seed=1, d_hidden=5),
        loss_fn=mean_loss,
        windows=[
            [
                [class_micro_batch(100 * s + 10 * i + r, 3 if r == 0 else 5) for r in range(WORLD)]
                for i in range(2)
            ]
            for s in range(3)
        ],
        preseed=False,
    )
    even = Case(
        name="mean-k1",
        make_model=lambda: mlp(seed=2, d_hidden=5),
        loss_fn=mean_loss,
        windows=[[[class_micro_batch(100 * s + r, 4) for r in range(WORLD)]] for s in range(4)],
    )
    return [tokens, means, even]


CASES = {case.name: case for case in _cases()}
STRATEGIES: dict[str, Callable[[], Any]] = {
    "DDP": lambda: DDP(timeout_s=TIMEOUT_S),
    "FSDP": lambda: FSDP(timeout_s=TIMEOUT_S),
}
# FSDP's options change where tensors live and when they are gathered, never the result.
FSDP_VARIANTS: dict[str, Callable[[], Any]] = {
    "FSDP-checkpointing": lambda: FSDP(timeout_s=TIMEOUT_S, activation_checkpointing=True),
    "FSDP-cpu-offload": lambda: FSDP(timeout_s=TIMEOUT_S, cpu_offload=True),
    "FSDP-no-reshard": lambda: FSDP(timeout_s=TIMEOUT_S, reshard_after_forward=False),
    "FSDP-shard-by-class": lambda: FSDP(timeout_s=TIMEOUT_S, shard=torch.nn.Linear),
}
STRATEGIES.update(FSDP_VARIANTS)
TABLE = [(s, c) for s in ("DDP", "FSDP") for c in CASES] + [
    (s, "tokens-k3-clip") for s in FSDP_VARIANTS
]


def reference(case: Case) -> dict[str, list]:
    """The hand-written float64 loop: zero_grad, backward of the window mean, clip, step."""
    model = case.make_model()
    opt = adamw(model.parameters())
    params, losses, norms = [], [], []
    for window in case.windows:
        opt.zero_grad()
        loss = case.global_mean(model, window)
        loss.backward()
        if case.max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), case.max_norm))
        opt.step()
        losses.append(loss.detach())
        params.append([p.detach().clone() for p in model.parameters()])
    return {"params": params, "losses": losses, "norms": norms}


def check_equivalence(rank: int, strategy_name: str, case_name: str) -> None:
    case = CASES[case_name]
    strategy = STRATEGIES[strategy_name]()
    k = len(case.windows[0])
    state = lk.TrainState.create(case.make_model(), optimizer=adamw, strategy=strategy)
    if case.preseed:
        state = state.replace(window=lk.Window(size=k))
    step = lk.chain(
        lk.forward(case.loss_fn),
        lk.accumulate(k),
        lk.clip(case.max_norm) if case.max_norm is not None else lk.identity(),
        lk.optimizer_step(),
    )
    expected = reference(case)
    for s, window in enumerate(case.windows):
        for micro in window:
            state = step(state, micro[rank])
        metrics = state.strategy.reduce_metrics(state.metrics)
        torch.testing.assert_close(
            metrics["train/loss"].to(torch.float64), expected["losses"][s], rtol=RTOL, atol=ATOL
        )
        if case.max_norm is not None:
            torch.testing.assert_close(
                metrics["train/grad_norm"].to(torch.float64),
                expected["norms"][s],
                rtol=RTOL,
                atol=ATOL,
            )
        actual = full_params(state.model)
        for i, (a, e) in enumerate(zip(actual, expected["params"][s], strict=True)):
            torch.testing.assert_close(
                a, e, rtol=RTOL, atol=ATOL, msg=prefixed(f"step {s} param {i}")
            )


def counting_allreduce_hook() -> tuple[Callable[..., Any], list[int]]:
    """A DDP communication hook that all-reduces like the default one, and its call count."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    def hook(process_group, bucket):  # no annotations: DDP checks them against its own types
        calls[0] += 1
        return allreduce_hook(process_group, bucket)

    return hook, calls


class Record:
    """A callback: on fit start, install `install(state)`; after each step, read `read()`."""

    def __init__(self, install: Callable[[Any], None], read: Callable[[], int]) -> None:
        self.install, self.read = install, read
        self.per_step: list[int] = []

    def on_fit_start(self, state: Any, hparams: Any) -> None:
        self.install(state)

    def on_step_end(self, state: Any) -> None:
        self.per_step.append(self.read())


def _fit_counting(strategy: Any, record: Record, k: int, steps: int) -> Any:
    n = WORLD * 2 * k * steps  # batch 2 per rank, k micro-batches, `steps` windows
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 11, (n, 5), generator=g)
    )
    return lk.fit(
        BlockLM(),
        data,
        loss_fn=lambda model, batch: lk.cross_entropy(model(batch[0]), batch[1]),
        optimizer=adamw,
        strategy=strategy,
        batch_size=2,
        accumulate=k,
        max_steps=steps,
        progress=False,
        log_every=2,
        callbacks=[record],
    )


def check_ddp_allreduce_once_per_window(rank: int) -> list[int]:
    hook, calls = counting_allreduce_hook()
    record = Record(lambda state: state.model.register_comm_hook(None, hook), lambda: calls[0])
    _fit_counting(DDP(timeout_s=TIMEOUT_S), record, k=3, steps=4)
    return record.per_step


def check_fsdp_reduce_scatter_once_per_window(rank: int) -> list[int]:
    import torch.distributed as dist

    calls = [0]
    original = dist.reduce_scatter_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    try:
        record = Record(lambda state: None, lambda: calls[0])
        result = _fit_counting(FSDP(timeout_s=TIMEOUT_S), record, k=3, steps=4)
    finally:
        dist.reduce_scatter_single = original
    n_units = len(result.state.strategy._prepared[result.state.model].units)
    return [n_units, *record.per_step]


def check_fit_logs_the_global_loss(rank: int) -> tuple[float, float]:
    """fit's logged train/loss is the mean over both ranks' items, the same on every rank."""
    record = Record(lambda state: None, lambda: 0)
    result = _fit_counting(DDP(timeout_s=TIMEOUT_S), record, k=1, steps=2)
    logged = [row["train/loss"] for row in result.history if "train/loss" in row]
    return logged[-1], float(result.state.metrics["train/loss"])


def check_snapshot(rank: int, strategy_name: str) -> None:
    """A snapshot is an independent replica: stepping both alike gives the same weights."""
    case = CASES["tokens-k3-clip"]
    state = lk.TrainState.create(
        case.make_model(), optimizer=adamw, strategy=STRATEGIES[strategy_name]()
    )
    step = lk.chain(lk.forward(case.loss_fn), lk.accumulate(3), lk.optimizer_step())
    for micro in case.windows[0]:
        state = step(state, micro[rank])
    copy = state.snapshot()
    before = full_params(copy.model)
    for micro in case.windows[1]:
        state = step(state, micro[rank])
    assert all(torch.equal(a, b) for a, b in zip(full_params(copy.model), before, strict=True))
    for micro in case.windows[1]:
        copy = step(copy, micro[rank])
    for a, b in zip(full_params(copy.model), full_params(state.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def check_rank_0_weights_everywhere(rank: int) -> tuple[bool, bool]:
    """Ranks that built different weights start from rank 0's (FSDP syncs like DDP)."""
    reference_params = list(BlockLM(seed=0).parameters())
    synced = lk.TrainState.create(
        BlockLM(seed=rank), optimizer=adamw, strategy=FSDP(timeout_s=TIMEOUT_S)
    )
    as_built = lk.TrainState.create(
        BlockLM(seed=rank),
        optimizer=adamw,
        strategy=FSDP(timeout_s=TIMEOUT_S, sync_module_states=False),
    )

    def same(state: lk.TrainState) -> bool:
        return all(
            torch.equal(a, b.detach())
            for a, b in zip(full_params(state.model), reference_params, strict=True)
        )

    return same(synced), same(as_built)


def check_fsdp_mixed_precision(rank: int) -> tuple[str, str, float, float]:
    """bf16 compute, fp32 reduction: the forward runs in bf16, the weights stay float64."""
    case = CASES["tokens-k3-clip"]
    strategy = FSDP(timeout_s=TIMEOUT_S, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    state = lk.TrainState.create(case.make_model(), optimizer=adamw, strategy=strategy)
    seen: list[torch.dtype] = []
    state.model.get_submodule("head").register_forward_hook(
        lambda m, args, out: seen.append(out.dtype)
    )
    step = lk.chain(lk.forward(case.loss_fn), lk.accumulate(3), lk.optimizer_step())
    for micro in case.windows[0]:
        state = step(state, micro[rank])
    loss = float(state.strategy.reduce_metrics(state.metrics)["train/loss"])
    expected = float(reference(case)["losses"][0])
    return str(seen[0]), str(next(state.model.parameters()).dtype), loss, expected


def check_skip_nonfinite_agrees(rank: int) -> tuple[int, bool]:
    """Only rank 1's loss is NaN: both ranks skip the update, so their weights stay equal."""
    state = lk.TrainState.create(
        mlp(seed=1, d_hidden=5), optimizer=adamw, strategy=DDP(timeout_s=TIMEOUT_S)
    )
    step = lk.chain(
        lk.forward(mean_loss), lk.accumulate(1), lk.skip_nonfinite(), lk.optimizer_step()
    )
    x, y = class_micro_batch(rank, 4)
    if rank == 1:
        x[0, 0] = float("nan")
    state = step(state, (x, y))
    return state.skipped_steps, all(bool(p.isfinite().all()) for p in state.model.parameters())


def check_fsdp_errors(rank: int) -> tuple[str, str]:
    model = BlockLM()
    with pytest.raises(TypeError) as built:
        lk.TrainState.create(
            model, optimizer=adamw(model.parameters()), strategy=FSDP(timeout_s=TIMEOUT_S)
        )
    with pytest.raises(ValueError) as fp16:
        lk.TrainState.create(
            BlockLM(), optimizer=adamw, precision="fp16", strategy=FSDP(timeout_s=TIMEOUT_S)
        )
    return str(built.value), str(fp16.value)


CHECKS: dict[str, tuple[Callable[..., Any], tuple]] = {
    **{f"strategy({s})-case({c})": (check_equivalence, (s, c)) for s, c in TABLE},
    "ddp-count": (check_ddp_allreduce_once_per_window, ()),
    "fsdp-count": (check_fsdp_reduce_scatter_once_per_window, ()),
    "fit-global-loss": (check_fit_logs_the_global_loss, ()),
    **{f"snapshot({s})": (check_snapshot, (s,)) for s in ("DDP", "FSDP")},
    "fsdp-sync-weights": (check_rank_0_weights_everywhere, ()),
    "fsdp-bf16": (check_fsdp_mixed_precision, ()),
    "skip-nonfinite": (check_skip_nonfinite_agrees, ()),
    "fsdp-errors": (check_fsdp_errors, ()),
}


def run_all_checks(rank: int) -> dict[str, tuple[str, Any]]:
    torch.set_num_threads(1)
    init_distributed(timeout_s=TIMEOUT_S)
    results: dict[str, tuple[str, Any]] = {}
    for name, (check, args) in CHECKS.items():
        try:
            results[name] = ("ok", check(rank, *args))
        except Exception:  # noqa: BLE001 - reported per check by the tests below
            results[name] = ("failed", traceback.format_exc())
    return results


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, tuple[str, Any]]]:
    return [o.unwrap() for o in run_ranks(WORLD, run_all_checks, timeout_s=240)]


def _result(outcomes: list[dict[str, tuple[str, Any]]], name: str) -> list[Any]:
    values = []
    for rank, results in enumerate(outcomes):
        status, value = results[name]
        assert status == "ok", f"rank {rank}, {name}:\n{value}"
        values.append(value)
    return values


@pytest.mark.parametrize(
    ("strategy", "case"), TABLE, ids=[f"strategy({s})-case({c})" for s, c in TABLE]
)
def test_two_ranks_match_one_device_with_the_whole_batch(outcomes, strategy, case):
    _result(outcomes, f"strategy({strategy})-case({case})")


def test_ddp_all_reduces_exactly_once_per_window(outcomes):
    # 4 windows of 3 micro-batches: one all-reduce (one bucket) per window, from the first.
    for per_step in _result(outcomes, "ddp-count"):
        assert per_step == [1, 2, 3, 4]


def test_fsdp_reduce_scatters_exactly_once_per_window(outcomes):
    for n_units, *per_step in _result(outcomes, "fsdp-count"):
        assert n_units == 3  # two blocks and the root
        assert per_step == [n_units * (s + 1) for s in range(4)]


def test_fit_logs_the_loss_over_every_rank(outcomes):
    (logged_0, local_0), (logged_1, local_1) = _result(outcomes, "fit-global-loss")
    assert logged_0 == logged_1  # the reduced value, the same on both ranks
    assert logged_0 == pytest.approx(local_0 + local_1, rel=1e-12)  # each holds its share


@pytest.mark.parametrize("strategy", ["DDP", "FSDP"])
def test_snapshot_is_an_independent_replica(outcomes, strategy):
    _result(outcomes, f"snapshot({strategy})")


def test_fsdp_starts_every_rank_from_rank_0_weights(outcomes):
    for synced, as_built in _result(outcomes, "fsdp-sync-weights"):
        assert synced
        assert not as_built  # without the broadcast, rank 1's slices keep its own init


def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_the_weights(outcomes):
    for compute, weights, loss, expected in _result(outcomes, "fsdp-bf16"):
        assert (compute, weights) == ("torch.bfloat16", "torch.float64")
        assert loss == pytest.approx(expected, rel=2e-2)  # bf16 logits: ~3 digits


def test_skip_nonfinite_skips_on_every_rank_when_one_rank_is_bad(outcomes):
    assert _result(outcomes, "skip-nonfinite") == [(1, True), (1, True)]


def test_fsdp_needs_a_factory_and_refuses_fp16(outcomes):
    built, fp16 = _result(outcomes, "fsdp-errors")[0]
    assert built == FSDP_NEEDS_FACTORY
    assert "precision='fp16'" in fp16 and "bf16" in fp16
