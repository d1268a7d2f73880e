"""torchmetrics in fit(): which stdlib package does a line of Python come from?

    python examples/torchmetrics_classification.py            # a few seconds on a CPU

The data is real and on every machine: lines of the Python standard library's own source
(the `asyncio`, `email` and `xml` packages; nothing is downloaded), each labelled with its
package. A line becomes a bag of characters and of hashed words; a small MLP learns the
package. fit() evaluates it with a torchmetrics `MetricCollection` (accuracy, macro F1,
AUROC) beside loopkit's own loss: torchmetrics objects go into `metrics=` as they are,
each entry of a collection is reported as "eval/<entry>", and EarlyStopping can watch
one of them. At the end the script checks the last evaluation against the same metrics
computed once over all eval predictions.
"""

from __future__ import annotations

import argparse
import re
import sysconfig
import zlib
from pathlib import Path

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

import loopkit as lk

PACKAGES = ("asyncio", "email", "xml")
N_CHARS, N_WORDS = 128, 256  # features: character counts, hashed word counts
_WORD = re.compile(r"[A-Za-z_]+")


def _lines_of(package: str) -> list[str]:
    """The stripped source lines of at least 20 characters of one stdlib package, in a fixed
    order (sorted files)."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    lines: list[str] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines.extend(line.strip() for line in text.splitlines() if len(line.strip()) >= 20)
    if not lines:
        raise FileNotFoundError(f"no Python source under {root} (a minimal Python install?)")
    return lines


def featurize(line: str) -> torch.Tensor:
    """A line as counts of its characters and of its words (hashed with crc32, which, unlike
    `hash`, is the same in every process), per 10 characters of the line."""
    features = torch.zeros(N_CHARS + N_WORDS)
    for char in line:
        features[min(ord(char), N_CHARS - 1)] += 1
    for word in _WORD.findall(line):
        features[N_CHARS + zlib.crc32(word.encode()) % N_WORDS] += 1
    return features * (10 / len(line))


def stdlib_lines(
    counts: tuple[int, ...] = (300, 200, 100), seed: int = 0
) -> torch.utils.data.TensorDataset:
    """`counts[k]` lines drawn at random (by `seed`) from package `PACKAGES[k]`: a
    TensorDataset of (features float32 [N, 384], package index int64 [N]).

    Uneven counts make the classes imbalanced, so accuracy, macro F1 and AUROC differ.
    """
    generator = torch.Generator().manual_seed(seed)
    features, labels = [], []
    for label, (package, count) in enumerate(zip(PACKAGES, counts, strict=False)):
        lines = _lines_of(package)
        for index in torch.randperm(len(lines), generator=generator)[:count].tolist():
            features.append(featurize(lines[index]))
            labels.append(label)
    return torch.utils.data.TensorDataset(torch.stack(features), torch.tensor(labels))


def split(data: torch.utils.data.TensorDataset, n_eval: int, seed: int = 0):
    """A shuffled (train, eval) split with `n_eval` eval items."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    x, y = data.tensors
    train, held = order[n_eval:], order[:n_eval]
    return (
        torch.utils.data.TensorDataset(x[train], y[train]),
        torch.utils.data.TensorDataset(x[held], y[held]),
    )


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(N_CHARS + N_WORDS, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
    )


def loss_fn(model: torch.nn.Module, batch) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


def main(
    steps: int = 200, counts: tuple[int, ...] = (300, 200, 100)
) -> tuple[lk.FitResult, dict[str, float]]:
    """Train, evaluating with torchmetrics every `steps // 4` steps.

    Returns:
        fit's result, and the metrics of the final model over all eval predictions at once
        ({"accuracy": ..., "f1": ..., "auroc": ...}).
    """
    train, held = split(stdlib_lines(counts), n_eval=sum(counts) // 4)
    classes = len(PACKAGES)
    metrics = MetricCollection(
        {
            "accuracy": MulticlassAccuracy(classes, average="micro"),
            "f1": MulticlassF1Score(classes, average="macro"),
            "auroc": MulticlassAUROC(classes),
        }
    )
    result = lk.fit(
        make_model(),
        train,
        loss_fn=loss_fn,
        optimizer={"name": "AdamW", "lr": 3e-3},
        max_steps=steps,
        batch_size=32,
        eval_data=held,
        eval_every=max(1, steps // 4),
        metrics={"package": metrics},  # entries are reported as eval/accuracy, eval/f1, ...
        callbacks=[lk.EarlyStopping(monitor="eval/f1", mode="max", patience=3)],
        progress=False,
    )
    print(result)

    # The same metrics over all eval predictions at once, computed afterwards.
    model = result.state.model.eval()
    with torch.no_grad():
        logits = model(held.tensors[0])
    metrics.reset()
    metrics.update(logits, held.tensors[1])
    once = {key: float(value) for key, value in metrics.compute().items()}
    last = next(row for row in reversed(result.history) if "eval/f1" in row)
    assert last["step"] == result.state.step, "the last evaluation saw the final weights"
    for key, value in once.items():
        print(f"eval/{key}: fit {last[f'eval/{key}']:.6f}, all predictions at once {value:.6f}")
    return result, once


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    main(args.steps)
