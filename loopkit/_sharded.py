"""Sharded model and optimizer state: torch.distributed.checkpoint over safetensors files.

Used by checkpoint.py for strategies whose ranks each hold part of the state (FSDP). Each
rank writes its own shards with DCP's `HuggingFaceStorageWriter(save_distributed=True)`:
one safetensors file per rank whose JSON header records each shard's offset in the full
tensor. Reading goes through `HuggingFaceStorageReader`, which builds DCP's metadata from
those headers alone, so a checkpoint loads at any world size (DCP reshards) and nothing
is unpickled: DCP's default format keeps its metadata in a pickled `.metadata` file, this
one has none.

The tensors are addressed by their path in `{"model": ..., "optimizer": ...}` as
torch.distributed.checkpoint.state_dict returns them (parameter names, not indices), and
the non-tensor rest (param groups, hyperparameters) goes to the checkpoint's JSON.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import _tree

_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def has_dtensors(module: torch.nn.Module) -> bool:
    """Whether `module`'s parameters are DTensors (sharded by FSDP or tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, with_optimizer: bool
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not with_optimizer:
        return {"model": get_model_state_dict(model), "optimizer": None}
    # get_state_dict fills an empty optimizer's state with one zero-lr step first, so
    # callers only ask for the optimizer when it has state (or when loading into it).
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


@contextlib.contextmanager
def _quiet_no_dist(collective: bool) -> Iterator[None]:
    if collective:
        yield  # no catch_warnings: it would reset the "once" registry of every warning
        return
    # DCP warns when it runs without a process group; one process is what we asked for.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
        yield


def write_shards(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    *,
    collective: bool,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """Write this rank's shards of the model and optimizer state into `directory`.

    A collective when `collective` (every rank of the default process group must call
    it); otherwise DCP runs without a process group. Returns the JSON-able
    skeleton of the state (the same on every rank): tensors appear as references to the
    shard files' keys. `extra` adds more (D)Tensors by name beside "model" and
    "optimizer" (the weight averages: {"averages": {"ema": {name: tensor}}}).
    """
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    tree = _state_dicts(model, optimizer, with_optimizer=bool(optimizer.state))
    tree.update(extra or {})
    skeleton, tensors = _tree.split(tree, by_path=True)
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)
    with _quiet_no_dist(collective):
        save(tensors, storage_writer=writer, no_dist=not collective)
    if collective and torch.distributed.get_world_size() > 1:
        # Ranks that hold different parts of the model (pipeline stages) have different
        # skeletons: the checkpoint's is their union, the skeleton of the whole model. Ranks
        # that shard every tensor (FSDP) have the same one, which the union leaves as is.
        skeleton = merge_skeletons(_all_gather_json(skeleton))
    return skeleton


def _all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-able `value`, gathered as JSON bytes (no pickle on the wire)."""
    import json

    dist = torch.distributed
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [
        json.loads(bytes(g[: int(n)].cpu().tolist()).decode())
        for g, n in zip(gathered, sizes, strict=True)
    ]


def merge_skeletons(skeletons: list[Any]) -> Any:
    """The union of several ranks' skeletons: dicts by key, name lists in order.

    Raises:
        ValueError: two ranks disagree on a value both hold (a hyperparameter, say).
    """

    def merge(a: Any, b: Any, path: str) -> Any:
        if a == b or b is None:
            return a
        if a is None:
            return b
        if isinstance(a, dict) and isinstance(b, dict):
            out = dict(a)
            for key, value in b.items():
                out[key] = merge(a[key], value, f"{path}.{key}") if key in a else value
            return out
        if isinstance(a, list) and isinstance(b, list):
            if all(isinstance(x, str) for x in (*a, *b)):  # parameter names of a group
                return a + [x for x in b if x not in a]
            if len(a) == len(b):
                return [merge(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
        raise ValueError(f"the ranks' states disagree at {path or 'the root'}: {a!r} and {b!r}.")

    merged = skeletons[0]
    for other in skeletons[1:]:
        merged = merge(merged, other, "")
    return merged


def _restrict(saved: Any, own: Any, path: str) -> Any:
    """The part of the merged skeleton `saved` that this rank's own skeleton `own` has.

    Raises:
        ValueError: this rank holds something the saved state lacks.
    """
    if isinstance(own, dict) and isinstance(saved, dict) and _tree.TENSOR not in own:
        out = {k: _restrict(saved[k], own[k], f"{path}.{k}") if k in saved else own[k] for k in own}
        # Saved values this rank lacks: tensors belong to other ranks (their parameter
        # names); plain values (a hyperparameter) are kept, as the saved state has them.
        out.update(
            {k: v for k, v in saved.items() if k not in own and next(_tensor_keys(v), None) is None}
        )
        return out
    if isinstance(own, list) and isinstance(saved, list):
        if own and all(isinstance(x, str) for x in (*own, *saved)):
            missing = [x for x in own if x not in saved]
            if missing:
                raise ValueError(
                    f"the saved {path} lacks {missing[:10]}: the checkpoint's optimizer "
                    "grouped the parameters differently"
                )
            return list(own)
        if len(own) != len(saved):
            raise ValueError(
                f"{path}: the checkpoint has {len(saved)} entries, this run {len(own)} (the "
                "optimizer's param groups?); build the optimizer over the same groups"
            )
        return [_restrict(s, o, f"{path}[{i}]") for i, (s, o) in enumerate(zip(saved, own))]
    return saved


def _tensor_keys(skeleton: Any) -> Iterator[str]:
    if isinstance(skeleton, list):
        for value in skeleton:
            yield from _tensor_keys(value)
    elif isinstance(skeleton, dict):
        if _tree.TENSOR in skeleton:
            yield skeleton[_tree.TENSOR]
        else:
            for value in skeleton.values():
                yield from _tensor_keys(value)


def read_shards(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    skeleton: Any,
    *,
    collective: bool,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Load sharded state written by `write_shards` (at any world size) into model/optimizer.

    `extra` holds the tensors of write_shards' `extra`, allocated by the caller (sharded
    like the saved ones were, or not): they are loaded in place.

    Raises:
        ValueError: the checkpoint's tensors do not fit (missing, unexpected, or of another
            shape), naming both sides.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if not (isinstance(skeleton, dict) and "model" in skeleton and "optimizer" in skeleton):
        raise ValueError("the sharded state's skeleton lacks 'model' or 'optimizer'.")
    with_optimizer = skeleton["optimizer"] is not None
    own, targets = _tree.split(
        {**_state_dicts(model, optimizer, with_optimizer), **(extra or {})}, by_path=True
    )
    reader = HuggingFaceStorageReader(str(directory))
    stored = reader.read_metadata().state_dict_metadata
    expected = set(_tensor_keys(skeleton))
    problems = []
    missing = sorted(set(targets) - set(stored))
    # Tensors another rank loads (a pipeline's other stages) are expected here too.
    claimed = set(targets)
    if collective and torch.distributed.get_world_size() > 1:
        claimed = {k for keys in _all_gather_json(sorted(targets)) for k in keys}
    unexpected = sorted(set(stored) - claimed)
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint: {unexpected[:10]}")
    shapes = [
        f"{k}: checkpoint {tuple(stored[k].size)}, here {tuple(targets[k].shape)}"  # type: ignore[union-attr]
        for k in sorted(set(targets) & set(stored))
        if tuple(stored[k].size) != tuple(targets[k].shape)  # type: ignore[union-attr]
    ]
    if shapes:
        problems.append(f"shape mismatches: {shapes[:10]}")
    if expected != set(stored):
        problems.append("state.json and the shard files list different tensors")
    if problems:
        raise ValueError("the sharded state does not fit; " + "; ".join(problems) + ".")
    with _quiet_no_dist(collective):
        load(targets, storage_reader=reader, no_dist=not collective)
    # The skeleton brings the saved hyperparameters (lr, betas, ...); the tensors were
    # loaded in place into this run's (differently sharded) tensors. A rank that holds
    # part of the model (a pipeline stage) takes its part of the whole model's skeleton.
    try:
        mine = _restrict(skeleton, own, "")
    except ValueError as error:
        raise ValueError(f"the sharded state does not fit; {error}.") from error
    tree = _tree.join(mine, targets)
    if with_optimizer:
        set_state_dict(
            model, optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optimizer"]
        )
    else:
        set_model_state_dict(model, tree["model"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state_dict gathered to rank 0's CPU memory ({} on other ranks).

    A collective: every rank must call it. Peak memory on rank 0: the full model once.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)  # type: ignore[return-value]


__all__ = ["full_model_state", "has_dtensors", "merge_skeletons", "read_shards", "write_shards"]
