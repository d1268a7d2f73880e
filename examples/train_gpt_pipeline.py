"""The demo GPT (examples/gpt.py, as it is) trained on 2 pipeline stages, split by tracing.

    python examples/train_gpt_pipeline.py                                  # one process
    torchrun --nproc_per_node 2 examples/train_gpt_pipeline.py --strategy pipeline
    torchrun --nproc_per_node 2 examples/train_gpt_pipeline.py --strategy pipeline --schedule GPipe

`GPT` is not an nn.Sequential: it keeps its blocks in an nn.ModuleList and has its own
forward (token + position embeddings, the blocks, a final LayerNorm, a head whose weight
is the token embedding's). `Pipeline({"blocks.2": "beginning"}, example_inputs=...)`
traces that forward (torch.export, through torch.distributed.pipelining.pipeline) and cuts
it where blocks.2 starts: stage 0 runs the embeddings and blocks 0-1, stage 1 blocks 2-3,
the final norm and the head. The tied weight lives on both stages; its two gradients are
summed once per step, so both copies stay equal. Checkpoints and `--save-model` files keep
GPT's own parameter names and load into an unsplit GPT.

The data is the Python standard library's own source, character by character (see
examples/gpt.py): no download.
"""

from __future__ import annotations

import argparse

import gpt  # examples/gpt.py, next to this script
import torch

import loopkit as lk
from loopkit.strategies import Pipeline, SingleDevice

BLOCK_SIZE = 32


def make_data(
    max_chars: int = 60_000,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int]:
    """(train windows, eval windows, vocabulary size) from the stdlib's source text."""
    text = gpt.load_stdlib_text(max_chars)
    tokenizer = gpt.CharTokenizer(text)
    train_ids, val_ids = gpt.split(tokenizer.encode(text), 0.1)
    return (
        gpt.CharDataset(train_ids, BLOCK_SIZE, stride=7),
        gpt.CharDataset(val_ids, BLOCK_SIZE, stride=BLOCK_SIZE),
        tokenizer.vocab_size,
    )


def main(
    strategy: str = "single",
    steps: int = 40,
    batch_size: int = 16,
    schedule: str = "1F1B",
    microbatches: int = 4,
    device: str | None = None,
    checkpoint_dir: str | None = None,
    save_model_to: str | None = None,
) -> lk.FitResult:
    train_data, eval_data, vocab_size = make_data()
    torch.manual_seed(0)  # every rank builds the same GPT, then keeps its stage's tensors
    model = gpt.GPT(vocab_size, BLOCK_SIZE, d_model=64, n_layers=4, n_heads=4)
    if strategy == "pipeline":
        # One model call's inputs (one micro-batch: batch_size / microbatches rows); only
        # shapes and dtypes count, so a meta tensor costs nothing.
        example = torch.zeros(
            batch_size // microbatches, BLOCK_SIZE, dtype=torch.long, device="meta"
        )
        chosen: object = Pipeline(
            {"blocks.2": "beginning"},
            example_inputs=(example,),
            schedule=schedule,
            n_microbatches=microbatches,
            device=device,
        )
    else:
        chosen = SingleDevice(device)
    result = lk.fit(
        model,
        train_data,
        loss_fn=gpt.loss_fn,  # written for one device; Pipeline runs it on the last stage
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01),
        schedule=lk.schedules.cosine(warmup_steps=min(10, steps // 4), total_steps=steps),
        strategy=chosen,
        batch_size=batch_size,  # a multiple of microbatches
        drop_last=True,
        clip=1.0,
        max_steps=steps,
        eval_data=eval_data,
        eval_batches=4,
        log_every=max(1, steps // 4),
        progress=False,
        checkpoint_dir=checkpoint_dir,
        save_every=steps if checkpoint_dir else None,
    )
    if save_model_to is not None:
        lk.save_model(result.state, save_model_to)  # every rank calls it (stages gather)
    if chosen.rank == 0:  # type: ignore[attr-defined]
        print(f"{chosen!r}: {result}")
        last = next(h for h in reversed(result.history) if "train/loss" in h)
        print(
            f"final train/loss {last['train/loss']:.5f} "
            f"eval/loss {result.history[-1].get('eval/loss', float('nan')):.5f}"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategy", choices=["single", "pipeline"], default="single")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--schedule", default="1F1B", help="GPipe, 1F1B, ... (docs/pipeline.md)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, cuda; default: cuda if available")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--save-model", default=None, help="directory for model.safetensors")
    args = parser.parse_args()
    main(
        args.strategy,
        args.steps,
        args.batch_size,
        args.schedule,
        args.microbatches,
        args.device,
        args.checkpoint_dir,
        args.save_model,
    )
