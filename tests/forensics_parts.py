"""Builders and a base run config for the forensics and CLI tests.

Run configs in the tests name these by import path (`forensics_parts:build_model`); the
base config puts tests/ and examples/configs/ (the planted faults) on sys.path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import loopkit as lk
from loopkit.run_config import RunConfig, write_record


def build_model(hidden: int = 16) -> torch.nn.Module:
    """A small MLP 4 -> hidden -> hidden -> 1 (modules "0" to "4")."""
    return torch.nn.Sequential(
        torch.nn.Linear(4, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 1),
    )


def build_data(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    """`n` samples of a smooth regression target, float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model: torch.nn.Module, batch: Any) -> lk.Loss:
    """Summed squared error and the sample count."""
    x, y = batch
    return lk.Loss((model(x) - y).pow(2).sum(), x.shape[0])


BASE_CONFIG = """
python_path = [{tests}, {faults}]
seed = 0
threads = 1
model = {{ call = "forensics_parts:build_model" }}
data = {{ call = "forensics_parts:build_data", n = 512 }}
loss_fn = "forensics_parts:loss_fn"
optimizer = {{ name = "AdamW", lr = 0.01 }}
max_steps = 40
batch_size = 16
log_every = 10
progress = false
"""
NUDGE = 'callbacks=[{call="faults:Nudge", step=37, parameter="2.weight"}]'
"""A --set item that adds examples/configs/faults.py's Nudge (module "2" holds "2.weight")."""
COUNTING_LOSS = 'loss_fn={call="faults:counting_loss", inner="forensics_parts:loss_fn"}'
"""A --set item for a loss with a call counter in its closure (examples/configs/faults.py)."""


def base_config(directory: Path) -> Path:
    """Write the tests' base run config (this MLP, 40 steps) into `directory`; its path."""
    path = directory / "base.toml"
    if not path.exists():
        tests = Path(__file__).resolve().parent
        path.write_text(
            BASE_CONFIG.format(
                tests=json.dumps(str(tests)),
                faults=json.dumps(str(tests.parent / "examples" / "configs")),
            )
        )
    return path


def train(config: RunConfig) -> None:
    """What `loopkit fit CONFIG` does: record the config in the log_dir, build, fit."""
    built = config.build()
    write_record(config, built.fit_kwargs["log_dir"])
    lk.fit(built.model, built.data, **built.fit_kwargs)


def nudged_pair(directory: Path) -> tuple[Path, Path]:
    """Runs a (Nudge after step 37) and b (untouched), checkpoints every step; their log_dirs."""
    for name, extra in (("a", [NUDGE]), ("b", [])):
        sets = [f"log_dir={directory}/{name}", f"checkpoint_dir={directory}/{name}-ckpt"]
        train(RunConfig.load(base_config(directory), [*sets, "save_every=1", *extra]))
    return directory / "a", directory / "b"
