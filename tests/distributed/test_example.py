"""examples/train_distributed.py: one process, `torchrun` with DDP, `torchrun` with FSDP.

The torchrun runs are real launches (2 CPU processes, gloo). With 4 samples per rank they
see the same global batches as one process with 8, so all three end with the same loss.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_distributed.py"
ARGS = ["--steps", "3", "--accumulate", "1"]


def final_loss(output: str) -> float:
    found = re.findall(r"final train/loss ([0-9.]+)", output)
    assert len(found) == 1, f"expected one final line (rank 0 only), got:\n{output}"
    return float(found[0])


def torchrun(strategy: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--strategy",
        strategy,
        "--batch-size",
        "4",
        *ARGS,
        *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def one_process() -> float:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        example = importlib.import_module("train_distributed")
    finally:
        sys.path.remove(str(SCRIPT.parent))
    result = example.main("single", steps=3, batch_size=8, accumulate=1, device="cpu")
    return next(h["train/loss"] for h in reversed(result.history) if "train/loss" in h)


def test_torchrun_ddp_matches_one_process(one_process):
    assert final_loss(torchrun("ddp")) == pytest.approx(one_process, abs=2e-4)


def test_torchrun_fsdp_matches_one_process_and_writes_sharded_checkpoints(one_process, tmp_path):
    out = torchrun(
        "fsdp", "--checkpoint-dir", str(tmp_path / "ckpt"), "--save-model", str(tmp_path / "model")
    )
    assert final_loss(out) == pytest.approx(one_process, abs=2e-4)
    shards = list((tmp_path / "ckpt" / "step-00000003" / "shards").iterdir())
    assert len(shards) == 2
    tensors = safetensors.torch.load_file(str(tmp_path / "model" / "model.safetensors"))
    assert any(name.startswith("blocks.1.") for name in tensors)  # the full model, one file
