"""Cutting a model into pipeline stages by module name: checks, the plan, the stage trees.

An nn.Sequential (nested Sequentials flattened) is cut before (`'beginning'`) or after
(`'end'`) named modules; each stage is a Sequential tree of the original module objects
under their original names, so parameter names (and so checkpoints) stay those of the
unsplit model.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from torch import nn

SPLIT_SIDES = ("beginning", "end")


def split_side(name: str, value: object) -> str:
    side = getattr(value, "name", value)  # a torch SplitPoint enum member
    if isinstance(side, str) and side.lower() in SPLIT_SIDES:
        return side.lower()
    raise ValueError(
        f"Pipeline(split_points={{{name!r}: {value!r}}}): the side must be 'beginning' (a "
        "new stage starts at that module) or 'end' (a new stage starts after it), or a "
        "torch.distributed.pipelining.SplitPoint."
    )


def check_split_points(split_points: object) -> dict[str, str]:
    if isinstance(split_points, Mapping):
        items = list(split_points.items())
    elif isinstance(split_points, (list, tuple)):
        items = [(name, "beginning") for name in split_points]
    else:
        raise TypeError(
            f"Pipeline(split_points={split_points!r}): module names where new stages start, "
            "as a dict {'layers.4': 'beginning'} or a list ['layers.4'] (each a 'beginning')."
        )
    if not items:
        raise ValueError(
            "Pipeline(split_points=[]): give at least one split point, e.g. ['layers.4'] "
            "(two stages), or train with SingleDevice/DDP/FSDP."
        )
    checked: dict[str, str] = {}
    for name, side in items:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"Pipeline(split_points=...): {name!r} is not a module name such as 'layers.4'."
            )
        if name in checked:
            raise ValueError(f"Pipeline(split_points=...): {name!r} is given twice.")
        checked[name] = split_side(name, side)
    return checked


# ------------------------------------------------------------------ splitting a Sequential


def expands(module: nn.Module) -> bool:
    """Whether `module` is a plain nn.Sequential: its children run in order, nothing else."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def sequential_units(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], set[str]]:
    """The modules a plain nn.Sequential tree runs in order (nested Sequentials flattened).

    Returns (units as (path, module), the paths of the flattened Sequentials).
    """
    units: list[tuple[str, nn.Module]] = []
    containers: set[str] = set()

    def walk(seq: nn.Module, prefix: str) -> None:
        own = [n for n, _ in seq.named_parameters(recurse=False)]
        own += [n for n, _ in seq.named_buffers(recurse=False)]
        if own:
            raise ValueError(
                f"Pipeline(split_points=...): the Sequential {prefix.rstrip('.') or 'model'!r} "
                f"holds tensors of its own ({own}); only its children can be placed on stages."
            )
        for name, child in seq.named_children():
            path = f"{prefix}{name}"
            if expands(child):
                containers.add(path)
                walk(child, f"{path}.")
            else:
                units.append((path, child))

    walk(model, "")
    return units, containers


def plan_stages(model: nn.Module, split_points: Mapping[str, str]) -> list[list[str]]:
    """The unit paths of each stage, in order, cut at `split_points`.

    Raises:
        TypeError: the model is not a plain nn.Sequential.
        ValueError: a split point names no module, a module inside a unit, or leaves a
            stage empty.
    """
    shown = repr(dict(split_points))
    if not expands(model):
        raise TypeError(
            f"Pipeline(split_points={shown}): splitting by module name needs an nn.Sequential "
            f"(nested Sequentials are fine), whose children run one after another; "
            f"{type(model).__name__} has its own forward. Build the model as an "
            "nn.Sequential, or pass split_fn=... to build each stage yourself."
        )
    units, containers = sequential_units(model)
    paths = [p for p, _ in units]
    cuts: dict[int, str] = {}
    for name, side in split_points.items():
        inside = [i for i, p in enumerate(paths) if p == name or p.startswith(f"{name}.")]
        if name not in containers and name not in paths:
            known = [n for n, _ in model.named_modules() if n]
            owner = next((p for p in paths if name.startswith(f"{p}.")), None)
            if owner is not None and name in known:
                why = (
                    f"it is inside {owner!r} ({type(model.get_submodule(owner)).__name__}), "
                    "whose forward runs as one piece; split before or after "
                    f"{owner!r} instead"
                )
            else:
                close = difflib.get_close_matches(name, paths + sorted(containers), n=3)
                why = "no such module" + (f" (did you mean {close}?)" if close else "")
            raise ValueError(
                f"Pipeline(split_points={shown}): {name!r}: {why}. Split points name "
                f"modules the Sequential runs in order: {short_list(paths)}."
            )
        cut = inside[0] if side == "beginning" else inside[-1] + 1
        if cut in (0, len(paths)):
            raise ValueError(
                f"Pipeline(split_points={shown}): {name!r} at its {side} would leave the "
                f"{'first' if cut == 0 else 'last'} stage empty; name a module inside the model."
            )
        if cut in cuts:
            raise ValueError(
                f"Pipeline(split_points={shown}): {cuts[cut]!r} and {name!r} cut at the same "
                "place, which would leave a stage empty; drop one of them."
            )
        cuts[cut] = name
    bounds = [0, *sorted(cuts), len(paths)]
    return [paths[a:b] for a, b in zip(bounds, bounds[1:])]


def short_list(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def assemble(root: nn.Module, keep: Sequence[str]) -> nn.Sequential:
    """A Sequential tree of `root`'s units in `keep`, under their original names.

    The units are the same module objects (no copy), and the tree mirrors `root`'s nested
    Sequentials, so every parameter keeps its full name ("layers.4.fc.weight").
    """
    wanted = set(keep)

    def build(seq: nn.Module, prefix: str) -> nn.Sequential:
        out = nn.Sequential()
        for name, child in seq.named_children():
            path = f"{prefix}{name}"
            if expands(child):
                sub = build(child, f"{path}.")
                if len(sub):
                    out.add_module(name, sub)
            elif path in wanted:
                out.add_module(name, child)
        return out

    return build(root, "")


__all__ = [
    "SPLIT_SIDES",
    "assemble",
    "check_split_points",
    "expands",
    "plan_stages",
    "sequential_units",
    "short_list",
    "split_side",
]
