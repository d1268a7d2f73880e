"""Loggers: TensorBoard event files, CSV and JSONL rows, the progress bar."""

from __future__ import annotations

import csv
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


def test_csv_appends_rows_and_restarts_at_fit_start(tmp_path):
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    logger.on_fit_start(_state(0), {})
    for step in (1, 2, 3):
        logger.on_log(_state(step), {"train/loss": float(step)})
    assert _column(path, "train/loss") == ["1.0", "2.0", "3.0"]
    logger.on_fit_start(_state(0), {})  # a new run replaces the file
    logger.on_log(_state(1), {"train/loss": 9.0})
    assert _column(path, "train/loss") == ["9.0"]


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
