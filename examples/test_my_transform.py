"""A user's test file: property-test a custom transform with loopkit.testing.

The transform is gradient noise (Neelakantan et al., 2015): Gaussian noise added to each
closed window's gradients, with a standard deviation that decays with the step. Written as
a loopkit transform it has to get three things right, and the checks below prove each one:

- it acts once per *window*, not per micro-batch, so accumulation does not change it;
- its randomness comes from (seed, step), not from a global generator, so a run is
  reproducible, resumes exactly, and does not depend on how a batch was split;
- it consumes the record it changes, so a stale record cannot apply it twice.

Run: pytest examples/test_my_transform.py   (or: python examples/test_my_transform.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings

import loopkit as lk
from loopkit.testing import (
    check_accumulation_invariance,
    check_determinism,
    check_gradient_flow,
    check_loss_decreases,
    check_no_stale_reuse,
    check_resume_equivalence,
    check_strategy_equivalence,
    search,
)
from loopkit.testing.pytest_plugin import loopkit_check  # noqa: F401 - the fixture

# --- the code under test: a custom transform -----------------------------------------------


@dataclass(frozen=True)
class grad_noise:  # noqa: N801 - a transform factory reads like a function
    """Add N(0, sigma^2) noise to a closed window's gradients, sigma = std / (1 + step)^decay.

    The noise of step k comes from a generator seeded with (state.seed, k): the same on
    every rank and for every split of the window, and restored by a resume.
    """

    std: float
    decay: float = 0.55

    def __post_init__(self) -> None:
        if not (math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"grad_noise(std={self.std!r}): must be a finite float >= 0.")

    def __call__(self, state: lk.TrainState, batch: object, /) -> lk.TrainState:
        state.check_fresh()  # before touching anything: a stale record must not add noise
        if not state.window.closed:  # once per window, after accumulate normalised it
            return state
        gen = torch.Generator(device=state.strategy.device)
        gen.manual_seed((state.seed * 1_000_003 + state.step) % 2**63)
        sigma = self.std / (1 + state.step) ** self.decay
        with torch.no_grad():
            for p in state.params:
                if p.grad is not None:
                    noise = torch.randn(
                        p.grad.shape, generator=gen, dtype=p.grad.dtype, device=p.grad.device
                    )
                    p.grad.add_(noise, alpha=sigma)
        # The gradients changed in place: consume the record (it is stale from now on).
        return state.replace(metrics={**state.metrics, "train/grad_noise_std": sigma})


@dataclass(frozen=True)
class make_step:  # noqa: N801
    """`k -> the chain under test`: what every check builds for a window of k micro-batches.

    A frozen dataclass (not a lambda) so it pickles into the processes that
    check_strategy_equivalence spawns.
    """

    noise: object = grad_noise(0.01)

    def __call__(self, k: int) -> lk.Transform:
        return lk.chain(
            lk.forward(loss_fn), lk.accumulate(k), self.noise, lk.clip(1.0), lk.optimizer_step()
        )


# --- the pieces the checks need ----------------------------------------------------------------

# Tiny models run fastest on one thread (thread start-up dominates); a conftest.py is the
# usual place for this line.
torch.set_num_threads(1)

make_model = search.MLPFactory(d_in=4, hidden=(16,), d_out=3)  # identical fresh models, float64
make_model_with_dropout = search.MLPFactory(d_in=4, hidden=(16,), d_out=3, dropout=0.2)


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def make_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # a learnable rule


BATCHES = [make_batch(seed=i) for i in range(4)]


# --- the tests -----------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(split=search.splits(total=8, max_parts=4), seed=search.seeds())
def test_noise_does_not_depend_on_the_micro_batch_split(split, seed) -> None:
    check_accumulation_invariance(
        make_model, loss_fn, batches=BATCHES[:2], splits=[split], seed=seed, make_step=make_step()
    )


def test_runs_are_reproducible_whatever_the_global_rng_holds() -> None:
    check_determinism(
        make_model_with_dropout, loss_fn, batches=BATCHES, split=[3, 5], make_step=make_step()
    )


def test_resume_continues_the_same_noise(tmp_path) -> None:
    check_resume_equivalence(
        make_model_with_dropout,
        loss_fn,
        batches=BATCHES,
        save_at=2,
        make_step=make_step(),
        directory=tmp_path,
    )


def test_a_consumed_record_cannot_add_noise_twice() -> None:
    check_no_stale_reuse(
        make_model, loss_fn, batches=BATCHES[:2], split=[3, 5], make_step=make_step()
    )


def test_training_still_works_with_noise() -> None:
    check_gradient_flow(make_model, loss_fn, batch=BATCHES[0], make_step=make_step())
    check_loss_decreases(make_model, loss_fn, batch=BATCHES[0], make_step=make_step())


def test_the_fixture_runs_every_check_in_one_line(loopkit_check) -> None:  # noqa: F811
    loopkit_check(make_model, loss_fn, make_step=make_step()).all(batch=BATCHES[0], batches=BATCHES)


@pytest.mark.skipif(not hasattr(lk.strategies, "DDP"), reason="this loopkit has no DDP strategy")
def test_noise_is_the_same_on_every_ddp_rank() -> None:
    from loopkit.strategies import DDP

    check_strategy_equivalence(
        make_model, loss_fn, batches=BATCHES[:2], strategy=DDP, make_step=make_step(), k=2
    )


# --- what the checks catch: the naive version --------------------------------------------------


@dataclass(frozen=True)
class naive_grad_noise:  # noqa: N801
    """The obvious first draft: `torch.randn_like` draws from the global generator."""

    std: float

    def __call__(self, state: lk.TrainState, batch: object, /) -> lk.TrainState:
        state.check_fresh()
        if not state.window.closed:
            return state
        with torch.no_grad():
            for p in state.params:
                p.grad.add_(torch.randn_like(p.grad), alpha=self.std)
        return state.replace()


def test_the_naive_version_depends_on_the_split() -> None:
    # loopkit's forward seeds the global generator from (seed, step, micro_step) for
    # dropout; noise drawn from it after the last micro-batch changes with the number of
    # micro-batches, so splitting the batch changes training.
    with pytest.raises(AssertionError, match="changed training at optimizer step 1"):
        check_accumulation_invariance(
            make_model, loss_fn, batches=BATCHES[0], make_step=make_step(naive_grad_noise(0.01))
        )


if __name__ == "__main__":
    import subprocess
    import sys

    # A fresh interpreter: pytest must import hypothesis itself to hook into it.
    raise SystemExit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q"]))
