"""Per-micro-step randomness derived from (seed, step, micro_step, rank)."""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def micro_step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """A 63-bit seed that depends on every argument and on nothing else.

    Each part is folded in with a multiply by a large odd constant and an xor-shift (the
    steps of splitmix64), so nearby (step, micro_step) pairs give unrelated seeds.
    """
    value = ((seed & _MASK) * 0x9E3779B97F4A7C15 + step) & _MASK
    value = ((value ^ (value >> 29)) * 0xBF58476D1CE4E5B9 + micro_step) & _MASK
    value = ((value ^ (value >> 31)) * 0x94D049BB133111EB + rank) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    return (value ^ (value >> 31)) >> 1


# device -> device.type: reading `torch.device.type` builds a new str each time (~3k
# instructions, half of seeding the CPU generator); a dict lookup costs ~10x less.
_KINDS: dict[torch.device, str] = {}


def seed_devices_(seed: int, device: torch.device) -> None:
    """Seed the default generators that ops on `device` draw from (dropout, rand).

    Seeding the generators directly costs about a microsecond; `torch.manual_seed` costs
    ~100x more because it visits every backend.
    """
    torch.default_generator.manual_seed(seed)
    kind = _KINDS.get(device)
    if kind is None:
        kind = _KINDS.setdefault(device, device.type)
    if kind == "cpu":
        return
    if kind == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.default_generators[index].manual_seed(seed)
    elif kind == "mps":
        torch.mps.manual_seed(seed)
