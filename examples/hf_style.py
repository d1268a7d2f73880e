"""A training script written for HF's Trainer, running on loopkit.

Everything below is what a user writes for `transformers.Trainer`: TrainingArguments,
Trainer(model=..., args=..., train_dataset=..., eval_dataset=..., compute_metrics=...),
trainer.train(), trainer.evaluate(), trainer.save_model(). The only change for loopkit is
the import line:

    - from transformers import Trainer, TrainingArguments, EarlyStoppingCallback
    + from loopkit.compat import Trainer, TrainingArguments, EarlyStoppingCallback

The model follows the HF convention: the batch carries its labels, and forward returns a
dict with "loss" and "logits". The data is a map-style dataset of dict samples whose label
key is "label" (the default collator renames it "labels", as HF's does).

Run: python examples/hf_style.py [--epochs 3] [--output-dir runs/hf_style]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from loopkit.compat import EarlyStoppingCallback, Trainer, TrainingArguments


class TextLikeClassifier(nn.Module):
    """Bag of token embeddings -> MLP -> logits; returns {"loss", "logits"} like HF models."""

    def __init__(self, vocab_size: int = 64, hidden: int = 32, num_labels: int = 4) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, hidden, mode="mean")
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, num_labels)
        )

    def forward(self, input_ids, attention_mask=None, labels=None):  # noqa: ANN001
        logits = self.head(self.norm(self.embed(input_ids)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits} if loss is not None else {"logits": logits}


class ToyTopics(torch.utils.data.Dataset):
    """Sequences of 16 token ids; each topic (label) prefers its own quarter of the vocab."""

    def __init__(self, n: int, seed: int, vocab_size: int = 64, num_labels: int = 4) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, num_labels, size=n)
        width = vocab_size // num_labels
        topical = rng.integers(0, width, size=(n, 16)) + self.labels[:, None] * width
        noise = rng.integers(0, vocab_size, size=(n, 16))
        self.input_ids = np.where(rng.random((n, 16)) < 0.6, topical, noise)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": np.ones(16, dtype=np.int64),
            "label": int(self.labels[i]),
        }


def compute_metrics(eval_pred):  # noqa: ANN001, ANN201
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(
    output_dir: str = "runs/hf_style", num_train_epochs: float = 3, n_train: int = 2048
) -> dict:
    training_args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=2,
        learning_rate=3e-2,
        weight_decay=0.01,
        warmup_steps=0.1,  # a fraction of the run (transformers 5; older: warmup_ratio=0.1)
        lr_scheduler_type="cosine",
        logging_steps=10,
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
        model=TextLikeClassifier(),
        args=training_args,
        train_dataset=ToyTopics(n_train, seed=0),
        eval_dataset=ToyTopics(256, seed=1),
        compute_metrics=compute_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
    )
    train_result = trainer.train()
    print(train_result)
    metrics = trainer.evaluate()
    print(metrics)
    trainer.save_model(f"{output_dir}/final")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--output-dir", default="runs/hf_style")
    cli = parser.parse_args()
    main(cli.output_dir, cli.epochs)
