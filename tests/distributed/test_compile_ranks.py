"""fit(compile=True) under DDP and FSDP: the wrapped model is compiled, the step runs eagerly.

compile_step captures whole steps on one device only; under DDP and FSDP it compiles the
wrapped model instead (PyTorch's recipe for both) and says so in one warning. Each of 2
gloo ranks fits BlockLM (float64) eagerly and with compile=True; the compiled fit must
compile frames, warn once, and end within float64 rounding of the eager fit.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from _models import TIMEOUT_S, BlockLM, adamw
from _ranks import run_ranks
from torch._dynamo.utils import counters

import loopkit as lk
from loopkit.compiled import CompileFallbackWarning
from loopkit.strategies import DDP, FSDP

STRATEGIES = {"DDP": DDP, "FSDP": FSDP}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


def eager_and_compiled(rank: int, name: str) -> dict[bool, Any]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 11, (32, 5), generator=g), torch.randint(0, 11, (32, 5), generator=g)
    )
    out: dict[bool, Any] = {}
    for compile in (False, True):
        counters.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = lk.fit(
                BlockLM(),
                data,
                loss_fn=lambda model, batch: lk.cross_entropy(model(batch[0]), batch[1]),
                optimizer=adamw,
                strategy=STRATEGIES[name](timeout_s=TIMEOUT_S),
                batch_size=2,
                accumulate=2,
                max_steps=3,
                compile=compile,
                progress=False,
            )
        out[compile] = {
            "weights": [_full(p) for p in result.state.model.parameters()],
            "warnings": [str(w.message) for w in caught if w.category is CompileFallbackWarning],
            "frames": counters["frames"]["ok"],
        }
    return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_compile_under_data_parallel_compiles_the_model(name: str) -> None:
    for outcome in run_ranks(2, eager_and_compiled, name, timeout_s=300.0):
        runs = outcome.unwrap()
        eager, compiled = runs[False], runs[True]
        assert eager["warnings"] == [] and eager["frames"] == 0
        assert compiled["frames"] > 0  # torch.compile ran on the model
        (message,) = compiled["warnings"]  # one warning, naming the strategy and what is done
        assert f"strategy={name}(" in message and "the model is compiled instead" in message
        for a, b in zip(eager["weights"], compiled["weights"], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
