"""Precision policies: fp32, bf16 autocast, fp16 autocast with dynamic loss scaling."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ._types import PrecisionName

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NO_AUTOCAST = contextlib.nullcontext()  # reusable: entering it does nothing


@dataclass(frozen=True, slots=True)
class Precision:
    """How the forward pass runs and how fp16 gradients are scaled.

    fp16 uses dynamic loss scaling: the scale and its growth tracker are tensors in the
    TrainState (`loss_scale`, `growth_tracker`), so they checkpoint and snapshot with it.
    A window whose gradients overflow skips its update, halves the scale and is counted in
    `TrainState.skipped_steps`; `growth_interval` clean windows in a row double it.

    Args:
        name: "fp32" (no autocast), "bf16" or "fp16" (autocast to that dtype).
        init_scale: first fp16 loss scale.
        growth_factor: scale multiplier after `growth_interval` clean windows.
        backoff_factor: scale multiplier after an overflow.
        growth_interval: clean windows between scale increases.
    """

    name: PrecisionName = "fp32"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise ValueError(
                f"Precision(name={self.name!r}): allowed values are 'fp32', 'bf16', 'fp16'. "
                "Use 'bf16' on hardware that supports it, 'fp16' with loss scaling otherwise."
            )
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(
                f"Precision(init_scale={self.init_scale!r}): must be a positive, finite float."
            )
        if not (math.isfinite(self.growth_factor) and self.growth_factor >= 1.0):
            raise ValueError(
                f"Precision(growth_factor={self.growth_factor!r}): must be a finite float >= 1."
            )
        if not (0.0 < self.backoff_factor < 1.0):
            raise ValueError(
                f"Precision(backoff_factor={self.backoff_factor!r}): must lie in (0, 1), e.g. 0.5."
            )
        if not (isinstance(self.growth_interval, int) and self.growth_interval >= 1):
            raise ValueError(
                f"Precision(growth_interval={self.growth_interval!r}): must be an int >= 1."
            )

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return _DTYPES[self.name]

    @property
    def scales_loss(self) -> bool:
        """Whether gradients are computed on a scaled loss (fp16)."""
        return self.name == "fp16"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        """Return the autocast context for a forward pass on `device`."""
        dtype = self.dtype
        if dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(device_type=device.type, dtype=dtype)

    def __repr__(self) -> str:
        return f"Precision({self.name!r})"


def as_precision(value: Precision | str) -> Precision:
    """Coerce a precision name or Precision record to a Precision."""
    if isinstance(value, Precision):
        return value
    if isinstance(value, str):
        return Precision(value)  # type: ignore[arg-type]
    raise TypeError(
        f"precision={value!r}: expected 'fp32', 'bf16', 'fp16' or a loopkit.Precision, "
        f"got {type(value).__name__}."
    )


def set_tf32(enabled: bool = True) -> None:
    """Allow (or forbid) TF32 matmuls and convolutions on CUDA: faster fp32, ~10-bit mantissa."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


__all__ = [
    "Precision",
    "PrecisionName",
    "as_precision",
    "set_tf32",
]
