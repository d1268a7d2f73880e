"""Trainer.save_model under FSDP is a collective: every rank calls it, rank 0 writes the
whole model (it used to return early on the other ranks while rank 0 gathered from all of
them, and hang)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _models import TIMEOUT_S
from _ranks import run_ranks
from safetensors.torch import load_file

from loopkit.compat import Trainer, TrainingArguments
from loopkit.strategies import FSDP

pytestmark = pytest.mark.distributed


class Pairs:
    """A map-style dataset that is not a torch Dataset (HF takes any such object)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        self.double()

    def forward(self, x, labels=None):  # noqa: ANN001
        logits = self.out(torch.tanh(self.inp(x)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _save(rank: int, out: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        max_steps=2,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    strategy = FSDP(device="cpu", timeout_s=TIMEOUT_S)
    trainer = Trainer(model=Net(), args=args, train_dataset=Pairs(16), strategy=strategy)
    trainer.train()
    full = {}
    for name, value in trainer.unwrapped_model().state_dict().items():
        gather = getattr(value, "full_tensor", None)
        full[name] = (gather() if callable(gather) else value).detach().clone()
    # Every rank calls it and nothing follows it: a rank that skipped the gather would
    # leave rank 0 waiting for it.
    trainer.save_model(str(Path(out) / "final"))
    return full


def test_save_model_under_fsdp_is_a_collective_and_writes_the_whole_model(tmp_path):
    out = str(tmp_path / "run")
    ranks = [o.unwrap() for o in run_ranks(2, _save, out, timeout_s=120)]
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert set(saved) == set(ranks[0])
    for name, value in ranks[0].items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
        torch.testing.assert_close(ranks[1][name], value, rtol=0, atol=0)
    assert (tmp_path / "run" / "final" / "training_args.json").is_file()
