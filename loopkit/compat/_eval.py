"""Evaluation helpers of the Trainer façade: predictions out of model outputs, gathered."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

PAD_INDEX = -100  # what HF pads predictions and labels of different lengths with


def logits_of(
    outputs: Any, has_loss: bool, ignore_keys: Sequence[str] = ()
) -> tuple[torch.Tensor, ...]:
    """The prediction tensors in a model's outputs, as HF's prediction_step picks them.

    A dict (or ModelOutput): every value but "loss" and `ignore_keys`; a tuple/list: all
    but the first element when it is the loss; an object: `.logits`, else its tensor
    fields but `.loss`; a tensor: itself.
    """
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    if isinstance(outputs, Mapping):
        return tuple(
            v
            for k, v in outputs.items()
            if k != "loss" and k not in ignore_keys and isinstance(v, torch.Tensor)
        )
    if isinstance(outputs, (tuple, list)):
        values = outputs[1:] if has_loss else outputs
        return tuple(v for v in values if isinstance(v, torch.Tensor))
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return (logits,)
    if dataclasses.is_dataclass(outputs):
        return tuple(
            getattr(outputs, f.name)
            for f in dataclasses.fields(outputs)
            if f.name != "loss" and isinstance(getattr(outputs, f.name), torch.Tensor)
        )
    raise TypeError(
        f"Trainer.evaluate: cannot find predictions in the model's output "
        f"({type(outputs).__name__}); return a tensor, a dict, a tuple or an object with "
        "`.logits`."
    )


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16; HF converts the same way
    return tensor.cpu().numpy()


def pad_concat(arrays: Sequence[np.ndarray], pad: int = PAD_INDEX) -> np.ndarray:
    """Concatenate along dim 0, padding the other dims to the largest size with `pad`."""
    if not arrays:
        return np.zeros((0,))
    if all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    ndim = arrays[0].ndim
    shape = [sum(a.shape[0] for a in arrays)] + [
        max(a.shape[d] for a in arrays) for d in range(1, ndim)
    ]
    out = np.full(shape, pad, dtype=np.result_type(*[a.dtype for a in arrays]))
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]),) + tuple(slice(0, s) for s in a.shape[1:])] = a
        row += a.shape[0]
    return out


class Collect:
    """A loopkit Metric that keeps every batch's predictions and labels (on device).

    evaluate() calls update(outputs, batch) once per batch; its compute() is a placeholder
    (the Trainer pops it). Nothing is summed across ranks: `gather` does that afterwards.
    """

    def __init__(
        self, label_of: Any, preprocess: Any, ignore_keys: Sequence[str], has_loss: bool
    ) -> None:
        self.label_of = label_of
        self.preprocess = preprocess
        self.ignore_keys = tuple(ignore_keys)
        self.has_loss = has_loss
        self.predictions: list[tuple[torch.Tensor, ...]] = []
        self.labels: list[tuple[torch.Tensor, ...]] = []

    def reset(self) -> None:
        self.predictions, self.labels = [], []

    def update(self, outputs: Any, batch: Any) -> None:
        logits: Any = logits_of(outputs, self.has_loss, self.ignore_keys)
        labels = self.label_of(batch)
        if self.preprocess is not None:
            joined = logits[0] if len(logits) == 1 else logits
            joined = self.preprocess(joined, labels[0] if len(labels) == 1 else labels)
            logits = (joined,) if isinstance(joined, torch.Tensor) else tuple(joined)
        self.predictions.append(tuple(t.detach() for t in logits))
        self.labels.append(tuple(t.detach() for t in labels))

    def compute(self) -> float:
        return 0.0

    def state_tensors(self) -> list[torch.Tensor]:
        return []


def stack(parts: list[tuple[torch.Tensor, ...]]) -> list[np.ndarray]:
    """Per output position, the batches concatenated (padded) as numpy arrays."""
    if not parts:
        return []
    return [pad_concat([to_numpy(p[i]) for p in parts]) for i in range(len(parts[0]))]


def gather(arrays: list[np.ndarray], strategy: Any, n_items: int | None) -> list[np.ndarray]:
    """Every rank's arrays in dataset order, truncated to `n_items` (one process: as is).

    The eval loader's DistributedSampler deals item i to rank i % world_size (after padding
    the dataset to a multiple of it), so rank r's j-th row is item j * world_size + r.
    """
    world = int(getattr(strategy, "world_size", 1))
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        device = torch.device(getattr(strategy, "device", "cpu"))
        arrays = [_all_gather_interleaved(a, world, device) for a in arrays]
    if n_items is not None:
        arrays = [a[:n_items] for a in arrays]
    return arrays


def _all_gather_interleaved(array: np.ndarray, world: int, device: torch.device) -> np.ndarray:
    dist = torch.distributed
    shape = torch.tensor(array.shape, dtype=torch.int64, device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    sizes = torch.stack(shapes).cpu()
    biggest = sizes.max(dim=0).values.tolist()
    padded = np.full(biggest, PAD_INDEX, dtype=array.dtype)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    local = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    rows = [p.cpu().numpy()[: int(sizes[r, 0])] for r, p in enumerate(parts)]
    per_rank = max(r.shape[0] for r in rows)
    out = np.full([per_rank * world] + biggest[1:], PAD_INDEX, dtype=array.dtype)
    for r, part in enumerate(rows):
        out[r : r + world * part.shape[0] : world] = part
    return out
