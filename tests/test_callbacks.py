"""Callbacks: dispatch, Stop, EarlyStopping, BestModel, LRMonitor, ThroughputMonitor."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from loopkit.callbacks import (
    HOOKS,
    BestModel,
    Callback,
    EarlyStopping,
    LRMonitor,
    MetricNotFoundError,
    Stop,
    ThroughputMonitor,
    check_callbacks,
    collect_log_metrics,
    dispatch,
    improved,
    infer_mode,
    peak_flops_for,
)

# --- dispatch -----------------------------------------------------------------------------


class Recorder:
    def __init__(self, name: str, calls: list[tuple[str, str]], stop_on: str | None = None):
        self.name, self.calls, self.stop_on = name, calls, stop_on

    def on_step_end(self, state):
        self.calls.append((self.name, "on_step_end"))
        return Stop(f"{self.name} stops") if self.stop_on == "on_step_end" else None

    def on_log(self, state, metrics):
        self.calls.append((self.name, "on_log"))
        return None


class OnlyFitEnd:
    def __init__(self, calls):
        self.calls = calls

    def on_fit_end(self, state):
        self.calls.append(("only", "on_fit_end"))


def test_dispatch_calls_every_callback_in_order_and_returns_the_first_stop():
    calls: list[tuple[str, str]] = []
    callbacks = [
        Recorder("a", calls),
        Recorder("b", calls, stop_on="on_step_end"),
        OnlyFitEnd(calls),
        Recorder("c", calls, stop_on="on_step_end"),
    ]
    result = dispatch(callbacks, "on_step_end", object())
    assert result == Stop("b stops")
    # all called, even after the first Stop; one without the hook is skipped
    assert calls == [("a", "on_step_end"), ("b", "on_step_end"), ("c", "on_step_end")]
    calls.clear()
    assert dispatch(callbacks, "on_log", object(), {"train/loss": 1.0}) is None
    assert calls == [("a", "on_log"), ("b", "on_log"), ("c", "on_log")]
    calls.clear()
    assert dispatch(callbacks, "on_fit_end", object()) is None
    assert calls == [("only", "on_fit_end")]


def test_dispatch_with_no_callbacks_returns_none():
    assert dispatch([], "on_fit_start", object(), {}) is None


def test_callback_base_class_does_nothing_for_every_hook():
    args = {
        "on_fit_start": (None, {}),
        "on_log": (None, {}),
        "on_eval_end": (None, {}),
        "on_checkpoint_saved": (None, "x"),
    }
    for hook in HOOKS:
        assert dispatch([Callback()], hook, *args.get(hook, (None,))) is None


class Returns:
    def __init__(self, value):
        self.value = value

    def on_epoch_end(self, state):
        return self.value


@pytest.mark.parametrize("value", [True, 0, "stop", {"stop": True}, Stop])
def test_a_hook_returning_anything_but_none_or_stop_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"Returns\.on_epoch_end returned .*None or loopkit\.Stop"):
        dispatch([Callback(), Returns(value)], "on_epoch_end", object())


def test_a_hook_returning_a_state_gets_a_hint():
    class TrainState:  # same name as loopkit's record
        pass

    with pytest.raises(TypeError, match="never replace or step it"):
        dispatch([Returns(TrainState())], "on_epoch_end", object())


def test_dispatch_rejects_unknown_hook_names():
    with pytest.raises(ValueError, match="on_step_ended.*on_step_end"):
        dispatch([Callback()], "on_step_ended", object())


def test_stop_is_a_frozen_record_with_a_str_reason():
    stop = Stop("done")
    assert stop == Stop("done") and stop.reason == "done"
    with pytest.raises(AttributeError):
        stop.reason = "x"  # type: ignore[misc]
    with pytest.raises(TypeError, match="Stop"):
        Stop(3)  # type: ignore[arg-type]


def test_check_callbacks_finds_misspelled_hooks_and_unlisted_callbacks():
    class Typo:
        def on_epoch_ended(self, state):
            pass

    with pytest.raises(ValueError, match="Did you mean on_epoch_end"):
        check_callbacks([Typo()])
    with pytest.raises(TypeError, match=r"callbacks=\[EarlyStopping\(\.\.\.\)\]"):
        check_callbacks(EarlyStopping())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of callbacks"):
        check_callbacks("early")  # type: ignore[arg-type]
    ok = [Callback(), LRMonitor(), EarlyStopping()]
    assert check_callbacks(ok) == tuple(ok)


def test_collect_log_metrics_merges_and_rejects_duplicates_and_bad_returns():
    class Const:
        def __init__(self, values):
            self.values = values

        def log_metrics(self, state):
            return self.values

    assert collect_log_metrics([Const({"a": 1.0}), Callback(), Const({"b": 2.0})], None) == {
        "a": 1.0,
        "b": 2.0,
    }
    with pytest.raises(ValueError, match="'a' is already contributed by Const"):
        collect_log_metrics([Const({"a": 1.0}), Const({"a": 2.0})], None)
    with pytest.raises(TypeError, match="Const.log_metrics returned"):
        collect_log_metrics([Const([1.0])], None)


# --- mode inference -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, mode",
    [
        ("eval/loss", "min"),
        ("eval/perplexity", "min"),
        ("val_loss", "min"),
        ("eval/error_rate", "min"),
        ("eval/mse", "min"),
        ("eval/mae", "min"),
        ("eval/accuracy", "max"),
        ("eval/acc", "max"),
        ("eval/top5_accuracy", "max"),
        ("eval/f1", "max"),
        ("eval/precision", "max"),
        ("eval/recall", "max"),
        ("eval/auc", "max"),
        ("eval/bleu", "max"),
        ("eval/score", "max"),
    ],
)
def test_mode_is_inferred_from_the_name(name, mode):
    assert infer_mode(name) == mode
    assert EarlyStopping(name).mode == mode
    assert BestModel(name).mode == mode


@pytest.mark.parametrize("name", ["eval/reward_mean", "eval/loss_score"])
def test_mode_that_cannot_be_inferred_asks_for_mode(name):
    with pytest.raises(ValueError, match='Pass mode="min" or mode="max"'):
        EarlyStopping(name)
    assert EarlyStopping(name, mode="max").mode == "max"


@pytest.mark.parametrize(
    ("value", "best", "mode", "min_delta", "expected"),
    [
        (0.5, None, "min", 0.0, True),  # anything but NaN beats nothing
        (0.5, None, "max", 0.0, True),
        (math.nan, None, "min", 0.0, False),  # NaN never improves
        (math.nan, 0.5, "max", 0.0, False),
        (0.4, 0.5, "min", 0.0, True),
        (0.5, 0.5, "min", 0.0, False),  # a tie is not an improvement
        (0.6, 0.5, "min", 0.0, False),
        (0.6, 0.5, "max", 0.0, True),
        (0.5, 0.5, "max", 0.0, False),
        (0.45, 0.5, "min", 0.05, False),  # must beat the best by more than min_delta
        (0.44, 0.5, "min", 0.05, True),
        (0.56, 0.5, "max", 0.05, True),
        (-math.inf, 0.5, "min", 0.0, True),
    ],
)
def test_improved_is_the_one_rule(value, best, mode, min_delta, expected):
    assert improved(value, best, mode, min_delta) is expected


def test_explicit_mode_overrides_the_name_and_is_checked():
    assert EarlyStopping("eval/loss", mode="max").mode == "max"
    with pytest.raises(ValueError, match=r"EarlyStopping\(mode='minimum'\)"):
        EarlyStopping("eval/loss", mode="minimum")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patience": 0}, "patience=0"),
        ({"patience": 1.5}, "patience=1.5"),
        ({"min_delta": -0.1}, "min_delta=-0.1"),
        ({"min_delta": math.inf}, "min_delta=inf"),
        ({"monitor": ""}, "monitor=''"),
    ],
)
def test_early_stopping_validates_its_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EarlyStopping(**kwargs)


# --- EarlyStopping ------------------------------------------------------------------------


def reference_stop_index(values, mode, patience, min_delta):
    """Hand-written rule: index of the eval at which training stops, or None.

    An eval improves when it beats the best improving value before it by more than
    min_delta; training stops at the first eval that is `patience` evals after the last
    improvement (or after the start, when there was none yet).
    """
    last_improvement = -1
    best = None
    for i, value in enumerate(values):
        if value == value:  # not NaN
            better = best is None or (
                value < best - min_delta if mode == "min" else value > best + min_delta
            )
            if better:
                best, last_improvement = value, i
                continue
        if i - last_improvement >= patience:
            return i
    return None


eval_values = st.lists(
    st.one_of(
        st.sampled_from([0.0, 0.5, 1.0, 1.05, 2.0]),
        st.floats(-3, 3, allow_nan=False),
        st.just(math.nan),
    ),
    min_size=1,
    max_size=25,
)


def _state(step):
    return SimpleNamespace(step=step, epoch=0, strategy=SimpleNamespace(rank=0, is_main=True))


@given(
    values=eval_values,
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(1, 5),
    min_delta=st.sampled_from([0.0, 0.1, 0.7]),
)
def test_early_stopping_stops_at_the_eval_the_patience_rule_says(values, mode, patience, min_delta):
    stopper = EarlyStopping("eval/metric", mode=mode, patience=patience, min_delta=min_delta)
    stopped_at = None
    for i, value in enumerate(values):
        result = stopper.on_eval_end(_state(10 * (i + 1)), {"eval/metric": value, "eval/x": 0})
        if result is not None:
            assert isinstance(result, Stop) and "eval/metric" in result.reason
            stopped_at = i
            break
    assert stopped_at == reference_stop_index(values, mode, patience, min_delta)
    seen = values[: (stopped_at if stopped_at is not None else len(values) - 1) + 1]
    finite = [v for v in seen if v == v]
    if finite:  # the best value is one of the improving values, with its step
        assert stopper.best_value in finite
        assert stopper.best_step == 10 * (seen.index(stopper.best_value) + 1)
        if min_delta == 0.0:
            assert stopper.best_value == (min(finite) if mode == "min" else max(finite))
    else:
        assert stopper.best_value is None and stopper.best_step is None


@given(values=eval_values, patience=st.integers(1, 4), cut=st.integers(0, 25))
def test_early_stopping_resumes_from_its_state_dict(values, patience, cut):
    cut = min(cut, len(values))
    whole = EarlyStopping("eval/loss", patience=patience)
    first = EarlyStopping("eval/loss", patience=patience)
    results_whole, results_split = [], []
    for i, value in enumerate(values):
        results_whole.append(whole.on_eval_end(_state(i), {"eval/loss": value}))
    for i, value in enumerate(values[:cut]):
        results_split.append(first.on_eval_end(_state(i), {"eval/loss": value}))
    saved = json.loads(json.dumps(first.state_dict()))  # JSON-able
    second = EarlyStopping("eval/loss", patience=patience)
    second.load_state_dict(saved)
    for i, value in enumerate(values[cut:], start=cut):
        results_split.append(second.on_eval_end(_state(i), {"eval/loss": value}))
    assert results_split == results_whole
    assert second.state_dict() == whole.state_dict()


def test_early_stopping_state_dict_is_checked_against_the_settings():
    saved = EarlyStopping("eval/loss").state_dict()
    with pytest.raises(ValueError, match="saved monitor='eval/loss'"):
        EarlyStopping("eval/accuracy").load_state_dict(saved)
    with pytest.raises(ValueError, match="saved mode='min'"):
        EarlyStopping("eval/loss", mode="max").load_state_dict(saved)


def test_a_missing_monitor_lists_the_available_keys():
    stopper = EarlyStopping("eval/acuracy", mode="max")
    with pytest.raises(KeyError) as info:
        stopper.on_eval_end(_state(1), {"eval/loss": 1.0, "eval/accuracy": 0.5})
    assert isinstance(info.value, MetricNotFoundError)
    assert "['eval/accuracy', 'eval/loss']" in str(info.value)


def test_early_stopping_keeps_asking_to_stop_after_patience_runs_out():
    stopper = EarlyStopping("eval/loss", patience=1)
    assert stopper.on_eval_end(_state(1), {"eval/loss": 1.0}) is None
    assert isinstance(stopper.on_eval_end(_state(2), {"eval/loss": 1.0}), Stop)  # no gain
    assert isinstance(stopper.on_eval_end(_state(3), {"eval/loss": 2.0}), Stop)


# --- BestModel ----------------------------------------------------------------------------


def _model_state(model, step, rank=0):
    return SimpleNamespace(
        step=step, epoch=0, model=model, strategy=SimpleNamespace(rank=rank, is_main=rank == 0)
    )


def test_best_model_keeps_and_saves_the_weights_of_the_best_eval(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "out" / "best.safetensors"
    best = BestModel("eval/loss", path=path)
    weights_at = {}
    for i, loss in enumerate([3.0, 1.0, 2.0, 0.5, 4.0, 0.5]):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(i))
        weights_at[i] = {k: v.clone() for k, v in model.state_dict().items()}
        assert best.on_eval_end(_model_state(model, 100 * i), {"eval/loss": loss}) is None
    assert best.best_value == 0.5 and best.best_step == 300  # ties do not replace the best
    for name, tensor in weights_at[3].items():
        assert torch.equal(best.best_weights[name], tensor)
        assert best.best_weights[name].device.type == "cpu"
    # a copy: the model has moved on
    assert not torch.equal(best.best_weights["weight"], model.weight.detach())
    loaded = load_file(str(path))
    assert loaded.keys() == weights_at[3].keys()
    for name, tensor in weights_at[3].items():
        assert torch.equal(loaded[name], tensor)
    sidecar = json.loads((tmp_path / "out" / "best.json").read_text())
    assert sidecar == {"step": 300, "monitor": "eval/loss", "mode": "min", "value": 0.5}
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.json", "best.safetensors"]

    fresh = torch.nn.Linear(3, 2)
    assert best.restore(fresh) is fresh
    assert torch.equal(fresh.weight, weights_at[3]["weight"])

    resumed = BestModel("eval/loss", path=path)
    resumed.load_state_dict(json.loads(json.dumps(best.state_dict())))
    assert resumed.best_value == 0.5 and resumed.best_step == 300
    assert torch.equal(resumed.best_weights["bias"], weights_at[3]["bias"])


def test_best_model_in_max_mode_and_off_the_main_rank(tmp_path):
    model = torch.nn.Linear(2, 1)
    path = tmp_path / "best.safetensors"
    best = BestModel("eval/accuracy", path=path)
    for i, acc in enumerate([0.1, 0.9, 0.3]):
        with torch.no_grad():
            model.weight.fill_(float(i))
        best.on_eval_end(_model_state(model, i, rank=1), {"eval/accuracy": acc})
    assert best.best_step == 1 and torch.all(best.best_weights["weight"] == 1.0)
    assert not path.exists()  # only rank 0 writes


def test_best_model_restore_before_any_eval_says_why():
    with pytest.raises(RuntimeError, match="no eval has been seen yet"):
        BestModel().restore(torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match="BestModel\\(path=3\\)"):
        BestModel(path=3)  # type: ignore[arg-type]


# --- LRMonitor, ThroughputMonitor ---------------------------------------------------------


def test_lr_monitor_reports_every_param_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=1.0)
    assert LRMonitor().log_metrics(SimpleNamespace(optimizer=opt)) == {
        "lr/group0": 0.1,
        "lr/group1": 0.01,
    }


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _perf_state(samples, tokens, device="cpu", world_size=1):
    return SimpleNamespace(
        step=0,
        samples_seen=samples,
        tokens_seen=tokens,
        strategy=SimpleNamespace(
            device=torch.device(device), rank=0, is_main=True, world_size=world_size
        ),
    )


def test_throughput_monitor_mfu_is_over_every_devices_peak():
    """samples_seen/tokens_seen are job-wide sums, so MFU divides by world_size peaks."""
    clock = FakeClock()
    monitor = ThroughputMonitor(flops_per_item=6000.0, peak_flops=1e6, clock=clock)
    monitor.on_fit_start(_perf_state(0, 0, world_size=4), {})
    clock.now = 2.0
    out = monitor.log_metrics(_perf_state(64, 640, world_size=4))
    assert out["perf/tokens_per_s"] == 320.0
    assert out["perf/mfu"] == 6000.0 * 320.0 / (1e6 * 4)


def test_throughput_monitor_math_with_a_fake_clock():
    clock = FakeClock()
    monitor = ThroughputMonitor(flops_per_item=6000.0, peak_flops=1e6, clock=clock)
    clock.now = 5.0
    monitor.on_fit_start(_perf_state(0, 0), {})
    clock.now = 7.0  # 2 s: 64 samples, 640 tokens (tokens_seen is a device tensor)
    out = monitor.log_metrics(_perf_state(64, torch.tensor(640)))
    assert out == {
        "perf/samples_per_s": 32.0,
        "perf/tokens_per_s": 320.0,
        "perf/mfu": 6000.0 * 320.0 / 1e6,
    }
    clock.now = 11.0  # 4 s, of which an eval ends at 10.0: the window restarts there
    monitor.on_eval_end(_perf_state(96, torch.tensor(960)), {})
    clock.now = 12.0
    out = monitor.log_metrics(_perf_state(128, torch.tensor(1280)))
    assert out["perf/samples_per_s"] == 32.0 and out["perf/tokens_per_s"] == 320.0
    clock.now = 14.0
    monitor.on_checkpoint_saved(_perf_state(128, 1280), "ckpt")
    clock.now = 18.0
    out = monitor.log_metrics(_perf_state(160, 1600))
    assert out["perf/samples_per_s"] == 8.0 and out["perf/tokens_per_s"] == 80.0


def test_throughput_monitor_without_flops_has_no_mfu_and_skips_zero_time():
    clock = FakeClock()
    monitor = ThroughputMonitor(clock=clock)
    assert monitor.log_metrics(_perf_state(0, 0)) == {}  # not started: opens the window
    clock.now = 1.0
    assert monitor.log_metrics(_perf_state(10, 20)) == {
        "perf/samples_per_s": 10.0,
        "perf/tokens_per_s": 20.0,
    }
    assert monitor.log_metrics(_perf_state(10, 20)) == {}  # no time passed


def test_throughput_monitor_needs_peak_flops_on_cpu():
    monitor = ThroughputMonitor(flops_per_item=1.0)
    with pytest.raises(ValueError, match=r"ThroughputMonitor\(peak_flops=None\).*'cpu'"):
        monitor.on_fit_start(_perf_state(0, 0), {})
    with pytest.raises(ValueError, match="flops_per_item=0"):
        ThroughputMonitor(flops_per_item=0)
    with pytest.raises(ValueError, match="peak_flops=-1"):
        ThroughputMonitor(peak_flops=-1)


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("Quadro P400", None),
    ],
)
def test_peak_flops_table(name, flops):
    assert peak_flops_for(name) == flops
