"""zero_nonfinite(): keep NaN and inf gradients out of the weights, with no host sync.

`skip_nonfinite()` drops a bad update, which needs the host to know that it is bad (one
sync per optimizer step). `zero_nonfinite()` decides on the device instead: when the
closed window's gradients are not all finite it zeroes them, so the optimizer step that
follows applies a zero gradient (the weights stay finite; a stateful optimizer still
moves them by its momentum and weight decay), and it records the step's flag as
`metrics["train/nonfinite"]` (a 0-dim bool device tensor, logged as 1.0 when the gradients
were zeroed). fit's non-finite watch reads that flag where fit syncs anyway and raises
(nonfinite="raise").

The decision is the same on every rank when it reads gradients or a norm that are the
same on every rank: after a data-parallel window's gradient all-reduce, a NaN or inf from
any rank's loss is in every rank's gradients. With `clip` before it, the guard reads the
global norm clip recorded (global across DDP replicas, FSDP shards and pipeline stages).
Without `clip`, it takes the max-abs norm of this rank's gradients: the same on every
DDP rank (their gradients are identical after the sync); under FSDP or Pipeline each rank
then decides for its own shard or stage (its weights stay finite either way).

Cost, every step: with `clip` before it, two tiny ops on clip's norm (isfinite, not);
without, a foreach max-abs norm over the gradients, a stack and a max first (five ops).
Then one in-place `masked_fill_` per gradient tensor (torch has no foreach `where`), which
reads and writes every gradient once. No host sync, no collective. Measured in
docs/distributed.md ("A NaN on one rank").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._types import Batch, Transform
from .state import TrainState, apply_staged

NONFINITE_METRIC = "train/nonfinite"
"""The metric `zero_nonfinite()` records each closed window: True (logged as 1.0) if it
zeroed the window's gradients for being NaN or infinite (a 0-dim bool device tensor)."""

_NORM = "train/grad_norm"  # what clip() records


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded, DTensor) tensor, sharing its storage."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _is_bad(norm: Any, grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-dim bool device tensor: whether the gradients (or the recorded norm) are not finite."""
    if isinstance(norm, torch.Tensor):
        return ~torch.isfinite(norm.reshape(()))  # clip's global norm: the same on every rank
    grads = [g for g in grads if g.numel()]  # an empty FSDP shard (dim 0 < ranks) has no norm
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    # Each gradient's max-abs norm (one foreach kernel): NaN and inf propagate through it,
    # and, unlike a 2-norm, it cannot overflow from finite values.
    norms = torch._foreach_norm(grads, float("inf"))
    return ~torch.isfinite(
        torch.stack([n if n.device == device else n.to(device) for n in norms]).max()
    )


@dataclass(frozen=True, slots=True)
class _ZeroNonfinite:
    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        return apply_staged(self, state, batch)

    def _changes(self, state: TrainState, batch: Batch, /) -> dict[str, Any] | None:
        window = state.window
        # found_inf: fp16's overflow check (or skip_nonfinite) already drops a bad update.
        if not window.closed or window.found_inf is not None:
            return None
        grads = [_local(p.grad) for p in state.params if p.grad is not None]
        bad = _is_bad(state.metrics.get(_NORM), grads, state.strategy.device)
        masks: dict[torch.device, torch.Tensor] = {bad.device: bad}
        for grad in grads:  # one small kernel per gradient; no sync
            mask = masks.get(grad.device)
            if mask is None:  # gradients on another device (CPU offload): one copy each
                mask = masks[grad.device] = bad.to(grad.device)
            grad.masked_fill_(mask, 0.0)
        return {"metrics": {**state.metrics, NONFINITE_METRIC: bad}}

    def __repr__(self) -> str:
        return "zero_nonfinite()"


def zero_nonfinite() -> Transform:
    """Zero a closed window's gradients on the device when they are NaN or infinite.

    Put it after `accumulate` and `clip` (it then reads clip's global gradient norm) and
    before `optimizer_step`. It records `metrics["train/nonfinite"]` (True when it zeroed
    the gradients); fit(nonfinite="raise") reads that at log and save steps and raises.
    Unlike `skip_nonfinite()` it costs no host sync: the optimizer still steps, with zero
    gradients. Open windows, and windows whose update fp16 (or `skip_nonfinite`) already
    drops, pass through.

    Example:
        >>> import loopkit as lk
        >>> step = lk.chain(lk.forward(lambda m, b: m(b).mean()), lk.accumulate(1),
        ...                 lk.clip(1.0), lk.zero_nonfinite(), lk.optimizer_step())
    """
    return _ZeroNonfinite()


__all__ = ["NONFINITE_METRIC", "zero_nonfinite"]
