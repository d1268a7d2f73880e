"""Loggers: callbacks that write log and eval records to TensorBoard, CSV, JSONL or a bar.

Every logger receives host floats (fit() pulls metrics off the device at log steps only),
writes from the main rank only (fit() attaches loggers there; the loggers also check
`state.strategy.is_main`), and never asks to stop. A record is one `on_log` or one
`on_eval_end`: step, epoch, time_s (seconds since fit start) and the metrics.

loopkit's own messages ("resumed from ...", "accumulate=4 (...)") go through the standard
library's `logging`, to the "loopkit" logger and its children, from the main rank only.
Unless you configure logging, they are printed to stdout as "loopkit: <message>", as
`print` would: the "loopkit" logger is at INFO and has a console handler that steps aside
when another handler on the way (one you added to "loopkit" or to the root logger, e.g.
with `logging.basicConfig()`) already writes to the console. Silence them with
`logging.getLogger("loopkit").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

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


class TensorBoardLogger:
    """Write scalars to TensorBoard event files in `log_dir` (with tensorboardX).

    At fit start the settings go in as text ("hparams", JSON) and in the HParams plugin
    (numbers, bools and strings as they are; anything else as its str). Each log and eval
    metric becomes a scalar at `state.step`. Eval ends and fit end flush; fit end closes.

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

    def _open(self) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.log_dir, flush_secs=self.flush_secs)
        return self._writer

    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        if not state.strategy.is_main:
            return
        writer = self._open()
        text = json.dumps(dict(hparams), indent=2, sort_keys=True, default=repr)
        writer.add_text("hparams", f"```\n{text}\n```", int(state.step))
        from tensorboardX.summary import hparams as hparams_summary

        plain = {str(k): _hparam_value(v) for k, v in hparams.items()}
        for summary in hparams_summary(plain, {}):
            writer.file_writer.add_summary(summary)

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

    def on_fit_end(self, state: Any) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir!r})"


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
    numbers per log step); otherwise each row is appended. The file is replaced at fit
    start.

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
        self._rows.clear()
        self._written = False
        if state.strategy.is_main:
            self._rewrite()

    def _write_row(self, state: Any, metrics: Mapping[str, float]) -> None:
        if not state.strategy.is_main:
            return
        row = _record(state, metrics, self._watch)
        self._rows.append(row)
        new = [key for key in row if key not in self._columns]
        if new or not self._written:
            self._columns.extend(new)
            self._rewrite()
            return
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, self._columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, self._columns, restval="")
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(tmp, self.path)
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
    The file is replaced at fit start.

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
        if state.strategy.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            open(self.path, "w", encoding="utf-8").close()
            self._started = True

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
