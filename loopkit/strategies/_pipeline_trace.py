"""Cutting a model that is not an nn.Sequential into pipeline stages by tracing.

`torch.distributed.pipelining.pipeline(module, mb_args, split_spec=...)` traces the model
with `torch.export` and cuts the graph where the named modules start (SplitPoint.BEGINNING)
or end (SplitPoint.END). loopkit traces a *skeleton* of the model (the same modules, every
parameter and buffer on the meta device: no memory, no compute), then gives each stage
graph this rank's real tensors by name. The stage graphs keep the original qualified names
(`blocks.2.attn.qkv.weight`), so a rank's tensors live in a plain module tree under those
names (`holder`): checkpoints and `save_model` files load into the unsplit model.

Two traces matter:

- at setup, from the user's `example_inputs`: which tensors each stage uses, so each rank
  keeps (and builds its optimizer over) its stages' tensors before any batch is seen;
- per micro-batch shape and train/eval mode, from the real batch: torch.export
  specialises shapes (a reshape to `[4, 16, 3, 4, 8]` is baked into the graph), so a
  new shape is traced again; the new graphs use the same tensors.

A pipeline stage receives only what the stage before it sends, so an activation that a
later stage reads (a residual from two stages back) travels through the stages in between
(`Plan`). An input of the model that a later stage reads (the labels of a loss computed in
forward, a mask) does not travel: every rank has the batch and reads it (`Feed`).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._pipeline_split import short_list

Key = tuple[str, int, int | None]
"""A value a stage reads or passes on: ("in", leaf index, None) for an input of the model,
("out", stage, output index or None for a single output) for a stage's output, and ID,
the micro-batch's index."""

ID: Key = ("id", 0, None)

WAYS_OUT = (
    "Two ways out: write the model as an nn.Sequential whose children run in order (wrap "
    "the steps between modules in small modules), which Pipeline cuts by module name "
    "without tracing; or pass split_fn=lambda model, stage_index, n_stages: ... to build "
    "each stage yourself."
)


def check_example_inputs(value: object) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Pipeline(example_inputs=...) as (positional args, keyword args), or None.

    Raises:
        TypeError: not a tensor, a tuple/list of the model's positional inputs, or a dict
            of its keyword inputs.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return (), dict(value)
    raise TypeError(
        f"Pipeline(example_inputs={value!r}): expected the inputs of one model call, as a "
        "tensor, a tuple of positional inputs such as (torch.zeros(4, 64, dtype=torch.long),) "
        "or a dict of keyword inputs; only their shapes and dtypes are used (meta tensors "
        "are fine)."
    )


def bind(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """The model's inputs as one positional tuple, defaults filled in, by its forward's
    signature: the first stage takes its inputs positionally.

    Raises:
        TypeError: the arguments do not fit the signature, or keyword arguments meet a
            forward that takes *args or **kwargs.
    """
    signature = inspect.signature(model.forward)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    where = f"{type(model).__name__}.forward{signature}"
    if any(p.kind in variadic for p in signature.parameters.values()):
        if kwargs:
            raise TypeError(
                f"Pipeline: {where} takes *args or **kwargs, and the model is called with "
                f"keyword arguments {sorted(kwargs)}; call it with positional arguments."
            )
        return tuple(args)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"Pipeline: the model's inputs do not fit {where}: {error}.") from error
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def to_meta(value: Any) -> Any:
    """The same structure with every tensor replaced by a meta tensor of its shape/dtype."""
    return pytree.tree_map(
        lambda v: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v,
        value,
    )


def first_chunk(args: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """The first of n micro-batches of `args`, cut as the schedule cuts them (dim 0)."""
    return pytree.tree_map(
        lambda v: v.tensor_split(n)[0] if isinstance(v, torch.Tensor) else v, args
    )


def shape_key(args: Any) -> tuple[Any, ...]:
    """Shapes, dtypes and (other) values of the leaves: what a trace specialises on."""
    leaves, spec = pytree.tree_flatten(args)
    return (
        str(spec),
        *((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in leaves),
    )


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` under every name it has (tied ones twice)."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def skeleton_of(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors (tied ones stay tied).

    Raises:
        TypeError: the model cannot be deep-copied.
    """
    memo: dict[int, Any] = {}
    for tensor in tensors_of(model).values():
        if id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        raise TypeError(
            f"Pipeline: cannot copy {type(model).__name__}'s structure for tracing "
            f"(copy.deepcopy failed: {error}). {WAYS_OUT}"
        ) from error


# ------------------------------------------------------------------ tracing


@dataclass
class Plan:
    """How one traced stage reads its graph's inputs and what it passes on.

    Attributes:
        reads: the graph module's inputs, in order.
        takes: what the stage receives: the model's tensor inputs (first stage; then ID
            if a later stage reads an input) or the previous stage's `gives`.
        gives: what it returns for later stages (empty on the last stage).
    """

    reads: list[Key]
    takes: list[Key]
    gives: list[Key]


@dataclass
class Split:
    """One trace of the skeleton: the stage graphs (meta tensors) and how values flow.

    Stages pass each other activations only. An input of the model that a later stage
    reads (labels for a loss computed in forward, a mask) is read there from `Feed`,
    the running step's inputs cut into micro-batches on every rank, at the index ID that
    travels with the activations: integer inputs never cross a stage boundary (torch
    sizes its receive buffers from a forward on uninitialised tensors).
    """

    modules: list[nn.Module]
    plans: list[Plan]
    outputs: list[Key]  # the model's flattened outputs
    out_spec: Any  # their pytree structure
    names: list[set[str]]  # the tensor names (as the graphs spell them) each stage uses
    constants: dict[int, Any]  # the model's non-tensor inputs, by leaf index
    feeds_later: bool  # a stage after the first reads an input of the model (ID travels)
    order: list[str] = field(default_factory=list)  # the split points as forward reached them


class Feed:
    """The running step's model inputs, stacked by micro-batch, for stages after the first.

    Every rank of a pipeline is given the same batch, so each can cut the model's inputs
    as the schedule cuts them (dim 0 into n equal chunks) and look chunk i up on the
    device (no host sync) by the ID tensor that travels with the activations.
    """

    def __init__(self) -> None:
        self.stacked: dict[int, torch.Tensor] = {}
        self.n = 0
        self.spec: Any = None  # the structure of the model's output, set by the last stage

    def unflatten(self, flat: Any) -> Any:
        """The last stage's flat outputs (a tuple) in the model's output structure."""
        leaves = list(flat) if isinstance(flat, (tuple, list)) else [flat]  # one: as is
        return pytree.tree_unflatten(leaves, self.spec)

    def start(self, inputs: tuple[Any, ...], n: int, split_feeds: bool) -> tuple[Any, ...]:
        """Keep this step's inputs; return what the schedule feeds the first stage."""
        leaves = pytree.tree_leaves(inputs)
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        self.n, self.stacked = n, {}
        if not split_feeds:
            return tuple(tensors)
        for i, v in enumerate(leaves):
            if isinstance(v, torch.Tensor):
                if v.ndim == 0 or v.shape[0] % n:
                    raise ValueError(
                        f"Pipeline: input {i} of the model has shape {tuple(v.shape)}; a stage "
                        f"after the first reads it, so its first dimension must split into "
                        f"{n} equal micro-batches."
                    )
                self.stacked[i] = v.reshape(n, v.shape[0] // n, *v.shape[1:])
        device = tensors[0].device if tensors else None
        return (*tensors, torch.arange(n, device=device))

    def read(self, leaf: int, index: torch.Tensor) -> torch.Tensor:
        # clamp: torch's first step sizes buffers by a forward on uninitialised tensors,
        # whose "index" may be anything; any chunk has the right shape then.
        return self.stacked[leaf].index_select(0, index[:1].clamp(0, self.n - 1)).squeeze(0)


@dataclass
class Calls:
    """Which split-point modules ran during a trace, in order (for error messages)."""

    order: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def _watch_calls(skeleton: nn.Module, names: Sequence[str]) -> Iterator[Calls]:
    calls = Calls(counts=dict.fromkeys(names, 0))
    handles = []
    for name in names:

        def seen(module: nn.Module, args: Any, name: str = name) -> None:
            calls.counts[name] += 1
            calls.order.append(name)

        handles.append(skeleton.get_submodule(name).register_forward_pre_hook(seen))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        for name in names:  # pipeline() patches forward on the instance; undo it
            module = skeleton.get_submodule(name)
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_orig_forward", None)


def check_names(model: nn.Module, split_points: Mapping[str, str]) -> None:
    """Split points must name modules of the model (as for a Sequential, with the fix).

    Raises:
        ValueError: a name that is no module of the model.
    """
    shown = repr(dict(split_points))
    known = [n for n, _ in model.named_modules() if n]
    for name in split_points:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            why = "no such module" + (f" (did you mean {close}?)" if close else "")
            raise ValueError(
                f"Pipeline(split_points={shown}): {name!r}: {why}. Split points name modules "
                f"of {type(model).__name__} that its forward calls: {short_list(known)}."
            )


def trace(
    skeleton: nn.Module,
    split_points: Mapping[str, str],
    args: tuple[Any, ...],
    n_stages: int,
    training: bool,
) -> Split:
    """Trace `skeleton` on (meta) `args` and cut it at `split_points` into n_stages graphs.

    Raises:
        TypeError: torch.export cannot capture the forward (data-dependent control flow,
            ...): names the module, the line and the ways out.
        ValueError: a split point never runs or runs twice, or a stage would be empty.
    """
    from torch.distributed.pipelining import SplitPoint, pipeline

    spec = {
        name: SplitPoint.BEGINNING if side == "beginning" else SplitPoint.END
        for name, side in split_points.items()
    }
    cls = type(skeleton).__name__
    shown = repr(dict(split_points))
    skeleton.train(training)
    args = to_meta(args)
    with _watch_calls(skeleton, list(spec)) as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, inside
        try:
            pipe = pipeline(skeleton, mb_args=args, split_spec=spec)
        except Exception as error:
            _raise_trace_error(error, cls, shown, calls)
            raise
    never = [n for n, c in calls.counts.items() if c == 0]
    twice = {n: c for n, c in calls.counts.items() if c > 1}
    if never:
        module = skeleton.get_submodule(never[0])
        hint = "forward does not call it"
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            child = next(iter(module.named_children()), ("0", None))[0]
            hint = f"a {type(module).__name__} has no forward: name a module it holds, e.g. "
            hint += repr(f"{never[0]}.{child}")
        raise ValueError(
            f"Pipeline(split_points={shown}): {never[0]!r} never runs in {cls}.forward, so it "
            f"cannot start or end a stage ({hint})."
        )
    if twice:
        name, count = next(iter(twice.items()))
        raise ValueError(
            f"Pipeline(split_points={shown}): {name!r} runs {count} times in {cls}.forward; "
            "a split point must run once per forward. Name a module that runs once."
        )
    if pipe.num_stages != n_stages:
        raise ValueError(
            f"Pipeline(split_points={shown}): tracing {cls}.forward made {pipe.num_stages} "
            f"stages, not {n_stages}: two split points cut at the same place, or "
            f"{calls.order[-1]!r} at its end leaves the last stage empty; drop or move one."
        )
    split = _plan(pipe, args)
    split.order = list(calls.order)
    split.out_spec = output_spec(skeleton, args, training)
    if split.out_spec.num_leaves != len(split.outputs):
        raise TypeError(
            f"Pipeline: {cls}.forward returns {split.out_spec.num_leaves} values and its "
            f"traced graph {len(split.outputs)}; return tensors (or tuples, lists, dicts of "
            "them) from forward."
        )
    return split


def _raise_trace_error(error: Exception, cls: str, shown: str, calls: Calls) -> None:
    if isinstance(error, AttributeError) and "submod_pp_0" in str(error) and calls.order:
        raise ValueError(
            f"Pipeline(split_points={shown}): {calls.order[0]!r} at its beginning would leave "
            "the first stage empty; name a module inside the model."
        ) from error
    cause = error.__cause__ if error.__cause__ is not None else error
    where = _user_line(str(cause))
    raise TypeError(
        f"Pipeline(split_points={shown}): cannot split {cls} by tracing: torch.export could "
        f"not capture {cls}.forward as one graph ({type(cause).__name__}"
        f"{': ' + where if where else ''}). Tracing needs a forward without data-dependent "
        "control flow (an `if` or loop on tensor values, .item(), .tolist()), without "
        f"graph breaks and with ops that have meta kernels. {WAYS_OUT}"
    ) from error


def _user_line(message: str) -> str:
    """The user's line torch.export names ("The following call raised this error: ...")."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if "The following call raised this error" in line:
            rest = [x.strip() for x in lines[i + 1 : i + 3] if x.strip()]
            return " ".join(rest)
    return lines[0][:200] if lines else ""


def _plan(pipe: Any, args: tuple[Any, ...]) -> Split:
    """Read the split graph: each stage's inputs, outputs and what it must pass on."""
    graph = pipe.split_gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    leaves = pytree.tree_leaves(args)
    if len(placeholders) != len(leaves):
        raise TypeError(
            f"Pipeline: the traced graph takes {len(placeholders)} inputs, and the model's "
            f"inputs flatten to {len(leaves)}; pass plain tensors (or tuples, lists, dicts of "
            "them) to the model."
        )
    position = {n: i for i, n in enumerate(placeholders)}
    calls = [n for n in graph.nodes if n.op == "call_module"]
    index = {n: i for i, n in enumerate(calls)}

    def key(node: Any) -> Key:
        if node.op == "placeholder":
            return ("in", position[node], None)
        if node.op == "call_module":
            return ("out", index[node], None)
        if node.op == "call_function" and node.target is operator.getitem:
            return ("out", index[node.args[0]], int(node.args[1]))
        raise TypeError(f"Pipeline: unexpected value {node.format_node()} between stages.")

    reads = [[key(a) for a in call.args] for call in calls]
    output = next(n for n in graph.nodes if n.op == "output")
    flat_out = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    outputs = [key(n) for n in flat_out]
    n = len(calls)
    feeds_later = any(k[0] == "in" for r in [*reads[1:], outputs] for k in r)
    tensor_inputs = [("in", i, None) for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    takes: list[list[Key]] = [tensor_inputs + ([ID] if feeds_later else [])]
    gives: list[list[Key]] = []
    for s in range(n - 1):
        later = [k for r in reads[s + 1 :] for k in r] + outputs
        passed = [ID if k[0] == "in" else k for k in later if k[0] == "in" or k[1] <= s]
        gives.append(list(dict.fromkeys(passed)))
        takes.append(gives[-1])
    gives.append([])
    modules = [pipe.get_stage_module(s) for s in range(n)]
    # The first stage may carry the model's own input handling (pytree codegen); it takes
    # its graph inputs positionally here (TracedStage flattens the model's inputs).
    modules[0].graph.set_codegen(torch.fx.graph.CodeGen())
    modules[0].recompile()
    return Split(
        modules=modules,
        plans=[Plan(reads[s], takes[s], gives[s]) for s in range(n)],
        outputs=outputs,
        out_spec=None,
        names=[used_names(m) for m in modules],
        constants={i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)},
        feeds_later=feeds_later,
    )


# ------------------------------------------------------------------ tensors by name


def graphs(module: nn.Module) -> Iterator[tuple[str, nn.Module, torch.fx.Graph]]:
    """(qualified name, module, its fx graph) for every traced module inside `module`."""
    for name, sub in module.named_modules(remove_duplicate=False):
        graph = getattr(sub, "graph", None)  # GraphModule, InterpreterModule
        if isinstance(graph, torch.fx.Graph):
            yield name, sub, graph


def used_names(module: nn.Module) -> set[str]:
    """The qualified names of the attributes a stage graph reads (get_attr nodes)."""
    return {
        f"{prefix}.{node.target}" if prefix else str(node.target)
        for prefix, _, graph in graphs(module)
        for node in graph.nodes
        if node.op == "get_attr"
    }


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Each tensor name of `model` -> the first name of the same tensor (tied weights)."""
    first: dict[int, str] = {}
    out = {}
    for name, tensor in tensors_of(model).items():
        out[name] = first.setdefault(id(tensor), name)
    return out


def holder(model: nn.Module, keep: set[str]) -> nn.Module:
    """A plain module tree holding `model`'s tensors whose canonical name is in `keep`.

    Every name of a kept tensor is registered (a tied weight under each of its names), in
    the model's order, so `state_dict()` has the unsplit model's keys for those tensors.
    The tensors are the model's own objects (no copy).
    """
    canonical = canonical_names(model)
    persistent = set(model.state_dict(keep_vars=True))
    root = nn.Module()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, tensor in table.items():
                full = f"{prefix}.{name}" if prefix else name
                if tensor is None or canonical.get(full) not in keep:
                    continue
                owner = _owner(root, prefix)
                if kind == "param":
                    owner.register_parameter(name, tensor)  # type: ignore[arg-type]
                else:
                    owner.register_buffer(name, tensor, persistent=full in persistent)
    return root


def _owner(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module


def bind_(module: nn.Module, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Give a stage graph this rank's tensors by name; drop the ones it does not read.

    Constants the trace captured move to `device`; so do the devices written into ops
    (`torch.arange(..., device=meta)`).

    Raises:
        RuntimeError: a tensor the graph reads is not among `tensors` (a meta leftover).
    """
    used = used_names(module)
    for full in used:
        path, _, attr = full.rpartition(".")
        owner = module.get_submodule(path)
        if full in tensors:
            real = tensors[full]
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)
            owner.__dict__.pop(attr, None)
            if isinstance(real, nn.Parameter):
                owner.register_parameter(attr, real)
            else:
                owner.register_buffer(attr, real)
        else:
            value = getattr(owner, attr)
            if isinstance(value, torch.Tensor):
                if value.is_meta:
                    raise RuntimeError(
                        f"Pipeline: the traced stage reads {full!r}, a tensor this rank does "
                        "not hold; register it as a parameter or buffer of the model."
                    )
                setattr(owner, attr, value.to(device))
    for names in (
        [n for n, _ in module.named_parameters(remove_duplicate=False)],
        [n for n, _ in module.named_buffers(remove_duplicate=False)],
    ):
        for full in names:
            if full not in used:
                path, _, attr = full.rpartition(".")
                owner = module.get_submodule(path)
                owner._parameters.pop(attr, None)
                owner._buffers.pop(attr, None)
    _set_device_(module, device)


def _set_device_(module: nn.Module, device: torch.device) -> None:
    for _, sub, graph in graphs(module):
        changed = False
        for node in graph.nodes:
            if node.op == "call_function" and node.kwargs.get("device") is not None:
                if node.kwargs["device"] != device:
                    node.update_kwarg("device", device)
                    changed = True
        if changed:
            compiled = sub if isinstance(sub, torch.fx.GraphModule) else None
            compiled = compiled or sub.__dict__.get("graph_module")
            if isinstance(compiled, torch.fx.GraphModule):
                compiled.recompile()


class TracedStage(nn.Module):
    """One traced stage as a pipeline stage runs it: values in, values out, by the plan.

    The first stage takes the model's tensor inputs (then ID); the others take what the
    stage before gives. The last stage returns the model's outputs flattened into a tuple
    (torch's stages pass tensors and tuples only) and leaves their structure in the feed
    (`Feed.unflatten` gives it back); the others a tuple of tensors.
    """

    def __init__(self, module: nn.Module, index: int, split: Split, feed: Feed, last: bool) -> None:
        super().__init__()
        self.module, self.index, self.plan = module, index, split.plans[index]
        self.outputs = split.outputs if last else None
        self.out_spec, self.constants, self.feed = split.out_spec, split.constants, feed

    def forward(self, *received: Any) -> Any:
        values: dict[Key, Any] = dict(zip(self.plan.takes, received, strict=True))
        args = [self._value(k, values) for k in self.plan.reads]
        out = self.module(*args)
        values[("out", self.index, None)] = out
        if isinstance(out, (tuple, list)):
            for j, v in enumerate(out):
                values[("out", self.index, j)] = v
        if self.outputs is not None:
            self.feed.spec = self.out_spec
            flat = tuple(self._value(k, values) for k in self.outputs)
            return flat[0] if len(flat) == 1 else flat
        return tuple(values[k] for k in self.plan.gives)

    def _value(self, key: Key, values: dict[Key, Any]) -> Any:
        if key in values:
            return values[key]
        if key[0] == "in" and key[1] in self.constants:
            return self.constants[key[1]]
        return self.feed.read(key[1], values[ID])


def output_spec(skeleton: nn.Module, args: tuple[Any, ...], training: bool) -> Any:
    """The pytree structure of the model's output, from one eager forward on meta tensors."""
    skeleton.train(training)
    with torch.no_grad():
        return pytree.tree_flatten(skeleton(*to_meta(args)))[1]


# ------------------------------------------------------------------ the traced model


@dataclass
class TracedModel:
    """What tracing told about a model, shared by a rank's record and its snapshots.

    Attributes:
        skeleton: the model with meta tensors, traced again for each new input shape.
        split_points: checked split points {name: 'beginning' | 'end'}.
        n_stages: the number of stages.
        stage_names: the canonical names of the tensors each stage reads.
        canonical: every tensor name of the model -> its canonical (first) name.
        example: the example inputs, bound to the forward's signature (meta tensors).
        feeds_later: whether a stage after the first reads an input of the model.
        first: the setup's trace of `example` (and the mode it ran in), handed to the
            first rank model that needs it.
    """

    skeleton: nn.Module
    split_points: dict[str, str]
    n_stages: int
    stage_names: list[set[str]]
    canonical: dict[str, str]
    example: tuple[Any, ...]
    feeds_later: bool
    first: tuple[bool, Split] | None = None

    @classmethod
    def of(
        cls,
        model: nn.Module,
        split_points: dict[str, str],
        example: tuple[tuple[Any, ...], dict[str, Any]],
        n_stages: int,
    ) -> TracedModel:
        """Trace `model` on `example` (args, kwargs) and check every stage trains something.

        Raises:
            ValueError / TypeError: see `check_names` and `trace`; a stage without
                trainable parameters.
        """
        check_names(model, split_points)
        skeleton = skeleton_of(model)
        args = bind(skeleton, *example)
        split = trace(skeleton, split_points, args, n_stages, model.training)
        canonical = canonical_names(skeleton)
        names = [{canonical[n] for n in used if n in canonical} for used in split.names]
        traced = cls(
            skeleton,
            split_points,
            n_stages,
            names,
            canonical,
            to_meta(args),
            split.feeds_later,
            (model.training, split),
        )
        trainable = {canonical[n] for n, p in skeleton.named_parameters() if p.requires_grad}
        bounds = ["the start", *(f"{n!r} ({split_points[n]})" for n in split.order), "the end"]
        for s, stage in enumerate(names):
            if not stage & trainable:
                raise ValueError(
                    f"Pipeline(split_points={dict(split_points)!r}): stage {s} of {n_stages}, "
                    f"from {bounds[s]} to {bounds[s + 1]} of {type(model).__name__}.forward, "
                    "holds no trainable parameters; move a split point so that every stage "
                    "holds some."
                )
        return traced

    def keep(self, stage_indices: Sequence[int]) -> set[str]:
        """The canonical names of the tensors the given stages read."""
        return {n for s in stage_indices for n in self.stage_names[s]}

    def shared(self, pp_rank_of: Sequence[int]) -> list[str]:
        """Trainable parameters read on stages of more than one pipeline rank (tied weights),
        in the model's order; `pp_rank_of[s]` is the rank that runs stage s."""
        ranks: dict[str, set[int]] = {}
        for s, stage in enumerate(self.stage_names):
            for name in stage:
                ranks.setdefault(name, set()).add(pp_rank_of[s])
        trainable = [
            self.canonical[n] for n, p in self.skeleton.named_parameters() if p.requires_grad
        ]
        return [n for n in trainable if len(ranks.get(n, ())) > 1]

    def owner(self, name: str, pp_rank_of: Sequence[int]) -> int:
        """The lowest pipeline rank whose stages read tensor `name`."""
        return min(pp_rank_of[s] for s, stage in enumerate(self.stage_names) if name in stage)

    def stages(
        self,
        rank_model: nn.Module,
        stage_indices: Sequence[int],
        args: tuple[Any, ...] | None,
        training: bool,
        device: torch.device,
        feed: Feed,
    ) -> list[TracedStage]:
        """This rank's stages for micro-batches like `args` (None: the setup's example).

        Traces the skeleton again unless the setup's trace fits (same shapes and mode);
        the stages read `rank_model`'s tensors.

        Raises:
            RuntimeError: the new trace puts tensors on other stages than the setup's
                (a forward whose split depends on the input shape).
        """
        args = self.example if args is None else args
        fits = self.first is not None and self.first[0] == training
        if fits and shape_key(args) == shape_key(self.example):
            assert self.first is not None
            split, self.first = self.first[1], None
        else:
            split = trace(self.skeleton, self.split_points, args, self.n_stages, training)
        if split.feeds_later != self.feeds_later:
            raise RuntimeError(
                f"Pipeline: tracing {type(self.skeleton).__name__}.forward for inputs of "
                f"shapes {shape_key(args)[1:]} routes the model's inputs to other stages than "
                f"the trace from example_inputs did. {WAYS_OUT}"
            )
        tensors = tensors_of(rank_model)
        built = []
        for s in stage_indices:
            names = {self.canonical[n] for n in split.names[s] if n in self.canonical}
            if names != self.stage_names[s]:
                moved = sorted(names ^ self.stage_names[s])[:5]
                raise RuntimeError(
                    f"Pipeline: tracing {type(self.skeleton).__name__}.forward for inputs of "
                    f"shapes {shape_key(args)[1:]} puts other tensors on stage {s} than the "
                    f"trace from example_inputs did ({moved}); the split must not depend on "
                    f"the input shape. {WAYS_OUT}"
                )
            bind_(split.modules[s], tensors, device)
            built.append(TracedStage(split.modules[s], s, split, feed, s == self.n_stages - 1))
        return built


__all__ = [
    "WAYS_OUT",
    "Calls",
    "Feed",
    "ID",
    "Key",
    "Plan",
    "Split",
    "TracedModel",
    "TracedStage",
    "bind",
    "bind_",
    "canonical_names",
    "check_example_inputs",
    "check_names",
    "first_chunk",
    "holder",
    "output_spec",
    "shape_key",
    "skeleton_of",
    "tensors_of",
    "to_meta",
    "trace",
    "used_names",
]
