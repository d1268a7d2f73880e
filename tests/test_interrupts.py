"""Graceful stop: real signals to real processes, a checkpoint at the stop, exact resume.

The trainer (tests/_interrupt_trainer.py) pauses inside a drawn micro-batch; the test sends
the signal while that micro-batch is in flight, lets it go on, and checks the process ends
as documented with one checkpoint at the end of that micro-batch's window. Resuming from it
must end with weights bitwise equal to an uninterrupted run. Most trainers are forked from
this process (no interpreter start); two are real `python` scripts, for the exit status and
the line a person sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _interrupt_trainer import MAX_STEPS, train
from helpers import mlp
from torch.utils.data import DataLoader, TensorDataset

import loopkit as lk
from loopkit.checkpoint import validate_checkpoint
from loopkit.data import iterate, keep_workers_through_sigterm

HANG_S = 120.0  # only to turn a hang into a failure; a case takes well under a second
EXIT = {"SIGINT": -signal.SIGINT, "SIGTERM": 143, "SIGUSR1": 0}  # as docs/fit.md says


def _draw_cases() -> list[tuple[str, int, int]]:
    """(signal, accumulate, micro-batch to signal in), drawn with a fixed seed.

    Per signal: one plain case, one anywhere with accumulate=3, and one in the first
    micro-batch of a window, so the two after it must still run before the stop.
    """
    rng = random.Random(15)
    cases = []
    for name in ("SIGINT", "SIGTERM"):
        cases.append((name, 1, rng.randrange(MAX_STEPS[1])))
        cases.append((name, 3, rng.randrange(3 * MAX_STEPS[3])))
        cases.append((name, 3, 3 * rng.randrange(MAX_STEPS[3])))
    cases.append(("SIGUSR1", 3, rng.randrange(3 * MAX_STEPS[3])))
    return cases


CASES = _draw_cases()


def _exit_like_a_script(body: Callable[[], Any]) -> NoReturn:
    """Run `body` in a forked child and leave as CPython leaves a script that ran it.

    0 when it returns, SystemExit's code, and for an uncaught KeyboardInterrupt what
    CPython does since 3.8: put SIGINT's default action back and kill itself with it.
    """
    code = 1
    try:
        body()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - shown in the test's output
        traceback.print_exc()
    finally:
        os._exit(code)


@dataclass
class Child:
    """A forked trainer: its pid, the pipe it reports pauses on, the pipe it waits on."""

    pid: int
    paused: int
    go: int

    def wait_paused(self) -> None:
        ready, _, _ = select.select([self.paused], [], [], HANG_S)
        assert ready and os.read(self.paused, 1) == b"p", "the trainer never paused"

    def resume(self) -> None:
        os.write(self.go, b"g")

    def wait_exit(self) -> int:
        """The exit status as subprocess reports it (-N: killed by signal N)."""
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the trainer hung: still running after {HANG_S} s")


def fork_trainer(**options: Any) -> Child:
    """Fork `train(**options)` with a `pause` that reports to and waits on this process."""
    paused_r, paused_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(paused_r)
        os.close(go_w)
        # As an interactive shell leaves it, even if this test process was started with
        # SIGINT ignored (fit keeps an ignored signal ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def pause() -> None:
            os.write(paused_w, b"p")
            os.read(go_r, 1)

        _exit_like_a_script(lambda: train(pause=pause, **options))
    os.close(paused_w)
    os.close(go_r)
    return Child(pid, paused_r, go_w)


_REFERENCE: dict[int, dict[str, torch.Tensor]] = {}


def uninterrupted(accumulate: int, root: Path) -> dict[str, torch.Tensor]:
    """The final weights of the run with no signal (computed once per accumulate)."""
    if accumulate not in _REFERENCE:
        result = train(root / f"reference-{accumulate}", accumulate=accumulate)
        _REFERENCE[accumulate] = result.state.model.state_dict()
    return _REFERENCE[accumulate]


def step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("step-*"))


@pytest.mark.parametrize(
    "name, accumulate, signal_at",
    CASES,
    ids=[f"{n}-accumulate({k})-microbatch({m})" for n, k, m in CASES],
)
def test_a_signal_stops_at_the_window_end_and_resume_is_exact(
    tmp_path: Path, name: str, accumulate: int, signal_at: int
) -> None:
    ckpt, ends = tmp_path / "ckpt", (tmp_path / "reason", tmp_path / "old-style")
    child = fork_trainer(
        checkpoint_dir=ckpt, accumulate=accumulate, pause_at={signal_at}, ends=ends
    )
    child.wait_paused()
    os.kill(child.pid, getattr(signal, name))
    child.resume()
    assert child.wait_exit() == EXIT[name]

    stop_step = signal_at // accumulate + 1  # the end of the window it landed in
    assert ends[0].read_text() == f"{name} {stop_step}"  # on_fit_end(state, reason)
    assert ends[1].read_text() == f"called {stop_step}"  # on_fit_end(state) still called
    stop_dir = f"step-{stop_step:08d}"
    assert (ckpt / "latest").read_text() == stop_dir
    assert step_dirs(ckpt)[-1] == stop_dir  # nothing after the stop
    validate_checkpoint(ckpt / stop_dir)

    resumed = train(ckpt, accumulate=accumulate, resume=True)
    assert resumed.state.step == MAX_STEPS[accumulate]
    expected = uninterrupted(accumulate, tmp_path)
    final = resumed.state.model.state_dict()
    assert final.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(final[key], tensor), f"{key} differs from the uninterrupted run"


SCRIPT = Path(__file__).with_name("_interrupt_trainer.py")


@pytest.mark.parametrize("name, accumulate, signal_at", [("SIGINT", 1, 5), ("SIGTERM", 3, 6)])
def test_a_script_ends_as_the_signal_implies_and_says_how_to_resume(
    tmp_path: Path, name: str, accumulate: int, signal_at: int
) -> None:
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, str(SCRIPT), str(ckpt), "--accumulate", str(accumulate)]
    proc = subprocess.Popen(
        [*command, "--pause-at", str(signal_at)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "paused\n"
        proc.send_signal(getattr(signal, name))
        out, err = proc.communicate("go\n", timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == EXIT[name], err
    stop = signal_at // accumulate + 1
    lines = [line for line in out.splitlines() if "stopped by" in line]
    assert lines == [
        f"loopkit: stopped by {name} at step {stop}; saved checkpoint "
        f"{ckpt / f'step-{stop:08d}'}; resume with fit(..., checkpoint_dir={str(ckpt)!r}, "
        f"resume=True); "
        + ("raising KeyboardInterrupt." if name == "SIGINT" else "exiting with status 143.")
    ]
    if name == "SIGINT":  # the traceback is the short one from fit's own raise
        assert err.rstrip().endswith("KeyboardInterrupt") and err.count("File ") <= 5, err
    else:
        assert err == ""
    validate_checkpoint(ckpt / f"step-{stop:08d}")


def test_sigterm_to_the_process_group_with_loader_workers_still_saves(tmp_path: Path) -> None:
    # SLURM and `kill -- -PGID` signal every process, DataLoader workers included: the
    # workers must outlive the signal until the main process has closed its window.
    ckpt, signal_at = tmp_path / "ckpt", 6
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(ckpt), "--accumulate", "3", "--workers", "2"]
        + ["--pause-at", str(signal_at)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "paused\n"
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate("go\n", timeout=HANG_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT["SIGTERM"], err
    stop = signal_at // 3 + 1
    assert f"stopped by SIGTERM at step {stop}; saved checkpoint" in out
    validate_checkpoint(ckpt / f"step-{stop:08d}")
    resumed = train(ckpt, accumulate=3, resume=True, num_workers=2)
    expected = uninterrupted(3, tmp_path)
    final = resumed.state.model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(final[key], tensor), f"{key} differs from the uninterrupted run"


class _ItemAndPid(torch.utils.data.Dataset):
    """Item i is (i, the pid of the process that read it); item `stuck_at` never comes."""

    def __init__(self, stuck_at: int | None = None) -> None:
        self.stuck_at = stuck_at

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.stuck_at:
            time.sleep(3600)
        return torch.tensor(float(i)), torch.tensor(os.getpid())


_STRAY_THREAD = [False]


def _start_a_stray_thread() -> None:
    """In a forked child: a thread that does not block SIGTERM, made before any init_fn
    runs, as some libraries' fork handlers make them (jemalloc's, with pyarrow loaded)."""
    if _STRAY_THREAD[0]:
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()


os.register_at_fork(after_in_child=_start_a_stray_thread)


@pytest.fixture
def stray_thread_in_children() -> Any:
    _STRAY_THREAD[0] = True
    yield
    _STRAY_THREAD[0] = False


@pytest.mark.parametrize("guarded", [True, False])
def test_a_user_loader_worker_outlives_a_sigterm_from_outside(
    guarded: bool, stray_thread_in_children: Any
) -> None:
    loader = DataLoader(
        _ItemAndPid(),
        batch_size=4,
        num_workers=1,
        worker_init_fn=keep_workers_through_sigterm if guarded else None,
    )
    batches = iterate(loader)  # starts a guarded loader's workers with SIGTERM blocked
    first = next(batches)
    outside = ["kill", "-TERM", str(int(first[1][0]))]  # a sender other than the parent
    if not guarded:  # torch's own worker handler: any sender but the parent kills it
        with pytest.raises(RuntimeError, match="killed by signal: Terminated"):
            subprocess.run(outside, check=True)
            time.sleep(0.5)
            list(batches)
        return
    subprocess.run(outside, check=True)
    time.sleep(0.5)  # let the signal land before the next batches are asked for
    got = [first[0], *(b[0] for b in batches)]
    assert torch.equal(torch.cat(got), torch.arange(32.0))


def test_a_guarded_worker_stuck_in_the_dataset_still_ends_when_the_loader_stops_it() -> None:
    # The loader ends a worker that does not stop by itself with a SIGTERM of its own: a
    # guarded worker must still obey that one, or the process would wait for it at exit.
    loader = DataLoader(
        _ItemAndPid(stuck_at=4),
        batch_size=4,
        num_workers=1,
        timeout=1.0,
        worker_init_fn=keep_workers_through_sigterm,
    )
    batches = iterate(loader)
    worker_pid = int(next(batches)[1][0])
    with pytest.raises(lk.DataTimeoutError):
        next(batches)
    deadline = time.monotonic() + HANG_S
    while _alive(worker_pid):
        assert time.monotonic() < deadline, f"worker {worker_pid} still running"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "slurm, guarded, warned", [(True, False, True), (True, True, False), (False, False, False)]
)
def test_fit_under_slurm_names_a_user_loader_whose_workers_sigterm_would_kill(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    slurm: bool,
    guarded: bool,
    warned: bool,
) -> None:
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    loader = DataLoader(
        TensorDataset(torch.randn(8, 4, dtype=torch.float64), torch.zeros(8, dtype=torch.long)),
        batch_size=4,
        num_workers=1,
        worker_init_fn=keep_workers_through_sigterm if guarded else None,
    )
    with caplog.at_level(logging.WARNING, logger="loopkit"):
        lk.fit(
            mlp(seed=0),
            loader,
            loss_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            max_steps=1,
            progress=False,
        )
    messages = [r.getMessage() for r in caplog.records if "under SLURM" in r.getMessage()]
    assert len(messages) == int(warned), messages
    if warned:
        assert "fit(train_data=...): a DataLoader with num_workers=1" in messages[0]
        assert "worker_init_fn=loopkit.data.keep_workers_through_sigterm" in messages[0]


def test_a_second_sigint_aborts_at_once_without_saving(tmp_path: Path) -> None:
    ckpt, ends = tmp_path / "ckpt", (tmp_path / "reason", tmp_path / "old-style")
    # Two pauses in one window of 3: the first Ctrl-C lands in the first, and the second
    # once the trainer has run on (so the first was handled, not merged with the second).
    child = fork_trainer(checkpoint_dir=ckpt, accumulate=3, pause_at={6, 7}, ends=ends)
    child.wait_paused()
    os.kill(child.pid, signal.SIGINT)
    child.resume()
    child.wait_paused()
    os.kill(child.pid, signal.SIGINT)  # never resumed: it must leave by itself
    assert child.wait_exit() == -signal.SIGINT
    assert step_dirs(ckpt) == []  # save_every=4 was not reached, and no stop checkpoint
    assert not ends[0].exists() and not ends[1].exists()  # no on_fit_end either


def _recorder(calls: list[int]) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        calls.append(signum)

    return handler


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@pytest.fixture
def own_handlers() -> Any:
    """Handlers of the test's own on the three stop signals; the originals come back after."""
    originals: dict[int, Any] = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    calls: list[int] = []
    mine = {s: _recorder(calls) for s in STOP_SIGNALS}
    for s, handler in mine.items():
        signal.signal(s, handler)
    yield mine, calls
    for number, previous in originals.items():
        signal.signal(number, previous)


class SeeHandlers:
    """Records the stop signals' handlers while fit runs; optionally fails at step 2."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: dict[int, Any] = {}
        self.fail = fail

    def on_step_end(self, state: Any) -> None:
        self.seen = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        if self.fail and state.step == 2:
            raise RuntimeError("a failing callback")


def _tiny_fit(*callbacks: Any, max_steps: int = 3) -> lk.FitResult:
    x = torch.randn(16, 4, dtype=torch.float64)
    return lk.fit(
        torch.nn.Linear(4, 1, dtype=torch.float64),
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
        loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=4,
        max_steps=max_steps,
        progress=False,
        callbacks=list(callbacks),
    )


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_fit_puts_the_previous_handlers_back(own_handlers: Any, fail: bool) -> None:
    mine, _ = own_handlers
    seen = SeeHandlers(fail)
    if fail:
        with pytest.raises(RuntimeError, match="a failing callback"):
            _tiny_fit(seen)
    else:
        assert _tiny_fit(seen).stopped_by == "max_steps"
    assert all(seen.seen[s] is not mine[s] for s in STOP_SIGNALS)  # fit's own while it ran
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == mine


def test_an_ignored_signal_stays_ignored(own_handlers: Any) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as nohup or a background job leaves it

    class SendUsr1:
        def on_step_end(self, state: Any) -> None:
            if state.step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    seen = SeeHandlers()
    result = _tiny_fit(SendUsr1(), seen)
    assert seen.seen[signal.SIGUSR1] == signal.SIG_IGN
    assert result.stopped_by == "max_steps" and result.state.step == 3


def test_fit_outside_the_main_thread_leaves_the_handlers_alone(own_handlers: Any) -> None:
    mine, _ = own_handlers
    seen = SeeHandlers()
    thread = threading.Thread(target=_tiny_fit, args=(seen,))
    thread.start()
    thread.join(HANG_S)
    assert seen.seen == mine


def test_a_signal_too_late_to_act_on_goes_to_the_previous_handler(own_handlers: Any) -> None:
    _, calls = own_handlers

    class SendUsr1AtTheEnd:
        def on_fit_end(self, state: Any) -> None:  # after fit's last look at its flag
            os.kill(os.getpid(), signal.SIGUSR1)

    result = _tiny_fit(SendUsr1AtTheEnd())
    assert result.stopped_by == "max_steps"
    assert calls == [signal.SIGUSR1]  # passed on once, after fit put the handler back


def test_a_signal_stops_a_run_without_checkpoint_dir(own_handlers: Any, caplog: Any) -> None:
    class SendUsr1:
        def on_step_end(self, state: Any) -> None:
            if state.step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    result = _tiny_fit(SendUsr1(), max_steps=5)
    assert result.stopped_by == "SIGUSR1" and result.state.step == 2
    assert re.search(
        r"stopped by SIGUSR1 at step 2; nothing saved \(fit has no checkpoint_dir=\.\.\.\); "
        r"fit returns\.",
        caplog.text,
    )
