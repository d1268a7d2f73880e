"""The `loopkit` command: fit from a config file, inspect checkpoints, diff runs, certify resume.

    loopkit fit CONFIG [--set key=value ...] [--save-model DIR]
    loopkit ckpt ls|validate|inspect DIR [--json]
    loopkit diff RUN_A RUN_B [--rtol R] [--atol A] [--json] [--plot PNG | --no-plot] [--replay]
    loopkit certify-resume CONFIG [--set key=value ...] [--interruptions N] [--seed S]

Also `python -m loopkit ...`. Built on argparse: every subcommand has `--help`; a bad
argument or a bad config value is an error naming it, with exit status 2. Other statuses:
0 success; 1 a finding (`diff`: the runs differ; `ckpt validate`: a checkpoint is bad;
`certify-resume`: the resumed run diverged).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors

from .certify import certify_resume
from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    read_meta,
    save_model,
    validate_checkpoint,
)
from .fit import fit
from .forensics import check_replayable, diff_runs, plot_diff
from .replay import replay
from .run_config import RunConfig, write_record

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


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


def _add_sets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable); dotted keys reach into tables "
        "(--set model.hidden=32); values read as TOML (--set max_steps=20)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `loopkit` argument parser (its subcommands, options and help)."""
    parser = argparse.ArgumentParser(
        prog="loopkit",
        description="loopkit: fit from a config, inspect checkpoints, compare runs.",
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
        default="loopkit-diff.png",
        help="where to draw loss curves and relative differences (default: loopkit-diff.png)",
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
    cert.add_argument("--workdir", metavar="DIR", help="where the runs go (default: a temp dir)")
    cert.add_argument("--json", action="store_true", help="print one JSON object")
    cert.add_argument(
        "--verbose", action="store_true", help="show fit's messages (resumed from ..., ...)"
    )
    cert.set_defaults(handler=_certify)
    return parser


def _load(args: argparse.Namespace) -> RunConfig:
    return RunConfig.load(args.config, args.sets)


def _fit(args: argparse.Namespace) -> int:
    config = _load(args)
    built = config.build()
    log_dir = built.fit_kwargs.get("log_dir")
    if log_dir is not None:
        write_record(config, log_dir)  # what `loopkit diff --replay` rebuilds the run from
    result = fit(built.model, built.data, **built.fit_kwargs)
    print(result)
    if args.save_model:
        print(f"saved {save_model(result.state, args.save_model)}")
    return EXIT_OK


def _checkpoints(directory: str) -> list[Path]:
    path = Path(directory)
    if (path / "manifest.json").exists() or (path / "state.json").exists():
        return [path]
    found = list_checkpoints(path)
    if not path.is_dir():
        raise ValueError(f"DIR={directory!r}: no such directory.")
    return found


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
        print(f"no checkpoints in {args.dir}")
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
    results = []
    for path in _checkpoints(args.dir):
        try:
            validate_checkpoint(path, deep=True)
            results.append({"name": path.name, "valid": True, "reason": None})
        except CheckpointError as error:
            results.append({"name": path.name, "valid": False, "reason": str(error)})
    if args.json:
        print(json.dumps(results, indent=1))
    elif not results:
        print(f"no checkpoints in {args.dir}")
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


def _ckpt_inspect(args: argparse.Namespace) -> int:
    paths = _checkpoints(args.dir)
    if not paths:
        raise ValueError(f"DIR={args.dir!r}: no checkpoint to inspect.")
    path = paths[0]  # a checkpoint_dir: its newest
    meta = read_meta(path)
    info: dict[str, Any] = {
        "path": str(path),
        **{k: meta.get(k) for k in ("step", "epoch", "samples_seen", "skipped_steps", "seed")},
        **{k: meta.get(k) for k in ("run_id", "precision", "schedule", "base_lrs", "versions")},
        "layout": meta.get("layout", "full"),
    }
    if (path / "model.safetensors").exists():
        info["model"] = _shapes(path / "model.safetensors")
    info["state"] = _shapes(path / "state.safetensors")
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    for key, value in info.items():
        if key not in ("model", "state"):
            print(f"{key}: {value}")
    for part in ("model", "state"):
        tensors = info.get(part, {})
        print(f"{part}.safetensors: {len(tensors)} tensors")
        for name, t in tensors.items():
            print(f"  {name}  {t['dtype']}  {tuple(t['shape'])}")
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    if args.replay:
        check_replayable(args.run_a, args.run_b)  # one process only: refused before any work
    report = diff_runs(args.run_a, args.run_b, rtol=args.rtol, atol=args.atol)
    if args.replay and report.first_divergent_step is not None:
        report.replay = replay(
            args.run_a, args.run_b, report.first_divergent_step, rtol=args.rtol, atol=args.atol
        )
    if not args.no_plot:
        try:
            report.plot = str(plot_diff(report, args.plot))
        except ModuleNotFoundError:
            report.notes.append("no plot: matplotlib is not installed (pip install loopkit[plot])")
    print(json.dumps(report.to_json(), indent=1) if args.json else report.format())
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `loopkit` command; return its exit status.

    Bad arguments, configs and paths (ValueError, TypeError) print `loopkit <command>:
    error: ...` and return 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on a bad argument, naming it
    command = " ".join(p for p in (args.command, getattr(args, "action", None)) if p)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError) as error:
        print(f"loopkit {command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `loopkit ckpt inspect DIR | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FINDING


__all__ = ["build_parser", "main"]
