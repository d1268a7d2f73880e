"""One training script for one process, DDP and FSDP: only `strategy=` changes.

    python examples/train_distributed.py                                      # one process
    torchrun --nproc_per_node 2 examples/train_distributed.py --strategy ddp
    torchrun --nproc_per_node 2 examples/train_distributed.py --strategy fsdp
    srun --ntasks 2 python examples/train_distributed.py --strategy fsdp      # SLURM

A small causal transformer learns a synthetic language (each token is the sum of the two
before it, modulo the vocabulary) from padded sequences of random lengths, so every rank
counts a different number of real tokens. fit() gives each rank its share of the data
(DistributedSampler), normalises every step by the tokens of all ranks, logs the global
loss from rank 0, and writes checkpoints (sharded under FSDP) that `--resume` continues
from, at any number of processes. On CPU the processes talk over gloo; on GPUs over nccl.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import loopkit as lk
from loopkit.strategies import DDP, FSDP, SingleDevice

VOCAB, SEQ = 16, 24


class Block(nn.Module):
    """Pre-norm transformer block; FSDP shards each one separately (they sit in a ModuleList)."""

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


class TinyGPT(nn.Module):
    def __init__(self, d: int = 48, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


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
    tokens, targets = batch
    return lk.cross_entropy(model(tokens), targets)  # (sum over real tokens, their count)


def make_strategy(name: str, device: str | None, precision: str) -> object:
    if name == "ddp":
        return DDP(device)
    if name == "fsdp":
        # bf16 compute with fp32 gradient reduction; the optimizer keeps fp32 weights.
        bf16 = precision == "bf16"
        return FSDP(device, param_dtype=torch.bfloat16 if bf16 else None,
                    reduce_dtype=torch.float32 if bf16 else None)
    return SingleDevice(device)


def main(
    strategy: str = "single",
    steps: int = 60,
    batch_size: int = 16,
    accumulate: int = 2,
    device: str | None = None,
    precision: str = "fp32",
    checkpoint_dir: str | None = None,
    resume: bool = False,
    save_model_to: str | None = None,
) -> lk.FitResult:
    torch.manual_seed(0)  # every rank builds the same initial weights
    chosen = make_strategy(strategy, device, precision)
    fsdp_bf16 = strategy == "fsdp" and precision == "bf16"
    result = lk.fit(
        TinyGPT(),
        make_data(4096),
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
        schedule=lk.schedules.cosine(warmup_steps=min(10, steps // 4), total_steps=steps),
        strategy=chosen,
        precision="fp32" if fsdp_bf16 else precision,  # FSDP casts itself (param_dtype)
        batch_size=batch_size,  # per rank
        accumulate=accumulate,
        clip=1.0,
        max_steps=steps,
        eval_data=make_data(256, seed=1),
        eval_every=steps // 2 if steps >= 4 else None,  # and once at the end
        log_every=max(1, steps // 6),
        progress=False,
        checkpoint_dir=checkpoint_dir,
        save_every=max(1, steps // 3) if checkpoint_dir else None,
        resume=resume,
    )
    if save_model_to is not None:
        lk.save_model(result.state, save_model_to)  # every rank calls it (FSDP gathers)
    if chosen.rank == 0:  # type: ignore[attr-defined]
        print(f"{chosen!r}: {result}")
        last = next(h for h in reversed(result.history) if "train/loss" in h)
        print(f"final train/loss {last['train/loss']:.4f} "
              f"eval/loss {result.history[-1].get('eval/loss', float('nan')):.4f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu, cuda; default: cuda if available")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save-model", default=None, help="directory for model.safetensors")
    args = parser.parse_args()
    main(args.strategy, args.steps, args.batch_size, args.accumulate, args.device,
         args.precision, args.checkpoint_dir, args.resume, args.save_model)
