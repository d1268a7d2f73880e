"""loopkit.compat.Trainer on 2 processes (DDP or FSDP, gloo): the same run as one process,
and compute_metrics sees the whole eval set, gathered across ranks, in dataset order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _models import TIMEOUT_S
from _ranks import run_ranks

from loopkit.compat import EvalPrediction, Trainer, TrainingArguments
from loopkit.strategies import DDP, FSDP, SingleDevice, Strategy

pytestmark = pytest.mark.distributed


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = (
            torch.nn.Linear(4, 8),
            torch.nn.LayerNorm(8),
            torch.nn.Linear(8, 3),
        )
        self.double()
        torch.random.set_rng_state(gen)

    def forward(self, x, labels=None):  # noqa: ANN001
        logits = self.out(torch.tanh(self.norm(self.inp(x))))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)  # an FSDP shard: gather the whole tensor
    return (full() if callable(full) else tensor).detach().clone()


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "DDP": lambda: DDP(device="cpu", timeout_s=TIMEOUT_S),
    "FSDP": lambda: FSDP(device="cpu", timeout_s=TIMEOUT_S),
}


def _run(rank: int, world: int, out: str, strategy_name: str = "DDP") -> dict:
    seen: list[EvalPrediction] = []

    def metrics(pred: EvalPrediction) -> dict[str, float]:
        seen.append(pred)
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=0.05,
        weight_decay=0.1,
        warmup_steps=1,
        seed=3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_eval_batch_size=2,
        logging_strategy="no",
        disable_tqdm=True,
    )
    strategy = STRATEGIES[strategy_name]() if world > 1 else SingleDevice("cpu")
    trainer = Trainer(
        model=Net(),
        args=args,
        train_dataset=Blobs(32),
        eval_dataset=Blobs(7, 1),
        compute_metrics=metrics,
        strategy=strategy,
    )
    trainer.train()
    result = trainer.evaluate()
    return {
        "params": {k: _full(v) for k, v in trainer.unwrapped_model().named_parameters()},
        "predictions": seen[-1].predictions,
        "labels": seen[-1].label_ids,
        "accuracy": result["eval_accuracy"],
        "checkpoints": sorted(p.name for p in Path(out).glob("checkpoint-*")),
    }


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_ranks_train_like_one_and_gather_the_eval_set(tmp_path, strategy):
    one = _run(0, 1, str(tmp_path / "one"))
    two = str(tmp_path / "two")
    ranks = [o.unwrap() for o in run_ranks(2, _run, 2, two, strategy, timeout_s=120)]
    for rank in ranks:
        for name, value in one["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-9, atol=1e-12)
        # 7 items on 2 ranks (one padded): every rank sees all 7, in dataset order, once
        assert rank["predictions"].shape == (7, 3)
        np.testing.assert_array_equal(rank["labels"], Blobs(7, 1).y.numpy())
        np.testing.assert_allclose(rank["predictions"], one["predictions"], rtol=1e-9)
        assert rank["accuracy"] == one["accuracy"]
    assert ranks[0]["checkpoints"] == one["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
