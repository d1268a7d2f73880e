"""Helpers the checks share: cutting batches, building records, running windows, RNG guards."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._batch import first_tensor
from ..checkpoint import unwrap
from ..compose import chain, identity
from ..precision import Precision
from ..state import TrainState
from ..strategies import SingleDevice
from ..transforms import accumulate, clip, forward, optimizer_step

MakeModel = Callable[[], torch.nn.Module]
MakeStep = Callable[[int], Any]


@dataclass(frozen=True)
class default_optimizer:  # noqa: N801 - a factory reads like a function
    """The checks' default optimizer factory: SGD with momentum.

    SGD carries a gradient error into the parameters linearly (Adam would normalise a tiny
    error on a near-zero gradient up to the size of an update), so tight tolerances hold.
    """

    lr: float = 0.05
    momentum: float = 0.9

    def __call__(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


@dataclass(frozen=True)
class default_step:  # noqa: N801
    """`make_step` for loopkit's standard chain: `k -> chain(forward, accumulate(k), [clip],
    optimizer_step())`. A frozen record, so it prints and pickles."""

    loss_fn: Any
    max_norm: float | None = None

    def __call__(self, k: int) -> Any:
        return chain(
            forward(self.loss_fn),
            accumulate(k),
            clip(self.max_norm) if self.max_norm is not None else identity(),
            optimizer_step(),
        )


def name_of(obj: object) -> str:
    """A short, readable name for a user piece (function, factory record, class)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return repr(obj)
    return getattr(obj, "__qualname__", None) or repr(obj)


# --- batches ------------------------------------------------------------------------------


def as_batch_list(batches: Any, where: str) -> list[Any]:
    """A list is one batch per step; anything else (tuple, dict, tensor) is one batch."""
    if isinstance(batches, list):
        if not batches:
            raise ValueError(f"{where}(batches=[]): pass at least one batch.")
        return list(batches)
    if batches is None:
        raise ValueError(f"{where}(batches=None): pass a batch or a list of batches.")
    return [batches]


def leading_size(batch: Any, where: str) -> int:
    tensor = first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            f"{where}: the batch ({type(batch).__name__}) holds no tensor with a batch "
            "dimension; expected a tensor, or a dict / tuple / list / dataclass of tensors."
        )
    return int(tensor.shape[0])


def split_batch(batch: Any, sizes: Sequence[int], where: str) -> list[Any]:
    """Cut every tensor of `batch` along dim 0 into pieces of `sizes` (0-d ones are shared).

    Raises:
        ValueError: sizes do not sum to the batch size, or a tensor has another length.
    """
    total = leading_size(batch, where)
    sizes = [int(s) for s in sizes]
    if sum(sizes) != total or any(s < 1 for s in sizes):
        raise ValueError(
            f"{where}: split {sizes} must be sizes >= 1 summing to the batch size {total}."
        )

    def cut(node: Any, path: str) -> list[Any]:
        if isinstance(node, torch.Tensor):
            if node.ndim == 0:
                return [node] * len(sizes)
            if node.shape[0] != total:
                raise ValueError(
                    f"{where}: batch{path} has leading size {node.shape[0]}, the batch has "
                    f"{total}; every tensor must share the batch dimension to be split."
                )
            return list(node.split(sizes))
        if isinstance(node, Mapping):
            parts = {k: cut(v, f"{path}[{k!r}]") for k, v in node.items()}
            return [type(node)({k: v[i] for k, v in parts.items()}) for i in range(len(sizes))]  # type: ignore[call-arg]
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            cols = [cut(v, f"{path}.{f}") for f, v in zip(node._fields, node, strict=True)]
            return [type(node)(*(c[i] for c in cols)) for i in range(len(sizes))]
        if isinstance(node, (list, tuple)):
            cols = [cut(v, f"{path}[{j}]") for j, v in enumerate(node)]
            return [type(node)(c[i] for c in cols) for i in range(len(sizes))]
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            fields = [f.name for f in dataclasses.fields(node) if f.init]
            by_field = {f: cut(getattr(node, f), f"{path}.{f}") for f in fields}
            return [
                dataclasses.replace(node, **{f: c[i] for f, c in by_field.items()})
                for i in range(len(sizes))
            ]
        return [node] * len(sizes)

    return cut(batch, "")


def describe_batches(batches: Sequence[Any]) -> str:
    """'<2 batches of 8 items: dict(tokens=(8, 5) int64, ...)>' for reproduction messages."""

    def shape(node: Any) -> str:
        if isinstance(node, torch.Tensor):
            return f"{tuple(node.shape)} {str(node.dtype).replace('torch.', '')}"
        if isinstance(node, Mapping):
            return "dict(" + ", ".join(f"{k}={shape(v)}" for k, v in node.items()) + ")"
        if isinstance(node, (list, tuple)):
            return f"{type(node).__name__}(" + ", ".join(shape(v) for v in node) + ")"
        return type(node).__name__

    first = batches[0]
    size = first_tensor(first)
    items = f" of {size.shape[0]} items" if size is not None and size.ndim else ""
    plural = "batch" if len(batches) == 1 else "batches"
    return f"<{len(batches)} {plural}{items}: {shape(first)}>"


# --- records ------------------------------------------------------------------------------


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_same_init(make_model: MakeModel, where: str) -> None:
    """Fail (ValueError) unless two calls of make_model give bitwise-identical models."""
    if not callable(make_model):
        raise TypeError(
            f"{where}(make_model={make_model!r}): expected a factory `make_model() -> "
            "nn.Module` that returns a fresh, identical model on every call."
        )
    a, b = make_model(), make_model()
    if not isinstance(a, torch.nn.Module):
        raise TypeError(f"{where}: make_model() returned {type(a).__name__}, not an nn.Module.")
    if a is b:
        raise ValueError(
            f"{where}(make_model=...): two calls returned the same module object; the checks "
            "train several copies side by side, so make_model must build a new one per call."
        )
    sa, sb = a.state_dict(), b.state_dict()
    for name, value in sa.items():
        other = sb.get(name)
        if other is None or other.shape != value.shape or not torch.equal(value, other):
            raise ValueError(
                f"{where}(make_model={name_of(make_model)}): two calls returned models with "
                f"different initial weights (first at {name!r}). Seed inside the factory, e.g. "
                "`torch.manual_seed(0)` before building (or loopkit.testing.strategies."
                "MLPFactory), so every run starts from the same weights."
            )


def build_state(
    make_model: MakeModel,
    *,
    optimizer: Any,
    precision: Precision | str,
    schedule: Any,
    seed: int,
    device: str | torch.device,
    strategy: Any = None,
) -> TrainState:
    return TrainState.create(
        make_model(),
        optimizer=optimizer,
        precision=precision,
        schedule=schedule,
        seed=seed,
        strategy=strategy if strategy is not None else SingleDevice(device),
    )


def resolve_step(make_step: MakeStep | None, loss_fn: Any, k: int, where: str) -> Any:
    maker = make_step if make_step is not None else default_step(loss_fn)
    step = maker(k)
    if not callable(step):
        raise TypeError(
            f"{where}(make_step={name_of(maker)}): make_step({k}) returned {step!r}; it must "
            "return a transform, e.g. `lambda k: lk.chain(lk.forward(loss_fn), "
            "lk.accumulate(k), lk.optimizer_step())`."
        )
    return step


def run_window(
    state: TrainState, step: Any, micro_batches: Sequence[Any], where: str
) -> TrainState:
    """Apply `step` to every micro-batch of one window; check that it closed the window."""
    before = state.step
    for micro_batch in micro_batches:
        state = step(state, micro_batch)
    if state.step != before + 1 or state.micro_step != 0:
        raise AssertionError(
            f"{where}: after the {len(micro_batches)} micro-batch(es) of window {before}, the "
            f"record is at step {state.step}, micro_step {state.micro_step}; expected step "
            f"{before + 1}, micro_step 0. Does make_step(k) build a chain with accumulate(k) "
            "and optimizer_step() for the k it is given?"
        )
    return state


def params_tree(state: TrainState) -> dict[str, Any]:
    """Detached copies of the named parameters plus the closed window's train/loss."""
    module = unwrap(state.model)
    tree: dict[str, Any] = {"model": {n: p.detach().clone() for n, p in module.named_parameters()}}
    loss = state.metrics.get("train/loss")
    if isinstance(loss, torch.Tensor):
        tree["metrics"] = {"train/loss": loss.detach().clone()}
    return tree


def clone_tree(tree: Any) -> Any:
    """A copy of a nested structure with every tensor detached and cloned."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [clone_tree(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone_tree(v) for v in tree)
    return tree


# --- randomness ---------------------------------------------------------------------------


@contextlib.contextmanager
def global_rng_guard() -> Iterator[None]:
    """Restore torch's, Python's and numpy's global generators on exit."""
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py_state = random.getstate()
    np_state = _numpy_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        if np_state is not None:
            import numpy as np

            np.random.set_state(np_state)


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    return np.random.get_state()


def seed_globals(value: int) -> None:
    """Seed torch's (all devices), Python's and numpy's global generators with `value`."""
    torch.manual_seed(value)
    random.seed(value)
    try:
        import numpy as np

        np.random.seed(value % 2**32)
    except ImportError:  # pragma: no cover
        pass


def reproduce(call: str, **values: Any) -> str:
    """'Reproduce: call(make_model, loss_fn, a=1, ...)' for failure messages."""
    args = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
    return f"Reproduce: {call}(make_model, loss_fn, {args})"
