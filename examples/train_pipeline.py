"""Pipeline parallel training: the same fit() call, the model cut into stages over ranks.

    python examples/train_pipeline.py                                   # one process
    torchrun --nproc_per_node 2 examples/train_pipeline.py --strategy pipeline
    torchrun --nproc_per_node 2 examples/train_pipeline.py --strategy pipeline --schedule GPipe
    torchrun --nproc_per_node 4 examples/train_pipeline.py --strategy pipeline  # 2 x 2 (pp x dp)

A small causal transformer, written as an nn.Sequential so that Pipeline can cut it by
module name: `{"blocks.2": "beginning"}` puts the embeddings and blocks 0-1 on the first
stage, blocks 2-3, the final norm and the head on the second. Each schedule step cuts the
batch into `--microbatches` chunks that flow through the stages (1F1B by default). The
data is the synthetic language of examples/train_distributed.py: each token is the sum of
the two before it (mod the vocabulary), padded after a random length, so the loss counts a
different number of real tokens in every chunk and is still normalised exactly.

With 4 processes the two pipelines are data-parallel replicas (a ("pp", "dp") device
mesh); each replica reads its own share of the data.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
from torch import nn

import loopkit as lk
from loopkit.strategies import Pipeline, SingleDevice

VOCAB, SEQ = 16, 24


class Embed(nn.Module):
    """Token plus position embeddings: the first stage's entry point."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(SEQ, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


class Block(nn.Module):
    """Pre-norm transformer block: activations in, activations out, as a stage needs."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def tiny_gpt(d: int = 48, heads: int = 4, layers: int = 4) -> nn.Sequential:
    """The model as an nn.Sequential: its children run in order, so it splits by name."""
    return nn.Sequential(OrderedDict(
        embed=Embed(d),
        blocks=nn.Sequential(*(Block(d, heads) for _ in range(layers))),
        ln=nn.LayerNorm(d),
        head=nn.Linear(d, VOCAB),
    ))


def make_data(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Sequences where token t = (token t-1 + token t-2) % VOCAB, padded after a random length."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(n, SEQ + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    for t in range(2, SEQ + 1):
        seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % VOCAB
    targets = seq[:, 1:].clone()
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    targets[torch.arange(SEQ) >= lengths[:, None]] = -100  # padding: not counted
    return torch.utils.data.TensorDataset(seq[:, :-1], targets)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> lk.Loss:
    # Under Pipeline the first stage gets `tokens` (the model call's argument) and the
    # last stage computes this loss on each chunk's output: write it as for one device.
    tokens, targets = batch
    return lk.cross_entropy(model(tokens), targets)


def main(
    strategy: str = "single",
    steps: int = 40,
    batch_size: int = 16,
    accumulate: int = 2,
    schedule: str = "1F1B",
    microbatches: int = 4,
    device: str | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    save_model_to: str | None = None,
) -> lk.FitResult:
    torch.manual_seed(0)  # every rank builds the same initial weights, then keeps its stages
    if strategy == "pipeline":
        chosen: object = Pipeline({"blocks.2": "beginning"}, schedule=schedule,
                                  n_microbatches=microbatches, device=device)
    else:
        chosen = SingleDevice(device)
    result = lk.fit(
        tiny_gpt(),
        make_data(2048),
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
        schedule=lk.schedules.cosine(warmup_steps=min(10, steps // 4), total_steps=steps),
        strategy=chosen,
        batch_size=batch_size,  # per pipeline (data-parallel replica); a multiple of microbatches
        drop_last=True,  # every schedule step needs whole chunks
        accumulate=accumulate,
        clip=1.0,
        max_steps=steps,
        eval_data=make_data(128, seed=1),
        eval_every=steps // 2 if steps >= 4 else None,  # and once at the end
        log_every=max(1, steps // 4),
        progress=False,
        checkpoint_dir=checkpoint_dir,
        save_every=max(1, steps // 2) if checkpoint_dir else None,
        resume=resume,
    )
    if save_model_to is not None:
        lk.save_model(result.state, save_model_to)  # every rank calls it (stages gather)
    if chosen.rank == 0:  # type: ignore[attr-defined]
        print(f"{chosen!r}: {result}")
        last = next(h for h in reversed(result.history) if "train/loss" in h)
        print(f"final train/loss {last['train/loss']:.4f} "
              f"eval/loss {result.history[-1].get('eval/loss', float('nan')):.4f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["single", "pipeline"], default="single")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="per pipeline")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--schedule", default="1F1B",
                        help="GPipe, 1F1B, Interleaved1F1B, ... (see docs/pipeline.md)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, cuda; default: cuda if available")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save-model", default=None, help="directory for model.safetensors")
    args = parser.parse_args()
    main(args.strategy, args.steps, args.batch_size, args.accumulate, args.schedule,
         args.microbatches, args.device, args.checkpoint_dir, args.resume, args.save_model)
