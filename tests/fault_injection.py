"""Fault injection for checkpoints: SIGKILL a training process at random moments, resume, repeat.

A "zygote" process imports torch and loopkit once, then forks one training process per
attempt (so an attempt costs milliseconds, not the 2 s of a torch import). Each training
process runs fit() with checkpoint_dir, save_every=1, keep_last=3 and resume=True; the
campaign SIGKILLs it after a random delay, checks that every visible checkpoint is whole,
and starts the next one, until a run finishes. The final weights and optimizer state must
equal, bit for bit, those of the same run never interrupted.

Writes are slowed with the LOOPKIT_TEST_SAVE_PAUSE_S hook of loopkit.checkpoint so that
many kills land inside a save; a kill inside a save leaves its hidden
`.step-*.tmp-<pid>` directory behind, which is how those kills are counted.

Run it standalone for the figures recorded in docs/checkpointing.md:

    python tests/fault_injection.py --kills 30 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STEPS = 120  # optimizer steps of the run under test
COMPUTE_S = 0.004  # stands for a real step's compute, so kills also land between saves
PAUSE_ENV = "LOOPKIT_TEST_SAVE_PAUSE_S"


def train(checkpoint_dir: str | None, out_dir: str) -> None:
    """The run under test (in a forked child): 30 epochs of 4 windows of 2 micro-batches."""
    import torch

    import loopkit as lk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
    )

    def loss_fn(model: torch.nn.Module, batch: Any) -> lk.Loss:
        return lk.cross_entropy(model(batch[0]), batch[1])

    class Compute:
        def on_step_end(self, state: Any) -> None:
            time.sleep(COMPUTE_S)

    checkpoints: dict[str, Any] = {}
    if checkpoint_dir is not None:
        checkpoints = dict(checkpoint_dir=checkpoint_dir, save_every=1, keep_last=3, resume=True)
    result = lk.fit(
        model,
        data,
        loss_fn=loss_fn,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        schedule=lk.schedules.cosine(10, STEPS),
        max_steps=STEPS,
        accumulate=2,
        batch_size=8,
        shuffle=True,
        clip=1.0,
        seed=7,
        progress=False,
        log_every=10,
        callbacks=[Compute()],
        **checkpoints,
    )
    lk.save_model(result.state, out_dir)
    lk.save_checkpoint(result.state, Path(out_dir) / "final")


def serve() -> None:
    """The zygote: import once, then fork a training process per request on stdin."""
    import torch

    import loopkit  # noqa: F401 - imported here so that every child inherits it

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print("ready", flush=True)
    for line in sys.stdin:
        checkpoint_dir, out_dir, pause_s, log = line.rstrip("\n").split("\t")
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ[PAUSE_ENV] = pause_s
            code = 0
            try:
                train(checkpoint_dir or None, out_dir)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def _check_visible_checkpoints(directory: Path) -> None:
    """Every checkpoint under a step-* name is whole, and `latest` names one of them."""
    from loopkit import checkpoint as ckpt

    for path in ckpt.list_checkpoints(directory):
        ckpt.validate_checkpoint(path)  # raises on a half-written one
    pointer = directory / "latest"
    if pointer.exists():
        ckpt.validate_checkpoint(directory / pointer.read_text())


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same names, dtypes, shapes and bits."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype
        and x[k].shape == y[k].shape
        and torch.equal(x[k].reshape(-1).view(torch.uint8), y[k].reshape(-1).view(torch.uint8))
        for k in x
    )


def campaign(
    root: Path, *, kills: int = 25, seed: int = 0, pause_s: float = 0.01, max_delay_s: float = 0.5
) -> dict[str, Any]:
    """Kill the run `kills` times at random moments, let it finish, compare with a clean run."""
    start = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    import loopkit

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(loopkit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    zygote = subprocess.Popen(
        [sys.executable, __file__, "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert zygote.stdin is not None and zygote.stdout is not None

    def expect(word: str) -> str:
        line = zygote.stdout.readline().split()  # type: ignore[union-attr]
        assert line and line[0] == word, f"zygote said {line!r}; see {root}/*.log"
        return line[-1]

    def attempt(
        ckpt_dir: Path | None, out: Path, pause: float, delay: float | None
    ) -> tuple[int, int]:
        zygote.stdin.write(f"{ckpt_dir or ''}\t{out}\t{pause}\t{root / 'train.log'}\n")  # type: ignore[union-attr]
        zygote.stdin.flush()  # type: ignore[union-attr]
        pid = int(expect("pid"))
        if delay is not None:
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it finished first
        return pid, int(expect("exit"))

    try:
        expect("ready")
        _, code = attempt(None, root / "reference", 0.0, None)
        assert code == 0, f"the reference run failed; see {root / 'train.log'}"
        rng = random.Random(seed)
        run_dir, out = root / "checkpoints", root / "interrupted"
        killed = mid_write = mid_delete = mid_pointer = 0
        for _ in range(3 * kills + 10):
            delay = rng.uniform(0.0, max_delay_s) if killed < kills else None
            pid, code = attempt(run_dir, out, pause_s, delay)
            if code == 0:
                break
            assert code == -signal.SIGKILL, f"the run failed ({code}); see {root / 'train.log'}"
            killed += 1
            if run_dir.exists():
                mid_write += bool(list(run_dir.glob(f".step-*.tmp-{pid}")))
                mid_delete += bool(list(run_dir.glob(f".step-*.del-{pid}")))
                mid_pointer += bool(list(run_dir.glob(f".latest.tmp-{pid}")))
                _check_visible_checkpoints(run_dir)
        else:
            raise AssertionError("the run never finished")
    finally:
        zygote.stdin.close()  # type: ignore[union-attr]
        try:
            zygote.wait(timeout=30)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait()
        zygote.stdout.close()  # type: ignore[union-attr]
    from loopkit.checkpoint import latest_checkpoint

    final = latest_checkpoint(root / "interrupted" / "final")
    return {
        "kills": killed,
        "mid_write": mid_write,  # inside save_checkpoint, before its rename
        "mid_rotation": mid_delete,  # while deleting an old checkpoint
        "mid_pointer": mid_pointer,  # while replacing `latest`
        "steps": STEPS,
        "weights_equal": _same_tensors(
            root / "reference" / "model.safetensors", root / "interrupted" / "model.safetensors"
        ),
        "optimizer_equal": final is not None
        and _same_tensors(
            latest_checkpoint(root / "reference" / "final") / "state.safetensors",  # type: ignore[operator]
            final / "state.safetensors",
        ),
        "leftover_tmp_dirs": len(list(run_dir.glob(".step-*.tmp-*"))),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="campaign", choices=["campaign", "serve"])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pause-s", type=float, default=0.01)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "serve":
        serve()
        return
    import tempfile

    root = args.dir or Path(tempfile.mkdtemp(prefix="loopkit-faults-"))
    print(json.dumps(campaign(root, kills=args.kills, seed=args.seed, pause_s=args.pause_s)))


if __name__ == "__main__":
    main()
