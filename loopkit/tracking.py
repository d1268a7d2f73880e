"""Run trackers: MLflow and W&B loggers, as fit() callbacks.

Both loggers are callbacks like `loopkit.logging.TensorBoardLogger`: at fit start they open
a run and record fit's settings (its `hparams`) as parameters / config; each log and eval
record becomes metrics at `state.step`; saved checkpoints' weights are logged as artifacts
when asked (`log_checkpoints=True`), and `log_model(dir)` logs a `save_model` directory.
They write from the main rank only (`state.strategy.is_main`) and never ask to stop.

A resumed fit continues the same tracked run: each logger's `state_dict()` holds its run
id, fit stores it in every checkpoint and gives it back (`load_state_dict`) before
`on_fit_start`. Points that the interrupted run logged after that checkpoint stay in the
tracker (MLflow's and W&B's histories are append-only), so those steps show twice.

The libraries are optional extras, imported when a run starts: `pip install
'loopkit[mlflow]'` (mlflow-skinny with SQLAlchemy and Alembic for the local store) and
`pip install 'loopkit[wandb]'`. A missing one is named when the logger is built.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from ._version import __version__

PathLike = str | os.PathLike

_log = logging.getLogger(__name__)

MLFLOW_EXTRA = "pip install 'loopkit[mlflow]'"
"""How to install what MLflowLogger needs (mlflow-skinny, sqlalchemy, alembic)."""

WANDB_EXTRA = "pip install 'loopkit[wandb]'"
"""How to install what WandbLogger needs."""

_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
"""fit's stopped_by for a stop by a signal: the run is marked killed (it may resume)."""

_MODEL_FILES = ("model.safetensors", "config.json")
"""What `loopkit.save_model` writes; `log_model` logs these files of a directory."""


def _require(module: str, where: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{where}: needs {module}, which is not installed: {extra}.")


def _check_str(value: object, where: str, example: str) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{where}={value!r}: expected a str or None, e.g. {example!r}.")


def _check_tags(tags: object, where: str) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping) or not all(isinstance(k, str) for k in tags):
        raise TypeError(
            f"{where}(tags={tags!r}): expected a dict of str keys, e.g. {{'team': 'nlp'}}."
        )
    return {k: str(v) for k, v in tags.items()}


def _model_files(directory: PathLike, where: str) -> list[Path]:
    """The files of a `save_model` directory; ValueError without its model.safetensors."""
    path = Path(directory)
    if not (path / "model.safetensors").is_file():
        raise ValueError(
            f"{where}(directory={str(directory)!r}): no model.safetensors there; pass a "
            "directory written by loopkit.save_model(state, directory)."
        )
    return [path / name for name in _MODEL_FILES if (path / name).is_file()]


def _checkpoint_weights(path: str) -> Path | None:
    """A checkpoint's model.safetensors, or None (a sharded checkpoint holds shards)."""
    weights = Path(path) / "model.safetensors"
    if weights.is_file():
        return weights
    _log.warning(
        "%s holds no model.safetensors (a sharded checkpoint); its weights are not logged. "
        "Write whole weights with loopkit.save_model and log them with log_model(directory).",
        path,
    )
    return None


# --------------------------------------------------------------------------------- MLflow

_MLFLOW_NAME = re.compile(r"[^\w./\- :]")
"""Characters MLflow refuses in metric and param names (it allows word chars . / - space :)."""

_MLFLOW_PARAM_LENGTH = 6000
"""MLflow's longest param value; longer reprs (a chain, a function) are cut."""


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide a deprecation warning mlflow's SQL store triggers in SQLAlchemy 2.1 (harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The ``noload`` loader strategy is deprecated", module=r"mlflow\."
        )
        yield


def _default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store at ./mlruns/mlflow.db (created)."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _artifacts_beside(tracking_uri: str) -> str | None:
    """For a SQLite file store, `<its directory>/artifacts` as a file URI; else None.

    mlflow's client puts a SQLite store's artifacts under ./mlruns of the working directory
    at the time the store is first opened, wherever the database is; an experiment made
    with this location keeps them next to the database instead. None: the store's default.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        return None
    database = Path(tracking_uri[len(prefix) :].split("?")[0])
    return (database.resolve().parent / "artifacts").as_uri()


class MLflowLogger:
    """Log fit's settings, metrics and model weights to an MLflow run.

    By default the run goes to a local store in the working directory at fit start:
    `./mlruns/mlflow.db` (SQLite; mlflow's own file store refuses to start unless
    `MLFLOW_ALLOW_FILE_STORE` is set) with artifacts under `./mlruns/artifacts/<run id>/`
    (experiments the logger creates in any SQLite store keep artifacts beside the database).
    View it with `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`. Any other
    tracking URI (a server, Databricks, ...) is used as given, or taken from
    `$MLFLOW_TRACKING_URI`.

    What is logged: at fit start fit's settings as params (values as str, cut to 6000
    characters); each log and eval record's metrics at `state.step` (names with characters
    MLflow refuses get "_" instead); with `log_checkpoints=True` each saved checkpoint's
    `model.safetensors` as the artifact `checkpoints/<checkpoint dir>/model.safetensors`;
    `log_model(directory)` logs a `save_model` directory (model.safetensors, config.json)
    under `model/`. At fit end the run is marked FINISHED (KILLED after a stop by a signal).

    A resumed fit continues the same run (the run id travels in fit's checkpoints; pass
    `run_id=` to continue a run yourself); a fit that does not resume starts a new run,
    also with a logger object an earlier fit used (an lr sweep reusing one logger gets a
    run per fit). MLflow params cannot change: on a resumed run only new ones are logged.

    Args:
        tracking_uri: where runs go; None: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db.
        experiment: the experiment's name (created if missing); None:
            $MLFLOW_EXPERIMENT_NAME or "loopkit".
        run_name: the run's name in the UI (None: MLflow picks one).
        run_id: continue this existing run instead of creating one.
        tags: extra run tags.
        log_checkpoints: log each saved checkpoint's weights as an artifact (a copy of the
            weights per checkpoint in the artifact store).

    Raises:
        ModuleNotFoundError: mlflow is missing (`pip install 'loopkit[mlflow]'`).
        TypeError: an argument of the wrong kind (named in the message).

    Example:
        >>> logger = MLflowLogger(experiment="spirals")  # doctest: +SKIP
        >>> lk.fit(model, data, ..., callbacks=[logger])  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        *,
        run_id: str | None = None,
        tags: Mapping[str, object] | None = None,
        log_checkpoints: bool = False,
    ) -> None:
        for name, value, example in (
            ("tracking_uri", tracking_uri, "sqlite:///mlruns/mlflow.db"),
            ("experiment", experiment, "spirals"),
            ("run_name", run_name, "baseline"),
            ("run_id", run_id, "3f2a..."),
        ):
            _check_str(value, f"MLflowLogger({name}", example)
        if not isinstance(log_checkpoints, bool):
            raise TypeError(f"MLflowLogger(log_checkpoints={log_checkpoints!r}): expected a bool.")
        self.tags = _check_tags(tags, "MLflowLogger")
        _require("mlflow", "MLflowLogger", MLFLOW_EXTRA)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self._continues = run_id is not None  # the next fit continues run_id (see on_fit_start)
        self.log_checkpoints = log_checkpoints
        self._client: Any = None
        self._names: dict[str, str] = {}  # each metric key's MLflow name, fixed for the run

    # ---- run state (fit stores it in checkpoints, so a resume continues the run)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        run_id = state.get("run_id")
        if isinstance(run_id, str):
            self.run_id, self._continues = run_id, True

    @property
    def client(self) -> Any:
        """The `mlflow.tracking.MlflowClient` of this logger's store (made on first use)."""
        if self._client is None:
            with _quiet_mlflow():
                from mlflow.exceptions import MlflowException
                from mlflow.tracking import MlflowClient

                uri = self.tracking_uri or _default_tracking_uri()
                self.tracking_uri = uri
                try:
                    self._client = MlflowClient(tracking_uri=uri)
                except MlflowException as error:  # an unknown scheme, a plain file store
                    raise ValueError(
                        f"MLflowLogger(tracking_uri={uri!r}): MLflow cannot open this store: "
                        f"{error} (e.g. tracking_uri='sqlite:///mlruns/mlflow.db' or "
                        "'http://host:5000'; None: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db)"
                    ) from error
        return self._client

    def _experiment_id(self) -> str:
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "loopkit"
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflowLogger(experiment={name!r}): that experiment is deleted in "
                f"{self.tracking_uri} (MLflow keeps a deleted experiment's name until it is "
                f"purged). Restore it (`mlflow experiments restore --experiment-id "
                f"{found.experiment_id}`) or pick another name."
            )
        if found is not None:
            return str(found.experiment_id)
        location = _artifacts_beside(self.client.tracking_uri)
        return str(self.client.create_experiment(name, artifact_location=location))

    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        if not state.strategy.is_main:
            return
        if not self._continues:  # a fresh fit: the logger's last run is not this one's
            self.run_id, self._names = None, {}
        self._continues = False
        with _quiet_mlflow():
            continued = self.run_id is not None and self._continue_run()
            if not continued:
                tags = {"loopkit.version": __version__, **self.tags}
                run = self.client.create_run(
                    self._experiment_id(), run_name=self.run_name, tags=tags
                )
                self.run_id = run.info.run_id
            self._log_params(hparams, continued=continued)
        _log.info(
            "MLflow: %s run %s in %s",
            "continued" if continued else "started",
            self.run_id,
            self.tracking_uri,
        )

    def _continue_run(self) -> bool:
        """Set the known run running again; False (with a warning) when it is not found."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(self.run_id)
        except MlflowException:
            _log.warning(
                "MLflow run %s is not in %s; starting a new run.", self.run_id, self.tracking_uri
            )
            return False
        self.client.update_run(self.run_id, status="RUNNING")
        return True

    def _log_params(self, hparams: Mapping[str, object], *, continued: bool) -> None:
        from mlflow.entities import Param

        params = {_mlflow_name(str(k)): _param_value(v) for k, v in hparams.items()}
        if continued:
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k in params if k in logged and logged[k] != params[k])
            if changed:
                _log.info(
                    "MLflow keeps the first value of a param; changed on this resume (not "
                    "logged): %s.",
                    ", ".join(changed),
                )
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def _names_of(self, keys: list[str]) -> list[str]:
        """Each metric key's MLflow name: itself when MLflow takes it, else `_mlflow_name`,
        with "_2", "_3", ... when that is another key's name already (two keys never share
        one history). Keys MLflow takes as they are pick first; a key keeps its name."""
        for key in sorted(
            (k for k in keys if k not in self._names), key=lambda k: _mlflow_name(k) != k
        ):
            name = base = _mlflow_name(key)
            taken, n = set(self._names.values()), 2
            while name in taken:
                name, n = f"{base}_{n}", n + 1
            self._names[key] = name
            if name != key:
                _log.warning("MLflow refuses %r as a metric name; logged as %r.", key, name)
        return [self._names[k] for k in keys]

    def _metrics(self, state: Any, metrics: Mapping[str, float]) -> None:
        if not state.strategy.is_main or self.run_id is None:
            return
        from mlflow.entities import Metric

        now_ms, step = int(time.time() * 1000), int(state.step)
        names = self._names_of(list(metrics))
        items = [
            Metric(name, float(v), now_ms, step)
            for name, v in zip(names, metrics.values(), strict=True)
        ]
        with _quiet_mlflow():
            for start in range(0, len(items), 1000):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._metrics(state, metrics)

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._metrics(state, metrics)

    def on_checkpoint_saved(self, state: Any, path: str) -> None:
        if not (self.log_checkpoints and state.strategy.is_main and self.run_id is not None):
            return
        weights = _checkpoint_weights(path)
        if weights is not None:
            with _quiet_mlflow():
                self.client.log_artifact(
                    self.run_id, str(weights), artifact_path=f"checkpoints/{Path(path).name}"
                )

    def log_model(self, directory: PathLike, artifact_path: str = "model") -> None:
        """Log a `loopkit.save_model` directory's files as artifacts under `artifact_path`.

        Call it after fit (the run stays open for artifacts after it finished).

        Raises:
            ValueError: the directory holds no model.safetensors.
            RuntimeError: no run yet (call it after fit started this logger's run).
        """
        files = _model_files(directory, "MLflowLogger.log_model")
        if self.run_id is None:
            raise RuntimeError(
                "MLflowLogger.log_model: no run yet; pass the logger to fit(callbacks=[...]) "
                "first, or build it with run_id= of an existing run."
            )
        with _quiet_mlflow():
            for file in files:
                self.client.log_artifact(self.run_id, str(file), artifact_path=artifact_path)

    def on_fit_end(self, state: Any, reason: str | None = None) -> None:
        if not state.strategy.is_main or self.run_id is None:
            return
        status = "KILLED" if reason in _SIGNALS else "FINISHED"
        with _quiet_mlflow():
            self.client.set_terminated(self.run_id, status=status)

    def __repr__(self) -> str:
        return f"MLflowLogger(tracking_uri={self.tracking_uri!r}, experiment={self.experiment!r})"


def _mlflow_name(key: str) -> str:
    """`key` as a name MLflow takes: each refused character becomes "_", and a name that
    path normalisation would change ("eval//f1", "eval/f1/", "a/./b", "..a"), which MLflow
    refuses too, loses its empty parts and has its "." / ".." parts written as "_"."""
    name = _MLFLOW_NAME.sub("_", key)
    parts = [p if p not in (".", "..") else "_" * len(p) for p in name.split("/") if p]
    name = "/".join(parts) or "_"
    return "_" + name[1:] if name.startswith("..") else name


def _param_value(value: object) -> str:
    text = str(value)
    if len(text) > _MLFLOW_PARAM_LENGTH:
        return text[: _MLFLOW_PARAM_LENGTH - 3] + "..."
    return text


# ------------------------------------------------------------------------------------ W&B

WandbMode = Literal["offline", "online", "disabled", "shared"]


class WandbLogger:
    """Log fit's settings, metrics and model weights to a Weights & Biases run.

    Offline by default: the run is written under `<dir>/wandb/offline-run-<time>-<id>/`
    and nothing goes over the network; upload it later with `wandb sync <that dir>`.
    `mode="online"` logs live (after `wandb login`).

    What is logged: at fit start fit's settings as the run's config; each log and eval
    record's metrics at `step=state.step` (W&B's own step); with `log_checkpoints=True`
    each saved checkpoint's model.safetensors as a new version of the artifact
    `model-<run id>` (type "model", aliased `step-<n>`); `log_model(directory)` logs a
    `save_model` directory the same way. At fit end the run finishes (exit code 1 after a
    stop by a signal).

    A resumed fit continues the same run id (`resume="allow"`; the id travels in fit's
    checkpoints; pass `run_id=` yourself otherwise); a fit that does not resume starts a
    new run, also with a logger object an earlier fit used. Offline, each fit writes its own run
    directory under that id, and `wandb sync` uploads them into the one run.

    Args:
        project: the W&B project (None: W&B's default, "uncategorized" offline).
        mode: "offline" (default), "online", "disabled" or "shared".
        dir: where the `wandb/` directory goes (created; None: the working directory).
        name: the run's display name.
        run_id: continue this run id.
        entity: the W&B team or user.
        tags: run tags.
        log_checkpoints: log each saved checkpoint's weights as an artifact version.
        init_kwargs: anything else for `wandb.init` (e.g. group=, settings=).

    Raises:
        ModuleNotFoundError: wandb is missing (`pip install 'loopkit[wandb]'`).
        ValueError / TypeError: a bad argument (named in the message).

    Example:
        >>> logger = WandbLogger(project="spirals", dir="runs")  # doctest: +SKIP
        >>> lk.fit(model, data, ..., callbacks=[logger])  # doctest: +SKIP
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        mode: WandbMode = "offline",
        dir: PathLike | None = None,  # noqa: A002 - wandb.init's own name
        name: str | None = None,
        run_id: str | None = None,
        entity: str | None = None,
        tags: list[str] | tuple[str, ...] | None = None,
        log_checkpoints: bool = False,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        for arg, value, example in (
            ("project", project, "spirals"),
            ("name", name, "baseline"),
            ("run_id", run_id, "a1b2c3d4"),
            ("entity", entity, "my-team"),
        ):
            _check_str(value, f"WandbLogger({arg}", example)
        if mode not in ("offline", "online", "disabled", "shared"):
            raise ValueError(
                f"WandbLogger(mode={mode!r}): one of 'offline' (default: no network), "
                "'online', 'disabled', 'shared'."
            )
        if dir is not None and not isinstance(dir, (str, os.PathLike)):
            raise TypeError(f"WandbLogger(dir={dir!r}): expected a directory path, e.g. 'runs'.")
        if tags is not None and not (
            isinstance(tags, (list, tuple)) and all(isinstance(t, str) for t in tags)
        ):
            raise TypeError(f"WandbLogger(tags={tags!r}): expected a list of str.")
        if not isinstance(log_checkpoints, bool):
            raise TypeError(f"WandbLogger(log_checkpoints={log_checkpoints!r}): expected a bool.")
        if init_kwargs is not None and not isinstance(init_kwargs, Mapping):
            raise TypeError(f"WandbLogger(init_kwargs={init_kwargs!r}): expected a dict.")
        _require("wandb", "WandbLogger", WANDB_EXTRA)
        self.project, self.mode, self.name, self.run_id = project, mode, name, run_id
        self._continues = run_id is not None  # the next fit continues run_id (see on_fit_start)
        self.dir = None if dir is None else os.fspath(dir)
        self.entity, self.tags, self.log_checkpoints = entity, tags, log_checkpoints
        self.init_kwargs = dict(init_kwargs or {})
        self.run: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        run_id = state.get("run_id")
        if isinstance(run_id, str):
            self.run_id, self._continues = run_id, True

    def _init(self, config: dict[str, Any] | None) -> Any:
        """Start (or continue, when the run id is known) the W&B run; return it."""
        import wandb

        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
        arguments: dict[str, Any] = {
            "project": self.project,
            "entity": self.entity,
            "name": self.name,
            "dir": self.dir,
            "mode": self.mode,
            "tags": list(self.tags) if self.tags is not None else None,
            "reinit": "create_new",  # never finishes a run of the user's own
            **self.init_kwargs,
        }
        resuming = self.run_id is not None
        if resuming:
            arguments.update(id=self.run_id, resume="allow")
        elif config is not None:
            arguments["config"] = config
        run = wandb.init(**arguments)
        if resuming and config is not None:
            # A continued run keeps its config; settings changed by the resume win.
            run.config.update(config, allow_val_change=True)
        self.run_id = run.id
        return run

    def on_fit_start(self, state: Any, hparams: Mapping[str, object]) -> None:
        if not state.strategy.is_main:
            return
        self.on_fit_end(state)  # a run left open by an earlier fit ends here
        if not self._continues:  # a fresh fit: the logger's last run is not this one's
            self.run_id = None
        self._continues = False
        self.run = self._init({str(k): _config_value(v) for k, v in hparams.items()})
        _log.info("W&B: run %s (%s) in %s", self.run.id, self.mode, self.run.dir)

    def _metrics(self, state: Any, metrics: Mapping[str, float]) -> None:
        if self.run is not None and state.strategy.is_main:
            self.run.log({k: float(v) for k, v in metrics.items()}, step=int(state.step))

    def on_log(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._metrics(state, metrics)

    def on_eval_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self._metrics(state, metrics)

    def _log_files(self, files: list[Path], aliases: list[str]) -> None:
        import wandb

        artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
        for file in files:
            artifact.add_file(str(file))
        self.run.log_artifact(artifact, aliases=aliases)

    def on_checkpoint_saved(self, state: Any, path: str) -> None:
        if not (self.log_checkpoints and self.run is not None and state.strategy.is_main):
            return
        weights = _checkpoint_weights(path)
        if weights is not None:
            self._log_files([weights], [f"step-{int(state.step)}", "latest"])

    def log_model(self, directory: PathLike, aliases: tuple[str, ...] = ("latest",)) -> None:
        """Log a `loopkit.save_model` directory as a version of the `model-<run id>` artifact.

        After fit (its run finished) the run is continued for the upload and finished
        again; offline that writes one more run directory under the same id.

        Raises:
            ValueError: the directory holds no model.safetensors.
            RuntimeError: no run yet (no fit started one and no run_id was given).
        """
        files = _model_files(directory, "WandbLogger.log_model")
        if self.run is not None:
            self._log_files(files, list(aliases))
            return
        if self.run_id is None:
            raise RuntimeError(
                "WandbLogger.log_model: no run yet; pass the logger to fit(callbacks=[...]) "
                "first, or build it with run_id= of an existing run."
            )
        self.run = self._init(None)
        try:
            self._log_files(files, list(aliases))
        finally:
            self.run.finish()
            self.run = None

    def on_fit_end(self, state: Any, reason: str | None = None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if reason in _SIGNALS else 0)
            self.run = None

    def __repr__(self) -> str:
        return f"WandbLogger(project={self.project!r}, mode={self.mode!r}, dir={self.dir!r})"


def _config_value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


__all__ = ["MLFLOW_EXTRA", "WANDB_EXTRA", "MLflowLogger", "WandbLogger"]
