"""The checks in loopkit.testing catch real bugs: each planted defect (a mutant) fails its
check, and the correct code passes the same check with the same pieces.

Mutants are written the way a user would write them: small transforms, distribution
strategies and resume functions outside loopkit, never edits to loopkit itself.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

import loopkit as lk
from loopkit.strategies.common import local_eval_forward, local_forward_backward, whole_model_state
from loopkit.testing import (
    check_accumulation_invariance,
    check_determinism,
    check_gradient_flow,
    check_loss_decreases,
    check_matches_reference,
    check_no_stale_reuse,
    check_resume_equivalence,
    check_strategy_equivalence,
    default_resume,
)
from loopkit.testing.pytest_plugin import loopkit_check  # noqa: F401 - the fixture
from loopkit.testing.search import MLPFactory, TransformerFactory, make_token_batch

# --- shared pieces (module level: the strategy check pickles them into spawned processes) --

MLP = MLPFactory(d_in=4, hidden=(8,), d_out=3)
MLP_DROPOUT = MLPFactory(d_in=4, hidden=(8,), d_out=3, dropout=0.5)
MLP32 = MLPFactory(d_in=4, hidden=(8,), d_out=3, dtype=torch.float32)
LM = TransformerFactory(vocab_size=11, max_len=6)


def classification_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> lk.Loss:
    return lk.cross_entropy(model(batch["tokens"]), batch["targets"])


def classification_batch(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64) -> Any:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


# Rows of different lengths: micro-batches of the same number of rows hold different numbers
# of tokens, so averaging per micro-batch differs from averaging per token.
TOKENS = make_token_batch([1, 6, 2, 5], width=6, vocab_size=11, seed=3)


def expect_failure(check: Any, *args: Any, match: str, **kwargs: Any) -> str:
    with pytest.raises(AssertionError, match=match) as info:
        check(*args, **kwargs)
    return str(info.value)


# --- mutant 1: accumulation that averages per micro-batch, not per item ----------------------


@dataclass(frozen=True)
class MeanOfMeansForward:
    """A user's forward+accumulate: backward of (micro-batch mean / k), closing every k."""

    loss_fn: Any
    k: int

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        state.check_fresh()
        out = self.loss_fn(state.model, state.strategy.to_device(batch))
        mean = out.sum / out.count
        (mean / self.k).backward()
        micro_step = state.micro_step + 1
        closed = micro_step == self.k
        window = lk.Window(loss=mean.detach(), count=out.count, size=self.k, closed=closed)
        metrics = {"train/loss": mean.detach()} if closed else state.metrics
        return state.replace(micro_step=micro_step, window=window, metrics=metrics)


@dataclass(frozen=True)
class MeanOfMeansStep:
    loss_fn: Any

    def __call__(self, k: int) -> Any:
        return lk.chain(MeanOfMeansForward(self.loss_fn, k), lk.optimizer_step())


def test_accumulation_invariance_catches_a_mean_of_micro_batch_means() -> None:
    message = expect_failure(
        check_accumulation_invariance,
        LM,
        token_loss,
        batches=TOKENS,
        make_step=MeanOfMeansStep(token_loss),
        match="changed training at optimizer step 1",
    )
    assert "mean of means" in message and "Reproduce: check_accumulation_invariance" in message
    assert "tolerance" in message or "rtol=" in message
    check_accumulation_invariance(LM, token_loss, batches=TOKENS)  # loopkit's own chain passes


def test_accumulation_invariance_message_names_the_parameter_and_the_split() -> None:
    message = expect_failure(
        check_accumulation_invariance,
        MLP,
        classification_loss,
        batches=classification_batch(),
        splits=[[2, 6]],
        make_step=MeanOfMeansStep(classification_loss),
        match=r"micro-batches \[2, 6\]",
    )
    assert "model." in message and "max |diff|" in message
    assert "rtol=1e-07, atol=1e-10 (default for torch.float64)" in message
    assert "splits=[[2, 6]]" in message


# --- mutant 2: clipping with per-parameter norms ---------------------------------------------


@dataclass(frozen=True)
class PerParameterClip:
    """A user's clip that clips each parameter's gradient on its own (wrong: not global)."""

    max_norm: float

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        state.check_fresh()
        if not state.window.closed:
            return state
        norms = [torch.nn.utils.clip_grad_norm_([p], self.max_norm) for p in state.params]
        return state.replace(metrics={**state.metrics, "train/grad_norm": torch.stack(norms).max()})


@dataclass(frozen=True)
class ClipStep:
    loss_fn: Any
    clip: Any

    def __call__(self, k: int) -> Any:
        return lk.chain(lk.forward(self.loss_fn), lk.accumulate(k), self.clip, lk.optimizer_step())


def test_matches_reference_catches_a_per_parameter_clip() -> None:
    batch = classification_batch()
    expect_failure(
        check_matches_reference,
        MLP,
        classification_loss,
        batches=batch,
        max_norm=0.05,
        make_step=ClipStep(classification_loss, PerParameterClip(0.05)),
        match="differs from the hand-written loop",
    )
    check_matches_reference(
        MLP,
        classification_loss,
        batches=batch,
        max_norm=0.05,
        make_step=ClipStep(classification_loss, lk.clip(0.05)),
    )
    check_matches_reference(MLP, classification_loss, batches=batch, max_norm=0.05, split=[3, 5])


# --- mutant 3: a forgotten zero_grad ----------------------------------------------------------


@dataclass(frozen=True)
class StepWithoutZeroGrad:
    """A user's optimizer step that never zeroes the gradients."""

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        state.check_fresh()
        if not state.window.closed:
            return state
        state.optimizer.step()
        return state.replace(
            step=state.step + 1, micro_step=0, window=lk.Window(size=state.window.size)
        )


@dataclass(frozen=True)
class NoZeroGradStep:
    loss_fn: Any

    def __call__(self, k: int) -> Any:
        return lk.chain(lk.forward(self.loss_fn), lk.accumulate(k), StepWithoutZeroGrad())


def test_a_forgotten_zero_grad_fails_the_reference_and_accumulation_checks() -> None:
    batch = classification_batch()
    make_step = NoZeroGradStep(classification_loss)
    expect_failure(
        check_matches_reference,
        MLP,
        classification_loss,
        batches=batch,
        make_step=make_step,
        match="after optimizer step 2 of 2",
    )
    expect_failure(
        check_accumulation_invariance,
        MLP,
        classification_loss,
        batches=batch,
        make_step=make_step,
        match="at optimizer step 2",
    )
    check_matches_reference(MLP, classification_loss, batches=batch)


# --- mutant 4: randomness from the global generators -----------------------------------------


@dataclass(frozen=True)
class ForwardWithoutSeeding:
    """A user's forward: dropout draws from whatever state the global generator is in."""

    loss_fn: Any

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        state.check_fresh()
        out = self.loss_fn(state.model, batch)
        (out.sum / out.count).backward()
        count = out.count
        return state.replace(
            micro_step=state.micro_step + 1,
            window=lk.Window(loss=(out.sum / out.count).detach(), count=count, ref_count=count),
        )


@dataclass(frozen=True)
class UnseededStep:
    loss_fn: Any

    def __call__(self, k: int) -> Any:
        return lk.chain(ForwardWithoutSeeding(self.loss_fn), lk.accumulate(k), lk.optimizer_step())


@dataclass(frozen=True)
class RandomlyReseededNoise:
    """A user's gradient noise that reseeds torch from Python's global `random`."""

    std: float

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        state.check_fresh()
        if not state.window.closed:
            return state
        torch.manual_seed(random.randrange(2**31))
        with torch.no_grad():
            for p in state.params:
                assert p.grad is not None  # a closed window: every parameter has one
                p.grad.add_(torch.randn_like(p.grad) * self.std)
        return state.replace()


def test_determinism_catches_dropout_drawn_from_the_global_generator() -> None:
    batch = classification_batch()
    message = expect_failure(
        check_determinism,
        MLP_DROPOUT,
        classification_loss,
        batches=batch,
        make_step=UnseededStep(classification_loss),
        match="re-seeded before every micro-batch",
    )
    assert "bitwise" in message
    check_determinism(MLP_DROPOUT, classification_loss, batches=batch, split=[3, 5])


def test_determinism_catches_a_transform_that_reseeds_torch_at_random() -> None:
    batch = classification_batch()
    expect_failure(
        check_determinism,
        MLP,
        classification_loss,
        batches=batch,
        make_step=ClipStep(classification_loss, RandomlyReseededNoise(0.1)),
        match="global generator",
    )


# --- mutant 5: a resume that forgets the data position or the fp16 scaler -------------------


def resume_forgetting_the_data_position(
    path: Any, state: lk.TrainState, data: Any
) -> lk.TrainState:
    return lk.load_checkpoint(path, state)


def resume_forgetting_the_scaler(path: Any, state: lk.TrainState, data: Any) -> lk.TrainState:
    assert state.loss_scale is not None and state.growth_tracker is not None
    fresh_scale, fresh_tracker = state.loss_scale.clone(), state.growth_tracker.clone()
    state = default_resume(path, state, data)
    assert state.loss_scale is not None and state.growth_tracker is not None
    state.loss_scale.copy_(fresh_scale)
    state.growth_tracker.copy_(fresh_tracker)
    return state


def four_batches(dtype: torch.dtype = torch.float64) -> list[Any]:
    return [classification_batch(seed=i, dtype=dtype) for i in range(4)]


def test_resume_equivalence_catches_a_forgotten_data_position(tmp_path: Any) -> None:
    message = expect_failure(
        check_resume_equivalence,
        MLP_DROPOUT,
        classification_loss,
        batches=four_batches(),
        split=[3, 5],
        resume=resume_forgetting_the_data_position,
        directory=tmp_path,
        match="different record at step 4",
    )
    assert "data position" in message
    check_resume_equivalence(
        MLP_DROPOUT, classification_loss, batches=four_batches(), split=[3, 5], directory=tmp_path
    )


def test_resume_equivalence_catches_a_forgotten_fp16_scaler() -> None:
    # growth_interval=1: the scale doubles every clean window, so it differs from its start.
    fp16 = lk.Precision("fp16", init_scale=2.0**4, growth_interval=1)
    message = expect_failure(
        check_resume_equivalence,
        MLP32,
        classification_loss,
        batches=four_batches(torch.float32),
        precision=fp16,
        resume=resume_forgetting_the_scaler,
        match="right after resuming",
    )
    assert "loss_scale" in message
    check_resume_equivalence(
        MLP32, classification_loss, batches=four_batches(torch.float32), precision=fp16
    )


# --- mutant 6: unsynchronised data-parallel gradients -----------------------------------------


class AllReduceDP:
    """A user's data-parallel strategy, written from the Strategy protocol alone: sum
    gradients over ranks on a window's last micro-batch, count items globally."""

    is_sharded = False
    timeout_s: float | None = None

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dp_rank, self.dp_world_size = self.rank, self.world_size  # every rank a replica
        self.is_main = self.rank == 0

    # The usual whole-model behaviour, from loopkit's shared free functions.
    forward_backward = local_forward_backward
    eval_forward = staticmethod(local_eval_forward)
    full_model_state = staticmethod(whole_model_state)

    def setup(self, model: torch.nn.Module, optimizer: Any, precision: Any) -> Any:
        from loopkit.strategies.common import build_optimizer

        return model, build_optimizer(model, optimizer)

    def to_device(self, batch: Any) -> Any:
        return batch

    def gradient_sync(self, model: torch.nn.Module, enabled: bool) -> Any:
        return contextlib.nullcontext()  # this strategy syncs in backward, not in forward

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, *, sync: bool) -> None:
        # Like DDP: backward of world_size * loss, then average over ranks, which sums the
        # rank gradients. An average (unlike a plain sum) is idempotent, so a redundant sync
        # on an earlier micro-batch of the window does not count its gradients twice.
        (loss * self.world_size).backward()
        if sync:
            self.sync_(model)

    def sync_(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    def reduce_count(self, count: Any) -> Any:
        total = torch.as_tensor(count, dtype=torch.float64).clone()
        dist.all_reduce(total)
        return total

    def reduce_metrics(self, metrics: Any) -> dict[str, Any]:
        return dict(metrics)

    def clip_grad_norm_(self, params: Any, max_norm: float, norm_type: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def snapshot(self, fields: dict[str, Any]) -> dict[str, Any]:
        from loopkit.strategies.common import deep_copy_training_objects

        return deep_copy_training_objects(fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoSyncDP(AllReduceDP):
    """The mutant: backward never synchronises the gradients."""

    def sync_(self, model: torch.nn.Module) -> None:
        pass


@pytest.mark.distributed
def test_strategy_equivalence_catches_unsynchronised_gradients() -> None:
    batch = classification_batch()
    message = expect_failure(
        check_strategy_equivalence,
        MLP,
        classification_loss,
        batches=batch,
        strategy=NoSyncDP,
        match=r"NoSyncDP\(\) on 2 processes",
    )
    assert "ranks also disagree" in message
    check_strategy_equivalence(MLP, classification_loss, batches=batch, strategy=AllReduceDP, k=2)


DDP = getattr(lk.strategies, "DDP", None)


class NeverSyncDDP(DDP or object):  # type: ignore[misc]
    """The mutant on loopkit's own DDP: every micro-batch runs under no_sync."""

    def gradient_sync(self, model: torch.nn.Module, enabled: bool) -> Any:
        return super().gradient_sync(model, False)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, *, sync: bool) -> None:
        super().backward(model, loss, sync=False)

    def __repr__(self) -> str:
        return "NeverSyncDDP()"


@pytest.mark.distributed
@pytest.mark.skipif(DDP is None, reason="loopkit.strategies.DDP is not available")
def test_strategy_equivalence_catches_loopkit_ddp_without_gradient_sync() -> None:
    batch = classification_batch()
    expect_failure(
        check_strategy_equivalence,
        MLP,
        classification_loss,
        batches=batch,
        strategy=NeverSyncDDP,
        k=2,
        match=r"NeverSyncDDP\(\) on 2 processes",
    )
    assert DDP is not None  # the skipif above
    check_strategy_equivalence(MLP, classification_loss, batches=batch, strategy=DDP, k=2)


def test_strategy_equivalence_refuses_pieces_that_cannot_be_pickled() -> None:
    with pytest.raises(ValueError, match="loss_fn=.*cannot be"):
        check_strategy_equivalence(
            MLP,
            lambda model, b: classification_loss(model, b),
            batches=classification_batch(),
            strategy=AllReduceDP,
        )


# --- stale reuse, gradient flow, loss decreases ------------------------------------------------


@dataclass(frozen=True)
class ScaleGradsLate:
    """Mutant: changes gradients before consuming the record (no check_fresh first)."""

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        if state.window.closed:
            for p in state.params:
                assert p.grad is not None  # a closed window: every parameter has one
                p.grad.mul_(0.5)
        return state.replace()


@dataclass(frozen=True)
class ScaleGradsInPlace:
    """Mutant: changes gradients and returns the record it received."""

    def __call__(self, state: lk.TrainState, batch: Any, /) -> lk.TrainState:
        if state.window.closed:
            for p in state.params:
                assert p.grad is not None  # a closed window: every parameter has one
                p.grad.mul_(0.5)
        return state


@pytest.mark.parametrize(
    ("mutant", "match"),
    [
        (ScaleGradsLate(), "only after changing tensors"),
        (ScaleGradsInPlace(), "returned the record it received"),
    ],
    ids=["late-check", "in-place"],
)
def test_no_stale_reuse_catches_transforms_that_mutate_unsafely(mutant: Any, match: str) -> None:
    batch = classification_batch()
    expect_failure(
        check_no_stale_reuse,
        MLP,
        classification_loss,
        batches=batch,
        make_step=ClipStep(classification_loss, mutant),
        match=match,
    )
    result = check_no_stale_reuse(
        MLP,
        classification_loss,
        batches=batch,
        split=[3, 5],
        make_step=ClipStep(classification_loss, lk.clip(1.0)),
    )
    assert "4 of 4 part(s)" in result.details


def partly_detached_loss(model: torch.nn.Module, batch: Any) -> lk.Loss:
    x, y = batch
    assert isinstance(model, torch.nn.Sequential)  # an MLPFactory model
    hidden = model[1](model[0](x)).detach()  # the first layer never gets a gradient
    return lk.cross_entropy(model[2](hidden), y)


def detached_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    loss = classification_loss(model, batch)
    return torch.tensor((loss.sum / loss.count).detach().item(), dtype=torch.float64)


def test_gradient_flow_names_parameters_cut_off_by_a_detach() -> None:
    message = expect_failure(
        check_gradient_flow,
        MLP,
        partly_detached_loss,
        batch=classification_batch(),
        match="2 parameter",
    )
    assert "0.weight: no gradient" in message and "0.bias: no gradient" in message
    check_gradient_flow(
        MLP, partly_detached_loss, batch=classification_batch(), allow_no_grad=("0.",)
    )
    check_gradient_flow(LM, token_loss, batch=TOKENS)


def frozen_first_layer() -> torch.nn.Module:
    model = MLP()
    lk.freeze(model, "0.")
    return model


def test_gradient_flow_accepts_frozen_parameters_without_gradients() -> None:
    result = check_gradient_flow(
        frozen_first_layer, classification_loss, batch=classification_batch()
    )
    assert "2 frozen got none" in result.details


def test_loss_decreases_catches_a_dead_optimizer_and_a_detached_graph() -> None:
    batch = classification_batch()
    expect_failure(
        check_loss_decreases,
        MLP,
        classification_loss,
        batch=batch,
        schedule=lambda step: 0.0,
        match="dead optimizer",
    )
    expect_failure(check_loss_decreases, MLP, detached_loss, batch=batch, match="detached graph")
    expect_failure(check_gradient_flow, MLP, detached_loss, batch=batch, match="detached graph")
    check_loss_decreases(MLP, classification_loss, batch=batch)
    check_loss_decreases(LM, token_loss, batch=TOKENS)


# --- the pytest fixture --------------------------------------------------------------------------


def test_loopkit_check_fixture_runs_every_single_process_check(loopkit_check: Any) -> None:  # noqa: F811
    check = loopkit_check(MLP, classification_loss, seed=3)
    results = check.all(batch=classification_batch(), batches=four_batches())
    assert [r.check for r in results] == [
        "check_accumulation_invariance",
        "check_determinism",
        "check_resume_equivalence",
        "check_no_stale_reuse",
        "check_gradient_flow",
        "check_loss_decreases",
    ]
