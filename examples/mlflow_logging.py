"""Track a fit() run in MLflow: params, metrics by step, checkpoint and model weights.

The run goes to a local MLflow store under <root>/mlruns (SQLite database and artifacts),
then MLflow's own client reads it back. A second fit resumes from the last checkpoint and
continues the same MLflow run. Needs the `mlflow` extra: pip install 'loopkit[mlflow]'.

Run: python examples/mlflow_logging.py [--root runs/mlflow-demo] [--steps 40]
View: mlflow ui --backend-store-uri sqlite:///runs/mlflow-demo/mlruns/mlflow.db
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from classifier import loss_fn, make_blobs

import loopkit as lk


def train(root: Path, max_steps: int, resume: bool) -> tuple[lk.FitResult, lk.MLflowLogger]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    logger = lk.MLflowLogger(
        tracking_uri=f"sqlite:///{root.resolve() / 'mlruns' / 'mlflow.db'}",
        experiment="blobs",
        run_name="mlflow-example",
        log_checkpoints=True,  # each checkpoint's model.safetensors becomes an artifact
    )
    result = lk.fit(
        model,
        make_blobs(2048),
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        max_steps=max_steps,
        batch_size=64,
        eval_data=make_blobs(512, seed=1),
        eval_every=10,
        metrics=["accuracy"],
        log_every=5,
        checkpoint_dir=root / "checkpoints",
        save_every=10,
        resume=resume,
        callbacks=[logger],
        progress=False,
    )
    return result, logger


def main(root: str = "runs/mlflow-demo", steps: int = 40) -> dict[str, list[tuple[int, float]]]:
    """Train half the steps, resume to the end; return the run's metrics as MLflow has them."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    (path / "mlruns").mkdir(exist_ok=True)
    first, logger = train(path, steps // 2, resume=False)
    result, resumed = train(path, steps, resume=True)  # the same MLflow run continues
    assert resumed.run_id == logger.run_id
    lk.save_model(result.state, path / "model")
    resumed.log_model(path / "model")  # model.safetensors + config.json under model/

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resumed.tracking_uri)
    run = client.get_run(resumed.run_id)
    print(f"run {run.info.run_id} ({run.info.status}): params {dict(run.data.params)}")
    metrics = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("train/loss", "eval/loss", "eval/accuracy")
    }
    for key, points in metrics.items():
        print(key, [(step, round(value, 4)) for step, value in points])
    print("artifacts:", [a.path for a in client.list_artifacts(run.info.run_id)])
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="runs/mlflow-demo")
    parser.add_argument("--steps", type=int, default=40)
    arguments = parser.parse_args()
    main(arguments.root, arguments.steps)
