"""fit()'s graceful stop: SIGINT, SIGTERM and SIGUSR1 end a run at an optimizer-step boundary.

A signal handler only records which signal came. fit() reads that record at each optimizer
step boundary (the end of an accumulation window) and, when it is set, stops there: it saves
a checkpoint, fires `on_fit_end` with the signal's name as the reason, logs one line, and
ends as the signal implies (see `Interrupts.exit_error`).

Why the window boundary and not the next micro-batch: the gradients of an open window are
not in a checkpoint (`save_checkpoint` refuses an open window), and closing a window early
would take an optimizer step the uninterrupted run never takes. Finishing the open window
costs at most k-1 micro-batches and keeps resume bitwise exact.

Several processes (DDP, FSDP, Pipeline) agree on the stop through one all_reduce(MAX) of a
one-element CPU tensor on a gloo group made for it at fit start: host only, no device sync,
one small collective per optimizer step. Every rank then stops at the same step, whichever
rank the signal reached.

That collective is also where the collective timeouts change (loopkit.strategies.liveness):
every group starts a fit under the generous start-up timeout; once the first step's
all_reduce has returned, every rank has finished its start-up work, so each rank shortens
its groups to the strategy's `timeout_s` there, and puts the start-up value back when fit
ends. A failed all_reduce is explained like any failed collective: a roll call names the
rank(s) that did not come.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

from .strategies import DistributedError, Strategy, liveness

logger = logging.getLogger("loopkit.fit")

STOP_SIGNALS: tuple[str, ...] = ("SIGUSR1", "SIGTERM", "SIGINT")
"""The signals fit() turns into a graceful stop, weakest first.

When several arrive (on one rank, or on different ranks), the strongest decides how fit
ends: a SIGTERM after a SIGUSR1 still exits with status 143.
"""

SIGTERM_EXIT_STATUS = 128 + 15
"""fit's exit status after a SIGTERM stop: what a shell, torchrun, SLURM and Kubernetes
report for a process that SIGTERM ended (128 + 15)."""


def _code(signum: int) -> int:
    """A signal's strength: 1 + its index in STOP_SIGNALS (0 is "no signal")."""
    return 1 + STOP_SIGNALS.index(signal.Signals(signum).name)


class Interrupts:
    """Turn SIGINT, SIGTERM and SIGUSR1 into a stop that fit() takes at a step boundary.

    Use it as a context manager around the run. Entering installs the handlers (in the
    main thread only; a signal the process ignores stays ignored) and, with several
    processes, makes a gloo group for the stop flag. Leaving puts the previous handlers
    back and frees the group; a signal that came too late to be acted on (after the last
    `poll`) is then passed on to the previous handler, as if fit had not been there.

    A second SIGINT while a stop is pending raises KeyboardInterrupt at once (no save).

    Args:
        strategy: the run's strategy (its world size, main rank and collective timeout).
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.received = 0  # the strongest stop signal this process received (0: none)
        self.agreed = 0  # the signal every rank stops for (0: not stopping)
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self._group: Any = None
        self._flag = torch.zeros(1, dtype=torch.int64)
        self._restore_timeouts: Any = None  # set once the timeouts are short

    @property
    def reason(self) -> str:
        """The name of the signal the run stops for ("SIGTERM", ...), or "" if none."""
        return STOP_SIGNALS[self.agreed - 1] if self.agreed else ""

    def __enter__(self) -> Interrupts:
        if self.strategy.world_size > 1:
            timeout_s = self.strategy.timeout_s
            # The start-up timeout: what the default group has now (fit shortens it to
            # the strategy's timeout_s after the first step, see `poll`).
            timeout = liveness.group_timeout() or (
                datetime.timedelta(seconds=timeout_s) if timeout_s else None
            )
            # A collective: every rank makes the group at fit start. gloo, whatever the
            # strategy's backend, so the flag stays a host tensor. Made before the handlers
            # are installed: if it fails, nothing is left to put back.
            try:
                self._group = dist.new_group(backend="gloo", timeout=timeout)
            except RuntimeError as error:
                if not liveness.looks_like_comm_failure(error):
                    raise
                raise self._lost_peer_error(error, "making fit's gloo group") from error
            liveness.remember_rank0()
        self._install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        late = self.received if exc_type is None and not self.agreed else 0
        explained = None  # a raw collective failure, explained (while the timeouts hold)
        if exc is not None and self._unexplained_comm_failure(exc):
            what = f"a collective under {liveness.raised_in(exc) or 'fit'}"
            explained = self._lost_peer_error(exc, what)
        if exc is not None:
            liveness.note_left(exc)  # a roll call elsewhere reports how fit ended here
        if self._restore_timeouts is not None:
            restore, self._restore_timeouts = self._restore_timeouts, None
            restore()  # the start-up timeout again, for whatever runs next
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._group is not None:
            group, self._group = self._group, None
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - never hide why fit is leaving
                if exc_type is None:
                    raise
        if late:
            signal.raise_signal(getattr(signal, STOP_SIGNALS[late - 1]))
        if explained is not None:
            raise explained from exc  # replaces the raw error, chained to it

    def _unexplained_comm_failure(self, exc: BaseException) -> bool:
        """Whether `exc` is a failed collective that nothing has explained yet.

        The strategies explain the collectives they call (DistributedError); this catches
        the others that fit runs: DDP's forward (bucket rebuild, buffer broadcast), FSDP's
        all-gathers, evaluation and checkpoint collectives. An error whose chain already
        holds a DistributedError is explained.
        """
        if self.strategy.world_size < 2:
            return False
        chain: BaseException | None = exc
        while chain is not None:
            if isinstance(chain, DistributedError):
                return False
            chain = chain.__cause__ or chain.__context__
        return liveness.looks_like_comm_failure(exc)

    def _lost_peer_error(self, error: BaseException, what: str) -> DistributedError:
        """A DistributedError for a failed collective, naming who is lost (a roll call)."""
        strategy = self.strategy
        message, lost_ranks = liveness.describe_failure(
            error, strategy.rank, strategy.world_size, what, strategy.timeout_s or 0.0
        )
        return DistributedError(message, lost_ranks=lost_ranks)

    def poll(self, step: int | None = None) -> bool:
        """Whether to stop now; call it at each optimizer-step boundary, on every rank.

        One process: reads the flag. Several: one all_reduce(MAX) of this rank's flag over
        the gloo group (host only, no device sync), so every rank gets the same answer at
        the same step. Once True, it stays True without further collectives. After the
        first all_reduce every group's timeout becomes the strategy's `timeout_s`.

        Args:
            step: the optimizer steps taken; a roll call reports it (no I/O here).

        Raises:
            DistributedError: another rank died or hung past the timeout; it names the
                rank(s) that did not answer a roll call.
        """
        liveness.note_step(step)
        if self.agreed:
            return True
        code = self.received
        if self._group is not None:
            code = self._max_over_ranks(code)
            if self._restore_timeouts is None and self.strategy.timeout_s:
                # Every rank is past its start-up work: this all_reduce returned.
                self._restore_timeouts = liveness.shorten_timeouts(self.strategy.timeout_s)
        self.agreed = code
        return bool(code)

    def announce(self, step: int, saved: Path | None, checkpoint_dir: Any) -> None:
        """Log the one line that says where the run stopped, where it saved, how to resume."""
        if not self.strategy.is_main:
            return
        if saved is not None:
            where = (
                f"saved checkpoint {saved}; resume with "
                f"fit(..., checkpoint_dir={str(checkpoint_dir)!r}, resume=True)"
            )
        elif checkpoint_dir is None:
            where = "nothing saved (fit has no checkpoint_dir=...)"
        else:
            where = "nothing saved (the run ended inside an accumulation window)"
        ending = {
            "SIGINT": "raising KeyboardInterrupt",
            "SIGTERM": f"exiting with status {SIGTERM_EXIT_STATUS}",
        }.get(self.reason, "fit returns")
        logger.warning("stopped by %s at step %s; %s; %s.", self.reason, step, where, ending)

    def exit_error(self) -> BaseException | None:
        """What fit() raises once the stop is saved and reported, or None to return.

        SIGINT: KeyboardInterrupt, as Ctrl-C does without fit (uncaught, Python then exits
        as killed by SIGINT, status 130). SIGTERM: SystemExit(143), the status a launcher
        expects after SIGTERM, reached through Python's usual unwinding (finally blocks,
        atexit, buffered logs). SIGUSR1 (SLURM's `--signal=USR1@seconds`, a warning that
        time runs out): None; fit returns with `stopped_by="SIGUSR1"` and the script
        decides what follows (requeue, submit the next job, or just end).
        """
        if self.reason == "SIGINT":
            return KeyboardInterrupt()
        if self.reason == "SIGTERM":
            return SystemExit(SIGTERM_EXIT_STATUS)
        return None

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            if self.strategy.is_main:
                logger.debug("fit runs outside the main thread: no stop-signal handlers.")
            return
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)  # SIGUSR1 is POSIX only
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            # SIG_IGN: the process was started to ignore it (nohup, a background job).
            # None: a handler installed outside Python, which could not be put back.
            if previous is None or previous == signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The handler: record the signal; nothing else (fit acts at the step boundary)."""
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked during fit: the main process ends it
        if signum == signal.SIGINT and (self.received or self.agreed):
            raise KeyboardInterrupt  # a second Ctrl-C: abort now, without saving
        self.received = max(self.received, _code(signum))

    def _max_over_ranks(self, code: int) -> int:
        self._flag.fill_(code)
        try:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        except RuntimeError as error:  # gloo's errors: a peer closed or hung past the timeout
            what = "the step-end collective (agreeing whether to stop on a signal)"
            raise self._lost_peer_error(error, what) from error
        return int(self._flag.item())  # a CPU tensor: no device sync


__all__ = ["SIGTERM_EXIT_STATUS", "STOP_SIGNALS", "Interrupts"]
