"""MLflowLogger and WandbLogger, read back with the real libraries' own readers.

Each logger runs one fit that stops at a checkpoint and a second fit that resumes it (the
same tracked run must continue). MLflow's own client reads the store back; W&B's offline
run files are read record by record (the .wandb transaction log, parsed with wandb's own
protobuf classes). One store per module: mlflow's import and a new database take seconds.
"""

from __future__ import annotations

import json
import os
import struct
import time
import types
import zlib
from pathlib import Path

import pytest
import torch

import loopkit as lk
from loopkit import tracking

pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    return list(zip(x, x.sum(1, keepdim=True)))


def _loss(model, batch):
    return lk.mse(model(batch[0]), batch[1])


def _fit(logger: object, checkpoint_dir: Path, max_steps: int, resume: bool) -> lk.FitResult:
    torch.manual_seed(0)
    return lk.fit(
        torch.nn.Linear(4, 1),
        _data(),
        loss_fn=_loss,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        max_steps=max_steps,
        batch_size=16,
        eval_data=_data()[:32],
        eval_every=2,
        log_every=1,
        checkpoint_dir=checkpoint_dir,
        save_every=2,
        resume=resume,
        callbacks=[logger],
        progress=False,
    )


def _points(results: list[lk.FitResult]) -> dict[str, dict[int, float]]:
    """Every metric fit recorded, as key -> {step: value} (the resumed run's last)."""
    points: dict[str, dict[int, float]] = {}
    for result in results:
        for row in result.history:
            for key, value in row.items():
                if key not in ("step", "epoch", "time_s"):
                    points.setdefault(key, {})[int(row["step"])] = float(value)
    return points


# ----------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_runs(tmp_path_factory):
    """Fit 4 steps, then resume to 6, logging to the default store in a fresh directory."""
    root = tmp_path_factory.mktemp("mlflow")
    saved_cwd, saved_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(root)
    try:
        first = lk.MLflowLogger(experiment="loopkit-tests", log_checkpoints=True)
        a = _fit(first, root / "ckpt", max_steps=4, resume=False)
        second = lk.MLflowLogger(experiment="loopkit-tests", log_checkpoints=True)
        b = _fit(second, root / "ckpt", max_steps=6, resume=True)
        lk.save_model(b.state, root / "model")
        second.log_model(root / "model")
    finally:
        os.chdir(saved_cwd)
        if saved_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    return root, first, second, a, b


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")


def test_mlflow_default_store_is_sqlite_under_mlruns(mlflow_runs):
    root, first, *_ = mlflow_runs
    assert (root / "mlruns" / "mlflow.db").is_file()
    assert first.tracking_uri == f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def test_mlflow_client_reads_back_every_metric_at_its_step(mlflow_runs):
    root, first, second, a, b = mlflow_runs
    assert second.run_id == first.run_id  # the resumed fit continued the same run
    client = _client(root)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    expected = _points([a, b])
    assert set(expected) >= {"train/loss", "train/lr", "eval/loss", "eval/perplexity"}
    for key, by_step in expected.items():
        history = client.get_metric_history(first.run_id, key)
        got = {m.step: m.value for m in history}
        assert got == pytest.approx(by_step), key
        assert len(history) == len(by_step), f"{key}: a step logged twice"
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4, 5, 6]


def test_mlflow_params_are_fits_settings(mlflow_runs):
    root, first, *_ = mlflow_runs
    params = _client(root).get_run(first.run_id).data.params
    assert params["max_steps"] == "4"  # the first start's value: MLflow params are fixed
    assert params["batch_size"] == "16" and params["log_every"] == "1"
    assert params["accumulate"] == "1" and params["eval_every"] == "2"


def test_mlflow_artifacts_hold_checkpoint_and_model_weights(mlflow_runs):
    root, first, *_ = mlflow_runs
    client = _client(root)
    checkpoints = [a.path for a in client.list_artifacts(first.run_id, "checkpoints")]
    assert checkpoints == [f"checkpoints/step-{s:08d}" for s in (2, 4, 6)]
    artifacts = root / "mlruns" / "artifacts" / first.run_id / "artifacts"
    assert client.get_run(first.run_id).info.artifact_uri == artifacts.as_uri()
    model = sorted(a.path for a in client.list_artifacts(first.run_id, "model"))
    assert model == ["model/config.json", "model/model.safetensors"]
    local = Path(client.download_artifacts(first.run_id, "model/model.safetensors", str(root)))
    assert local.read_bytes() == (root / "model" / "model.safetensors").read_bytes()
    step6 = client.download_artifacts(
        first.run_id, "checkpoints/step-00000006/model.safetensors", str(root / "dl")
    )
    weights = (root / "ckpt" / "step-00000006" / "model.safetensors").read_bytes()
    assert Path(step6).read_bytes() == weights


# -------------------------------------------------------------------------------------- W&B


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file, parsed with wandb's protobuf classes.

    The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0),
    then LevelDB-log blocks of 32 KiB whose chunks carry a CRC-32, a length and a type
    (1 full, 2 first, 3 middle, 4 last); a record is the concatenated chunks.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    records, chunks, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or (length == 0 and kind == 0):
            pos += room  # the block's zero padding
            continue
        payload = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC"
        pos += 7 + length
        chunks += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    first = lk.WandbLogger(project="loopkit-tests", dir=root / "wb", log_checkpoints=True)
    a = _fit(first, root / "ckpt", max_steps=4, resume=False)
    # wandb names an offline run's directory by the second it starts and the run id: a
    # resume within the same second would share the first fit's directory.
    time.sleep(1.1)
    second = lk.WandbLogger(project="loopkit-tests", dir=root / "wb")
    b = _fit(second, root / "ckpt", max_steps=6, resume=True)
    return root, first, second, a, b


def _kinds(records: list, kind: str) -> list:
    return [r for r in records if r.WhichOneof("record_type") == kind]


def test_wandb_offline_runs_hold_every_metric_at_its_step(wandb_runs):
    root, first, second, a, b = wandb_runs
    assert second.run_id == first.run_id  # the resumed fit continued the same run id
    files = sorted((root / "wb" / "wandb").glob(f"offline-run-*-{first.run_id}/run-*.wandb"))
    assert len(files) == 2  # one offline directory per fit; `wandb sync` joins them
    got: dict[str, dict[int, float]] = {}
    for file in files:
        for record in _kinds(wandb_records(file), "history"):
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)  # "train/loss" comes nested
                if not key.startswith("_"):
                    got.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    expected = _points([a, b])
    assert set(got) == set(expected)
    for key, by_step in expected.items():
        assert got[key] == pytest.approx(by_step), key


def test_wandb_config_and_checkpoint_artifacts(wandb_runs):
    root, first, *_ = wandb_runs
    files = sorted((root / "wb" / "wandb").glob(f"offline-run-*-{first.run_id}/run-*.wandb"))
    records = wandb_records(files[0])
    (run,) = _kinds(records, "run")
    config = {item.key: json.loads(item.value_json) for item in run.run.config.update}
    assert config["max_steps"] == 4 and config["batch_size"] == 16
    artifacts = _kinds(records, "artifact")
    assert [sorted(r.artifact.aliases) for r in artifacts] == [
        ["latest", "step-2"],
        ["latest", "step-4"],
    ]
    assert all(r.artifact.name == f"model-{first.run_id}" for r in artifacts)
    assert [[m.path for m in r.artifact.manifest.contents] for r in artifacts] == [
        ["model.safetensors"]
    ] * 2


# ----------------------------------------------------------------------- both: rules, errors


def _not_main_state() -> object:
    return types.SimpleNamespace(strategy=types.SimpleNamespace(is_main=False), step=3, epoch=0)


def test_loggers_write_nothing_off_the_main_rank(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = _not_main_state()
    for logger in (lk.MLflowLogger(), lk.WandbLogger(dir=tmp_path / "wb")):
        logger.on_fit_start(state, {"max_steps": 3})
        logger.on_log(state, {"train/loss": 1.0})
        logger.on_eval_end(state, {"eval/loss": 1.0})
        logger.on_checkpoint_saved(state, str(tmp_path))
        logger.on_fit_end(state, "max_steps")
        assert logger.run_id is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("logger", "arguments", "error", "match"),
    [
        ("MLflowLogger", {"tracking_uri": 3}, TypeError, r"MLflowLogger\(tracking_uri=3"),
        ("MLflowLogger", {"experiment": ["a"]}, TypeError, r"MLflowLogger\(experiment="),
        ("MLflowLogger", {"tags": ["a"]}, TypeError, r"MLflowLogger\(tags="),
        ("MLflowLogger", {"log_checkpoints": "yes"}, TypeError, r"log_checkpoints='yes'"),
        ("WandbLogger", {"mode": "cloud"}, ValueError, r"WandbLogger\(mode='cloud'"),
        ("WandbLogger", {"dir": 3}, TypeError, r"WandbLogger\(dir=3"),
        ("WandbLogger", {"tags": "a"}, TypeError, r"WandbLogger\(tags='a'"),
        ("WandbLogger", {"project": 1}, TypeError, r"WandbLogger\(project=1"),
    ],
    ids=lambda value: ",".join(value) if isinstance(value, dict) else str(value),
)
def test_bad_arguments_are_refused_by_name(logger, arguments, error, match):
    with pytest.raises(error, match=match):
        getattr(lk, logger)(**arguments)


@pytest.mark.parametrize(
    ("build", "module", "extra"),
    [
        (lk.MLflowLogger, "mlflow", r"loopkit\[mlflow\]"),
        (lk.WandbLogger, "wandb", r"loopkit\[wandb\]"),
    ],
    ids=["mlflow", "wandb"],
)
def test_a_missing_library_names_its_extra(monkeypatch, build, module, extra):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == module else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match=extra):
        build()


def test_log_model_wants_a_save_model_directory(tmp_path):
    for logger in (lk.MLflowLogger(), lk.WandbLogger()):
        with pytest.raises(ValueError, match=r"log_model\(directory=.*no model.safetensors"):
            logger.log_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no run yet"):
        lk.MLflowLogger().log_model(tmp_path)


def test_one_logger_object_reused_by_fresh_fits_gives_a_run_per_fit(tmp_path):
    # An lr sweep reusing one logger: each fit that does not resume starts its own run.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = lk.MLflowLogger(tracking_uri=uri, experiment="reuse")
    wandb_logger = lk.WandbLogger(project="reuse", dir=tmp_path / "wb")
    ids: dict[str, list[str]] = {"mlflow": [], "wandb": []}
    for k in range(2):
        if k:
            time.sleep(1.1)  # wandb names offline directories by the second (see above)
        _fit(mlflow_logger, tmp_path / f"m{k}", max_steps=2, resume=False)
        ids["mlflow"].append(str(mlflow_logger.run_id))
        _fit(wandb_logger, tmp_path / f"w{k}", max_steps=2, resume=False)
        ids["wandb"].append(str(wandb_logger.run_id))
    assert len(set(ids["mlflow"])) == 2 and len(set(ids["wandb"])) == 2
    client = MlflowClient(tracking_uri=uri)
    for run_id in ids["mlflow"]:
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert steps == [1, 2], steps  # each step once, in its own run
        assert client.get_run(run_id).info.status == "FINISHED"
    for run_id in ids["wandb"]:
        assert len(list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
