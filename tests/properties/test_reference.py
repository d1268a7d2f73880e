"""Reference equality: a loopkit step equals the hand-written PyTorch loop, step for step.

fp32/float64: chain(forward, accumulate(k), clip(max_norm), optimizer_step()) with AdamW and
a linear warmup/decay schedule against zero_grad / backward / clip_grad_norm_ / AdamW with
the lr set by hand. fp16: dynamic loss scaling against torch.amp.GradScaler, and an injected
overflow that must skip exactly its own update. bf16: runs, finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from helpers import (
    WindowProbe,
    assert_tensors_close,
    classification_loss,
    clone_all,
    loss_scale,
    mlp,
    reference_trace,
    run_windows,
    window_cross_entropy,
)
from hypothesis import event, given
from hypothesis import strategies as st

import loopkit as lk

CPU = "cpu"


@st.composite
def windows_of_batches(draw: st.DrawFn, *, max_k: int = 3, steps: tuple[int, int] = (1, 5)):
    """k and the micro-batch sizes of each window (each window split its own way)."""
    k = draw(st.integers(1, max_k), label="k")
    n_steps = draw(st.integers(*steps), label="steps")
    sizes = [draw(st.lists(st.integers(1, 4), min_size=k, max_size=k)) for _ in range(n_steps)]
    return k, sizes


def make_windows(sizes, seed: int, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            (
                torch.randn(n, 4, generator=gen, dtype=dtype),
                torch.randint(0, 3, (n,), generator=gen),
            )
            for n in window
        ]
        for window in sizes
    ]


def hand_linear(step: int, warmup: int, total: int) -> float:
    """Linear warmup then linear decay to 0 (HF's get_linear_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


@given(
    split=windows_of_batches(),
    seed=st.integers(0, 2**16),
    base_lr=st.sampled_from([1e-3, 3e-2, 0.1]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    max_norm=st.floats(0.05, 5.0),
    warmup=st.integers(0, 3),
    decay=st.integers(0, 4),
)
def test_adamw_clip_schedule_matches_hand_written_loop(
    split, seed, base_lr, weight_decay, max_norm, warmup, decay
) -> None:
    k, sizes = split
    windows = make_windows(sizes, seed)

    def adamw(params):
        return torch.optim.AdamW(params, lr=base_lr, weight_decay=weight_decay)

    probe = WindowProbe()
    step = lk.chain(
        lk.forward(classification_loss),
        lk.accumulate(k),
        lk.clip(max_norm),
        probe,
        lk.optimizer_step(),
    )
    state = lk.TrainState.create(
        mlp(),
        optimizer=adamw,
        schedule=lk.schedules.linear(warmup, warmup + decay),
        strategy=lk.SingleDevice(CPU),
    )
    state, params_after = run_windows(state, step, windows)

    ref = reference_trace(
        mlp(),
        windows,
        window_cross_entropy,
        make_optimizer=adamw,
        max_norm=max_norm,
        lr_factor=lambda s: hand_linear(s, warmup, warmup + decay),
    )
    assert state.step == len(windows)
    for i in range(len(windows)):
        torch.testing.assert_close(
            probe.metrics[i]["train/grad_norm"], ref.grad_norms[i], rtol=1e-12, atol=1e-14
        )
        assert_tensors_close(
            probe.grads[i], ref.grads[i], rtol=1e-11, atol=1e-14, what=f"step {i} clipped grad"
        )
        assert_tensors_close(
            params_after[i], ref.params[i], rtol=1e-9, atol=1e-11, what=f"step {i} param"
        )
    assert math.isclose(float(state.metrics["train/lr"]), ref.lrs[-1], rel_tol=1e-12, abs_tol=1e-15)


# --- fp16: dynamic loss scaling ------------------------------------------------------------


def sum_count_loss(model: torch.nn.Module, batch) -> lk.Loss:
    x, y = batch
    return lk.Loss(F.cross_entropy(model(x), y, reduction="sum"), len(y))


@given(
    split=windows_of_batches(steps=(2, 6)),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fp16_matches_grad_scaler_loop(split, seed, data) -> None:
    """Loss scale, skips and parameters follow a GradScaler loop that accumulates
    `scale(sum_i / window_count).backward()` per micro-batch."""
    k, sizes = split
    # With k > 1 loopkit scales micro-batch i by 1/first count, not 1/window count, so near
    # the fp16 limit one side may overflow and the other not: natural overflows (2**16, one
    # sample) are compared for k == 1 only, where both compute exactly the same thing.
    init_scale = data.draw(
        st.sampled_from([2.0**4, 2.0**8, *([2.0**16] if k == 1 else [])]), label="init_scale"
    )
    windows = make_windows(sizes, seed, dtype=torch.float32)

    def sgd(params):
        return torch.optim.SGD(params, lr=1e-2)

    precision = lk.Precision("fp16", init_scale=init_scale, growth_interval=2)
    state = lk.TrainState.create(
        mlp(dtype=torch.float32),
        optimizer=sgd,
        precision=precision,
        strategy=lk.SingleDevice(CPU),
    )
    step = lk.chain(lk.forward(sum_count_loss), lk.accumulate(k), lk.optimizer_step())

    model = mlp(dtype=torch.float32)
    opt = sgd(model.parameters())
    scaler = torch.amp.GradScaler(CPU, init_scale=init_scale, growth_interval=2)
    for i, window in enumerate(windows):
        count = sum(len(y) for _, y in window)
        opt.zero_grad()
        for x, y in window:
            with torch.autocast(CPU, dtype=torch.float16):
                loss = F.cross_entropy(model(x), y, reduction="sum") / count
            scaler.scale(loss).backward()
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        ref_skipped = scaler.get_scale() < scale_before
        event(f"k={'1' if k == 1 else '>1'}, overflow={ref_skipped}")

        skipped_before = state.skipped_steps
        for micro_batch in window:
            state = step(state, micro_batch)
        assert state.skipped_steps - skipped_before == int(ref_skipped), f"step {i}"
        assert loss_scale(state) == scaler.get_scale(), f"step {i}"
        # k == 1 computes exactly what GradScaler does; k > 1 scales each micro-batch's
        # gradient differently before fp16 rounding (by 1/first count, not 1/window count).
        tol = {"rtol": 1e-6, "atol": 1e-7} if k == 1 else {"rtol": 1e-4, "atol": 1e-5}
        assert_tensors_close(state.params, list(model.parameters()), **tol, what=f"step {i}")


@given(
    split=windows_of_batches(steps=(2, 4)),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fp16_overflow_skips_exactly_that_update(split, seed, data) -> None:
    k, sizes = split
    windows = make_windows(sizes, seed, dtype=torch.float32)
    bad_step = data.draw(st.integers(0, len(windows) - 1), label="bad_step")
    bad_micro = data.draw(st.integers(0, k - 1), label="bad_micro_batch")
    x, y = windows[bad_step][bad_micro]
    x = x.clone()
    x[0, 0] = 1e6  # finite in float32, inf once autocast casts it to float16
    windows[bad_step][bad_micro] = (x, y)

    init_scale = 2.0**8
    state = lk.TrainState.create(
        mlp(dtype=torch.float32),
        optimizer=lambda p: torch.optim.SGD(p, lr=1e-2),
        precision=lk.Precision("fp16", init_scale=init_scale),
        strategy=lk.SingleDevice(CPU),
    )
    step = lk.chain(lk.forward(sum_count_loss), lk.accumulate(k), lk.optimizer_step())
    scale = init_scale
    for i, window in enumerate(windows):
        before = clone_all(state.params)
        for micro_batch in window:
            state = step(state, micro_batch)
        assert state.step == i + 1
        changed = [not torch.equal(a, b) for a, b in zip(state.params, before, strict=True)]
        if i == bad_step:
            scale /= 2
            assert not any(changed), f"the overflowing step {i} changed parameters"
        else:
            assert any(changed), f"clean step {i} left every parameter unchanged"
        assert state.skipped_steps == int(i >= bad_step), f"step {i}"
        assert loss_scale(state) == scale, f"step {i}"
        assert all(bool(p.isfinite().all()) for p in state.params)
        assert all(p.grad is None for p in state.params)


# --- bf16 ------------------------------------------------------------------------------------


@given(split=windows_of_batches(steps=(1, 3)), seed=st.integers(0, 2**16))
def test_bf16_runs_with_finite_loss(split, seed) -> None:
    k, sizes = split
    windows = make_windows(sizes, seed, dtype=torch.float32)
    state = lk.TrainState.create(
        mlp(dtype=torch.float32),
        optimizer=lambda p: torch.optim.SGD(p, lr=1e-2),
        precision="bf16",
        strategy=lk.SingleDevice(CPU),
    )
    step = lk.chain(lk.forward(classification_loss), lk.accumulate(k), lk.optimizer_step())
    initial = clone_all(state.params)
    state, _ = run_windows(state, step, windows)
    assert state.loss_scale is None and state.skipped_steps == 0
    loss = state.metrics["train/loss"]
    assert isinstance(loss, torch.Tensor)
    assert bool(torch.isfinite(loss)), loss
    assert all(bool(p.isfinite().all()) for p in state.params)
    assert any(not torch.equal(a, b) for a, b in zip(state.params, initial, strict=True))
    # bf16 keeps ~3 significant digits: the loss is the fp32 window mean up to that.
    ref = reference_trace(
        mlp(dtype=torch.float32),
        windows,
        window_cross_entropy,
        make_optimizer=lambda p: torch.optim.SGD(p, lr=1e-2),
    )
    torch.testing.assert_close(loss.float(), ref.losses[-1], rtol=3e-2, atol=3e-2)
