"""The `loopkit` command: fit from a config file, inspect checkpoints, diff runs, certify resume.

    loopkit fit CONFIG [--set key=value ...] [--save-model DIR]
    loopkit ckpt ls|validate|inspect DIR [--json]
    loopkit diff RUN_A RUN_B [--rtol R] [--atol A] [--json] [--plot PNG | --no-plot] [--replay]
    loopkit certify-resume CONFIG [--set key=value ...] [--interruptions N] [--seed S]

Also `python -m loopkit ...`. Built on argparse: every subcommand has `--help`; a bad
argument, config value or path is a one-line error naming it, with exit status 2, given
before any work. Other statuses: 0 success; 1 a finding (`diff`: the runs differ; `ckpt
validate`: a checkpoint is bad or there is none; `ckpt inspect`: the checkpoint is
incomplete; `certify-resume`: the resumed run diverged) or a run that failed (its error and
the line of the user's code that raised it; `loopkit --traceback ...` shows the traceback).
Nothing the user wrote is overwritten (--save-model, --workdir and --plot are checked first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch

from .certify import certify_resume
from .checkpoint import (
    SHARDS_DIR,
    CheckpointError,
    list_checkpoints,
    read_meta,
    save_model,
    validate_checkpoint,
)
from .fit import _Run, fit
from .forensics import check_replayable, diff_runs, plot_diff
from .replay import check_replay_inputs, replay
from .run_config import (
    RUN_RECORD,
    Earlier,
    RunConfig,
    error_site,
    keep_record_with,
    write_record,
)

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2
_STEP_NAME = re.compile(r"step-\d+$")


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= 1")
    return value


def _png(text: str) -> str:
    """--plot: a .png path in an existing directory (checked before any work)."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text!r}: must be a .png file path, e.g. diff.png")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; name a .png file in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r}: the directory {str(path.parent)!r} does not exist; create it first"
        )
    return text


def _add_sets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable); dotted keys reach into tables "
        "(--set model.hidden=32); values read as TOML (--set max_steps=20); "
        "KEY=null removes a key",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `loopkit` argument parser (its subcommands, options and help)."""
    parser = argparse.ArgumentParser(
        prog="loopkit",
        description="loopkit: fit from a config, inspect checkpoints, compare runs.",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, show Python's traceback instead of the one-line message",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "fit",
        help="train from a TOML/YAML/JSON run config",
        description="Build model, data and loss from the config's import paths and call "
        "loopkit.fit. With a log_dir, the config is recorded there (loopkit-run.json) for "
        "`loopkit diff --replay`.",
    )
    run.add_argument("config", metavar="CONFIG", help="the run config file")
    _add_sets(run)
    run.add_argument("--save-model", metavar="DIR", help="save the final weights (save_model)")
    run.set_defaults(handler=_fit)

    ckpt = commands.add_parser("ckpt", help="list, validate or inspect checkpoints")
    actions = ckpt.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, text in (
        ("ls", _ckpt_ls, "list the checkpoints of a checkpoint_dir, newest first"),
        ("validate", _ckpt_validate, "check manifests, sizes and sha256 checksums (exit 1: bad)"),
        ("inspect", _ckpt_inspect, "print one checkpoint's counters, run id and tensor shapes"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("dir", metavar="DIR", help="a checkpoint_dir or one step-* directory")
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(handler=handler)

    diff = commands.add_parser(
        "diff",
        help="find the first step where two runs' fingerprints differ",
        description="Compare two runs' step fingerprints (bitwise unless --rtol/--atol). "
        "Exit 0: no difference; 1: they differ.",
    )
    diff.add_argument("run_a", metavar="RUN_A", help="a log_dir (with fingerprints/)")
    diff.add_argument("run_b", metavar="RUN_B", help="a log_dir (with fingerprints/)")
    diff.add_argument("--rtol", type=_tolerance, default=0.0, help="relative tolerance (0)")
    diff.add_argument("--atol", type=_tolerance, default=0.0, help="absolute tolerance (0)")
    diff.add_argument("--json", action="store_true", help="print one JSON object")
    plot = diff.add_mutually_exclusive_group()
    plot.add_argument(
        "--plot",
        metavar="PNG",
        type=_png,
        default="loopkit-diff.png",
        help="a .png file to draw the loss curves and relative differences into (default: "
        "loopkit-diff.png in the current directory, replaced on each diff)",
    )
    plot.add_argument("--no-plot", action="store_true", help="draw nothing")
    diff.add_argument(
        "--replay",
        action="store_true",
        help="rerun the first divergent step of both runs with module hooks (needs runs "
        "started by `loopkit fit` with checkpoints at or before that step)",
    )
    diff.set_defaults(handler=_diff)

    cert = commands.add_parser(
        "certify-resume",
        help="train straight and interrupted+resumed; compare bitwise",
        description="Train the config once uninterrupted and once interrupted at drawn "
        "micro-batches and resumed; exit 0 with a certificate when every step's "
        "fingerprint agrees bitwise, 1 with the first divergence otherwise.",
    )
    cert.add_argument("config", metavar="CONFIG", help="the run config file")
    _add_sets(cert)
    cert.add_argument(
        "--interruptions", type=_positive_int, default=3, help="interruptions to draw (3)"
    )
    cert.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    cert.add_argument(
        "--workdir",
        metavar="DIR",
        help="a new or empty directory for both runs (default: a new temp dir)",
    )
    cert.add_argument("--json", action="store_true", help="print one JSON object")
    cert.add_argument(
        "--verbose", action="store_true", help="show fit's messages (resumed from ..., ...)"
    )
    cert.set_defaults(handler=_certify)
    return parser


def _load(args: argparse.Namespace) -> RunConfig:
    return RunConfig.load(args.config, args.sets)


def _check_save_model(directory: str | None) -> None:
    """--save-model DIR: refused before any work if it is a file or holds saved weights."""
    if directory is None:
        return
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--save-model {directory!r}: is a file; pass a directory.")
    taken = [name for name in ("model.safetensors", "config.json") if (path / name).exists()]
    if taken:
        raise ValueError(
            f"--save-model {directory!r}: the directory already holds {' and '.join(taken)}; "
            "pass a new directory (nothing is overwritten)."
        )


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


def _fit(args: argparse.Namespace) -> int:
    _check_save_model(args.save_model)
    config = _load(args)
    built = config.build()
    with _recording(config, built.fit_kwargs.get("log_dir")):
        result = fit(built.model, built.data, **built.fit_kwargs)
    print(result)
    if args.save_model:
        print(f"saved {save_model(result.state, args.save_model)}")
    return EXIT_OK


@contextlib.contextmanager
def _recording(config: RunConfig, log_dir: str | os.PathLike[str] | None) -> Iterator[None]:
    """Record the run config in the log_dir (`loopkit-run.json`) around the fit it wraps.

    What `loopkit diff --replay` rebuilds the run from. A log_dir that records another
    config keeps that record until this fit has started, since fit may still refuse the run
    (a checkpoint_dir of another run, a held lock): a start shows as the log_dir's
    fingerprints moved aside or rewritten, and the record is written then (or at the end).
    A fresh run that moved an earlier run's fingerprints aside (`fingerprints.<n>`) gets
    the earlier record put with them (see `keep_record_with`).
    """
    if log_dir is None:
        yield
        return
    directory = Path(log_dir)
    earlier = Earlier.of(directory)
    if _may_record(config, directory):
        write_record(config, directory)
        try:
            yield
        finally:
            keep_record_with(earlier, directory)
        return
    index = directory / "fingerprints" / "index.json"
    before = _stat(index)
    try:
        yield
    except BaseException:
        if _stat(index) != before:
            keep_record_with(earlier, directory)
            write_record(config, directory)
        raise
    keep_record_with(earlier, directory)
    write_record(config, directory)


def _may_record(config: RunConfig, log_dir: Path) -> bool:
    """`log_dir` has no run record, or one of this config (writing it loses nothing)."""
    try:
        recorded = json.loads((log_dir / RUN_RECORD).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return bool(recorded == json.loads(json.dumps(config.record())))


def _checkpoints(directory: str) -> list[Path]:
    """DIR as checkpoints: one checkpoint (a step-* directory or one with its files), or a
    checkpoint_dir's, newest first."""
    path = Path(directory)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "no such directory"
        raise ValueError(f"DIR={directory!r}: {what}.")
    own_files = ("manifest.json", "state.json", "state.safetensors", SHARDS_DIR)
    if _STEP_NAME.match(path.name) or any((path / f).exists() for f in own_files):
        return [path]
    return list_checkpoints(path)


def _no_checkpoints(directory: str) -> str:
    """Why DIR holds no checkpoint, and what to pass instead."""
    path = Path(directory)
    hint = "pass a fit checkpoint_dir (it holds step-<n> directories) or one step-<n> directory"
    if (path / "fingerprints").is_dir() or (path / RUN_RECORD).exists():
        hint = "it is a fit log_dir; " + hint
    elif (path / "model.safetensors").exists():
        hint = "it holds weights only, as save_model writes them; " + hint
    return f"no checkpoints in {directory} ({hint})"


def _ckpt_ls(args: argparse.Namespace) -> int:
    rows = []
    for path in _checkpoints(args.dir):
        row: dict[str, Any] = {"name": path.name, "path": str(path)}
        try:
            validate_checkpoint(path, deep=False)
            meta = read_meta(path)
            row.update({k: meta.get(k) for k in ("step", "epoch", "samples_seen", "run_id")})
            row["complete"] = True
        except CheckpointError as error:
            row.update(complete=False, problem=str(error))
        row["bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    if not rows:
        print(_no_checkpoints(args.dir))
    for r in rows:
        if r["complete"]:
            print(
                f"{r['name']}  step {r['step']}  epoch {r['epoch']}  samples {r['samples_seen']}"
                f"  run {r['run_id']}  {r['bytes'] / 1024:.1f} KiB"
            )
        else:
            print(f"{r['name']}  INCOMPLETE: {r['problem']}")
    return EXIT_OK


def _ckpt_validate(args: argparse.Namespace) -> int:
    paths = _checkpoints(args.dir)
    if not paths:  # nothing validated is not "all valid"
        print(f"loopkit ckpt validate: {_no_checkpoints(args.dir)}", file=sys.stderr)
        if args.json:
            print("[]")
        return EXIT_FINDING
    results = []
    for path in paths:
        try:
            validate_checkpoint(path, deep=True)
            results.append({"name": path.name, "valid": True, "reason": None})
        except CheckpointError as error:
            results.append({"name": path.name, "valid": False, "reason": str(error)})
    if args.json:
        print(json.dumps(results, indent=1))
    for r in results if not args.json else []:
        print(f"{r['name']}: ok" if r["valid"] else f"{r['name']}: BAD: {r['reason']}")
    return EXIT_FINDING if any(not r["valid"] for r in results) else EXIT_OK


def _shapes(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> shape and dtype, from a safetensors header (no tensor is read)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        out = {}
        for name in f.keys():
            piece = f.get_slice(name)
            out[name] = {"shape": list(piece.get_shape()), "dtype": piece.get_dtype()}
        return out


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _sharded_shapes(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """A sharded checkpoint's whole tensors (not the shards): "model" and "state" parts.

    Read from the shard files' headers by DCP's reader (no tensor data).
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    stored = HuggingFaceStorageReader(str(path / SHARDS_DIR)).read_metadata()
    parts: dict[str, dict[str, dict[str, Any]]] = {"model": {}, "state": {}}
    for name, meta in sorted(stored.state_dict_metadata.items()):
        size, properties = getattr(meta, "size", None), getattr(meta, "properties", None)
        if size is None or properties is None:
            continue
        dtype = _DTYPES.get(properties.dtype, str(properties.dtype).removeprefix("torch."))
        part, key = ("model", name[6:]) if name.startswith("model.") else ("state", name)
        parts[part][key] = {"shape": list(size), "dtype": dtype}
    return parts


def _problem(path: Path) -> str | None:
    """Why a checkpoint is incomplete (manifest, files, sizes; no checksums), or None."""
    try:
        validate_checkpoint(path, deep=False)
    except CheckpointError as error:
        return str(error)
    return None


def _inspected(args: argparse.Namespace) -> tuple[Path, dict[str, Any], str | None, list[str]]:
    """The checkpoint to inspect, its state.json, its problem and notes: DIR itself, or a
    checkpoint_dir's newest complete and readable checkpoint (its newest, if none is)."""
    paths = _checkpoints(args.dir)
    if not paths:
        raise ValueError(f"DIR={args.dir!r}: {_no_checkpoints(args.dir)}.")
    notes: list[str] = []
    for path in paths if paths != [Path(args.dir)] else []:
        problem = _problem(path)
        try:
            if problem is None:
                return path, read_meta(path), None, notes
        except CheckpointError as error:
            problem = str(error)
        notes.append(f"skipped {path.name}: {problem}")
    path = paths[0]  # DIR itself, or none is complete: the newest, reported as incomplete
    problem = _problem(path)
    try:
        return path, read_meta(path), problem, []
    except CheckpointError as error:
        reason = str(problem or error).rstrip(".")
        raise ValueError(
            f"DIR={args.dir!r}: cannot inspect it: {reason}. `loopkit ckpt ls` lists the "
            "checkpoints of a checkpoint_dir and which are complete."
        ) from None


def _ckpt_inspect(args: argparse.Namespace) -> int:
    path, meta, problem, notes = _inspected(args)
    info: dict[str, Any] = {
        "path": str(path),
        "complete": problem is None,
        "problem": problem,
        **{k: meta.get(k) for k in ("step", "epoch", "samples_seen", "skipped_steps", "seed")},
        **{k: meta.get(k) for k in ("run_id", "precision", "schedule", "base_lrs", "versions")},
        "layout": meta.get("layout", "full"),
        "notes": notes,
    }
    info.update(_tensor_shapes(path, info["layout"]))
    for note in notes:
        print(f"loopkit ckpt inspect: {note}", file=sys.stderr)
    if problem is not None:
        print(
            f"loopkit ckpt inspect: incomplete or altered: {problem.rstrip('.')}; fit's resume "
            "skips it, and its values below may be wrong.",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_inspected(info)
    return EXIT_OK if problem is None else EXIT_FINDING


def _tensor_shapes(path: Path, layout: str) -> dict[str, Any]:
    """The "model" and "state" tensor listings of a checkpoint (files that are missing or
    unreadable are left out: the checkpoint is incomplete, which inspect reports)."""
    if layout == "sharded":
        try:
            return _sharded_shapes(path)
        except Exception:  # noqa: BLE001 -- DCP raises several kinds for a broken shard dir
            return {}
    out = {}
    for part in ("model", "state"):
        try:
            out[part] = _shapes(path / f"{part}.safetensors")
        except Exception:  # noqa: BLE001 -- missing or not safetensors: reported as incomplete
            continue
    return out


def _print_inspected(info: dict[str, Any]) -> None:
    for key, value in info.items():
        if key not in ("model", "state", "notes", "problem") and not (key == "complete" and value):
            print(f"{key}: {value}")
    if info["problem"] is not None:
        print(f"problem: {info['problem']}")
    sharded = info["layout"] == "sharded"
    for part in ("model", "state"):
        if part not in info:
            continue
        tensors = info[part]
        label = f"{part} (whole tensors, from {SHARDS_DIR}/)" if sharded else f"{part}.safetensors"
        print(f"{label}: {len(tensors)} tensors")
        for name, t in tensors.items():
            print(f"  {name}  {t['dtype']}  {tuple(t['shape'])}")


def _diff(args: argparse.Namespace) -> int:
    for name, run in (("RUN_A", args.run_a), ("RUN_B", args.run_b)):
        if not Path(run).is_dir():
            what = "is a file, not a run's directory" if Path(run).exists() else "no such directory"
            raise ValueError(f"{name}={run!r}: {what}; pass a fit log_dir (with fingerprints/).")
    if args.replay:  # refused before any work: several processes, no record, no checkpoints
        check_replayable(args.run_a, args.run_b)
        check_replay_inputs(args.run_a, args.run_b)
    report = diff_runs(args.run_a, args.run_b, rtol=args.rtol, atol=args.atol)
    failed = None
    if args.replay and report.first_divergent_step is not None:
        try:
            report.replay = replay(
                args.run_a, args.run_b, report.first_divergent_step, rtol=args.rtol, atol=args.atol
            )
        except ValueError as error:  # e.g. no checkpoint at or before that step: say so, after
            failed = str(error)  # the report (the diff itself is done)
            report.replay = {"module": None, "error": failed, "message": f"not run: {failed}"}
    if not args.no_plot and report.steps_compared:
        try:
            report.plot = str(plot_diff(report, args.plot))
        except ModuleNotFoundError:
            report.notes.append("no plot: matplotlib is not installed (pip install loopkit[plot])")
    print(json.dumps(report.to_json(), indent=1) if args.json else report.format())
    if not report.steps_compared:  # no overlap is not "no difference"
        failed = (
            "RUN_A and RUN_B recorded no step in common, so nothing was compared; pass runs "
            "whose recorded steps overlap (fingerprint_every, resume points)."
        )
    if failed is not None:
        print(f"loopkit diff: error: {failed}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if report.first_divergent_step is None else EXIT_FINDING


def _certify(args: argparse.Namespace) -> int:
    config = _load(args)
    quiet = logging.getLogger("loopkit")
    level = quiet.level
    if not args.verbose:  # the segments' "stopped by SIGUSR1 ...", "resumed from ..."
        quiet.setLevel(logging.ERROR)
    try:
        certificate = certify_resume(
            config, interruptions=args.interruptions, seed=args.seed, workdir=args.workdir
        )
    finally:
        quiet.setLevel(level)
    print(json.dumps(certificate.to_json(), indent=1) if args.json else certificate.format())
    return EXIT_OK if certificate.ok else EXIT_FINDING


_TRAINING_CODE = frozenset(  # fit's loop: an error raised under one of these came from work
    f.__code__ for f in (_Run._epoch, _Run._end_epoch, _Run._finish)
)


def _raised_by_work(error: BaseException) -> bool:
    """Whether an error came from work under way, not from loopkit's checks before any work.

    Work is fit's training loop (its steps, evaluations, saves and callbacks, and loopkit's
    checks made there) and the user's own code: a loss, model or callback that raises a
    ValueError or TypeError is a run that failed (exit 1), not a bad argument (exit 2).
    Only the error's own traceback is read: a builder's error that loopkit wraps into a
    ValueError naming the config key (before any work) stays a bad config value.
    """
    if any(frame.f_code in _TRAINING_CODE for frame, _ in traceback.walk_tb(error.__traceback__)):
        return True
    return bool(error_site(error, causes=False))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `loopkit` command; return its exit status.

    Bad arguments, configs and paths (a ValueError or TypeError from loopkit's checks,
    before any work) print `loopkit <command>: error: ...` and return 2; another error (a
    run that fails, also with a ValueError or TypeError from the user's loss, model or
    callback, or from a check made while training) prints its type, message and the line of
    the user's code that raised it, and returns 1; `loopkit --traceback ...` shows Python's
    traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on a bad argument, naming it
    command = " ".join(p for p in (args.command, getattr(args, "action", None)) if p)
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # `loopkit ckpt inspect DIR | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FINDING
    except KeyboardInterrupt:
        print(f"loopkit {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback:
            raise
        usage = isinstance(error, (ValueError, TypeError)) and not _raised_by_work(error)
        what = "" if usage else f"{type(error).__name__}: "
        site = error_site(error)
        site = "" if site.strip() in str(error) else site  # a builder's error names it already
        print(
            f"loopkit {command}: error: {what}{error}{site}"
            + ("" if usage else " (loopkit --traceback ... shows the traceback)"),
            file=sys.stderr,
        )
        return EXIT_USAGE if usage else EXIT_FINDING


__all__ = ["build_parser", "main"]
