"""Nothing silent (issue 15, item 6): misuse that used to train nothing, or the wrong thing,
is refused with the fix, before training or within k + 1 micro-batches.

- a step chain that never closes or never applies a window;
- a sequence of samples with batch_size (batched like a Dataset) and the combinations of
  data and batch_size that would silently misread the data;
- a misspelled hook on a Callback subclass;
- a hung DataLoader worker (fit(data_timeout_s=...)), after which resume is exact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlp

import loopkit as lk
from loopkit.data import DataTimeoutError, make_loader


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def dataset(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(*data(n, seed))


def loss_fn(model, batch):
    x, y = batch
    return lk.cross_entropy(model(x), y)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


BASE: dict[str, Any] = dict(loss_fn=loss_fn, optimizer=sgd, progress=False, log_every=None)


class Counter:
    """Counts fit's events: proves whether any training happened."""

    def __init__(self) -> None:
        self.fit_starts = 0
        self.steps = 0

    def on_fit_start(self, state, hparams) -> None:
        self.fit_starts += 1

    def on_step_end(self, state) -> None:
        self.steps += 1


class CountCalls:
    """A step part of the user's own (opaque to fit's structure check): counts micro-batches."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, state, batch):
        self.calls += 1
        return state


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


# --- step chains that never train ------------------------------------------------------


@pytest.mark.parametrize(
    "step, message",
    [
        (lk.chain(lk.forward(loss_fn), lk.optimizer_step()), "never closes a gradient window"),
        (lk.chain(lk.forward(loss_fn), lk.clip(1.0), lk.optimizer_step()), "no accumulate"),
        (lk.chain(lk.forward(loss_fn), lk.accumulate(2)), "never applies them"),
        (lk.chain(lk.forward(loss_fn), lk.optimizer_step(), lk.accumulate(1)), "never applies"),
    ],
    ids=["no-accumulate", "clip-no-accumulate", "no-optimizer-step", "step-before-accumulate"],
)
def test_a_chain_that_cannot_train_is_refused_before_any_work(step, message):
    counter = Counter()
    with pytest.raises(ValueError, match=message) as error:
        lk.fit(mlp(), dataset(), step=step, batch_size=8, epochs=2, callbacks=[counter], **BASE)
    assert "fit(step=chain(forward(loss_fn)" in str(error.value)
    assert "optimizer_step()" in str(error.value)  # the fix
    assert counter.fit_starts == 0 and counter.steps == 0


@pytest.mark.parametrize("k", [1, 3])
def test_an_opaque_chain_that_never_steps_stops_after_k_plus_1_micro_batches(k):
    # A part of the user's own hides the chain from the structure check; the window of
    # accumulate(k) inside `when` never closes (its predicate is never true).
    counted = CountCalls()
    never = lk.when(lambda state: False, lk.accumulate(k))
    step = lk.chain(lk.forward(loss_fn), counted, never, lk.optimizer_step())
    counter = Counter()
    with pytest.raises(ValueError, match="micro-batches ran without an optimizer step") as error:
        lk.fit(mlp(), dataset(), step=step, batch_size=8, epochs=2, callbacks=[counter], **BASE)
    # optimizer_step refuses a window no accumulate(k) has seen at its second micro-batch,
    # before fit's own check (after k + 1 micro-batches) would.
    assert counted.calls == 2
    text = str(error.value)
    assert "2 micro-batches" in text and "state.step stayed 0" in text
    assert text.startswith("optimizer_step(): ") and "accumulate(k)" in text
    assert counter.steps == 0


def test_an_opaque_chain_without_accumulate_is_refused_at_the_second_micro_batch():
    counted = CountCalls()
    step = lk.chain(lk.forward(loss_fn), counted, lk.optimizer_step())
    with pytest.raises(ValueError, match="2 micro-batches ran without an optimizer step"):
        lk.fit(mlp(), dataset(), step=step, batch_size=8, epochs=2, **BASE)
    assert counted.calls == 2


@pytest.mark.parametrize("k", [2, 4])
def test_long_windows_in_opaque_and_conditional_chains_still_train(k):
    # Windows the run-time check can see: accumulate(k) at the top level next to a user
    # part, and accumulate(k) inside `when` (as the Trainer facade builds them).
    for window in (lk.accumulate(k), lk.when(lambda state: True, lk.accumulate(k))):
        step = lk.chain(lk.forward(loss_fn), CountCalls(), window, lk.optimizer_step())
        result = lk.fit(mlp(), dataset(), step=step, batch_size=8, epochs=1, shuffle=False, **BASE)
        assert result.state.step == 8 // k


# --- sequences of samples and batch_size -------------------------------------------------


class Samples:
    """A sequence that is no torch Dataset: only __len__ and __getitem__ (issue 21)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


@pytest.mark.parametrize("kind", ["list", "tuple", "sequence"])
def test_a_sequence_of_samples_with_batch_size_trains_exactly_like_a_dataset(kind):
    x, y = data(60)
    samples = {
        "list": lambda: [(x[i], y[i]) for i in range(len(x))],
        "tuple": lambda: tuple((x[i], y[i]) for i in range(len(x))),
        "sequence": lambda: Samples(x, y),
    }[kind]()
    kwargs = dict(batch_size=8, epochs=2, accumulate=2, seed=3, **BASE)  # shuffled per epoch
    expected = lk.fit(mlp(), torch.utils.data.TensorDataset(x, y), **kwargs)
    actual = lk.fit(mlp(), samples, **kwargs)
    assert actual.state.step == expected.state.step == 8  # ceil(60 / 8) = 8 batches / epoch
    assert actual.state.samples_seen == expected.state.samples_seen == 120
    assert_bitwise_equal(params(actual.state.model), params(expected.state.model))


def test_a_list_of_ready_batches_without_batch_size_still_works():
    x, y = data(64)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    kwargs = dict(epochs=2, **BASE)
    expected = lk.fit(
        mlp(), torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False, **kwargs
    )
    actual = lk.fit(mlp(), batches, **kwargs)
    assert actual.state.step == expected.state.step == 16
    assert_bitwise_equal(params(actual.state.model), params(expected.state.model))


def _generator():
    x, y = data(16)
    yield x[:8], y[:8]


@pytest.mark.parametrize(
    "train_data, kwargs, error, message",
    [
        (
            lambda: [(x, y) for x, y in zip(*data(16))],
            {},
            ValueError,
            r"element 0 holds a 0-d tensor .*Pass batch_size=",
        ),
        (
            lambda: torch.utils.data.DataLoader(dataset(16), 8),
            {"batch_size": 8},
            ValueError,
            r"DataLoader, which batches itself .*batch_size=8 would have no effect",
        ),
        (
            _generator,
            {"batch_size": 8},
            ValueError,
            r"generator, an iterable read as ready batches; batch_size=8 would have no effect",
        ),
        (
            lambda: {"train": dataset(16)},
            {"batch_size": 8},
            TypeError,
            r"got a dict.*Pick one split, e\.g\. data\['train'\]",
        ),
        (lambda: "abc", {"batch_size": 8}, TypeError, r"got a str"),
        (
            lambda: dataset(16),
            {},
            ValueError,
            r"a Dataset needs batch_size",
        ),
    ],
    ids=["samples-without-batch-size", "loader-with-batch-size", "generator-with-batch-size",
         "dict-of-splits", "str", "dataset-without-batch-size"],
)  # fmt: skip
def test_a_wrong_combination_of_data_and_batch_size_is_refused_before_any_work(
    train_data, kwargs, error, message
):
    counter = Counter()
    with pytest.raises(error, match=message) as raised:
        lk.fit(mlp(), train_data(), epochs=1, callbacks=[counter], **kwargs, **BASE)
    assert str(raised.value).startswith("fit(train_data=...)")
    assert counter.fit_starts == 0 and counter.steps == 0


def test_an_eval_loader_ignores_the_batch_size_it_inherits():
    # eval_batch_size defaults to batch_size: an eval DataLoader then keeps its own batches.
    x, y = data(16, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    result = lk.fit(mlp(), dataset(), batch_size=8, eval_data=loader, **BASE)
    assert "eval/loss" in result.history[-1]
    with pytest.raises(ValueError, match=r"fit\(eval_data=...\): got a DataLoader"):
        lk.fit(mlp(), dataset(), batch_size=8, eval_data=loader, eval_batch_size=4, **BASE)


def test_an_eval_sequence_of_samples_is_batched_like_the_train_data():
    x, y = data(16, seed=1)
    eval_shapes: list[tuple[int, ...]] = []

    def recording_loss(model, batch):
        if not model.training:
            eval_shapes.append(tuple(batch[0].shape))
        return loss_fn(model, batch)

    kwargs = dict(batch_size=8, eval_batch_size=4, **{**BASE, "loss_fn": recording_loss})
    expected = lk.fit(mlp(), dataset(), eval_data=torch.utils.data.TensorDataset(x, y), **kwargs)
    assert eval_shapes == [(4, 4)] * 4
    eval_shapes.clear()
    actual = lk.fit(mlp(), dataset(), eval_data=[(x[i], y[i]) for i in range(16)], **kwargs)
    assert eval_shapes == [(4, 4)] * 4
    assert actual.history[-1]["eval/loss"] == expected.history[-1]["eval/loss"]


# --- misspelled hooks on a Callback subclass ----------------------------------------------


class Typo(lk.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_ended(self, state) -> None:  # meant on_step_end: would never be called
        self.steps += 1


class Unknown(lk.Callback):
    def on_gradients_ready(self, state) -> None:
        pass


class WithHelpers(lk.Callback):
    """A subclass with helper methods that do not start with on_ is fine."""

    def __init__(self) -> None:
        self.steps = 0
        self.on_off = True  # an attribute (not a method) named on_* is no hook either

    def count(self) -> None:
        self.steps += 1

    def on_step_end(self, state) -> None:
        self.count()


def test_a_misspelled_hook_on_a_callback_subclass_is_refused_before_any_work():
    counter, typo = Counter(), Typo()
    with pytest.raises(ValueError, match=r"Typo\.on_step_ended is not a hook") as error:
        lk.fit(mlp(), dataset(), batch_size=8, callbacks=[counter, typo], **BASE)
    assert "Did you mean on_step_end?" in str(error.value)
    assert counter.fit_starts == 0 and typo.steps == 0


def test_an_on_method_close_to_no_hook_lists_the_hooks():
    with pytest.raises(ValueError, match=r"Unknown\.on_gradients_ready is not a hook") as error:
        lk.fit(mlp(), dataset(), batch_size=8, callbacks=[Unknown()], **BASE)
    assert "The hooks are on_fit_start, on_epoch_start" in str(error.value)


def test_helper_methods_of_a_callback_subclass_keep_working():
    callback = WithHelpers()
    result = lk.fit(mlp(), dataset(), batch_size=8, callbacks=[callback], **BASE)
    assert callback.steps == result.state.step == 8


# --- a hung DataLoader worker ---------------------------------------------------------------


class Hangs(torch.utils.data.Dataset):
    """A map-style dataset whose __getitem__ never returns for one index."""

    def __init__(self, hang_at: int | None) -> None:
        self.x, self.y = data(64)
        self.hang_at = hang_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == self.hang_at:
            time.sleep(3600)  # "forever": the worker is stopped when fit raises
        return self.x[index], self.y[index]


HUNG: dict[str, Any] = dict(
    batch_size=8,
    epochs=2,
    shuffle=False,
    num_workers=1,
    data_timeout_s=2,
    save_every=1,
    keep_last=2,
    **BASE,
)


def test_a_hung_worker_is_an_error_naming_it_and_resume_afterwards_is_exact(tmp_path: Path):
    expected = lk.fit(
        mlp(), Hangs(None), checkpoint_dir=tmp_path / "whole", callbacks=[Counter()], **HUNG
    )
    assert expected.state.step == 16

    # Sample 43 sits in batch 5 (samples 40..47): steps 1..5 run and are saved, then the
    # worker never delivers batch 5.
    counter = Counter()
    ckpt = tmp_path / "ckpt"
    started = time.monotonic()
    with pytest.raises(DataTimeoutError) as error:
        lk.fit(mlp(), Hangs(43), checkpoint_dir=ckpt, callbacks=[counter], **HUNG)
    print(f"hung worker: error after {time.monotonic() - started:.1f} s (data_timeout_s=2)")
    text = str(error.value)
    assert text.startswith("fit(train_data=...): DataLoader worker 0 (pid ")
    assert "within 2.0 s (batch 5 of this epoch)" in text
    assert "Hangs.__getitem__" in text
    assert "num_workers=0" in text and "data_timeout_s" in text  # the fixes
    assert "DataLoader timed out" in str(error.value.__cause__)
    assert counter.steps == 5

    again = Counter()  # the same callbacks as the interrupted run
    resumed = lk.fit(
        mlp(), Hangs(None), checkpoint_dir=ckpt, resume=True, callbacks=[again], **HUNG
    )
    assert resumed.state.step == 16 and again.steps == 11
    assert_bitwise_equal(params(resumed.state.model), params(expected.state.model))


def test_a_fit_built_loader_gets_data_timeout_s_only_with_workers():
    samples = dataset(16)
    common = dict(batch_size=8, shuffle=False, seed=0, timeout_s=7.5)
    assert make_loader(samples, num_workers=1, **common).timeout == 7.5
    assert make_loader(samples, num_workers=0, **common).timeout == 0  # no worker to wait for


def _two_layer_state(frozen_in_optimizer: bool) -> lk.TrainState:
    model = mlp(seed=1)
    first, last = model.get_submodule("0"), model.get_submodule("3")
    first.requires_grad_(False)
    trained = model.parameters() if frozen_in_optimizer else last.parameters()
    optimizer = torch.optim.SGD(trained, lr=0.1)
    return lk.TrainState.create(model, optimizer=optimizer, strategy=lk.SingleDevice("cpu"))


def test_a_param_group_added_after_the_record_is_made_is_not_silent():
    # The record's params and base_lrs are fixed at create: an added group's gradients
    # would miss the window's normalisation and the clip, and its lr the schedule.
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(2), lk.clip(1e-3), lk.optimizer_step())
    state = _two_layer_state(frozen_in_optimizer=False)
    first = state.model.get_submodule("0")
    first.requires_grad_(True)
    state.optimizer.add_param_group({"params": first.parameters(), "lr": 0.1})
    batch = data(8)
    state = step(state, batch)  # an open window: nothing applied yet
    with pytest.warns(UserWarning, match=r"has 2 param groups, the TrainState was made with 1"):
        step(state, batch)


def test_layers_frozen_in_the_optimizer_from_the_start_train_clipped_once_unfrozen():
    # What the warning recommends: the unfrozen layer's gradients are clipped with the rest.
    step = lk.chain(lk.forward(loss_fn), lk.accumulate(1), lk.clip(1e-3), lk.optimizer_step())
    state = _two_layer_state(frozen_in_optimizer=True)
    first = state.model.get_submodule("0")
    before = first.weight.detach().clone()
    state = step(state, data(8))
    assert torch.equal(first.weight, before)  # frozen: not trained
    first.requires_grad_(True)
    state = step(state, data(8, seed=1))
    moved = float((first.weight.detach() - before).norm())
    assert 0 < moved <= 0.1 * 1e-3 * (1 + 1e-9)  # at most lr x the clipped global norm


@pytest.mark.parametrize(
    "parts",
    [
        lambda: [lk.forward(loss_fn), lk.optimizer_step()],
        lambda: [lk.forward(loss_fn), lk.clip(1.0), lk.optimizer_step()],
    ],
    ids=["no-accumulate", "clip-no-accumulate"],
)
def test_a_custom_loop_without_accumulate_is_refused_at_the_second_micro_batch(parts):
    # Outside fit no structure check runs: the window of such a chain never closed, and the
    # loop went on forever, training nothing and piling up gradients.
    model = mlp(seed=1)
    state = lk.TrainState.create(model, optimizer=sgd, strategy=lk.SingleDevice("cpu"))
    step = lk.chain(*parts())
    state = step(state, data(8))
    with pytest.raises(ValueError, match="2 micro-batches ran without an optimizer step"):
        step(state, data(8))


def test_optimizer_step_apart_from_its_window_still_trains():
    # accumulate(k) called apart from the chain that holds optimizer_step (a loop of one's
    # own) has seen the window: no error, and the step happens.
    forward, acc = lk.chain(lk.forward(loss_fn), lk.optimizer_step()), lk.accumulate(3)
    state = lk.TrainState.create(mlp(seed=1), optimizer=sgd, strategy=lk.SingleDevice("cpu"))
    for _ in range(3):
        state = acc(forward(state, data(8)), None)
    assert state.step == 0 and state.window.closed
    state = lk.optimizer_step()(state, data(8))
    assert state.step == 1
