"""Loggers: TensorBoard event files, CSV and JSONL rows, the progress bar."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import loopkit as lk
import loopkit.logging as lk_logging
from loopkit.callbacks import dispatch
from loopkit.logging import (
    CSV_COLUMNS,
    LOGGER_NAME,
    CSVLogger,
    JSONLLogger,
    ProgressBar,
    TensorBoardLogger,
)


def _state(step, epoch=0, rank=0):
    return SimpleNamespace(
        step=step, epoch=epoch, strategy=SimpleNamespace(rank=rank, is_main=rank == 0)
    )


class FakeClock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


HPARAMS = {
    "max_steps": 30,
    "lr": 3e-4,
    "precision": "bf16",
    "clip": None,
    "betas": (0.9, 0.95),
    "device": torch.device("cpu"),
    "compile": False,
}

# (hook, step, epoch, metrics): what fit() would send, in order
EVENTS = [
    ("on_log", 10, 0, {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.75}),
    (
        "on_log",
        20,
        0,
        {"train/loss": 2.0, "train/lr": 9e-4, "train/grad_norm": 0.5, "perf/tokens_per_s": 1234.5},
    ),
    (
        "on_eval_end",
        20,
        0,
        {"eval/loss": 2.25, "eval/perplexity": math.exp(2.25), "eval/accuracy": 0.375},
    ),
    (
        "on_log",
        30,
        1,
        {"train/loss": 1.5, "train/lr": 8e-4, "train/grad_norm": 0.25, "perf/tokens_per_s": 1500.0},
    ),
    (
        "on_eval_end",
        30,
        1,
        {"eval/loss": 1.75, "eval/perplexity": math.exp(1.75), "eval/accuracy": 0.5},
    ),
]


def _run(loggers, clock=None, rank=0):
    """Drive loggers through EVENTS; return the expected records (step, epoch, time_s, ...)."""
    records = []
    if clock is not None:
        clock.now = 100.0
    dispatch(loggers, "on_fit_start", _state(0, rank=rank), HPARAMS)
    for i, (hook, step, epoch, metrics) in enumerate(EVENTS):
        if clock is not None:
            clock.now = 100.0 + 1.5 * (i + 1)
        dispatch(loggers, "on_step_end", _state(step, epoch, rank))
        assert dispatch(loggers, hook, _state(step, epoch, rank), dict(metrics)) is None
        records.append({"step": step, "epoch": epoch, "time_s": 1.5 * (i + 1), **metrics})
    dispatch(loggers, "on_fit_end", _state(30, 1, rank))
    return records


def test_tensorboard_event_file_holds_the_scalars_at_their_steps(tmp_path):
    log_dir = tmp_path / "tb"
    _run([TensorBoardLogger(log_dir)])
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for _, step, _, metrics in EVENTS:
        for key, value in metrics.items():
            expected.setdefault(key, []).append((step, value))
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for key, points in expected.items():
        events = acc.Scalars(key)
        assert [e.step for e in events] == [s for s, _ in points]
        assert [e.value for e in events] == pytest.approx([v for _, v in points], rel=1e-6)
    assert "hparams/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("hparams/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"precision": "bf16"' in text and '"betas": [' in text


def test_tensorboard_logger_writes_nothing_off_the_main_rank(tmp_path):
    _run([TensorBoardLogger(tmp_path / "tb")], rank=1)
    assert not (tmp_path / "tb").exists()


def test_csv_rows_match_what_was_logged(tmp_path):
    path = tmp_path / "logs" / "log.csv"
    clock = FakeClock()
    records = _run([CSVLogger(path, clock=clock)], clock)
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        header = reader.fieldnames
        rows = list(reader)
    assert tuple(header[: len(CSV_COLUMNS)]) == CSV_COLUMNS
    assert set(header) == set(CSV_COLUMNS) | {k for r in records for k in r}
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert int(row["step"]) == record["step"] and int(row["epoch"]) == record["epoch"]
        for key in header:
            if key in ("step", "epoch"):
                continue
            if key in record:
                assert float(row[key]) == record[key], key  # exact: repr round-trips
            else:
                assert row[key] == "", key


def _column(path, key):
    with open(path, newline="") as file:
        return [row[key] for row in csv.DictReader(file)]


def test_csv_appends_rows_and_a_fresh_fit_start_sets_the_old_file_aside(tmp_path):
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    logger.on_fit_start(_state(0), {})
    for step in (1, 2, 3):
        logger.on_log(_state(step), {"train/loss": float(step)})
    assert _column(path, "train/loss") == ["1.0", "2.0", "3.0"]
    before = path.read_bytes()
    logger.on_fit_start(_state(0), {})  # a new run: the old file moves to log.csv.1
    logger.on_log(_state(1), {"train/loss": 9.0})
    assert _column(path, "train/loss") == ["9.0"]
    assert (tmp_path / "log.csv.1").read_bytes() == before


def test_jsonl_rows_match_what_was_logged(tmp_path):
    path = tmp_path / "log.jsonl"
    clock = FakeClock()
    records = _run([JSONLLogger(path, clock=clock)], clock)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == records


def test_file_loggers_write_nothing_off_the_main_rank(tmp_path):
    _run([CSVLogger(tmp_path / "a.csv"), JSONLLogger(tmp_path / "a.jsonl")], rank=1)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_prints_plain_lines_when_stdout_is_not_a_tty(capsys):
    _run([ProgressBar()])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == len(EVENTS)
    assert "\r" not in out
    assert lines[0].startswith("step 10/30 | epoch 0 | loss 2.5000 | lr 1.000e-03")
    assert "tok/s 1,234" in lines[1]
    assert lines[2].startswith("step 20/30 | epoch 0 | eval/loss 2.2500")
    assert "eval/accuracy 0.3750" in lines[2]
    assert lines[3].startswith("step 30/30 | epoch 1 | loss 1.5000")


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_a_tqdm_bar_on_a_terminal():
    stream = FakeTTY()
    bar = ProgressBar(file=stream)
    _run([bar])
    out = stream.getvalue()
    assert "\r" in out and "30/30" in out and "loss=1.5000" in out
    assert "step 20: eval/loss 2.2500" in out
    assert bar._bar is None  # closed


def test_progress_bar_validates_refresh_every():
    with pytest.raises(ValueError, match="refresh_every=0"):
        ProgressBar(refresh_every=0)


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_loggers_reject_non_paths(cls):
    with pytest.raises(TypeError, match=cls.__name__):
        cls(3)


# --- continued logs: a fit start past step 0 (a resumed fit) keeps the rows through it ------


def _log_steps(logger, steps, start=0, metrics=lambda step: {"train/loss": step / 8}):
    """One fit of `logger`: a fit start at `start`, then a log record at each step."""
    logger.on_fit_start(_state(start), {})
    for step in steps:
        logger.on_log(_state(step), metrics(step))
    if hasattr(logger, "on_fit_end"):
        logger.on_fit_end(_state(steps[-1]))


FILE_LOGGERS = [pytest.param(CSVLogger, id="csv"), pytest.param(JSONLLogger, id="jsonl")]


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("cls", FILE_LOGGERS)
def test_a_resumed_fit_keeps_the_lines_through_its_step_and_appends(tmp_path, cls):
    path = tmp_path / "log"
    _log_steps(cls(path), [1, 2, 3, 4, 5, 6])  # 5 and 6: written after a checkpoint at 4
    before = _lines(path)
    header = 1 if cls is CSVLogger else 0
    _log_steps(cls(path), [5, 6, 7], start=4, metrics=lambda step: {"train/loss": -step})
    after = _lines(path)
    assert after[: header + 4] == before[: header + 4]  # byte for byte
    if cls is CSVLogger:
        steps = [int(s) for s in _column(path, "step")]
        losses = [float(v) for v in _column(path, "train/loss")]
    else:
        rows = [json.loads(line) for line in after]
        steps, losses = [r["step"] for r in rows], [r["train/loss"] for r in rows]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert losses == [0.125, 0.25, 0.375, 0.5, -5, -6, -7]
    assert not (tmp_path / "log.1").exists()


@pytest.mark.parametrize("cls", FILE_LOGGERS)
def test_a_resumed_fit_without_a_file_starts_one(tmp_path, cls):
    _log_steps(cls(tmp_path / "log"), [5], start=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_csv_header_still_grows_after_a_resume(tmp_path):
    path = tmp_path / "log.csv"
    first = CSVLogger(path)
    _log_steps(first, [1, 2, 3])
    first.on_eval_end(_state(3), {"eval/loss": 7.0})  # lost with step 3: widened the header
    assert "eval/loss" in _csv_header(path)
    logger = CSVLogger(path)
    logger.on_fit_start(_state(2), {})
    assert _csv_header(path) == list(CSV_COLUMNS)
    logger.on_log(_state(3), {"train/loss": 0.5})
    logger.on_eval_end(_state(3), {"eval/loss": 0.75, "eval/accuracy": 0.5})
    logger.on_log(_state(4), {"train/loss": 0.25})
    assert _csv_header(path) == [*CSV_COLUMNS, "eval/loss", "eval/accuracy"]
    assert _column(path, "step") == ["1", "2", "3", "3", "4"]
    assert _column(path, "train/loss") == ["0.125", "0.25", "0.5", "", "0.25"]
    assert _column(path, "eval/loss") == ["", "", "", "0.75", ""]


def _csv_header(path):
    with open(path, newline="") as file:
        return next(csv.reader(file))


@pytest.mark.parametrize("cls", FILE_LOGGERS)
def test_the_rewrite_of_the_kept_rows_is_atomic(tmp_path, cls, monkeypatch):
    """A write error before the rename (here: fsync fails, as on a full disk) loses nothing."""
    path = tmp_path / "log"
    _log_steps(cls(path), [1, 2, 3, 4])
    before = path.read_bytes()

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lk_logging.os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        cls(path).on_fit_start(_state(2), {})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]  # no temp file left


@pytest.mark.parametrize(
    ("cls", "torn"),
    [(CSVLogger, "5,0,1.2"), (JSONLLogger, '{"step": 5, "epoch": 0, "time_s": 1.')],
    ids=["csv", "jsonl"],
)
def test_a_line_torn_by_a_crash_is_dropped(tmp_path, cls, torn):
    path = tmp_path / "log"
    _log_steps(cls(path), [1, 2, 3, 4])
    with open(path, "a") as file:
        file.write(torn)  # a crash mid-write: no newline, fields missing
    _log_steps(cls(path), [5], start=4)
    text = path.read_text()
    assert torn not in text
    assert text.count("\n") == (6 if cls is CSVLogger else 5)


@pytest.mark.parametrize(
    ("cls", "text"),
    [
        (CSVLogger, "when,what\nmonday,notes\n"),  # no "step" column
        (JSONLLogger, '{"step": 1}\nnot json\n{"step": 9}\n'),  # unreadable inside
    ],
    ids=["csv", "jsonl"],
)
def test_a_resume_sets_a_file_that_is_no_log_aside_whole(tmp_path, cls, text, caplog):
    path = tmp_path / "log"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        _log_steps(cls(path), [5], start=4)
    assert f"moved it to {path}.1, unchanged: it is no loopkit log" in caplog.text
    assert (tmp_path / "log.1").read_text() == text
    assert "5" in path.read_text()


@pytest.mark.parametrize("cls", FILE_LOGGERS)
def test_a_fresh_fit_start_takes_the_next_free_number(tmp_path, cls, caplog):
    path = tmp_path / "log"
    for name, text in (("log", "newest"), ("log.1", "old"), ("log.3", "older?"), ("log.x", "")):
        (tmp_path / name).write_text(text)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        cls(path).on_fit_start(_state(0), {})
    assert (tmp_path / "log.4").read_text() == "newest"
    assert (tmp_path / "log.1").read_text() == "old" and (
        tmp_path / "log.3"
    ).read_text() == "older?"
    assert f"moved it to {path}.4" in caplog.text
    cls(path).on_fit_start(_state(0), {})  # an empty file (this fresh run's) is not kept
    assert not (tmp_path / "log.5").exists()


def _tb_points(log_dir, tag="train/loss"):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_readers_see_each_step_once_after_a_resume(tmp_path, monkeypatch):
    log_dir = tmp_path / "tb"
    # Two processes, the later one with a pid that sorts first ("10" < "9"): readers load
    # files in name order, so the names must follow creation time, not pids.
    monkeypatch.setattr(lk_logging.os, "getpid", lambda: 9)
    _log_steps(TensorBoardLogger(log_dir), [1, 2, 3, 4, 5, 6])
    monkeypatch.setattr(lk_logging.os, "getpid", lambda: 10)
    _log_steps(TensorBoardLogger(log_dir), [5, 6, 7], start=4, metrics=lambda s: {"train/loss": -s})
    assert _tb_points(log_dir) == [
        (1, 0.125),
        (2, 0.25),
        (3, 0.375),
        (4, 0.5),
        (5, -5),
        (6, -6),
        (7, -7),
    ]
    assert len(list(log_dir.iterdir())) == 2  # one per writer, none emptied


def test_tensorboard_events_through_a_checkpoint_are_on_disk_at_once(tmp_path):
    """tensorboardX queues events; a saved checkpoint must not leave any of them in memory."""
    log_dir = tmp_path / "tb"
    logger = TensorBoardLogger(log_dir, flush_secs=3600)
    logger.on_fit_start(_state(0), {})
    for step in range(1, 8):
        logger.on_log(_state(step), {"train/loss": float(step)})
    logger.on_checkpoint_saved(_state(7), str(tmp_path / "ckpt"))
    assert [s for s, _ in _tb_points(log_dir)] == list(range(1, 8))  # before fit end
    logger.on_log(_state(8), {"train/loss": 8.0})
    logger.on_fit_end(_state(8))
    assert [s for s, _ in _tb_points(log_dir)] == list(range(1, 9))


def test_tensorboard_says_when_a_fresh_run_shares_its_log_dir(tmp_path, caplog):
    log_dir = tmp_path / "tb"
    _log_steps(TensorBoardLogger(log_dir), [1])
    first = {p.name: p.read_bytes() for p in log_dir.iterdir()}
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        _log_steps(TensorBoardLogger(log_dir), [1])
    assert "holds 1 event file(s) of an earlier run" in caplog.text
    assert all((log_dir / name).read_bytes() == data for name, data in first.items())
    assert len(list(log_dir.iterdir())) == 2


# --- loopkit's own messages: the "loopkit" logger, shown on stdout unless configured ------


def _message_fit(**kwargs):
    """A fit whose setup says one thing ("accumulate=4 (32 samples per step / ...)")."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    model = torch.nn.Linear(4, 2).to(torch.float64)
    lk.fit(
        model,
        data,
        loss_fn=lambda model, batch: lk.cross_entropy(model(batch[0]), batch[1]),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        batch_size=8,
        samples_per_step=32,
        max_steps=1,
        progress=False,
        **kwargs,
    )


ACCUMULATE = "accumulate=4 (32 samples per step / 8 per micro-batch)"


def test_messages_go_to_the_loopkit_logger_and_to_stdout_by_default(capsys, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        _message_fit()
    assert capsys.readouterr().out == f"loopkit: {ACCUMULATE}\n"
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("loopkit.fit", logging.INFO, ACCUMULATE)
    ]


def test_a_console_handler_the_user_configured_shows_each_message_once(capsys):
    handler = logging.StreamHandler(sys.stderr)  # what logging.basicConfig() adds
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        _message_fit()
    finally:
        root.removeHandler(handler)
    captured = capsys.readouterr()
    assert captured.out == ""  # loopkit's own console handler stepped aside
    assert captured.err == f"loopkit.fit INFO {ACCUMULATE}\n"


def test_messages_are_silenced_by_the_loggers_level(capsys):
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        _message_fit()
    finally:
        logger.setLevel(level)
    assert capsys.readouterr().out == ""


class _OffMain(lk.SingleDevice):
    """A single device that says it is not the main rank, as rank 1 of a run would."""

    is_main = False


def test_messages_come_from_the_main_rank_only(capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger=LOGGER_NAME):
        _message_fit(strategy=_OffMain("cpu"))
    assert capsys.readouterr().out == ""
    assert caplog.records == []
