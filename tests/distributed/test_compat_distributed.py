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
        "loss": result["eval_loss"],
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
        # the eval split is not padded: each item counts once in the loss, as on one rank
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-12)
    assert ranks[0]["checkpoints"] == one["checkpoints"] == ["checkpoint-2", "checkpoint-4"]


# --- unpadded eval shares, iterable datasets, Pipeline ------------------------------------------


def _batch_metrics(rank: int, world: int, out: str, iterable: bool) -> list[tuple[list[int], bool]]:
    calls: list[tuple[list[int], bool]] = []

    def metrics(pred: EvalPrediction, compute_result: bool) -> dict[str, float] | None:
        calls.append((pred.label_ids.tolist(), compute_result))
        return {"n": float(len(calls))} if compute_result else None

    args = TrainingArguments(
        output_dir=out, per_device_eval_batch_size=4, batch_eval_metrics=True, disable_tqdm=True
    )
    strategy = DDP(device="cpu", timeout_s=TIMEOUT_S) if world > 1 else SingleDevice("cpu")
    data = Blobs(9, 1)
    data.y = torch.arange(9)  # the labels name the items (9 classes)
    model = Net()
    model.out = torch.nn.Linear(8, 9).double()
    trainer = Trainer(model=model, args=args, compute_metrics=metrics, strategy=strategy)
    trainer.evaluate(Stream(data) if iterable else data)
    return calls


@pytest.mark.parametrize("iterable", [False, True])
def test_batch_eval_metrics_on_uneven_shares_gathers_each_batch_of_every_rank(tmp_path, iterable):
    # 9 items on 2 ranks: rank 0 reads items 0 2 4 6 | 8, rank 1 items 1 3 5 7 (one batch
    # fewer): the second gather gets rank 0's last batch and an empty one from rank 1.
    outcomes = run_ranks(2, _batch_metrics, 2, str(tmp_path), iterable, timeout_s=60)
    for calls in [o.unwrap() for o in outcomes]:
        assert calls == [(list(range(8)), False), ([8], True)]


class Stream(torch.utils.data.IterableDataset):
    """An iterable dataset of Blobs' items: every rank can read all of it."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs

    def __iter__(self):  # noqa: ANN204
        return (self.blobs[i] for i in range(len(self.blobs)))


def _iterable(rank: int, world: int, out: str) -> dict:
    seen: list[EvalPrediction] = []

    def metrics(pred: EvalPrediction) -> dict[str, float]:
        seen.append(pred)
        return {}

    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4 // world,  # the same items per step on 1 or 2 ranks
        per_device_eval_batch_size=2,
        max_steps=4,  # 16 of the 18 items, 4 per step (test_compat_data: the last group)
        learning_rate=0.1,
        save_strategy="no",
        disable_tqdm=True,
    )
    strategy = DDP(device="cpu", timeout_s=TIMEOUT_S) if world > 1 else SingleDevice("cpu")
    trainer = Trainer(
        model=Net(),
        args=args,
        train_dataset=Stream(Blobs(18)),
        compute_metrics=metrics,
        strategy=strategy,
    )
    trainer.train()
    result = trainer.evaluate(Stream(Blobs(7, 1)))
    return {
        "params": {k: _full(v) for k, v in trainer.unwrapped_model().named_parameters()},
        "loss": result["eval_loss"],
        "labels": seen[-1].label_ids,
        "predictions": seen[-1].predictions,
    }


def test_an_iterable_dataset_is_shared_out_by_rank_not_read_whole_by_each(tmp_path):
    one = _iterable(0, 1, str(tmp_path / "one"))
    ranks = [o.unwrap() for o in run_ranks(2, _iterable, 2, str(tmp_path / "two"), timeout_s=60)]
    for rank in ranks:
        for name, value in one["params"].items():  # each step trained on the same 4 items
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-9, atol=1e-12)
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-12)  # each item once
        np.testing.assert_array_equal(rank["labels"], Blobs(7, 1).y.numpy())  # in order
        np.testing.assert_allclose(rank["predictions"], one["predictions"], rtol=1e-9)


def _pipeline_refusals(rank: int, world: int, out: str) -> list[str]:
    from loopkit.strategies import Pipeline

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))

        def forward(self, x, labels=None):  # noqa: ANN001
            return self.layers(x)

    args = TrainingArguments(output_dir=out, disable_tqdm=True)
    messages = []
    with pytest.raises(ValueError, match="not supported by loopkit.compat") as error:
        Trainer(
            model=Stack(), args=args, compute_metrics=lambda p: {}, strategy=Pipeline(["layers.1"])
        )
    messages.append(str(error.value))
    trainer = Trainer(model=Stack(), args=args, strategy=Pipeline(["layers.1"]))
    with pytest.raises(ValueError, match="not supported by loopkit.compat") as error:
        trainer.predict(Blobs(4))
    messages.append(str(error.value))
    torch.distributed.barrier()  # rank 0 holds the rendezvous store: leave together
    return messages


def test_predictions_under_pipeline_are_refused_on_every_rank_before_any_work(tmp_path):
    ranks = [o.unwrap() for o in run_ranks(2, _pipeline_refusals, 2, str(tmp_path), timeout_s=60)]
    for messages in ranks:
        assert all("predictions under Pipeline" in m for m in messages)
        assert "Trainer(compute_metrics=...)" in messages[0]
        assert "Trainer.prediction" in messages[1]
