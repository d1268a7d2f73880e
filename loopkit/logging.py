"""Loggers: callbacks that write log and eval records to TensorBoard, CSV, JSONL or a bar.

Every logger receives host floats (fit() pulls metrics off the device at log steps only),
writes from the main rank only (fit() attaches loggers there; the loggers also check
`state.strategy.is_main`), and never asks to stop. A record is one `on_log` or one
`on_eval_end`: step, epoch, time_s (seconds since fit start) and the metrics.

Logs continue across resumes, and no run's log is overwritten: a fit start past step 0
(fit() resumed from a checkpoint) keeps the records through that step, drops later ones
(logged after the checkpoint by work that was lost) and appends; TensorBoard purges the
later events for readers. A fresh fit start (step 0) renames an earlier run's CSV/JSONL
file to `path.N` and writes a new event file beside earlier ones. fit() records its run id
beside each CSV/JSONL file (`path.run`): a resumed run continues only its own file, and
renames another run's (a log_dir shared by two runs) to `path.N` instead of dropping its
later records.

loopkit's own messages ("resumed from ...", "accumulate=4 (...)") go through the standard
library's `logging`, to the "loopkit" logger and its children, from the main rank only.
Unless you configure logging, they are printed to stdout as "loopkit: <message>", as
`print` would: the "loopkit" logger is at INFO and has a console handler that steps aside
when another handler on the way (one you added to "loopkit" or to the root logger, e.g.
with `logging.basicConfig()`) already writes to the console. Silence them with
`logging.getLogger("loopkit").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, TextIO

PathLike = str | os.PathLike

CSV_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "time_s",
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "perf/tokens_per_s",
)
"""The columns every CSV log starts with; keys seen later (eval/..., perf/...) follow."""


LOGGER_NAME = "loopkit"
"""The logger loopkit's messages go to (modules log to children such as "loopkit.fit")."""


class _ConsoleHandler(logging.StreamHandler):
    """Write records to the current `sys.stdout`, unless a handler on the way already shows them.

    The stream is looked up per record, as `print` does, so redirection (and pytest's
    capture) sees the messages. A record is skipped when another handler that it reaches
    (on its logger or an ancestor, while they propagate) writes to stdout or stderr, so a
    user's `logging.basicConfig()` shows each message once, in the user's format.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter(f"{LOGGER_NAME}: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self._shown_elsewhere(record):
            return
        self.stream = sys.stdout
        super().emit(record)

    def _shown_elsewhere(self, record: logging.LogRecord) -> bool:
        consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            for handler in logger.handlers:
                if (
                    handler is not self
                    and isinstance(handler, logging.StreamHandler)
                    and handler.stream in consoles
                    and record.levelno >= handler.level
                ):
                    return True
            logger = logger.parent if logger.propagate else None
        return False


def _install_console_handler() -> None:
    """Give the "loopkit" logger a level and its console handler (once per process)."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())


_install_console_handler()


def _check_path(path: object, where: str, example: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}(path={path!r}): expected a file path, e.g. {example!r}.")
    return os.fspath(path)


class _Stopwatch:
    """Seconds since fit start (or since the first record when fit() did not start it)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        if not callable(clock):
            raise TypeError(f"clock={clock!r}: expected a callable returning seconds.")
        self.clock = clock
        self.start: float | None = None

    def restart(self) -> None:
        self.start = self.clock()

    def elapsed_s(self) -> float:
        if self.start is None:
            self.restart()
        return self.clock() - self.start  # type: ignore[operator]


def _record(state: Any, metrics: Mapping[str, float], watch: _Stopwatch) -> dict[str, Any]:
    return {
        "step": int(state.step),
        "epoch": int(state.epoch),
        "time_s": watch.elapsed_s(),
        **metrics,
    }


_log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"\.(\d+)")
"""The suffix of a log file an earlier fresh run set aside: metrics.csv.1, metrics.csv.2, ..."""


def _resumed_step(state: Any) -> int | None:
    """The step a fit start continues from, or None for a fresh run (step 0).

    fit() resumes before `on_fit_start`, so a state past step 0 there is a resumed run; a
    loop of your own that starts the loggers from such a state continues its logs too.
    """
    step = int(state.step)
    return step if step > 0 else None


def _replace_atomically(path: str, write: Callable[[IO[str]], None]) -> None:
    """Write `path` anew through a temp file beside it, then rename the temp file over it.

    A crash or a write error before the rename leaves `path` as it was (readers see the old
    file or the new one, never a part of one). The temp file is fsync'd before the rename,
    so a power loss cannot publish unwritten data either. Costs one fsync.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


_RUN_SUFFIX = ".run"
"""`<log file>.run` holds the id of the fit run whose records the log file holds."""


def _run_of_file(path: str) -> str | None:
    """The run id recorded beside a log file, or None (none recorded: an older log)."""
    try:
        with open(path + _RUN_SUFFIX, encoding="utf-8") as file:
            return file.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _other_run(path: str, hparams: Mapping[str, object]) -> str | None:
    """The id of another run whose records `path` holds; None: ours, or not known.

    fit() passes its run id in `hparams["run_id"]` (kept across resumes): a resumed run
    must not continue, and drop the later records of, another run's log in a shared log_dir.
    """
    run_id = hparams.get("run_id")
    owner = _run_of_file(path)
    if not isinstance(run_id, str) or owner is None or owner == run_id:
        return None
    return owner if os.path.exists(path) else None


def _mark_run(path: str, hparams: Mapping[str, object]) -> None:
    """Record fit's run id beside the log file it writes (nothing outside fit)."""
    run_id = hparams.get("run_id")
    if not isinstance(run_id, str):
        return

    def write(file: IO[str]) -> None:
        file.write(run_id + "\n")

    _replace_atomically(path + _RUN_SUFFIX, write)


def _set_aside(path: str, *, resumed: bool, other_run: str | None = None) -> str | None:
    """Rename a non-empty `path` to `path.N` (N one above the highest taken); its new name.

    A run never overwrites a log it does not continue (a fresh run's, a resumed run's
    when the file is no loopkit log or another run's): the old file keeps its bytes under
    the new name (a rename in the same directory), with its `.run` record, and the run
    starts a new one.
    """
    try:
        if os.path.getsize(path) == 0:
            return None
    except FileNotFoundError:
        return None
    directory, name = os.path.split(os.path.abspath(path))
    taken = [
        int(match.group(1))
        for other in os.listdir(directory)
        if other.startswith(name) and (match := _NUMBERED.fullmatch(other[len(name) :]))
    ]
    target = f"{path}.{max(taken, default=0) + 1}"
    os.rename(path, target)
    if os.path.exists(path + _RUN_SUFFIX):
        os.replace(path + _RUN_SUFFIX, target + _RUN_SUFFIX)
    why = (
        f"it holds the records of run {other_run}, another run than this resumed one"
        if other_run is not None
        else "it is no loopkit log this resumed run can continue"
        if resumed
        else "this fresh run (step 0) starts a new file; to continue a run instead, pass "
        "resume=True with its checkpoint_dir"
    )
    _log.warning(
        "%s held an earlier run's records; moved it to %s, unchanged: %s.", path, target, why
    )
    return target


def _step_of(value: object) -> int | None:
    """A record's step as an int, or None when it is not one (a torn or foreign line)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _keep_through(records: list[tuple[int | None, Any]], step: int) -> tuple[list[Any], int] | None:
    """The records at steps <= `step` and how many others there were; None: not a log.

    Each record comes with its step (None when it could not be read). Only the last one
    may be unreadable, as a line torn by a crash mid-write is; any other unreadable
    record means the file is not a loopkit log, so none of it is dropped.
    """
    kept = []
    for index, (record_step, record) in enumerate(records):
        if record_step is None and index < len(records) - 1:
            return None
        if record_step is not None and record_step <= step:
            kept.append(record)
    return kept, len(records) - len(kept)


def _read_csv(path: str) -> tuple[list[str], list[tuple[int | None, dict[str, str]]]] | None:
    """The header and the rows (each with its step) of a CSV log; None: no such log."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (FileNotFoundError, UnicodeDecodeError, csv.Error):
        return None
    if "step" not in header:
        return None
    # A row with too many fields has a None key; one with too few has None values.
    return header, [
        (None if None in row or None in row.values() else _step_of(row["step"]), row)
        for row in rows
    ]


def _read_jsonl(path: str) -> list[tuple[int | None, str]] | None:
    """The lines of a JSONL log, each with its record's step; None: no such file."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            lines = [line.rstrip("\r\n") for line in file]
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    records: list[tuple[int | None, str]] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        step = _step_of(record.get("step")) if isinstance(record, dict) else None
        records.append((step, line))
    return records


def _say_continued(path: str, step: int, kept: int, dropped: int) -> None:
    _log.info(
        "%s: continued after step %s (kept %s records; dropped %s written after the checkpoint).",
        path,
        step,
        kept,
        dropped,
    )


class TensorBoardLogger:
    """Write scalars to TensorBoard event files in `log_dir` (with tensorboardX).

    At fit start the settings go in as text ("hparams", JSON, at the start step) and in the
    HParams plugin (numbers, bools and strings as they are; anything else as its str). Each
    log and eval metric becomes a scalar at `state.step`. Eval ends flush; each saved
    checkpoint and the fit end close the event file, which is what writes every queued
    event to disk (the next event opens a new file).

    Each fit start opens a new event file; none is ever changed. A resumed fit (one that
    starts past step 0) opens it with tensorboardX's `purge_step` at the step after the
    resumed one, so readers drop the events an earlier run wrote after the checkpoint and
    each step shows once. A fresh fit into a directory that already holds event files adds
    its file beside them (as tensorboardX and Hugging Face do) and says so: TensorBoard
    then draws both runs' points at the same steps, so give each run its own `log_dir`.

    Args:
        log_dir: the run directory (created if missing). View with
            `tensorboard --logdir <its parent>`.
        flush_secs: how often tensorboardX flushes in the background.

    Example:
        >>> logger = TensorBoardLogger("runs/exp1")  # doctest: +SKIP
    """

    def __init__(self, log_dir: PathLike, *, flush_secs: int = 30) -> None:
        self.log_dir = _check_path(log_dir, "TensorBoardLogger", "runs/exp1")
        self.flush_secs = flush_secs
        self._writer: Any = None

    def _open(self, purge_step: int | None = None) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # tensorboardX names an event file by the second and the host only, and opens it
            # with "wb": a second writer in the same second would empty the first one's file
            # (a run resumed within a second of its start did). Readers load a directory's
            # files in name order and a purge acts on the files before it, so the suffix
            # orders files of one second by creation time (in ns, fixed width), then keeps
            # them apart (pid, number in this process).
            suffix = f".{time.time_ns():020d}.{os.getpid()}.{next(_WRITER_IDS)}"
            self._writer = SummaryWriter(
                logdir=self.log_dir,
                flush_secs=self.flush_secs,
                purge_step=purge_step,
                filename_suffix=suffix,
            )
        return self._writer

    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        if not state.strategy.is_main:
            return
        self.on_fit_end(state)  # a writer left open: its file ends here
        resumed = _resumed_step(state)
        if resumed is None:
            self._say_if_used()
        else:
            _log.info(
                "%s: continued after step %s (TensorBoard drops the events written after it).",
                self.log_dir,
                resumed,
            )
        writer = self._open(purge_step=None if resumed is None else resumed + 1)
        text = json.dumps(dict(hparams), indent=2, sort_keys=True, default=repr)
        writer.add_text("hparams", f"```\n{text}\n```", int(state.step))
        from tensorboardX.summary import hparams as hparams_summary

        plain = {str(k): _hparam_value(v) for k, v in hparams.items()}
        for summary in hparams_summary(plain, {}):
            writer.file_writer.add_summary(summary)

    def _say_if_used(self) -> None:
        """Warn when a fresh run writes beside an earlier run's event files."""
        try:
            used = [name for name in os.listdir(self.log_dir) if "tfevents" in name]
        except FileNotFoundError:
            return
        if used:
            _log.warning(
                "%s holds %s event file(s) of an earlier run; this fresh run (step 0) adds its "
                "own beside them and changes none, but TensorBoard draws both runs at the same "
                "steps. Give each run its own log_dir, or pass resume=True to continue a run.",
                self.log_dir,
                len(used),
            )

    def _scalars(self, state: Any, metrics: Mapping[str, float]) -> None:
        writer = self._open()
        step = int(state.step)
        for key, value in metrics.items():
            writer.add_scalar(key, float(value), step)

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        if state.strategy.is_main:
            self._scalars(state, metrics)

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        if state.strategy.is_main:
            self._scalars(state, metrics)
            self._writer.flush()

    def on_checkpoint_saved(self, state: Any, path: str) -> None:
        # tensorboardX's flush() writes only what its writer thread has dequeued; close()
        # drains the queue and fsyncs. Closing here puts every event through the checkpoint
        # on disk, so a SIGKILL later loses none that a resume keeps. Cost: the next event
        # opens a new file (one per checkpoint interval).
        self.on_fit_end(state)

    def on_fit_end(self, state: Any) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir!r})"


_WRITER_IDS = itertools.count()
"""Numbers this process's event files (see TensorBoardLogger._open)."""


def _hparam_value(value: object) -> bool | int | float | str:
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


class CSVLogger:
    """Write one CSV row per log and per eval record; readable with `csv.DictReader`.

    Columns: CSV_COLUMNS, then every other key in the order first seen. A row leaves the
    columns it lacks empty. When a new key appears (eval metrics at the first eval) the
    file is rewritten once with the wider header from the rows kept in memory (a few
    numbers per log step); otherwise each row is appended. Every rewrite goes through a
    temp file and a rename, so a crash leaves the old file or the new one.

    At fit start: a resumed fit (one that starts past step 0) keeps the file's rows through
    the resumed step, drops the rows of later steps (written after the checkpoint, by work
    that was lost) and appends after them. A fresh fit (step 0) renames a non-empty file to
    `path.1` (`.2`, ... when taken) and starts a new one: no run's rows are overwritten.

    Args:
        path: the CSV file, e.g. "runs/exp1/log.csv" (directories are created).
        clock: seconds as a float, for the "time_s" column; injectable for tests.
    """

    def __init__(self, path: PathLike, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = _check_path(path, "CSVLogger", "runs/exp1/log.csv")
        self._watch = _Stopwatch(clock)
        self._columns: list[str] = list(CSV_COLUMNS)
        self._rows: list[dict[str, Any]] = []
        self._written = False

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._columns)

    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        self._watch.restart()
        self._columns = list(CSV_COLUMNS)
        self._rows.clear()
        self._written = False
        if not state.strategy.is_main:
            return
        resumed = _resumed_step(state)
        other = None if resumed is None else _other_run(self.path, hparams)
        if resumed is None or other is not None or not self._continue(resumed):
            self._keep_earlier_file(resumed=resumed is not None, other_run=other)
        self._rewrite()
        _mark_run(self.path, hparams)

    def _keep_earlier_file(self, *, resumed: bool, other_run: str | None = None) -> None:
        """Set the file aside as `path.N`, unless it holds no rows (a header only)."""
        read = _read_csv(self.path)
        if read is None or read[1]:
            _set_aside(self.path, resumed=resumed, other_run=other_run)

    def _continue(self, step: int) -> bool:
        """Take the file's header and rows through `step`; False: no log to continue."""
        read = _read_csv(self.path)
        kept = None if read is None else _keep_through(read[1], step)
        if read is None or kept is None:
            return False
        rows, dropped = kept
        # Columns that only the dropped rows filled go, so the header is the one an
        # uninterrupted run would have.
        self._columns += [
            key for key in read[0] if key not in self._columns and any(row[key] for row in rows)
        ]
        self._rows += [{key: row[key] for key in self._columns if key in row} for row in rows]
        _say_continued(self.path, step, len(rows), dropped)
        return True

    def _write_row(self, state: Any, metrics: Mapping[str, float]) -> None:
        if not state.strategy.is_main:
            return
        row = _record(state, metrics, self._watch)
        self._rows.append(row)
        new = [key for key in row if key not in self._columns]
        if not self._written:  # no fit start: this is a fresh run
            self._keep_earlier_file(resumed=False)
        if new or not self._written:
            self._columns.extend(new)
            self._rewrite()
            return
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, self._columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        def write(file: IO[str]) -> None:
            writer = csv.DictWriter(file, self._columns, restval="")
            writer.writeheader()
            writer.writerows(self._rows)

        _replace_atomically(self.path, write)
        self._written = True

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._write_row(state, metrics)

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._write_row(state, metrics)

    def __repr__(self) -> str:
        return f"CSVLogger({self.path!r})"


class JSONLLogger:
    """Write one JSON object per line per log and eval record (step, epoch, time_s, metrics).

    Non-finite values are written as NaN/Infinity, as Python's json module reads them.

    At fit start: a resumed fit (one that starts past step 0) keeps the file's lines through
    the resumed step, byte for byte, drops the lines of later steps (written after the
    checkpoint, by work that was lost) and appends after them; the kept lines are written
    through a temp file and a rename, so a crash leaves the old file or the new one. A fresh
    fit (step 0) renames a non-empty file to `path.1` (`.2`, ... when taken) and starts a
    new one: no run's lines are overwritten.

    Args:
        path: the JSONL file, e.g. "runs/exp1/log.jsonl" (directories are created).
        clock: seconds as a float, for the "time_s" field; injectable for tests.
    """

    def __init__(self, path: PathLike, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = _check_path(path, "JSONLLogger", "runs/exp1/log.jsonl")
        self._watch = _Stopwatch(clock)
        self._started = False

    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        self._watch.restart()
        if not state.strategy.is_main:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        resumed = _resumed_step(state)
        other = None if resumed is None else _other_run(self.path, hparams)
        if resumed is None or other is not None or not self._continue(resumed):
            _set_aside(self.path, resumed=resumed is not None, other_run=other)
            open(self.path, "w", encoding="utf-8").close()
        _mark_run(self.path, hparams)
        self._started = True

    def _continue(self, step: int) -> bool:
        """Keep the file's lines through `step` (atomically); False: no log to continue."""
        records = _read_jsonl(self.path)
        kept = None if records is None else _keep_through(records, step)
        if kept is None:
            return False
        lines, dropped = kept
        _replace_atomically(self.path, lambda file: file.writelines(f"{x}\n" for x in lines))
        _say_continued(self.path, step, len(lines), dropped)
        return True

    def _write_row(self, state: Any, metrics: Mapping[str, float]) -> None:
        if not state.strategy.is_main:
            return
        if not self._started:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._started = True
        line = json.dumps(_record(state, metrics, self._watch))
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(line + "\n")

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._write_row(state, metrics)

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._write_row(state, metrics)

    def __repr__(self) -> str:
        return f"JSONLLogger({self.path!r})"


def _format(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def _format_rate(value: float) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else str(value)


_SHOWN = (
    ("train/loss", "loss", _format),
    ("train/lr", "lr", _format),
    ("perf/tokens_per_s", "tok/s", _format_rate),
    ("perf/samples_per_s", "samples/s", _format_rate),
)


class ProgressBar:
    """A tqdm bar over the optimizer steps, with loss, lr and throughput at log steps.

    When the output stream is not a terminal (CI logs, files), prints one plain line per
    log record and per eval instead of redrawing a bar.

    Args:
        refresh_every: advance the bar every this many steps (>= 1).
        file: the stream; None means sys.stdout at fit start.

    The bar's total is hparams["total_steps"] or hparams["max_steps"] when fit() knows it.
    """

    def __init__(self, refresh_every: int = 1, *, file: TextIO | None = None) -> None:
        if (
            isinstance(refresh_every, bool)
            or not isinstance(refresh_every, int)
            or (refresh_every < 1)
        ):
            raise ValueError(
                f"ProgressBar(refresh_every={refresh_every!r}): an int >= 1 (steps between "
                "bar updates)."
            )
        self.refresh_every = refresh_every
        self._file = file
        self._stream: TextIO | None = None
        self._bar: Any = None
        self._total: int | None = None
        self._start = 0.0

    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        if not state.strategy.is_main:
            return
        self._stream = self._file if self._file is not None else sys.stdout
        total = hparams.get("total_steps") or hparams.get("max_steps")
        self._total = total if isinstance(total, int) and not isinstance(total, bool) else None
        self._start = time.monotonic()
        isatty = getattr(self._stream, "isatty", None)
        if callable(isatty) and isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total,
                initial=int(state.step),
                unit="step",
                file=self._stream,
                dynamic_ncols=True,
            )

    def on_step_end(self, state: Any) -> None:
        bar = self._bar
        if bar is not None and state.step - bar.n >= self.refresh_every:
            bar.update(state.step - bar.n)

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        if self._stream is None:
            return
        shown = {label: fmt(float(metrics[key])) for key, label, fmt in _SHOWN if key in metrics}
        if self._bar is not None:
            self._bar.update(state.step - self._bar.n)
            self._bar.set_postfix(shown, refresh=True)
            return
        self._line(state, " | ".join(f"{k} {v}" for k, v in shown.items()))

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        if self._stream is None:
            return
        text = " | ".join(f"{k} {_format(float(v))}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.write(f"step {state.step}: {text}", file=self._stream)
        else:
            self._line(state, text)

    def _line(self, state: Any, text: str) -> None:
        total = f"/{self._total}" if self._total is not None else ""
        elapsed_s = time.monotonic() - self._start
        parts = [f"step {state.step}{total}", f"epoch {state.epoch}", text, f"{elapsed_s:.1f}s"]
        print(" | ".join(p for p in parts if p), file=self._stream, flush=True)

    def on_fit_end(self, state: Any) -> None:
        if self._bar is not None:
            self._bar.update(state.step - self._bar.n)
            self._bar.close()
            self._bar = None
        self._stream = None

    def __repr__(self) -> str:
        return f"ProgressBar(refresh_every={self.refresh_every})"


__all__ = [
    "CSV_COLUMNS",
    "LOGGER_NAME",
    "CSVLogger",
    "JSONLLogger",
    "ProgressBar",
    "TensorBoardLogger",
]
