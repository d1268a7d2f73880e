"""Text classification from an HF `datasets.Dataset`, written for HF's Trainer, on loopkit.

A script as transformers users write it: the data is a `datasets.Dataset` (built with
`Dataset.from_dict`, padded with `.map`, split with `.train_test_split`), it carries
columns the model does not take (an id, a source string) that the Trainer drops
(`remove_unused_columns`), its label column is "label", and the Trainer gets
TrainingArguments, compute_metrics and an EarlyStoppingCallback. The only change for
loopkit is the import line:

    - from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
    + from loopkit.compat import EarlyStoppingCallback, Trainer, TrainingArguments

It is tokenizer-free: the texts are already integer token ids, and the model is a tiny,
randomly initialised classifier that returns {"loss", "logits"} like a transformers
model. It has no dropout, so the run ends equal to HF's own Trainer on the same script
(tests/test_compat_hf.py runs both and compares them). Needs `pip install datasets`.

Run: python examples/hf_datasets_classification.py [--epochs 4] [--output-dir runs/hf_ds]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from loopkit.compat import EarlyStoppingCallback, Trainer, TrainingArguments

VOCAB, LABELS, MAX_LEN = 200, 3, 24


class TinyClassifier(nn.Module):
    """Token embeddings, masked mean over the sequence, an MLP head; HF-style outputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, LABELS))
        torch.random.set_rng_state(generator)

    def forward(self, input_ids, attention_mask, labels=None):  # noqa: ANN001, ANN201
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.head(self.norm(pooled))
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def make_dataset(n: int, seed: int = 0) -> Dataset:
    """Variable-length "texts" of token ids whose topic (label) prefers its own tokens."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, LABELS, size=n)
    width = VOCAB // LABELS
    texts = []
    for label in labels:
        length = int(rng.integers(6, MAX_LEN + 1))
        topical = rng.integers(0, width, size=length) + label * width
        noise = rng.integers(0, VOCAB, size=length)
        texts.append(np.where(rng.random(length) < 0.5, topical, noise).tolist())
    return Dataset.from_dict(
        {
            "id": list(range(n)),
            "source": ["synthetic"] * n,
            "token_ids": texts,
            "label": labels.tolist(),
        }
    )


def pad(example: dict[str, Any]) -> dict[str, Any]:
    """Pad token_ids to MAX_LEN (input_ids + attention_mask), as a tokenizer would."""
    ids = example["token_ids"]
    return {
        "input_ids": ids + [0] * (MAX_LEN - len(ids)),
        "attention_mask": [1] * len(ids) + [0] * (MAX_LEN - len(ids)),
    }


def compute_metrics(eval_pred) -> dict[str, float]:  # noqa: ANN001
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def run(output_dir: str, num_train_epochs: float = 4, n: int = 1200) -> tuple[Any, dict]:
    """Train, evaluate and save; return the trainer and its final eval metrics."""
    data = make_dataset(n).map(pad, remove_columns=["token_ids"])
    splits = data.train_test_split(test_size=0.2, seed=0)
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        weight_decay=0.01,
        warmup_steps=0.1,
        logging_steps=5,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        seed=0,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=TinyClassifier(),
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
        compute_metrics=compute_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(f"{output_dir}/final")
    return trainer, metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--output-dir", default="runs/hf_ds")
    cli = parser.parse_args()
    print(run(cli.output_dir, cli.epochs)[1])
