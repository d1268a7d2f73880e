"""Pipeline: the model split into stages over ranks, run by torch.distributed.pipelining."""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._batch import move
from .._types import Batch, Count, LossFn, OptimizerFactory, Predict
from ..normalise import check_first_count, divide_grads_, reference_count
from ..precision import Precision
from . import common
from ._pipeline_chunks import (
    Autocast,
    ChunkLoss,
    ModelCalledError,
    Recorder,
    StandIn,
    chunks,
    signature,
    summed,
)
from ._pipeline_split import assemble, check_split_points, expands, plan_stages
from ._pipeline_trace import (
    Feed,
    TracedModel,
    bind,
    check_example_inputs,
    first_chunk,
    holder,
    shape_key,
)
from .env import DEFAULT_TIMEOUT_S, detect_env, init_distributed

SplitFn = Callable[[nn.Module, int, int], nn.Module]
"""Builds stage `stage_index` of `n_stages` from the whole model: `split_fn(model, i, n)`."""

# Schedule names as torch.distributed.pipelining.schedules.get_schedule_class spells them,
# with their class names and how many stages a rank runs: "single" (exactly one),
# "loop" (any number; stage s on pipeline rank s % pp_size) or "v" (exactly two; rank r
# runs stages r and 2 * pp_size - 1 - r).
_SCHEDULES: dict[str, tuple[str, str]] = {
    "GPipe": ("ScheduleGPipe", "single"),
    "1F1B": ("Schedule1F1B", "single"),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", "loop"),
    "LoopedBFS": ("ScheduleLoopedBFS", "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", "v"),
    "DualPipeV": ("ScheduleDualPipeV", "v"),
}
_MAX_SCHEDULES = 8  # cached schedules per model (one per batch shape and train/eval)

NEEDS_FACTORY = (
    "Pipeline() needs an optimizer factory such as "
    "`lambda params: torch.optim.AdamW(params, lr=3e-4)`, not a built optimizer: each rank "
    "keeps only its own stages, so the optimizer must be built over their parameters alone."
)


def schedule_names() -> list[str]:
    """The pipeline schedules this torch ships, by the names Pipeline(schedule=...) takes."""
    from torch.distributed.pipelining import schedules

    return [name for name, (cls, _) in _SCHEDULES.items() if hasattr(schedules, cls)]


def _schedule_name(value: object) -> str:
    names = schedule_names()
    if isinstance(value, str):
        for name in names:
            if name.lower() == value.lower():
                return name
    raise ValueError(
        f"Pipeline(schedule={value!r}): not a pipeline schedule of this torch "
        f"({torch.__version__}); valid names (any case): {', '.join(names)}."
    )


def _count_stages(
    split_points: object, split_fn: SplitFn | None, n_stages: int | None, stages_per_rank: int
) -> tuple[dict[str, str] | None, int]:
    """(checked split points or None, number of stages) from Pipeline's arguments."""
    if (split_points is None) == (split_fn is None):
        raise ValueError(
            "Pipeline(split_points=..., split_fn=...): give exactly one: split_points "
            "to cut an nn.Sequential by module name, e.g. {'layers.4': 'beginning'}, or "
            "split_fn(model, stage_index, n_stages) -> stage module."
        )
    if split_points is not None:
        checked = check_split_points(split_points)
        stages = len(checked) + 1
        if n_stages is not None and n_stages != stages:
            raise ValueError(
                f"Pipeline(n_stages={n_stages!r}): {len(checked)} split points "
                f"make {stages} stages; leave n_stages out with split_points."
            )
        return checked, stages
    if not callable(split_fn):
        raise TypeError(
            f"Pipeline(split_fn={split_fn!r}): expected a callable "
            "split_fn(model, stage_index, n_stages) returning that stage's module."
        )
    if n_stages is None:
        raise ValueError(
            "Pipeline(split_fn=...): also give n_stages, the number of stages to build."
        )
    if stages_per_rank != 1:
        raise ValueError(
            f"Pipeline(split_fn=..., stages_per_rank={stages_per_rank}): stages "
            "built by split_fn run one per rank; use split_points on an "
            "nn.Sequential for several stages per rank."
        )
    return None, _check_int("n_stages", n_stages, 2)


def _check_stages_per_rank(schedule: str, style: str, stages_per_rank: int) -> None:
    if style == "single" and stages_per_rank != 1:
        raise ValueError(
            f"Pipeline(schedule={schedule!r}, stages_per_rank={stages_per_rank}): "
            f"{schedule} runs one stage per rank; use stages_per_rank=1, or a looped "
            "schedule (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) for several."
        )
    if style == "v" and stages_per_rank != 2:
        raise ValueError(
            f"Pipeline(schedule={schedule!r}, stages_per_rank={stages_per_rank}): "
            f"{schedule} runs exactly two stages per rank (a V shape); use "
            "stages_per_rank=2."
        )


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Pipeline({name}={value!r}): expected an int >= {low}.")
    return value


class _Prepared:
    """What Pipeline keeps about a model it split: its stage modules and their schedules.

    A Sequential (or split_fn) has fixed stage modules; a traced model gets stage modules
    per micro-batch shape and mode (`traced`, fed by `feed`). It also lists the weights
    read on the stages of several pipeline ranks (`shared`, tied weights: this rank's copy
    or None, numel, dtype; the same list on every rank) and the ids of the copies another
    rank counts in the gradient norm (`uncounted`).
    """

    __slots__ = (
        "stage_paths",
        "stage_modules",
        "loss",
        "schedules",
        "params",
        "traced",
        "shared",
        "uncounted",
        "feed",
        "__weakref__",
    )

    def __init__(
        self,
        rank_model: nn.Module,
        stage_paths: list[list[str]] | None,
        stage_modules: list[nn.Module],
        loss: ChunkLoss,
        traced: TracedModel | None = None,
    ) -> None:
        self.stage_paths = stage_paths
        self.stage_modules = stage_modules
        self.loss = loss
        self.schedules: dict[Any, Any] = {}
        self.params = list(rank_model.parameters())  # tied weights once
        self.traced = traced
        self.shared: list[tuple[nn.Parameter | None, int, torch.dtype]] = []
        self.uncounted: set[int] = set()
        self.feed = Feed()


# ------------------------------------------------------------------ the strategy


class Pipeline:
    """Pipeline parallel training with `torch.distributed.pipelining` stages and schedules.

    The model is cut into stages; consecutive ranks of a pipeline each hold their stages
    (parameters, gradients, optimizer state) and pass activations forward and gradients
    back. One `forward(loss_fn)` runs one schedule step over the micro-batch it is given:
    the schedule cuts it into `n_microbatches` chunks and interleaves their forward and
    backward passes over the stages (GPipe, 1F1B, ...). `accumulate`, `clip` and
    `optimizer_step` work as with every strategy: each rank's TrainState holds its stages
    and an optimizer over their parameters.

    Splitting: `split_points` cuts the model before (`'beginning'`) or after (`'end'`) the
    named modules. An `nn.Sequential` (nested Sequentials are flattened) is cut by name;
    any other model is split by tracing its forward with torch.export
    (`torch.distributed.pipelining.pipeline` with `SplitPoint`), which needs
    `example_inputs` (the inputs of one model call; only their shapes and dtypes count).
    Every stage keeps its parameters' full names, so checkpoints and `save_model` files
    load into the unsplit model. Or `split_fn(model, stage_index, n_stages) -> nn.Module`
    builds each stage (its forward takes the previous stage's outputs).

    The loss: the user's `loss_fn(model, batch)` as for any strategy. The first stage reads
    the model's inputs from it (the arguments of its model call); the last stage calls it
    on each chunk of the batch with a stand-in model that returns the pipeline's output
    for that chunk. Chunk losses are summed and divided by the window's item count summed
    over every chunk and data-parallel replica, so gradients are exactly those of the
    mean loss over every item, as on one device.

    Ranks: `n_stages / stages_per_rank` consecutive ranks form one pipeline; a world size
    that is a multiple of that runs that many pipelines as data-parallel replicas (a 2-D
    device mesh ("pp", "dp"); gradients are summed over replicas once per window). Every
    rank of a pipeline must be given the same batches (fit() shards data by `dp_rank`).

    Building a Pipeline joins the process group the launcher describes (see
    loopkit.strategies.env).

    Args:
        split_points: module names where new stages start: {"layers.4": "beginning"} or
            ["layers.4"] (each a beginning); SplitPoint values are accepted.
        example_inputs: for a model that is not an nn.Sequential (split by tracing): the
            inputs of one model call, as a tensor, a tuple of positional inputs or a dict
            of keyword inputs, e.g. `(torch.zeros(4, 64, dtype=torch.long),)`. Meta
            tensors are fine; give one micro-batch's shape (batch size / n_microbatches
            rows) to trace once. Ignored for an nn.Sequential.
        schedule: one of `schedule_names()` (any case): "GPipe", "1F1B",
            "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", ...
        n_microbatches: chunks per schedule step; must divide every batch. None: one per
            stage.
        stages_per_rank: stages each rank runs: 1 for GPipe and 1F1B, 2 for the V-shaped
            schedules, any for the looped ones.
        split_fn: instead of split_points, builds stage i of n from the whole model.
        n_stages: with split_fn, how many stages to build.
        device: "cpu", "cuda", "cuda:N" or None for cuda:LOCAL_RANK when CUDA is
            available, else cpu (gloo).
        timeout_s: seconds a collective waits for the other ranks before raising.

    Raises:
        ValueError / TypeError: a bad argument, an unknown schedule (the message lists the
            valid ones), or stages that do not fit the world size.
        DistributedError: the other processes did not join within `timeout_s`.

    Example:
        >>> strategy = Pipeline({"layers.2": "beginning"}, schedule="1F1B",
        ...                     n_microbatches=4)  # doctest: +SKIP
        >>> state = TrainState.create(model, optimizer=lambda p: torch.optim.AdamW(p),
        ...                           strategy=strategy)  # doctest: +SKIP
    """

    is_sharded = True

    def __init__(
        self,
        split_points: Mapping[str, Any] | Sequence[str] | None = None,
        *,
        schedule: str = "1F1B",
        n_microbatches: int | None = None,
        stages_per_rank: int = 1,
        split_fn: SplitFn | None = None,
        n_stages: int | None = None,
        device: str | torch.device | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        example_inputs: Any = None,
    ) -> None:
        self.schedule = _schedule_name(schedule)
        self.example_inputs = check_example_inputs(example_inputs)
        if self.example_inputs is not None and split_fn is not None:
            raise ValueError(
                "Pipeline(split_fn=..., example_inputs=...): example_inputs are for tracing "
                "a model cut at split_points; split_fn builds the stages itself. Drop one."
            )
        self.stages_per_rank = _check_int("stages_per_rank", stages_per_rank, 1)
        self.split_fn = split_fn
        self.split_points, self.n_stages = _count_stages(
            split_points, split_fn, n_stages, self.stages_per_rank
        )
        style = _SCHEDULES[self.schedule][1]
        _check_stages_per_rank(self.schedule, style, self.stages_per_rank)
        if self.n_stages % self.stages_per_rank:
            raise ValueError(
                f"{self._where()}: {self.n_stages} stages do not split into "
                f"{self.stages_per_rank} per rank; change split_points or stages_per_rank so "
                "that stages_per_rank divides the number of stages."
            )
        self.pp_size = self.n_stages // self.stages_per_rank
        if n_microbatches is None:
            n_microbatches = self.n_stages
        self.n_microbatches = _check_int("n_microbatches", n_microbatches, 1)
        self._check_world_size()
        self._join(device, timeout_s, style)

    def _check_world_size(self) -> None:
        """Fail before joining the process group if the world size misfits the stages."""
        dist = torch.distributed
        world = (
            dist.get_world_size()
            if dist.is_available() and dist.is_initialized()
            else detect_env().world_size
        )
        if world % self.pp_size:
            raise ValueError(
                f"{self._where()}: {self.n_stages} stages at stages_per_rank="
                f"{self.stages_per_rank} need {self.pp_size} processes per pipeline, and the "
                f"world size {world} is not a multiple of {self.pp_size}. Launch a multiple "
                f"of {self.pp_size} processes (torchrun --nproc_per_node {self.pp_size}), or "
                "change split_points / stages_per_rank."
            )

    def _join(self, device: str | torch.device | None, timeout_s: float, style: str) -> None:
        """Join the process group; place this rank on the ("pp", "dp") mesh and its stages."""
        env, self.device = init_distributed(device, timeout_s=timeout_s, where="Pipeline")
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.timeout_s = float(timeout_s)
        self._non_blocking = self.device.type == "cuda"
        self.dp_world_size = self.world_size // self.pp_size
        # Mesh ("pp", "dp"), row-major: rank = pp_rank * dp_world_size + dp_rank.
        self.pp_rank, self.dp_rank = divmod(self.rank, self.dp_world_size)
        self.is_main = self.rank == 0
        self.stage_indices: tuple[int, ...]
        if style == "v":
            self.stage_indices = (self.pp_rank, 2 * self.pp_size - 1 - self.pp_rank)
        else:
            self.stage_indices = tuple(
                self.pp_rank + i * self.pp_size for i in range(self.stages_per_rank)
            )
        self.has_first_stage = 0 in self.stage_indices
        self.has_last_stage = self.n_stages - 1 in self.stage_indices
        try:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(
                self.device.type, (self.pp_size, self.dp_world_size), mesh_dim_names=("pp", "dp")
            )
        except Exception as error:
            common.raise_if_comm_error(error, self, "building the ('pp', 'dp') device mesh")
            raise
        self.pp_group = self.mesh.get_group("pp")
        self.dp_group = self.mesh.get_group("dp")
        self._prepared: weakref.WeakKeyDictionary[nn.Module, _Prepared] = (
            weakref.WeakKeyDictionary()
        )

    def _where(self) -> str:
        spec = self.split_points if self.split_points is not None else "split_fn"
        return f"Pipeline({spec!r}, schedule={self.schedule!r})"

    # ------------------------------------------------------------------ preparing a model

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        precision: Precision,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        common.require_factory_and_no_loss_scaling(
            optimizer,
            precision,
            needs_factory=NEEDS_FACTORY,
            loss_scaling=f"{self!r} with precision='fp16': loss scaling checks each stage's "
            "gradients for overflow separately, so stages could disagree about skipping a "
            "step. Use precision='bf16' (no loss scaling) or 'fp32'.",
        )
        traced: TracedModel | None = None
        stage_paths: list[list[str]] | None = None
        if self.split_points is not None and expands(model):
            plan = plan_stages(model, self.split_points)
            mine = [path for s in self.stage_indices for path in plan[s]]
            rank_model: nn.Module = assemble(model, mine)
            stage_paths = [plan[s] for s in self.stage_indices]
        elif self.split_points is not None:
            traced = self._trace(model)
            rank_model = holder(model, traced.keep(self.stage_indices))
        else:
            assert self.split_fn is not None
            rank_model = self.split_fn(model, self.stage_indices[0], self.n_stages)
            if not isinstance(rank_model, nn.Module):
                raise TypeError(
                    f"Pipeline(split_fn={self.split_fn!r}): returned "
                    f"{type(rank_model).__name__} for stage {self.stage_indices[0]}; it must "
                    "return that stage's nn.Module."
                )
        rank_model.to(self.device)
        prepared = self._prepare(rank_model, stage_paths, precision, traced)
        if not prepared.params or not any(p.requires_grad for p in prepared.params):
            raise ValueError(
                f"{self._where()}: stage(s) {list(self.stage_indices)} on rank {self.rank} hold "
                "no trainable parameters; move a split point so every stage holds some."
            )
        # Built now, so that the schedule's own checks (e.g. 1F1B's n_microbatches >=
        # stages) fail before training; the first step uses it.
        self._schedule(prepared, rank_model, signature=None, train=True)
        return rank_model, common.build_optimizer(rank_model, optimizer)

    def _trace(self, model: nn.Module) -> TracedModel:
        """Split a model that is not an nn.Sequential by tracing it on example_inputs."""
        assert self.split_points is not None
        if self.example_inputs is None:
            raise ValueError(
                f"Pipeline(split_points={self.split_points!r}): {type(model).__name__} is not "
                "an nn.Sequential, so Pipeline splits it by tracing its forward, which needs "
                "example inputs: pass example_inputs=(...) with the inputs of one model call "
                "(one micro-batch), e.g. Pipeline(..., example_inputs=(torch.zeros(4, 64, "
                "dtype=torch.long),)). Only shapes and dtypes are used; meta tensors are fine. "
                "Without tracing: build the model as an nn.Sequential, or pass split_fn=..."
            )
        return TracedModel.of(model, self.split_points, self.example_inputs, self.n_stages)

    def _pp_rank_of(self) -> list[int]:
        """The pipeline rank that runs each stage (the same rule as _join's)."""
        if _SCHEDULES[self.schedule][1] == "v":
            return [
                s if s < self.pp_size else 2 * self.pp_size - 1 - s for s in range(self.n_stages)
            ]
        return [s % self.pp_size for s in range(self.n_stages)]

    def _prepare(
        self,
        rank_model: nn.Module,
        stage_paths: list[list[str]] | None,
        precision: Precision,
        traced: TracedModel | None = None,
    ) -> _Prepared:
        if traced is not None:
            modules: list[nn.Module] = []  # built per micro-batch shape (see _schedule)
        elif stage_paths is None:
            modules = [rank_model]
        else:
            modules = [assemble(rank_model, paths) for paths in stage_paths]
        loss = ChunkLoss(precision, self.device)
        prepared = _Prepared(rank_model, stage_paths, modules, loss, traced)
        if traced is not None:
            loss.unflatten = prepared.feed.unflatten
            # Tied weights read on stages of several pipeline ranks: each such rank holds a
            # copy; their gradients are summed at the window's end and the norm counts
            # the weight once (on the lowest of those ranks).
            ranks = self._pp_rank_of()
            params = dict(rank_model.named_parameters(remove_duplicate=False))
            for name in traced.shared(ranks):
                param = params.get(name)
                meta = traced.skeleton.get_parameter(name)
                prepared.shared.append((param, meta.numel(), meta.dtype))
                if param is not None and traced.owner(name, ranks) != self.pp_rank:
                    prepared.uncounted.add(id(param))
        self._prepared[rank_model] = prepared
        return prepared

    def _get(self, model: nn.Module) -> _Prepared:
        prepared = self._prepared.get(model)
        if prepared is None:
            raise ValueError(
                f"{self!r}: this model was not split by this Pipeline strategy; build the "
                "TrainState with TrainState.create(model, ..., strategy=this_strategy)."
            )
        return prepared

    def _schedule(
        self,
        prepared: _Prepared,
        model: nn.Module,
        signature: Any,
        train: bool,
        inputs: tuple[Any, ...] | None = None,
    ) -> tuple[Any, int]:
        """The schedule (and its chunk count) for batches of `signature`.

        Stages size their receive buffers from the first batch they see, so each batch
        shape gets its own stages and schedule (cached; a fixed batch size has one).
        Every rank of the pipeline sees the same batches, so they build them alike. A
        traced model's stages are traced for the micro-batch shape of `inputs` (the
        model's inputs for the whole batch; None: the example inputs) and its mode.
        """
        n = self.n_microbatches
        name = self.schedule
        if not train:
            # Forward only: any chunk count works for single-stage schedules (GPipe order),
            # so an uneven last eval batch still runs.
            if len(self.stage_indices) == 1:
                name = "GPipe"
                n = math.gcd(signature[1], n) if signature is not None else n
        traced = prepared.traced
        micro = None
        if traced is None:
            key: Any = (signature, train)
        else:
            micro = None if inputs is None else first_chunk(inputs, n)
            key = (shape_key(traced.example if micro is None else micro), n, train, model.training)
        if key in prepared.schedules:
            return prepared.schedules[key], n
        if traced is None and signature is not None and (None, train) in prepared.schedules:
            built = prepared.schedules.pop((None, train))  # the one setup built
            prepared.schedules[key] = built
            return built, n
        modules = prepared.stage_modules
        if traced is not None:
            modules = traced.stages(  # type: ignore[assignment]
                model, self.stage_indices, micro, model.training, self.device, prepared.feed
            )
        built = self._build_schedule(prepared, modules, name, n)
        if len(prepared.schedules) >= _MAX_SCHEDULES:  # the same on every rank
            prepared.schedules.pop(next(iter(prepared.schedules)))
        prepared.schedules[key] = built
        return built, n

    def _build_schedule(
        self, prepared: _Prepared, modules: Sequence[nn.Module], name: str, n: int
    ) -> Any:
        from torch.distributed.pipelining import PipelineStage, schedules

        precision = prepared.loss.precision
        stages = []
        for index, module in zip(self.stage_indices, modules, strict=True):
            runs = module if precision.dtype is None else Autocast(module, precision, self.device)
            stages.append(
                PipelineStage(runs, index, self.n_stages, self.device, group=self.pp_group)
            )
        cls = getattr(schedules, _SCHEDULES[name][0])
        first = stages[0] if _SCHEDULES[name][1] == "single" else stages
        try:
            return cls(first, n, loss_fn=prepared.loss, scale_grads=False)
        except ValueError as error:
            raise ValueError(
                f"{self._where()} with n_microbatches={n}: torch's {cls.__name__} refuses "
                f"it ({error}). Choose n_microbatches to fit the schedule (e.g. at least the "
                f"number of stages, {self.n_stages}) or another schedule."
            ) from error

    # ------------------------------------------------------------------------ the step

    def to_device(self, batch: Batch) -> Batch:
        return move(batch, self.device, self._non_blocking)

    # The usual behaviour, shared with the other strategies as free functions.
    gradient_sync = staticmethod(common.no_gradient_sync)  # replicas sync in forward_backward
    # Every rank holds its share of the item count (the last stage the count, the others 0)
    # and of "train/loss" (likewise): the sum over all ranks is the global value, and the
    # count's all-reduce doubles as a barrier. The other metrics (grad norm, lr) are the
    # same on every rank: the mean keeps them.
    reduce_count = common.reduce_count_over_ranks
    reduce_metrics = common.reduce_metrics_over_ranks

    def backward(self, model: nn.Module, loss: torch.Tensor, *, sync: bool = True) -> None:
        raise RuntimeError(
            f"{self!r}.backward: a pipeline runs backward inside its schedule, one chunk at "
            "a time, so there is no whole loss to backpropagate. Use forward(loss_fn), which "
            "calls Pipeline.forward_backward."
        )

    def _inputs(self, loss_fn: LossFn, batch: Batch, prepared: _Prepared) -> tuple[Any, ...]:
        """The model's inputs for this batch: the arguments of loss_fn's model call.

        A traced model takes keyword arguments too: they are bound to its forward's
        signature (defaults filled in) and passed positionally.
        """
        recorder = Recorder()
        try:
            loss_fn(recorder, batch)  # type: ignore[arg-type]
        except ModelCalledError:
            pass
        if recorder.args is None:
            raise RuntimeError(
                f"{self!r}: loss_fn(model, batch) did not call the model, so the first stage "
                "has no inputs. Under a pipeline loss_fn must call the model once, e.g. "
                "`lk.cross_entropy(model(batch[0]), batch[1])`."
            )
        if prepared.traced is not None:
            return bind(prepared.traced.skeleton, recorder.args, recorder.kwargs)
        if recorder.kwargs:
            raise ValueError(
                f"{self!r}: loss_fn calls the model with keyword arguments "
                f"{sorted(recorder.kwargs)}; the stages of an nn.Sequential take positional "
                "inputs only."
            )
        return recorder.args

    def _first_stage_args(
        self, prepared: _Prepared, inputs: tuple[Any, ...] | None, n: int
    ) -> tuple[Any, ...]:
        """What the schedule feeds the first stage (nothing on the other stages).

        A traced model's stages take tensors only (its other inputs are constants of the
        trace); every rank keeps the step's inputs where a later stage reads one.
        """
        if inputs is None:
            return ()
        if prepared.traced is not None:
            inputs = prepared.feed.start(inputs, n, prepared.traced.feeds_later)
        return inputs if self.has_first_stage else ()

    def _check_batch(self, n_samples: int, n: int) -> None:
        if n_samples % n:
            raise ValueError(
                f"{self._where()}: n_microbatches={n} does not divide the batch of "
                f"{n_samples} samples; use a batch size that is a multiple of {n} (and "
                "drop_last=True), or another n_microbatches."
            )

    def forward_backward(
        self,
        model: nn.Module,
        batch: Batch,
        loss_fn: LossFn,
        *,
        precision: Precision,
        n_samples: int,
        ref_count: Count | None,
        sync: bool,
        loss_scale: torch.Tensor | None,
        check_count: bool,
    ) -> tuple[torch.Tensor, Count, Count]:
        """Run one schedule step (forward and backward of every chunk) over `batch`.

        Gradients become those of (sum of the chunk losses) / ref, where ref is `ref_count`
        (the window's reference count) or, for a window's first micro-batch, this batch's
        item count summed over every rank (one all-reduce, which also brings the last
        stage's count to the others), divided after the step. With `sync`, data-parallel
        replicas then sum their gradients. The stages run under the precision given at
        setup; `loss_scale` is always None (fp16 is refused at setup).

        Returns:
            (this rank's share of sum / ref, detached: the loss on the last stage, zero on
            the others; this rank's item count share, likewise; ref).
        """
        prepared = self._get(model)
        self._check_batch(n_samples, self.n_microbatches)
        # Every stage of a traced model reads the inputs' shapes (its graphs are traced
        # per micro-batch shape); only the first stage feeds them to the schedule.
        wants = self.has_first_stage or prepared.traced is not None
        inputs = self._inputs(loss_fn, batch, prepared) if wants else None
        schedule, n = self._schedule(prepared, model, (signature(batch), n_samples), True, inputs)
        args = self._first_stage_args(prepared, inputs, n)
        loss = prepared.loss
        pieces = chunks(batch, n, n_samples) if self.has_last_stage else []
        loss.start(loss_fn, pieces, n_samples // n, ref_count)
        target = torch.arange(n) if self.has_last_stage else None
        try:
            schedule.step(*args, target=target, return_outputs=False)
        except Exception as error:
            common.raise_if_comm_error(error, self, "the pipeline schedule step")
            raise
        records = loss.take(n)
        if self.has_last_stage:
            local, count = summed(records)
            local = local.to(records[0][0].dtype)
        else:
            local, count = torch.zeros((), device=self.device), 0
        ref = reference_count(count, ref_count, self)
        if ref_count is None:
            if check_count:
                check_first_count(ref, self)
            divide_grads_(prepared.params, ref)  # type: ignore[arg-type]  # a device tensor
        if sync and prepared.shared:
            self._sum_shared(prepared.shared)
        if sync and self.dp_world_size > 1:
            self._sum_over_replicas(prepared.params)
        return local / ref, count, ref

    def _sum_shared(self, shared: Sequence[tuple[nn.Parameter | None, int, torch.dtype]]) -> None:
        """Sum the gradients of tied weights over the pipeline ranks holding a copy.

        One all-reduce per window over the pipeline group of a flat buffer laid out the
        same on every rank (the model's order); a rank without a copy adds zeros. Every
        copy then holds the whole weight's gradient, and the optimizers update them alike.
        """
        by_dtype: dict[torch.dtype, list[tuple[nn.Parameter | None, int]]] = {}
        for param, numel, dtype in shared:
            by_dtype.setdefault(dtype, []).append((param, numel))
        try:
            for dtype, entries in by_dtype.items():
                parts = [
                    p.grad.reshape(-1)
                    if p is not None and p.grad is not None
                    else torch.zeros(numel, dtype=dtype, device=self.device)
                    for p, numel in entries
                ]
                flat = torch.cat(parts)
                torch.distributed.all_reduce(flat, group=self.pp_group)
                offset = 0
                for p, numel in entries:
                    if p is not None:
                        summed_grad = flat[offset : offset + numel].view_as(p)
                        if p.grad is None:
                            p.grad = summed_grad.clone()
                        else:
                            p.grad.copy_(summed_grad)
                    offset += numel
        except Exception as error:
            common.raise_if_comm_error(error, self, "summing tied weights' gradients over stages")
            raise

    def _sum_over_replicas(self, params: Sequence[nn.Parameter]) -> None:
        # One all-reduce per dtype over a flat buffer: loopkit has already divided by the
        # global item count, so replicas add their gradients (no averaging).
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        try:
            for grads in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in grads])
                torch.distributed.all_reduce(flat, group=self.dp_group)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        except Exception as error:
            common.raise_if_comm_error(error, self, "summing gradients over data-parallel replicas")
            raise

    def clip_grad_norm_(
        self, params: Sequence[nn.Parameter], max_norm: float, norm_type: float
    ) -> torch.Tensor:
        # Each rank holds its stages' gradients, the same on every data-parallel replica:
        # the global norm combines the stages' norms over the pipeline group only. A tied
        # weight held by several pipeline ranks counts once (on the lowest of them).
        uncounted = {i for prepared in list(self._prepared.values()) for i in prepared.uncounted}
        grads = [p.grad for p in params if p.grad is not None and id(p) not in uncounted]
        if grads:
            local = torch.nn.utils.get_total_norm(grads, norm_type, foreach=True)
        else:
            local = torch.zeros((), device=self.device)
        try:
            if self.pp_size == 1:
                total = local
            elif math.isinf(norm_type):
                total = local.clone()
                torch.distributed.all_reduce(
                    total, op=torch.distributed.ReduceOp.MAX, group=self.pp_group
                )
            else:
                total = local.pow(norm_type)
                torch.distributed.all_reduce(total, group=self.pp_group)
                total = total.pow(1.0 / norm_type)
        except Exception as error:
            common.raise_if_comm_error(error, self, "the global gradient norm over stages")
            raise
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total

    # ------------------------------------------------------------------------ evaluation

    def eval_forward(
        self,
        model: nn.Module,
        batch: Batch,
        loss_fn: LossFn | None,
        predict: Predict | None,
        *,
        n_samples: int,
        want_outputs: bool,
        sum_dtype: torch.dtype,
    ) -> tuple[tuple[torch.Tensor, Count] | None, Any]:
        """Run `batch` forward through the pipeline (no backward; call under no_grad).

        Returns:
            ((loss sum, item count) or None, outputs or None): on the last stage the loss
            summed over the batch's items (None without loss_fn) and, if `want_outputs`,
            what the metrics read: `predict(stand-in, batch)` if given, else the model's
            output; None for both on the other stages, which add nothing to the sums.
        """
        prepared = self._get(model)
        inputs: tuple[Any, ...] | None = None
        if self.has_first_stage or prepared.traced is not None:
            reader = loss_fn if loss_fn is not None else predict
            if reader is None:
                inputs = (batch[0],) if isinstance(batch, (tuple, list)) else ()
                if inputs and prepared.traced is not None:
                    inputs = bind(prepared.traced.skeleton, inputs, {})
                if not inputs:
                    raise ValueError(
                        f"{self!r}: evaluate without loss_fn or predict feeds batch[0] of "
                        "tuple/list batches to the model; pass predict=lambda model, batch: ..."
                    )
            else:
                inputs = self._inputs(reader, batch, prepared)
        schedule, n = self._schedule(prepared, model, (signature(batch), n_samples), False, inputs)
        self._check_batch(n_samples, n)
        args = self._first_stage_args(prepared, inputs, n)
        loss = prepared.loss
        pieces = chunks(batch, n, n_samples) if self.has_last_stage else []
        record = loss_fn if loss_fn is not None else _no_loss
        loss.start(record, pieces, n_samples // n, None)
        target = torch.arange(n) if self.has_last_stage else None
        try:
            outputs = schedule.eval(*args, target=target, return_outputs=want_outputs)
        except Exception as error:
            common.raise_if_comm_error(error, self, "the pipeline's forward pass (evaluation)")
            raise
        records = loss.take(n)
        if not self.has_last_stage:
            return None, None
        loss_total = None
        if loss_fn is not None:
            total, count = summed(records)
            loss_total = (total.to(sum_dtype), count)
        if not want_outputs:
            return loss_total, None
        if loss.unflatten is not None and outputs is not None:
            outputs = loss.unflatten(outputs)
        if predict is not None:
            outputs = predict(StandIn(outputs), batch)  # type: ignore[arg-type]
        return loss_total, outputs

    # ------------------------------------------------------------------------ weights

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every stage's state_dict gathered on rank 0, in CPU memory ({} elsewhere).

        A collective: every rank must call it. The first data-parallel replica's stages
        send their tensors (names, shapes, dtypes, whether each is a parameter and which
        name it repeats go as JSON, each distinct tensor once). Parameters come back as
        `nn.Parameter` (requires_grad=False) and a tied weight as one object under each of
        its names, as in the unsplit model's `state_dict(keep_vars=True)`, so that
        save_model counts the whole model's parameters.
        """
        dist = torch.distributed
        local = _marked_state(model)
        if self.world_size == 1:
            return local
        peers = [pp * self.dp_world_size for pp in range(self.pp_size)]  # dp_rank 0
        out: dict[str, torch.Tensor] = {}
        try:
            if self.rank == 0:
                out.update(local)
                for peer in peers[1:]:
                    header = self._recv_json(peer)
                    for name, shape, dtype, is_param, same_as in header:
                        if same_as is not None:  # a tied weight: the same object again
                            out[name] = out[header[same_as][0]]
                            continue
                        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                        dist.recv(buf, src=peer)
                        value = buf.cpu()
                        out[name] = nn.Parameter(value, requires_grad=False) if is_param else value
            elif self.rank in peers:
                header, first = [], {}  # type: ignore[var-annotated]
                for i, (name, value) in enumerate(local.items()):
                    same_as = first.setdefault(id(value), i)
                    header.append(
                        [
                            name,
                            list(value.shape),
                            str(value.dtype).removeprefix("torch."),
                            isinstance(value, nn.Parameter),
                            None if same_as == i else same_as,
                        ]
                    )
                self._send_json(header, 0)
                for value, row in zip(local.values(), header, strict=True):
                    if row[4] is None:
                        dist.send(value.detach().to(self.device).contiguous(), dst=0)
        except Exception as error:
            common.raise_if_comm_error(error, self, "gathering the stages' weights on rank 0")
            raise
        return out

    def _send_json(self, value: Any, dst: int) -> None:
        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
        torch.distributed.send(torch.tensor([data.numel()], device=self.device), dst=dst)
        torch.distributed.send(data.to(self.device), dst=dst)

    def _recv_json(self, src: int) -> Any:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        torch.distributed.recv(size, src=src)
        data = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        torch.distributed.recv(data, src=src)
        return json.loads(bytes(data.cpu().tolist()).decode())

    # ------------------------------------------------------------------------ snapshot

    def snapshot(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Deep-copy this rank's stages and optimizer; the copy gets its own schedules.

        Local only (no communication); the copy's first step sets up its stages anew.
        """
        prepared = self._get(fields["model"])
        copied = common.deep_copy_training_objects(fields)
        self._prepare(
            copied["model"], prepared.stage_paths, prepared.loss.precision, prepared.traced
        )
        return copied

    def __repr__(self) -> str:
        return (
            f"Pipeline(schedule={self.schedule!r}, n_microbatches={self.n_microbatches}, "
            f"stages={list(self.stage_indices)}/{self.n_stages}, rank={self.rank}, "
            f"world_size={self.world_size})"
        )


def _marked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state_dict on the CPU, parameters as nn.Parameter, tied ones one object."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in copies:
            cpu = value.detach().cpu()
            is_param = isinstance(value, nn.Parameter)
            copies[id(value)] = nn.Parameter(cpu, requires_grad=False) if is_param else cpu
        out[name] = copies[id(value)]
    return out


def _no_loss(model: Any, batch: Any) -> torch.Tensor:
    """Eval without loss_fn: read the output (so the stand-in is used), count nothing."""
    model(None)
    return torch.zeros(())


__all__ = ["NEEDS_FACTORY", "Pipeline", "SplitFn", "schedule_names"]
