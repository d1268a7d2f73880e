"""compile_step: the same step, with its tensor work compiled by torch.compile.

`compile_step(chain(forward(loss_fn), accumulate(k), clip(max_norm), optimizer_step()))`
returns a transform with the same `(state, batch) -> state` contract and the same records.
The record bookkeeping (`TrainState._advance`, `Window`, the counters) stays in Python; the
tensor work runs in two compiled graphs, each captured whole (`fullgraph=True`):

- the micro-batch graph: forward, loss, the window's normalisation (loopkit.normalise,
  through `Strategy.forward_backward`) and the backward, traced into the same graph
  (`torch._dynamo.config.trace_autograd_ops`: the backward becomes `autograd.grad` plus
  gradient accumulation inside the graph, so forward and backward fuse);
- the update graph, on the window's last micro-batch: closing the window (gradients times
  the closing factor), the clip (foreach) and the optimizer's own update, then the
  gradients set to None.

Nothing that changes per step enters a graph as a Python number: the closing factor and
the learning rates go in as tensors, the step count is the optimizer's own `step` tensor.
While the update graph runs, each param group holds its `lr` as a 0-d tensor and, where the
optimizer has these settings, `capturable=True, foreach=True` (its arithmetic all on
tensors, as torch.compile arranges on CUDA), and `fused=False` where it was fused (the
fused kernel cannot be traced; inductor fuses the foreach path); after it, the group is as
eager left it. A
run compiles each graph once (with accumulation, two micro-batch variants: gradients absent
or present); a new batch shape compiles once more, after which torch marks the changed
sizes dynamic. An optimizer whose state appears only after its first update (SGD with
momentum) compiles its update graph once more, at the second step. Random ops (dropout) run
torch's own kernels (inductor's `fallback_random`), so they draw what the eager step draws
from the seed forward sets.

Parts after optimizer_step (fit's `average=`: `ema`, `swa`; a part of your own) run
eagerly after the graphs, on each call, as the eager chain runs them. What cannot be
captured runs the whole step eagerly instead, with one `CompileFallbackWarning` per cause:
a chain with other parts before or among the four above (a part of your own,
`every`/`when`, `skip_nonfinite`), a strategy other than SingleDevice, fp16 loss
scaling, a torch LRScheduler, optimizer step hooks, a model or optimizer that torch
cannot trace whole (the warning quotes torch's reason), or torch's compiler switched off
(TORCHDYNAMO_DISABLE=1, a `torch.compiler.set_stance`; checked at each call). Under DDP
and FSDP the wrapped model is compiled then (`model.compile()`), and the step runs eagerly
around it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import numbers
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer

from ._batch import batch_size
from ._rng import micro_step_seed, seed_devices_
from ._types import Batch, Transform
from .compose import chain as chain_of
from .compose import parts_of
from .normalise import check_first_count, closing_factor
from .state import TrainState, Window
from .strategies import DDP, FSDP, SingleDevice
from .transforms import (
    accumulate,
    clip,
    forward,
    optimizer_step,
    skip_nonfinite,
    warn_groups_added,
    window_size_of,
)

logger = logging.getLogger(__name__)

LRScheduler = torch.optim.lr_scheduler.LRScheduler

# The built-in transforms' classes, read from their factories (no private imports).
_FORWARD = type(forward(lambda model, batch: torch.zeros(())))
_ACCUMULATE = type(accumulate(1))
_CLIP = type(clip(1.0))
_OPTIMIZER_STEP = type(optimizer_step())
_SKIP_NONFINITE = type(skip_nonfinite())
_BUILT_IN = (_FORWARD, _ACCUMULATE, _CLIP, _OPTIMIZER_STEP, _SKIP_NONFINITE)


class CompileFallbackWarning(UserWarning):
    """compile_step runs a step eagerly: the message names what could not be compiled."""


@dataclass(frozen=True, slots=True)
class _Parts:
    """The four parts compile_step captures, read from the step, and what follows them."""

    forward: Any
    accumulate: Any
    clip: Any | None
    optimizer_step: Any
    after: Transform | None  # the parts after optimizer_step (fit's average=), run eagerly

    @property
    def k(self) -> int:
        return int(self.accumulate.k)


def _read_chain(step: Transform) -> tuple[_Parts | None, str | None]:
    """The capturable chain of `step`, or None and why it cannot be captured."""
    parts = parts_of(step)
    kinds = [type(p) for p in parts]
    n = 4 if kinds[2:3] == [_CLIP] else 3  # the captured head; what follows runs eagerly
    if kinds[:n] in (
        [_FORWARD, _ACCUMULATE, _OPTIMIZER_STEP],
        [_FORWARD, _ACCUMULATE, _CLIP, _OPTIMIZER_STEP],
    ):
        # Parts after optimizer_step (lk.ema, lk.swa, a logger of the user's) read what the
        # step made: run after the graphs on each call, as the eager chain runs them.
        after = chain_of(*parts[n:]) if parts[n:] else None
        clip_part = parts[2] if n == 4 else None
        return _Parts(parts[0], parts[1], clip_part, parts[n - 1], after), None
    others = [repr(p) for p in parts if not isinstance(p, _BUILT_IN)]
    if others:
        what = f"{', '.join(others)}, which may run anything on the host"
    elif _SKIP_NONFINITE in kinds:
        what = "skip_nonfinite(), which decides on the host (a sync) whether to update"
    else:
        what = "its parts in an order other than forward, accumulate, [clip], optimizer_step"
    return None, f"the step {step!r} holds {what}"


def _state_cause(state: TrainState) -> str | None:
    """Why a record's training objects cannot be compiled, or None."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return (
            f"torch {torch.__version__} cannot trace a backward into a graph "
            "(torch._dynamo.config.trace_autograd_ops; torch 2.13 can)"
        )
    if type(state.strategy) is not SingleDevice:
        return f"strategy={state.strategy!r}: only SingleDevice steps are compiled whole"
    if state.precision.scales_loss:
        return "precision='fp16': dynamic loss scaling decides on the host whether to step"
    if isinstance(state.schedule, LRScheduler):
        return (
            f"schedule={type(state.schedule).__name__}: a torch LRScheduler sets the lr on the "
            "host after each step; pass a loopkit schedule (a function of the step) instead"
        )
    optimizer = state.optimizer
    hooks = (
        getattr(optimizer, "_optimizer_step_pre_hooks", None),
        getattr(optimizer, "_optimizer_step_post_hooks", None),
        torch_optimizer._global_optimizer_pre_hooks,
        torch_optimizer._global_optimizer_post_hooks,
    )
    if any(hooks):
        return f"optimizer={type(optimizer).__name__} has step hooks, which run on the host"
    if optimizer.defaults.get("differentiable"):
        return f"optimizer={type(optimizer).__name__}(differentiable=True)"
    return None


# The wrappers torch puts around every Optimizer.step: the profiler/hook wrapper and
# `_use_grad_for_differentiable`, whose graph breaks keep torch.compile(opt.step) from being
# one graph. compile_step checks the hooks (above) and runs the update under no_grad.
_TORCH_STEP_WRAPPERS = (
    torch.optim.Optimizer.profile_hook_step(lambda: None).__code__,
    torch_optimizer._use_grad_for_differentiable(lambda: None).__code__,
)


def _bare_step(optimizer: torch.optim.Optimizer) -> Callable[[torch.optim.Optimizer], Any]:
    """`type(optimizer).step` without torch's wrappers (the user's own decorators stay)."""
    step: Any = type(optimizer).step
    while getattr(step, "__code__", None) in _TORCH_STEP_WRAPPERS and hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return step  # type: ignore[no-any-return]


def _micro_batch(
    strategy: Any,
    model: torch.nn.Module,
    batch: Batch,
    loss_fn: Any,
    precision: Any,
    n_samples: int,
    ref_count: Any,
    window_loss: torch.Tensor | None,
    window_count: torch.Tensor | None,
) -> tuple[torch.Tensor, Any, Any, Any]:
    """Traced whole: forward + backward of one micro-batch, added to the window's sums."""
    scaled, count, ref = strategy.forward_backward(
        model,
        batch,
        loss_fn,
        precision=precision,
        n_samples=n_samples,
        ref_count=ref_count,
        sync=True,  # SingleDevice: nothing to sync; a constant keeps one graph per variant
        loss_scale=None,
        check_count=False,  # a host sync: checked after the graph
    )
    loss = scaled if window_loss is None else window_loss + scaled
    total = count if window_count is None else window_count + count
    return loss, count, total, ref


def _apply_window(
    strategy: Any,
    optimizer: torch.optim.Optimizer,
    bare_step: Callable[[torch.optim.Optimizer], Any],
    params: tuple[torch.nn.Parameter, ...],
    window_loss: torch.Tensor,
    factor: torch.Tensor | None,
    clip_part: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Traced whole: close the window, clip, update, drop the gradients (as the transforms)."""
    loss = window_loss
    if factor is not None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)
        loss = (window_loss * factor).to(window_loss.dtype)
    norm = None
    if clip_part is not None:  # its floats read as attributes: constants, not graph inputs
        norm = strategy.clip_grad_norm_(params, clip_part.max_norm, clip_part.norm_type)
    bare_step(optimizer)
    for p in params:
        p.grad = None
    return loss, norm


_copies = itertools.count(1)


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of `fn` with a code object, and a name, of its own.

    torch.compile keeps its graphs per code object, and what it learnt from earlier
    compiles (automatic dynamic: which sizes and floats changed, `torch._dynamo.pgo`) per
    code *name* (file, line, name). A copy per compiled step keeps both its own: without
    the new name, a second compile_step in a process (a sweep over momentum) started with
    the first one's differing optimizer floats marked dynamic, and torch could fail while
    retracing for them (SpeculationLogDivergence, SGD with momentum and a frozen parameter).
    """
    name = f"{fn.__name__}_{next(_copies)}"
    code = fn.__code__.replace(co_name=name)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__)


class _CountingInductor:
    """The inductor backend, counting the graphs it compiles."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        with warnings.catch_warnings():  # torch's own import-time deprecation notices
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch._inductor.compile_fx import compile_fx

        # fallback_random: random ops (dropout) draw from torch's generator as eager ones do,
        # so the compiled step draws eager's numbers (inductor's own generator draws others).
        compiled = compile_fx(gm, example_inputs, config_patches={"fallback_random": True})
        self.graphs += 1  # after it: a restarted analysis calls the backend twice
        return compiled


@functools.cache
def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch raises while compiling (before the graph runs): the step then runs eagerly.

    Read when a step first compiles, not at import: `import loopkit` must not import
    torch._dynamo (about a second, and torch's compiler state) for users who never compile.
    """
    import torch._dynamo.exc as dynamo_errors
    import torch._dynamo.symbolic_convert as tracer

    return tuple(
        error
        for error in (
            getattr(dynamo_errors, "TorchDynamoException", None),
            getattr(dynamo_errors, "FailOnRecompileLimitHit", None),  # torch >= 2.7
            # An AssertionError torch raises while retracing a frame (its own bug, before
            # anything ran): the step runs eagerly rather than the run ending.
            getattr(tracer, "SpeculationLogDivergence", None),
        )
        if error is not None
    )


_GROUP_FLAGS = ("capturable", "foreach")


class _Graphs:
    """The compiled functions and the tensors they read, for one model and optimizer."""

    def __init__(self, state: TrainState, backend: _CountingInductor) -> None:
        self.model = state.model
        self.optimizer = state.optimizer
        self.strategy = state.strategy
        self.schedule = state.schedule
        self.precision = state.precision
        self.bare_step = _bare_step(state.optimizer)
        self.micro = torch.compile(_fresh(_micro_batch), backend=backend, fullgraph=True)
        self.apply = torch.compile(_fresh(_apply_window), backend=backend, fullgraph=True)
        device = state.strategy.device
        # float32 unless the model trains in float64: torch reads a 0-d float64 CPU tensor's
        # value when it traces (a guard calling .item() every step, and a second trace).
        wide = any(p.dtype == torch.float64 for p in state.params) and device.type != "mps"
        dtype = torch.float64 if wide else torch.float32
        self.factor = torch.zeros((), dtype=dtype, device=device)
        self.lrs = [torch.zeros((), dtype=dtype, device=device) for _ in state.base_lrs]
        self.lr_values: list[float | None] = [None] * len(self.lrs)
        # What each param group holds while the update graph runs: the lr as a tensor, and
        # (where the optimizer has these settings) the capturable, foreach implementation:
        # all its arithmetic on tensors, no host scalars (torch.compile does the same on CUDA).
        self.overrides: list[dict[str, Any]] = []
        for group, lr in zip(state.optimizer.param_groups, self.lrs):
            overrides: dict[str, Any] = {"lr": lr}
            if group.get("fused"):  # a fused kernel is opaque to torch.compile (a graph break)
                overrides["fused"] = False
            for key in _GROUP_FLAGS:
                if key in group:
                    overrides[key] = True
            self.overrides.append(overrides)

    def fits(self, state: TrainState) -> bool:
        return (
            self.optimizer is state.optimizer
            and self.model is state.model
            and self.schedule is state.schedule
            and self.strategy is state.strategy
            and self.precision is state.precision
        )


class CompiledStep:
    """What `compile_step` returns: a transform running `step` through two compiled graphs.

    Attributes:
        step: the step it compiles (and runs eagerly where it cannot).
        graphs_compiled: graphs torch compiled for it so far (a recompile adds one).
        compile_seconds: wall seconds of the calls that compiled a graph.
        fallback_causes: why it ran steps eagerly, in order, each cause once.
    """

    def __init__(self, step: Transform) -> None:
        _compile_errors()  # imports torch's compiler (torch._dynamo) now, not with loopkit
        self.step = step
        self.graphs_compiled = 0
        self.compile_seconds = 0.0
        self.fallback_causes: list[str] = []
        # Why the chain cannot be captured, if so: said on the first call, unless the record
        # has a more basic cause (fit's DDP chain holds zero_nonfinite() because of the
        # strategy; the strategy is the cause to name).
        self._chain, self._chain_cause = _read_chain(step)
        self._backend = _CountingInductor()
        self._graphs: _Graphs | None = None
        self._eager_for: object = None  # the optimizer whose steps run eagerly, if any
        if self._chain is not None:
            self._empty_window = Window(size=self._chain.k)
            tail = parts_of(step)[1:]  # accumulate, [clip], optimizer_step, after
            self._tail = chain_of(*tail)

    def __call__(self, state: TrainState, batch: Batch, /) -> TrainState:
        state.check_fresh()
        if (off := _compiler_off()) is not None:  # for now: compiles again once it is back on
            self._fall_back(off, stacklevel=3)
            return self.step(state, batch)
        graphs = self._graphs
        if graphs is None or not graphs.fits(state):
            graphs = self._graphs_for(state)
            if graphs is None:
                return self.step(state, batch)
        parts = self._chain
        assert parts is not None  # no graphs without a chain
        if state.window.closed or state.micro_step >= parts.k:
            return self.step(state, batch)  # the eager transforms raise their errors
        start, before = time.perf_counter(), self._backend.graphs
        try:
            state = self._forward(state, batch, graphs, parts)
        except _compile_errors() as error:  # raised while compiling: nothing ran
            self._give_up(state, _torch_reason(error))
            return self.step(state, batch)
        if state.micro_step == parts.k:
            try:
                state = self._update(state, graphs, parts)
            except _compile_errors() as error:
                self._give_up(state, _torch_reason(error))
                return self._tail(state, batch)  # the micro-batch ran: close it eagerly
        if self._backend.graphs != before:
            self._note_compile(time.perf_counter() - start)
        if parts.after is not None:
            state = parts.after(state, batch)
        return state

    def _graphs_for(self, state: TrainState) -> _Graphs | None:
        """The compiled functions for this record's training objects, or None: run eagerly."""
        if self._eager_for is state.optimizer:
            return None
        cause = _state_cause(state) or self._chain_cause
        if cause is not None:
            self._give_up(state, cause + _compile_model_instead(state), stacklevel=5)
            return None
        try:
            self._graphs = _Graphs(state, self._backend)
            return self._graphs
        except RuntimeError as error:  # torch.compile unavailable (platform, python)
            self._give_up(state, f"torch.compile is not available here ({error})", stacklevel=5)
            return None

    def _give_up(self, state: TrainState, cause: str, stacklevel: int = 4) -> None:
        self._eager_for = state.optimizer
        self._graphs = None
        self._fall_back(cause, stacklevel)

    def _fall_back(self, cause: str, stacklevel: int) -> None:
        if cause in self.fallback_causes:
            return
        self.fallback_causes.append(cause)
        warnings.warn(
            f"compile_step: running the step eagerly, because {cause}.",
            CompileFallbackWarning,
            stacklevel=stacklevel,
        )

    def _note_compile(self, seconds: float) -> None:
        new = self._backend.graphs - self.graphs_compiled
        self.graphs_compiled = self._backend.graphs
        self.compile_seconds += seconds
        logger.info("compile_step: compiled %d graph(s) in %.2f s", new, seconds)

    def _forward(
        self, state: TrainState, batch: Batch, graphs: _Graphs, parts: _Parts
    ) -> TrainState:
        """forward and accumulate's bookkeeping around the micro-batch graph."""
        window, strategy = state.window, state.strategy
        batch = strategy.to_device(batch)
        n_samples = batch_size(batch, parts.forward)
        if parts.forward.seed_rng:
            seed_devices_(
                micro_step_seed(state.seed, state.step, state.micro_step, strategy.rank),
                strategy.device,
            )
        first = window.ref_count is None
        tensor_count = not first and isinstance(window.count, torch.Tensor)
        config = torch._dynamo.config
        traced = config.trace_autograd_ops
        config.trace_autograd_ops = True  # read only while torch traces a new graph
        try:
            loss, count, total, ref = graphs.micro(
                strategy,
                state.model,
                batch,
                parts.forward.loss_fn,
                state.precision,
                n_samples,
                window.ref_count,
                None if first else window.loss,
                window.count if tensor_count else None,
            )
        finally:
            config.trace_autograd_ops = traced
        if state.step == 0 and state.micro_step == 0 and isinstance(count, torch.Tensor):
            check_first_count(count, parts.forward)
        if not first and not tensor_count:
            total = window.count + count
        return state._advance(
            self,
            {
                "micro_step": state.micro_step + 1,
                "samples_seen": state.samples_seen + n_samples,
                "tokens_seen": state.tokens_seen + count,
                "window": Window(loss=loss, count=total, ref_count=ref, size=parts.k),
            },
        )

    def _update(self, state: TrainState, graphs: _Graphs, parts: _Parts) -> TrainState:
        """accumulate's close, clip and optimizer_step, in the update graph."""
        window = state.window
        total = window.ref_count if state.micro_step == 1 else window.count
        factor = closing_factor(window.ref_count, total)  # type: ignore[arg-type]
        if factor is not None:  # one input tensor whatever the count's type
            if isinstance(factor, torch.Tensor):
                graphs.factor.copy_(factor)
            else:
                graphs.factor.fill_(factor)
            factor = graphs.factor
        lr = self._set_lrs(state, graphs, parts)
        # The groups the record started with (base_lrs); a group added since (unfreezing
        # layers with add_param_group) keeps its own lr and settings, as eager leaves it,
        # and gets the same warning.
        if len(state.optimizer.param_groups) != len(state.base_lrs):
            warn_groups_added(state, parts.optimizer_step)
        groups = state.optimizer.param_groups[: len(graphs.overrides)]
        saved = [
            {key: group[key] for key in overrides}
            for group, overrides in zip(groups, graphs.overrides)
        ]
        for group, overrides in zip(groups, graphs.overrides):
            group.update(overrides)
        clip_part = parts.clip
        try:
            with torch.no_grad():
                loss, norm = graphs.apply(
                    state.strategy,
                    state.optimizer,
                    graphs.bare_step,
                    state.params,
                    window.loss,
                    factor,
                    clip_part,
                )
        finally:
            for group, value, originals in zip(groups, graphs.lr_values, saved):
                group.update(originals)
                group["lr"] = value
        for group in state.optimizer.param_groups[len(groups) :]:  # as optimizer.zero_grad()
            for p in group["params"]:
                p.grad = None
        metrics: dict[str, Any] = {"train/loss": loss}
        if norm is not None:
            metrics["train/grad_norm"] = norm
        metrics["train/lr"] = lr
        changes = {"step": state.step + 1, "micro_step": 0, "window": self._empty_window}
        return state._advance(self, {**changes, "metrics": metrics})

    def _set_lrs(self, state: TrainState, graphs: _Graphs, parts: _Parts) -> float:
        """optimizer_step's lr: schedule(step) times each base lr, into the lr tensors."""
        factor: Any = state.schedule(state.step)  # type: ignore[operator]
        real = type(factor) is float or isinstance(factor, numbers.Real)
        if not (real and math.isfinite(factor) and factor >= 0):
            name = getattr(state.schedule, "__qualname__", None) or repr(state.schedule)
            raise ValueError(
                f"{parts.optimizer_step!r}: schedule={name} returned {factor!r} at step "
                f"{state.step}; a schedule must return an lr factor, a finite float >= 0."
            )
        values = graphs.lr_values
        for i, base_lr in enumerate(state.base_lrs):
            value = base_lr * factor
            if values[i] != value:
                graphs.lrs[i].fill_(value)
                values[i] = value
        return float(state.base_lrs[0] * factor)

    def __repr__(self) -> str:
        return f"compile_step({self.step!r})"


def _compiler_off() -> str | None:
    """Why torch would run the compiled functions uncompiled, or None (~2 us, a config read).

    Run uncompiled, the update would call the optimizer with `capturable=True` outside a
    graph (Adam refuses that on CPU), and fullgraph=True raises after a micro-batch ran.
    """
    if torch._dynamo.config.disable:
        return "torch.compile is off (torch._dynamo.config.disable, e.g. TORCHDYNAMO_DISABLE=1)"
    # torch's private record of the stance (2.6+); absent elsewhere: taken as the default
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    if stance != "default":
        return f"torch.compiler.set_stance({stance!r}) runs compiled functions eagerly at times"
    return None


def _compile_model_instead(state: TrainState) -> str:
    """Under DDP or FSDP, compile the wrapped model (forward and backward) and say so.

    The step itself is not captured there, but `torch.compile` of the wrapped model is
    PyTorch's own recipe (DDP's buckets split the graphs; FSDP's hooks run eagerly), and
    what fit(compile=True) did before whole steps were compiled. A model the user compiled
    already is left as it is. Other strategies and causes run fully eagerly.
    """
    if not isinstance(state.strategy, (DDP, FSDP)):
        return " (the model is not compiled either)"
    model = state.model
    if getattr(model, "_compiled_call_impl", None) is None:
        model.compile()
    return f"; the model is compiled instead (torch.compile of the {type(model).__name__})"


def _torch_reason(error: BaseException) -> str:
    """The first line of torch's message (the graph break or compile failure), and of its
    cause where torch chained one ("Hard failure due to fullgraph=True" says nothing of the
    recompile limit behind it)."""
    reason = f"{type(error).__name__}: {_first_line(error)}"
    cause = error.__cause__
    if cause is not None:
        reason += f", from {type(cause).__name__}: {_first_line(cause)}"
    return f"torch.compile could not capture it whole ({reason})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def compile_step(step: Transform) -> Transform:
    """Compile a step's tensor work: forward, backward, window close, clip and update.

    Returns a transform with the same `(state, batch) -> state` contract and records as
    `step`; parameters and optimizer state match the eager step's within float32 rounding
    (fused kernels reassociate sums). The first call of each graph compiles it (seconds);
    later steps reuse it. Steps that cannot be captured run eagerly, with one
    `loopkit.compiled.CompileFallbackWarning` per cause, never silently (see the module
    docstring for the causes).

    Args:
        step: `chain(forward(loss_fn), accumulate(k), optimizer_step())`, optionally with
            `clip(max_norm)` before optimizer_step (fit's default step), and with any parts
            after optimizer_step (`ema`, `swa`), which run eagerly after the graphs.

    Raises:
        TypeError: step is not callable.
        ValueError: a chain of built-in transforms that can never train (as fit's check).

    Example:
        >>> import loopkit as lk
        >>> step = lk.compile_step(
        ...     lk.chain(lk.forward(lambda m, b: m(b).sum()), lk.accumulate(1), lk.optimizer_step())
        ... )
    """
    if not callable(step):
        raise TypeError(
            f"compile_step(step={step!r}): expected a transform, e.g. "
            "chain(forward(loss_fn), accumulate(1), clip(1.0), optimizer_step())."
        )
    window_size_of(step, where="compile_step")
    return CompiledStep(step)


__all__ = ["CompileFallbackWarning", "CompiledStep", "compile_step"]
