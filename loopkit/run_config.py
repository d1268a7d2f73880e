"""Run configs: a whole fit() — model, data, loss and settings — in one TOML, YAML or JSON file.

What `loopkit fit CONFIG`, `loopkit certify-resume CONFIG` and `loopkit diff --replay` read.
The file's keys are FitConfig's fields plus a few of its own:

    python_path = [".."]              # directories put on sys.path, relative to the file
    seed = 0                          # torch.manual_seed(seed) runs before the builders
    threads = 1                       # optional: torch.set_num_threads(threads)
    model = {call = "spirals:build_model", hidden = 64}    # called: build_model(hidden=64)
    data = {call = "spirals:build_data", n = 8192}
    loss_fn = "spirals:loss_fn"       # a bare string is imported and used as it is
    optimizer = {name = "AdamW", lr = 0.03}                 # FitConfig's named optimizers
    max_steps = 300

An import path is `module:attribute` (`mypkg.models:build_model`, `pkg.mod:Class.method`).
A table with a `call` key calls what it names with the table's other keys as keyword
arguments (resolved the same way, so they nest); that works for any value. A bare string is
an import path only where a value must be code: `model`, `data`, `eval_data`, `loss_fn`,
`predict`, `collate_fn` and the items of `callbacks`. The file's own directory is always on
sys.path, so modules beside it import without being a package (examples/configs/ works so).

Order: each of the file's own values is checked alone (an error names the file); an
unknown key gets "did you mean ...?" or where it belongs (`lr` -> `optimizer`). Then the
values are merged with `--set key=value` overrides (dotted keys reach into
tables: `--set model.hidden=32`; values read as TOML: `--set max_steps=20`,
`--set log_dir='"runs/b"'` or just `--set log_dir=runs/b`); FitConfig then validates every
plain field, before any import or build; then the builders run (model first, after the
seed), and FitConfig validates once more with the built objects.
"""

from __future__ import annotations

import importlib
import json
import os
import reprlib
import sys
import sysconfig
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .config import FitConfig, check_values, read_table, unknown_hints

RUN_FORMAT = "loopkit-run/1"
RUN_RECORD = "loopkit-run.json"
"""The file `loopkit fit` writes into the log_dir: the config it ran, for `diff --replay`."""

OWN_KEYS = ("model", "data", "python_path", "threads")
"""The keys of a run config that are not FitConfig fields (seed is both)."""
CODE_KEYS = ("model", "data", "eval_data", "loss_fn", "predict", "collate_fn")
"""Keys whose bare-string value is an import path (and the items of `callbacks`)."""
_FIT_FIELDS = tuple(f.name for f in fields(FitConfig))


def import_object(path: str, *, where: str) -> Any:
    """The object an import path `module:attribute` names.

    Raises:
        ValueError: a malformed path, a module that does not import or a missing attribute
            (the message names `where`, the path and what is allowed).
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"{where}={path!r}: an import path is 'module:attribute', e.g. "
            "'mypkg.models:build_model'."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"{where}={path!r}: cannot import {module_name!r} ({error}). Put its directory in "
            "python_path = [...] (relative to the config file) or install the package."
        ) from error
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{where}={path!r}: {module_name!r} has no {attribute!r}.") from None
    return obj


def _stand_in(*args: Any, **kwargs: Any) -> Any:
    """Stands for code values while the plain fields are checked (never called)."""
    raise AssertionError("a stand-in was called")


_STAND_IN = _stand_in


def _is_call(value: Any) -> bool:
    return isinstance(value, Mapping) and "call" in value


def resolve(value: Any, *, where: str, code: bool = False) -> Any:
    """Resolve `{call = ..., **kwargs}` tables (anywhere in `value`) and, with code=True, a
    bare import-path string. Other values are returned as they are.

    Raises:
        ValueError: an import fails, or a call fails with a TypeError (bad keyword arguments).
    """
    if _is_call(value):
        target = value["call"]
        if not isinstance(target, str):
            raise ValueError(f"{where}.call={target!r}: must be an import path string.")
        fn = import_object(target, where=f"{where}.call")
        kwargs = {str(k): resolve(v, where=f"{where}.{k}") for k, v in value.items() if k != "call"}
        try:
            return fn(**kwargs)
        except Exception as error:  # the user's builder: its error, named with where it ran
            arguments = ", ".join(f"{k}={reprlib.repr(v)}" for k, v in kwargs.items())
            raise ValueError(
                f"{where}: calling {target}({arguments}) failed: "
                f"{type(error).__name__}: {str(error).rstrip('.')}{error_site(error)}. "
                f"Check the values of {where} in the config (or the builder itself)."
            ) from error
    if code and isinstance(value, str):
        return import_object(value, where=where)
    if isinstance(value, Mapping):
        return {k: resolve(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, where=f"{where}[{i}]", code=code) for i, v in enumerate(value)]
    return value


_LIBRARY_DIRS = tuple(  # where a frame is not the user's: the stdlib, torch, loopkit
    str(Path(p).resolve()) + os.sep
    for p in (sysconfig.get_path("stdlib"), Path(torch.__file__).parent, Path(__file__).parent)
)


def error_site(error: BaseException, *, causes: bool = True) -> str:
    """` (at file:line, in function)`: the innermost frame of the user's code in a traceback.

    Follows `raise ... from` causes to the original error (with `causes=False`, only
    `error`'s own traceback is read); frames of the standard library, torch and loopkit
    itself are passed over ("" when every frame is theirs).
    """
    while causes and error.__cause__ is not None:
        error = error.__cause__
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    own = [
        f
        for f in frames
        if not f.filename.startswith("<")  # generated code: a dataclass's __init__, exec
        and not str(Path(f.filename).resolve()).startswith(_LIBRARY_DIRS)
    ]
    if not own:  # raised by loopkit or torch itself (e.g. a call with bad keywords)
        return ""
    return f" (at {own[-1].filename}:{own[-1].lineno}, in {own[-1].name})"


def _needs_build(value: Any) -> bool:
    if _is_call(value):
        return True
    if isinstance(value, Mapping):
        return any(_needs_build(v) for v in value.values())
    if isinstance(value, list):
        return any(_needs_build(v) for v in value)
    return False


class _Unset:
    """The value of `--set key=null`: remove the key (the field's or argument's default)."""

    def __repr__(self) -> str:
        return "null"


UNSET = _Unset()


def parse_set(item: str) -> tuple[list[str], Any]:
    """`key.sub=value` -> (["key", "sub"], value read as TOML, else the plain string).

    `key=null` gives UNSET: the key is removed (TOML has no null; `key='"null"'` is the
    string).

    Raises:
        ValueError: no `=`, an empty key, or a value that starts as an array or a table but
            is not valid TOML.
    """
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ValueError(f"--set {item!r}: expected key=value, e.g. --set max_steps=20.")
    if sys.version_info < (3, 11):  # pragma: no cover
        import tomli as tomllib
    else:
        import tomllib
    if text.strip() == "null":  # TOML has no null: this removes the key (its default)
        return [p.strip() for p in parts], UNSET
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as error:
        if text.lstrip().startswith(("[", "{")):  # meant as an array or a table: say why not
            raise ValueError(
                f"--set {item!r}: not a TOML array or table ({error}); quote the strings in "
                "it, e.g. --set 'metrics=[\"accuracy\"]', "
                "--set 'model={call=\"mypkg.models:build_model\", hidden=32}'."
            ) from None
        value = text  # a bare word: the string itself (--set log_dir=runs/b)
    return [p.strip() for p in parts], value


def _read_file(path: Path) -> dict[str, Any]:
    """The file's table (TOML, YAML or JSON, by suffix)."""
    return read_table(path, where=f"CONFIG={str(path)!r}")


@dataclass(frozen=True)
class Built:
    """A run config's objects, ready for `fit(model, data, **fit_kwargs)`."""

    model: torch.nn.Module
    data: Any
    fit_kwargs: dict[str, Any]


@dataclass(frozen=True)
class RunConfig:
    """A run config: the merged values (plain data), where they came from, their sys.path.

    Attributes:
        values: the file's values with the --set overrides merged in (JSON-able).
        source: the config file (None: built from values).
        python_path: absolute directories put on sys.path before building.
        cwd: the directory relative paths (log_dir, checkpoint_dir) are read from.
    """

    values: dict[str, Any]
    source: Path | None = None
    python_path: tuple[str, ...] = ()
    cwd: str = field(default_factory=os.getcwd)

    @classmethod
    def load(cls, path: str | os.PathLike[str], sets: Sequence[str] = ()) -> RunConfig:
        """Read a config file, merge `--set` items and check the plain FitConfig fields.

        Raises:
            ValueError: an unreadable file, a bad --set item, an unknown key or a bad value
                (FitConfig's message, naming the field).
        """
        source = Path(path).resolve()
        values = _read_file(source)
        try:  # each of the file's own values alone, so that an error names the file
            check_values(_plain(values))
        except ValueError as error:
            raise ValueError(f"CONFIG={str(source)!r}: {error}") from None
        for item in sets:
            keys, value = parse_set(item)
            values = _merged(values, keys, value)
        extra = values.get("python_path", [])
        if not (isinstance(extra, list) and all(isinstance(p, str) for p in extra)):
            raise ValueError(f"python_path={extra!r}: must be a list of directory strings.")
        dirs = (str(source.parent), *(str((source.parent / p).resolve()) for p in extra))
        for given, directory in zip(extra, dirs[1:]):
            if not Path(directory).is_dir():
                raise ValueError(
                    f"python_path=[..., {given!r}, ...]: {directory} is not a directory (entries "
                    f"are relative to the config file's directory, {source.parent})."
                )
        config = cls(values=values, source=source, python_path=dirs)
        config.check()
        return config

    def replace(self, **values: Any) -> RunConfig:
        """A copy with top-level values set (None removes a key); checked again."""
        merged = {k: v for k, v in {**self.values, **values}.items() if v is not None}
        config = RunConfig(merged, self.source, self.python_path, self.cwd)
        config.check()
        return config

    def check(self) -> None:
        """Validate the keys and every plain FitConfig field (no import, no build).

        Raises:
            ValueError: an unknown key, a missing model or data, or a bad field value.
        """
        known = (*OWN_KEYS, *_FIT_FIELDS)
        unknown = {k: v for k, v in self.values.items() if k not in known}
        if unknown:
            hints = unknown_hints(unknown, known)
            listing = ""
            if any(h.endswith(": no such field") for h in hints):
                listing = f" A run config takes {', '.join(known)}."
            end = "" if hints[-1].endswith("?") else "."
            raise ValueError(f"unknown key(s) {sorted(unknown)}: {'; '.join(hints)}{end}{listing}")
        for key in ("model", "data"):
            if key not in self.values:
                raise ValueError(
                    f"{key}: missing; e.g. {key} = {{call = 'mypkg.mod:build_{key}'}}."
                )
        callbacks = self.values.get("callbacks")
        if callbacks is not None and not isinstance(callbacks, list):
            raise ValueError(
                f"callbacks={callbacks!r}: must be a list, e.g. "
                "callbacks = [{call = 'mypkg.callbacks:MyCallback'}] or ['mypkg.mod:callback']."
            )
        threads = self.values.get("threads")
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads={threads!r}: must be an int >= 1.")
        FitConfig.from_dict(_plain(self.values))

    def _activate(self) -> None:
        for directory in reversed(self.python_path):
            if directory not in sys.path:
                sys.path.insert(0, directory)

    def build(self) -> Built:
        """Seed torch, run the builders, resolve the code values; validate with FitConfig.

        Raises:
            ValueError: an import or a builder call fails, model is not an nn.Module, or a
                field is bad (FitConfig's message).
        """
        self._activate()
        values = self.values
        if values.get("threads") is not None:
            torch.set_num_threads(int(values["threads"]))
        torch.manual_seed(int(values.get("seed", 0)))  # the model's initial weights
        model = resolve(values["model"], where="model", code=True)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"model={values['model']!r}: gave {type(model).__name__}, not a torch.nn.Module; "
                "name a builder with model = {call = 'mypkg.models:build_model', ...}."
            )
        data = resolve(values["data"], where="data", code=True)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in _FIT_FIELDS:
                continue
            if key == "callbacks":
                kwargs[key] = [
                    resolve(v, where=f"callbacks[{i}]", code=True) for i, v in enumerate(value)
                ]
            else:
                kwargs[key] = resolve(value, where=key, code=key in CODE_KEYS)
            if key in ("log_dir", "checkpoint_dir") and kwargs[key] is not None:
                kwargs[key] = str(Path(self.cwd, kwargs[key]))
        FitConfig.from_dict(kwargs)
        return Built(model, data, kwargs)

    def path_value(self, key: str) -> Path | None:
        """log_dir or checkpoint_dir as an absolute path (None if unset)."""
        value = self.values.get(key)
        return None if value is None else Path(self.cwd, value)

    def record(self) -> dict[str, Any]:
        """What `loopkit fit` writes to `<log_dir>/loopkit-run.json`."""
        return {
            "format": RUN_FORMAT,
            "source": None if self.source is None else str(self.source),
            "python_path": list(self.python_path),
            "cwd": self.cwd,
            "values": self.values,
        }

    @classmethod
    def from_record(cls, log_dir: str | os.PathLike[str]) -> RunConfig:
        """The config a `loopkit fit` run recorded in its log_dir.

        Raises:
            ValueError: no record there (the run was not started by `loopkit fit`).
        """
        path = Path(log_dir) / RUN_RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{str(log_dir)!r}: no readable {RUN_RECORD} ({error}); --replay needs runs "
                "started with `loopkit fit CONFIG` (it records the config in the log_dir)."
            ) from error
        if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
            raise ValueError(f"{path}: not a {RUN_FORMAT} record.")
        source = record.get("source")
        return cls(
            values=dict(record["values"]),
            source=None if source is None else Path(source),
            python_path=tuple(record.get("python_path", ())),
            cwd=str(record.get("cwd", os.getcwd())),
        )


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """The FitConfig fields of a run config, with stand-ins for code (checked unbuilt)."""
    return {
        k: (_STAND_IN if k in CODE_KEYS or _needs_build(v) else v)
        for k, v in values.items()
        if k in _FIT_FIELDS and k != "callbacks"
    }


def _merged(values: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """`values` with `value` set at the dotted `keys` (tables created as needed)."""
    out = dict(values)
    head, rest = keys[0], keys[1:]
    if not rest:
        if value is UNSET:
            out.pop(head, None)
        else:
            out[head] = value
        return out
    inner = out.get(head, {})
    if not isinstance(inner, dict):
        raise ValueError(
            f"--set {'.'.join(keys)}=...: {head} is {inner!r}, not a table; set {head} whole."
        )
    out[head] = _merged(inner, rest, value)
    return out


def write_record(config: RunConfig, log_dir: str | os.PathLike[str]) -> Path:
    """Write `config.record()` to `<log_dir>/loopkit-run.json` (atomically)."""
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RUN_RECORD
    _write_text_atomically(path, json.dumps(config.record(), indent=1))
    return path


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Earlier:
    """What a log_dir held before a fit: its run record and its set-aside fingerprints.

    Attributes:
        record: the text of `<log_dir>/loopkit-run.json` (None: there was none).
        set_aside: the names of the `fingerprints.<n>` directories already there.
    """

    record: str | None
    set_aside: frozenset[str]

    @classmethod
    def of(cls, log_dir: str | os.PathLike[str]) -> Earlier:
        """Read `log_dir` as it is now (before the fit)."""
        directory = Path(log_dir)
        try:
            record: str | None = (directory / RUN_RECORD).read_text()
        except OSError:  # none, or unreadable: nothing to keep
            record = None
        return cls(record, frozenset(p.name for p in _set_aside_dirs(directory)))


def _set_aside_dirs(log_dir: Path) -> list[Path]:
    """The `fingerprints.<n>` directories in `log_dir` (earlier runs' fingerprints)."""
    return [
        p
        for p in log_dir.glob("fingerprints.*")
        if p.is_dir() and p.name.removeprefix("fingerprints.").isdigit()
    ]


def keep_record_with(earlier: Earlier, log_dir: str | os.PathLike[str]) -> list[Path]:
    """Put the earlier run's record with its fingerprints, set aside since `earlier` was read.

    A fresh fit moves an earlier run's `fingerprints/` to `fingerprints.<n>` (loopkit
    .fingerprint); its record, `<log_dir>/loopkit-run.json`, is about to be replaced by the
    new run's. Written as `fingerprints.<n>/loopkit-run.json` (the same n), it keeps the
    earlier run replayable: `loopkit diff <log_dir>/fingerprints.<n> OTHER --replay`.
    A record already there is left as it is.

    Returns:
        The records written.
    """
    if earlier.record is None:
        return []
    written = []
    for directory in _set_aside_dirs(Path(log_dir)):
        path = directory / RUN_RECORD
        if directory.name in earlier.set_aside or path.exists():
            continue
        _write_text_atomically(path, earlier.record)
        written.append(path)
    return written


__all__ = [
    "Built",
    "Earlier",
    "CODE_KEYS",
    "OWN_KEYS",
    "RUN_FORMAT",
    "RUN_RECORD",
    "RunConfig",
    "UNSET",
    "error_site",
    "import_object",
    "keep_record_with",
    "parse_set",
    "resolve",
    "write_record",
]
