"""Who is missing when a collective fails, and how long a rank waits before it asks.

A failed collective tells a rank only what it saw itself: gloo says "Timed out waiting
2000ms for recv operation" or "Connection closed by peer", never which rank did not
come. loopkit asks the ranks directly, through the rendezvous store that every rank
already reaches (the store behind torch.distributed's default group), in a *roll call*:

1. At start (`init_distributed`) each rank writes who it is (`who/<rank>`: host and pid)
   and starts one daemon thread, its *responder*, blocked in `store.wait` on its own key
   `wake/<rank>`. Blocked, it sends nothing and uses no CPU.
2. A rank whose collective failed (`env.comm_error`) wakes every responder (the first
   such rank writes every `wake/<rank>` key, once) and waits up to `ROLL_CALL_S` for the
   answers. A responder answers from its own thread whatever its main thread is doing
   (blocked in the same collective, or somewhere else): host, pid, the last step boundary
   fit passed on that rank, and how fit ended there if it raised.
3. The ranks that did not answer are the lost ones: stopped (SIGSTOP, a debugger),
   killed, or cut off. Their `who/` records give host and pid; on this host /proc says
   whether the process is stopped or gone. A rank that left fit raising wrote
   `left/<rank>` first, so even a dead rank's last error is named.
4. A store that does not answer is news too: without torchrun's agent the store lives
   in rank 0's process, so rank 0 is the rank that is lost.

Every store request of a roll call runs in a helper thread that the failing rank waits
for at most `ROLL_CALL_S` + 2 s, so a stopped store host cannot hold it longer.

Timeouts. A process group starts with the generous start-up timeout (forming the group,
wrapping, loading a checkpoint, compiling, the first step). Once the first optimizer step
has ended on every rank, fit calls `shorten_timeouts(strategy.timeout_s)` (its step-end
collective is the barrier that makes this safe: no rank is still in start-up work), and
calls the returned undo when it ends, so the next fit or a resume starts generous again.

Costs: per step one attribute write (`note_step`), host only. Per process: one store
write, one thread and two more store connections. Per fit: one store read. A roll call
runs only after a collective has failed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch.distributed as dist

ROLL_CALL_S = 3.0
"""How long a rank whose collective failed waits for the other ranks to answer a roll
call. A live rank's responder answers within milliseconds; the rest is slack for a busy
host. The store requests themselves get 2 s more at most."""

_KEY = "loopkit/liveness/"
_FOREVER = datetime.timedelta(days=365)  # a responder waits for a roll call this long
_STORE_REQUEST = datetime.timedelta(seconds=10)  # one request of a roll call, at most
_POLL_S = 0.02  # how often a roll call reads the answers


@dataclass(frozen=True, slots=True)
class Peer:
    """One rank, as it described itself at start and as a roll call found it.

    Attributes:
        rank: its global rank.
        host: its host name ("" if unknown).
        pid: its process id (0 if unknown).
        step: the last step end fit passed there, i.e. the optimizer steps taken when
            its step-end collective returned (None: none yet, or unknown).
        left: how fit ended there if it raised ("ValueError: ..."), else "".
        at: where its main thread was when it answered: the innermost function outside
            torch and the standard library, "on_step_end (train.py:57)" ("" if unknown).
        local_state: for a rank on this host that did not answer, what /proc says:
            "stopped", "exited" or "gone" ("" when unknown or running).
    """

    rank: int
    host: str = ""
    pid: int = 0
    step: int | None = None
    left: str = ""
    at: str = ""
    local_state: str = ""

    @property
    def where(self) -> str:
        """ "pid 4242 on node07", or what of it is known."""
        parts = [f"pid {self.pid}" if self.pid else "", f"on {self.host}" if self.host else ""]
        return " ".join(p for p in parts if p) or "pid and host unknown"

    def __str__(self) -> str:
        return f"rank {self.rank} ({self.where})"


@dataclass(frozen=True, slots=True)
class RollCall:
    """What a roll call found about the other ranks.

    Attributes:
        answered: the other ranks that answered (alive, whatever they were doing).
        lost: the other ranks that did not answer (or rank 0, when its store did not).
        store_error: why the store could not be asked ("" when it answered).
        unavailable: why no roll call was possible at all ("" when one ran).
    """

    answered: tuple[Peer, ...] = ()
    lost: tuple[Peer, ...] = ()
    store_error: str = ""
    unavailable: str = ""


class _Monitor:
    """This process's half of the roll call: its record, its responder, its questions."""

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.pid = os.getpid()  # a forked child inherits this object, never its threads
        self.me = {"rank": rank, "host": socket.gethostname(), "pid": self.pid}
        self.step: int | None = None
        self.left = ""
        self.rank0: Peer | None = None
        # Two connections of our own: a client blocked in `wait` holds its connection's
        # lock, and a roll call must never queue behind the group's own store traffic.
        self.requests = store.clone()
        self.requests.set_timeout(_STORE_REQUEST)
        self._waiting = store.clone()
        self.requests.set(f"{_KEY}who/{rank}", json.dumps(self.me))
        self.busy = threading.Lock()  # held while a request runs (or hangs) on `requests`
        self.responder = threading.Thread(
            target=self._respond, name=f"loopkit-roll-call-{rank}", daemon=True
        )
        self.responder.start()

    def _respond(self) -> None:
        """The responder: wait for a roll call (or "stop"), answer it once, end."""
        key = f"{_KEY}wake/{self.rank}"
        try:
            self._waiting.wait([key], _FOREVER)
            if self._waiting.get(key) == b"stop":
                return
            main = threading.main_thread().ident or 0
            at = _location(_stack(sys._current_frames().get(main)))  # where it waits
            answer = {**self.me, "step": self.step, "left": self.left, "at": at}
            self._waiting.append(f"{_KEY}here", json.dumps(answer) + "\n")
            self._waiting.add(f"{_KEY}answered", 1)
        except Exception:  # noqa: BLE001 - the store went away with its host: nobody asks
            return

    def request(self, fn: Callable[[Any], object]) -> None:
        """Run a fire-and-forget request unless a roll call holds (or hangs on) the client."""
        if os.getpid() != self.pid or not self.busy.acquire(blocking=False):
            return  # a forked child must not talk over its parent's connection
        try:
            fn(self.requests)
        except Exception:  # noqa: BLE001 - best effort: this is bookkeeping for errors
            pass
        finally:
            self.busy.release()

    def remember_rank0(self) -> None:
        """Keep rank 0's record here: if rank 0 hosts the store and is lost, nobody can read it."""
        if self.rank0 is not None or os.getpid() != self.pid:
            return
        if not self.busy.acquire(blocking=False):
            return
        try:
            key = f"{_KEY}who/0"
            if self.requests.check([key]):
                self.rank0 = _peer(json.loads(self.requests.get(key)))
        except Exception:  # noqa: BLE001 - only a detail of a later error message
            pass
        finally:
            self.busy.release()

    def roll_call(self, grace_s: float) -> RollCall:
        """Wake every responder, collect the answers for up to `grace_s` seconds."""
        if os.getpid() != self.pid:
            return RollCall(unavailable="a forked child process cannot use its parent's")
        if not self.busy.acquire(blocking=False):
            return self._no_store("an earlier roll call still waits for it")
        found: dict[str, Any] = {"answers": {}}
        asking = threading.Thread(target=self._ask, args=(grace_s, found), daemon=True)
        asking.start()
        asking.join(grace_s + 2.0)
        if asking.is_alive() or "error" in found:
            why = found.get("error") or f"no reply in {grace_s + 2.0:g} s"
            return self._no_store(why)
        answers: dict[int, Peer] = found["answers"]
        records: dict[int, Peer] = found["records"]
        others = [r for r in range(self.world_size) if r != self.rank]
        return RollCall(
            answered=tuple(answers[r] for r in others if r in answers),
            lost=tuple(_with_local_state(records[r]) for r in others if r not in answers),
        )

    def _ask(self, grace_s: float, found: dict[str, Any]) -> None:
        """The store side of a roll call, in a helper thread (see `roll_call`)."""
        store = self.requests
        try:
            mine = str(self.rank).encode()
            if store.compare_set(f"{_KEY}called", "", str(self.rank)) == mine:
                keys = [f"{_KEY}wake/{r}" for r in range(self.world_size)]
                store.multi_set(keys, ["call"] * len(keys))  # once per job, by one rank
            # Poll a counter (a few bytes), then read the answers once (~150 bytes a rank).
            deadline = time.monotonic() + grace_s
            while store.add(f"{_KEY}answered", 0) < self.world_size:
                if time.monotonic() >= deadline:
                    break
                time.sleep(_POLL_S)
            store.append(f"{_KEY}here", "")  # so that `get` never waits for the key
            found["answers"] = _parse_answers(store.get(f"{_KEY}here"))
            everyone = set(range(self.world_size)) - {self.rank}
            missing = sorted(everyone - found["answers"].keys())
            found["records"] = {r: _record(store, r) for r in missing}
        except Exception as error:  # noqa: BLE001 - reported as the store's failure
            found["error"] = f"{type(error).__name__}: {str(error).strip()[:200]}"
        finally:
            self.busy.release()

    def _no_store(self, why: str) -> RollCall:
        """The store did not answer: say where it is, and who is lost if it is rank 0's."""
        where = _store_address(self.store)
        store = f"the rendezvous store{f' at {where}' if where else ''}"
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        if agent or self.rank == 0:  # torchrun's agent hosts it, or this very process does
            return RollCall(store_error=f"{store} did not answer ({why})")
        rank0 = _with_local_state(self.rank0 or Peer(0))
        text = f"{store}, which runs in rank 0's process, did not answer ({why})"
        return RollCall(lost=(rank0,), store_error=text)


_STATE_TEXT = {
    "stopped": "its process is stopped (SIGSTOP, Ctrl-Z or a debugger)",
    "exited": "its process has exited",
    "gone": "no such process runs on this host any more",
}


def explain(found: RollCall, error: BaseException | None = None) -> str:
    """What a roll call found, in a few sentences for the message of `error`."""
    if found.unavailable:
        return f"No roll call was possible ({found.unavailable}), so no rank can be named."
    if found.lost:
        why = found.store_error or f"no answer to a roll call within {ROLL_CALL_S:g} s"
        ranks = ", ".join(str(peer.rank) for peer in found.lost)
        subject = f"Rank {ranks} is" if len(found.lost) == 1 else f"Ranks {ranks} are"
        one = len(found.lost) == 1
        lost = "; ".join(_lost_text(peer, named=not one) for peer in found.lost)
        return f"{subject} lost ({why}): {lost}."
    if found.store_error:
        return f"No rank can be named: {found.store_error}."
    here = local_peer().step
    mine = _location(_stack_of(error)) if error is not None else ""
    elsewhere = [p for p in found.answered if p.left or p.step != here or p.at != mine]
    head = (
        "Every rank answered a roll call, so none is lost "
        f"(this rank: {_past(here)}, in {mine or '?'})"
    )
    if not elsewhere:
        return (
            f"{head}, and all wait at the same place: did the ranks call collectives in "
            "different orders, or with different shapes?"
        )
    shown = "; ".join(_elsewhere_text(p) for p in elsewhere[:_SHOWN])
    more = f"; and {len(elsewhere) - _SHOWN} more" if len(elsewhere) > _SHOWN else ""
    return f"{head}, but not every rank waits there: {shown}{more}."


_COMM_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "gloo",
    "nccl",
    "processgroup",
    "socket",
)


def looks_like_comm_failure(error: BaseException) -> bool:
    """Whether an exception raised inside a collective looks like a lost or hung peer:
    torch.distributed's own errors, and RuntimeErrors whose text names a connection, a
    timeout or a backend (gloo raises plain RuntimeErrors)."""
    if dist.is_available() and isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _COMM_MARKERS)


def raised_in(error: BaseException) -> str:
    """Where `error` was raised: the innermost function outside torch and the standard
    library, "loss_fn (train.py:40)" ("" if none)."""
    return _location(_stack_of(error))


def describe_failure(
    error: BaseException, rank: int, world_size: int, what: str, timeout_s: float
) -> tuple[str, tuple[int, ...]]:
    """Run a roll call; return the message for a DistributedError and the lost ranks.

    Args:
        error: what the collective raised.
        rank, world_size: this rank and the number of ranks.
        what: the collective, in words ("summing the item count over ranks").
        timeout_s: the strategy's steady-state timeout, for the message.

    Returns:
        (message, the ranks that did not answer). At most ROLL_CALL_S + 2 s.
    """
    found = roll_call()
    in_force = group_timeout()
    waited = f"{in_force.total_seconds():g} s" if in_force is not None else "unknown"
    message = (
        f"rank {rank} of {world_size} ({local_peer().where}): {what} failed "
        f"({type(error).__name__}: {str(error).strip()[:300]}). {explain(found, error)} "
        f"Collectives here wait {waited} for a peer (timeout_s={timeout_s} once the "
        "first step is done, the start-up timeout before). Check the logs of the ranks "
        "named (and the kernel log for the OOM killer), then restart every rank: "
        "fit(..., checkpoint_dir=..., resume=True) continues from the newest valid "
        "checkpoint."
    )
    return message, tuple(peer.rank for peer in found.lost)


_SHOWN = 8  # ranks an error message describes one by one


def _lost_text(peer: Peer, *, named: bool) -> str:
    parts = [f"rank {peer.rank}: {peer.where}" if named else peer.where]
    if peer.local_state:
        parts.append(_STATE_TEXT[peer.local_state])
    if peer.step is not None:
        parts.append(f"last {_past(peer.step)}")
    if peer.left:
        parts.append(f"it left fit raising {peer.left}")
    return ", ".join(parts)


def _elsewhere_text(peer: Peer) -> str:
    if peer.left:
        return f"{peer} left fit raising {peer.left}"
    return f"{peer} is alive, {_past(peer.step)}, in {peer.at or '?'}"


def _past(step: int | None) -> str:
    """Where a rank is in training: the last step end fit passed there (`note_step`)."""
    return "before its first step end" if step is None else f"past step {step}"


def _stack(frame: FrameType | None) -> list[tuple[str, str, int]]:
    """A thread's stack as (function, file, line), innermost first."""
    entries = []
    while frame is not None:
        entries.append((frame.f_code.co_name, frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return entries


def _stack_of(error: BaseException) -> list[tuple[str, str, int]]:
    """Where `error` was raised, as (function, file, line), innermost first."""
    entries = []
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        entries.append((code.co_name, code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return entries[::-1]


_TORCH = os.path.dirname(os.path.dirname(os.path.abspath(dist.__file__))) + os.sep
_STDLIB = os.path.normpath(sysconfig.get_paths()["stdlib"]) + os.sep


def _is_library(path: str) -> bool:
    """torch and the standard library (not the packages installed beside it): where every
    rank waits alike, so they say nothing about where a rank is."""
    if path.startswith(_TORCH) or path == os.path.normpath(__file__):
        return True
    installed = f"{os.sep}site-packages{os.sep}" in path or "dist-packages" in path
    return path.startswith(_STDLIB) and not installed


def _location(entries: list[tuple[str, str, int]]) -> str:
    """The innermost entry outside torch, the standard library and this module."""
    for function, filename, line in entries:
        if not _is_library(os.path.normpath(filename)):
            return f"{function} ({os.path.basename(filename)}:{line})"
    return ""


def _peer(record: dict[str, Any]) -> Peer:
    return Peer(
        rank=int(record["rank"]),
        host=str(record.get("host") or ""),
        pid=int(record.get("pid") or 0),
        step=None if record.get("step") is None else int(record["step"]),
        left=str(record.get("left") or ""),
        at=str(record.get("at") or ""),
    )


def _parse_answers(raw: bytes) -> dict[int, Peer]:
    answers = {}
    for line in raw.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            peer = _peer(json.loads(line))
            answers[peer.rank] = peer
    return answers


def _record(store: Any, rank: int) -> Peer:
    """A rank's start-up record and its last words, from the store (for a rank that is lost)."""
    who, left = f"{_KEY}who/{rank}", f"{_KEY}left/{rank}"
    record: dict[str, Any] = {"rank": rank}
    if store.check([who]):
        record.update(json.loads(store.get(who)), rank=rank)
    if store.check([left]):
        record["left"] = store.get(left).decode(errors="replace")
    return _peer(record)


def _with_local_state(peer: Peer) -> Peer:
    """`peer` with what /proc says of its process, when it ran on this host."""
    if not peer.pid or peer.host != socket.gethostname():
        return peer
    try:
        with open(f"/proc/{peer.pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        state = "gone" if os.path.isdir("/proc") else ""
    else:
        state = {"T": "stopped", "t": "stopped", "Z": "exited", "X": "exited"}.get(state, "")
    return Peer(peer.rank, peer.host, peer.pid, peer.step, peer.left, peer.at, state)


def _store_address(store: Any) -> str:
    """host:port of the TCPStore under the group's PrefixStores, or "" for another store."""
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    return f"{host}:{port}" if host and port else ""


_monitor: _Monitor | None = None
_unavailable = ""
_STOP_JOIN_S = 5.0
"""How long stop() waits for the responder to return from its store.wait."""


def start(rank: int, world_size: int) -> None:
    """Publish this rank's record and start its responder (once per process group).

    Called by `init_distributed`. A store that cannot be cloned (say a FileStore) leaves
    the roll call unavailable; errors then say so instead of naming ranks.
    """
    global _monitor, _unavailable
    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return
    store = dist.distributed_c10d._get_default_store()
    if _monitor is not None and _monitor.store is store:
        return
    stop()
    try:
        _monitor, _unavailable = _Monitor(store, rank, world_size), ""
        atexit.register(stop)  # the responder ends cleanly, before torch's own teardown
    except Exception as error:  # noqa: BLE001 - a diagnosis tool must not stop training
        _monitor = None
        _unavailable = f"{type(error).__name__}: {str(error).strip()[:200]}"


def stop() -> None:
    """End this process's responder (at exit): a later roll call finds this rank gone."""
    global _monitor
    monitor, _monitor = _monitor, None
    if monitor is not None:
        monitor.request(lambda store: store.set(f"{_KEY}wake/{monitor.rank}", "stop"))
        # Wait for it to leave store.wait: a daemon thread still inside that C++ call when
        # the interpreter finalizes is unwound by force, which aborts the process
        # ("terminate called without an active exception").
        if monitor.pid == os.getpid() and monitor.responder.is_alive():
            monitor.responder.join(_STOP_JOIN_S)


def note_step(step: int | None) -> None:
    """Record the step boundary fit just reached here (a roll call reports it); no I/O."""
    if _monitor is not None and step is not None:
        _monitor.step = step


def note_left(error: BaseException) -> None:
    """Record, in the store, that fit is leaving this rank raising `error` (its last words)."""
    if _monitor is None:
        return
    monitor = _monitor
    monitor.left = f"{type(error).__name__}: {str(error).strip()[:200]}"
    monitor.request(lambda store: store.set(f"{_KEY}left/{monitor.rank}", monitor.left))


def remember_rank0() -> None:
    """Read rank 0's record now, while the store answers (fit calls this at its start)."""
    if _monitor is not None:
        _monitor.remember_rank0()


def roll_call(grace_s: float = ROLL_CALL_S) -> RollCall:
    """Ask every rank to answer; return who did and who did not.

    Blocks for at most `grace_s` + 2 s (less when every rank answers at once). Only after
    a collective failed: the first call wakes every rank's responder for good.
    """
    if _monitor is None:
        why = _unavailable or "this process joined no process group of several ranks"
        return RollCall(unavailable=why)
    return _monitor.roll_call(grace_s)


def local_peer() -> Peer:
    """This process as a Peer: rank, host, pid and its last step boundary."""
    if _monitor is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return Peer(rank, socket.gethostname(), os.getpid())
    return Peer(_monitor.rank, str(_monitor.me["host"]), os.getpid(), _monitor.step)


def _member_groups() -> list[dist.ProcessGroup]:
    """Every process group this rank belongs to: the default one, the strategies' meshes,
    fit's side group."""
    world = getattr(dist.distributed_c10d, "_world", None)
    groups = list(getattr(world, "pg_map", {}) or {}) or [
        dist.distributed_c10d._get_default_group()
    ]
    return [g for g in groups if isinstance(g, dist.ProcessGroup) and dist.get_rank(g) >= 0]


def group_timeout(group: dist.ProcessGroup | None = None) -> datetime.timedelta | None:
    """The collective timeout in force on `group` (default: the default group), if readable."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group or dist.distributed_c10d._get_default_group()
    for device in getattr(group, "_device_types", ()):
        with contextlib.suppress(Exception):
            timeout = group._get_backend(device).options._timeout
            if isinstance(timeout, datetime.timedelta):
                return timeout
    return None


def shorten_timeouts(timeout_s: float) -> Callable[[], None]:
    """Set every group this rank belongs to to `timeout_s`; return the undo.

    Call it on every rank right after a collective that every rank reaches only once its
    start-up work is done (a slow rank still under the start-up timeout would otherwise
    meet a fast one already under the short one). Host only: no collective, no device
    sync. Affects collectives started afterwards.
    """
    short = datetime.timedelta(seconds=float(timeout_s))
    before = []
    for group in _member_groups():
        previous = group_timeout(group)
        try:
            group.set_timeout(short)
        except Exception:  # noqa: BLE001 - a backend without timeouts keeps its own
            continue
        before.append((group, previous))

    def restore() -> None:
        for group, timeout in before:
            if timeout is not None:
                with contextlib.suppress(Exception):  # the group may be destroyed by now
                    group.set_timeout(timeout)

    return restore


__all__ = [
    "ROLL_CALL_S",
    "Peer",
    "RollCall",
    "describe_failure",
    "explain",
    "group_timeout",
    "local_peer",
    "looks_like_comm_failure",
    "note_left",
    "note_step",
    "raised_in",
    "remember_rank0",
    "roll_call",
    "shorten_timeouts",
    "start",
    "stop",
]
