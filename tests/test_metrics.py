"""Metrics and evaluate: hand-computed oracles over padded batches, no side effects."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import TinyLM, mlp, token_loss

import loopkit as lk
from loopkit.evaluate import evaluate
from loopkit.metrics import (
    Accuracy,
    Mean,
    Metric,
    TopKAccuracy,
    as_metric,
    default_target,
    to_host,
)

VOCAB = 11


def token_batches(seed=0):
    """Three padded batches with different numbers of real tokens (so item mean != mean of
    batch means)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for rows, length, pads in ((2, 5, (0, 3)), (3, 4, (1, 2, 3)), (1, 6, (5,))):
        tokens = torch.randint(0, VOCAB, (rows, length), generator=gen)
        targets = torch.randint(0, VOCAB, (rows, length), generator=gen)
        for row, pad in enumerate(pads):
            if pad:
                targets[row, -pad:] = -100
        batches.append({"tokens": tokens, "targets": targets})
    return batches


def _state(model):
    return lk.TrainState.create(
        model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), strategy=lk.SingleDevice("cpu")
    )


def hand_computed(model, batches, k):
    """Per-token losses, argmax and top-k hits with numpy, pooled over every real token."""
    losses, hits, topk_hits = [], [], []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["tokens"]).numpy().reshape(-1, VOCAB)
            targets = batch["targets"].numpy().reshape(-1)
            for row, target in zip(logits, targets, strict=True):
                if target == -100:
                    continue
                log_probs = row - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
                losses.append(-log_probs[target])
                hits.append(int(np.argmax(row) == target))
                topk_hits.append(int(target in np.argsort(-row)[:k]))
    return float(np.mean(losses)), float(np.mean(hits)), float(np.mean(topk_hits))


def test_evaluate_matches_a_hand_computation_over_padded_batches():
    model = TinyLM(vocab=VOCAB)
    state = _state(model)
    batches = token_batches()
    loss, accuracy, top3 = hand_computed(model, batches, k=3)
    result = evaluate(
        state, batches, {"accuracy": Accuracy(), "top3": TopKAccuracy(3)}, loss_fn=token_loss
    )
    assert set(result) == {"eval/loss", "eval/perplexity", "eval/accuracy", "eval/top3"}
    assert result["eval/loss"] == pytest.approx(loss, rel=1e-12)
    assert result["eval/perplexity"] == pytest.approx(math.exp(loss), rel=1e-12)
    assert result["eval/accuracy"] == pytest.approx(accuracy, rel=1e-12)
    assert result["eval/top3"] == pytest.approx(top3, rel=1e-12)
    assert all(isinstance(v, float) for v in result.values())
    # the mean of batch means differs, so the pooling is really over items
    with torch.no_grad():
        batch_means = [
            float(token_loss(model, b).sum / token_loss(model, b).count) for b in batches
        ]
    assert abs(np.mean(batch_means) - loss) > 1e-3


def test_evaluate_leaves_the_model_params_grads_and_state_untouched():
    model = mlp()
    state = _state(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    assert model.training
    evaluate(
        state,
        [(x[:4], y[:4]), (x[4:], y[4:])],
        {"acc": Accuracy()},
        loss_fn=lambda m, b: lk.cross_entropy(m(b[0]), b[1]),
    )
    assert model.training  # mode restored
    assert len(forwards) == 2  # one forward per batch: metrics read loss_fn's forward
    for p, (value, grad) in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, value) and torch.equal(p.grad, grad)
    state.check_fresh()  # not consumed: training can go on with this record
    state = lk.forward(lambda m, b: lk.cross_entropy(m(b[0]), b[1]))(state, (x, y))
    model.eval()
    evaluate(state, [(x, y)], {"acc": Accuracy()})
    assert not model.training  # eval mode restored too


def test_a_scalar_mean_loss_is_weighted_by_batch_size():
    model = mlp(d_out=2)
    state = _state(model)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randn(n, 2, generator=gen, dtype=torch.float64),
        )
        for n in (3, 1, 5)
    ]
    with torch.no_grad():
        squared = torch.cat([((model(x) - y) ** 2).mean(dim=1) for x, y in batches])
    result = evaluate(state, batches, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1).mean())
    assert result["eval/loss"] == pytest.approx(float(squared.mean()), rel=1e-12)


def test_metric_functions_predict_default_outputs_and_max_batches():
    model = mlp()
    state = _state(model)
    gen = torch.Generator().manual_seed(2)
    batches = [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in (4, 2, 3)
    ]
    with torch.no_grad():
        outs = [model(x) for x, _ in batches]
    # a function returning a scalar mean (weighted by batch size) or Loss(sum, count)
    metrics = {
        "logit_mean": lambda out, batch: out.mean(dim=1).mean(),
        "logit_sum": lambda out, batch: lk.Loss(out.sum(), out.numel()),
    }
    result = evaluate(state, batches, metrics)  # no loss_fn: outputs = model(batch[0])
    assert set(result) == {"eval/logit_mean", "eval/logit_sum"}
    all_out = torch.cat(outs)
    assert result["eval/logit_mean"] == pytest.approx(float(all_out.mean()), rel=1e-12)
    assert result["eval/logit_sum"] == pytest.approx(float(all_out.mean()), rel=1e-12)
    two = evaluate(
        state, batches, {"acc": Accuracy()}, max_batches=2, predict=lambda m, b: -m(b[0])
    )  # predict decides what metrics see
    preds = torch.cat([(-o).argmax(1) for o in outs[:2]])
    targets = torch.cat([y for _, y in batches[:2]])
    assert two["eval/acc"] == float((preds == targets).double().mean())


def test_accuracy_reads_logits_from_dicts_tuples_and_attributes():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    batch = {"x": torch.zeros(3), "labels": torch.tensor([1, 1, -100])}
    with_attribute = type("Outputs", (), {"logits": logits})()
    for outputs in (logits, {"logits": logits}, (logits, None), with_attribute):
        metric = Accuracy()
        metric.update(outputs, batch)
        assert float(metric.compute()) == 0.5
        assert [float(t) for t in metric.state_tensors()] == [1.0, 2.0]
        metric.reset()
        assert [float(t) for t in metric.state_tensors()] == [0.0, 0.0]


def test_metric_protocol_and_as_metric():
    for metric in (Mean(lambda o, b: o.mean()), Accuracy(), TopKAccuracy(2)):
        assert isinstance(metric, Metric)
        assert as_metric(metric) is metric
    fn = lambda o, b: o.mean()  # noqa: E731
    wrapped = as_metric(fn)
    assert isinstance(wrapped, Mean) and wrapped.fn is fn
    with pytest.raises(TypeError, match=r"metrics\['acc'\]=Accuracy: pass an instance"):
        as_metric(Accuracy, "acc")
    with pytest.raises(TypeError, match=r"metrics\['x'\]=3"):
        as_metric(3, "x")


def test_default_target():
    y = torch.tensor([1])
    assert default_target((torch.zeros(1), y)) is y
    assert default_target({"targets": y}) is y and default_target({"labels": y}) is y
    with pytest.raises(ValueError, match=r"keys \['inputs', 'y'\].*target="):
        default_target({"inputs": y, "y": y})


def test_to_host_converts_tensors_and_numbers_in_order():
    values = {"a": torch.tensor(1.5), "b": 2, "c": torch.tensor([3], dtype=torch.int64)}
    assert list(to_host(values).items()) == [("a", 1.5), ("b", 2.0), ("c", 3.0)]
    with pytest.raises(ValueError, match="'v'.*scalars"):
        to_host({"v": torch.zeros(2)})
    with pytest.raises(TypeError, match="'s'"):
        to_host({"s": "x"})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"metrics": {3: Accuracy()}}, TypeError, "metric names must be non-empty str"),
        ({"metrics": {"acc": "accuracy"}}, TypeError, r"metrics\['acc'\]='accuracy'"),
        ({"metrics": [Accuracy()]}, TypeError, "expected a dict of name -> metric"),
        (
            {"metrics": {"loss": Accuracy()}, "loss_fn": token_loss},
            ValueError,
            "'eval/loss' is computed from loss_fn",
        ),
        ({"metrics": {"acc": Accuracy(), "eval/acc": Accuracy()}}, ValueError, "is given twice"),
        ({}, ValueError, "nothing to compute"),
        ({"loss_fn": token_loss, "max_batches": 0}, ValueError, "max_batches=0"),
        ({"loss_fn": 3}, TypeError, "loss_fn=3"),
    ],
)
def test_evaluate_argument_errors(kwargs, error, match):
    state = _state(TinyLM(vocab=VOCAB))
    with pytest.raises(error, match=match):
        evaluate(state, token_batches(), **kwargs)


def test_evaluate_data_errors():
    state = _state(TinyLM(vocab=VOCAB))
    with pytest.raises(ValueError, match="yielded no batch"):
        evaluate(state, [], loss_fn=token_loss)
    with pytest.raises(ValueError, match="counted 0.0 items"):
        masked = [{**b, "targets": torch.full_like(b["targets"], -100)} for b in token_batches()]
        evaluate(state, masked, loss_fn=token_loss)
    with pytest.raises(RuntimeError, match="loss_fn did not call the model"):
        evaluate(
            state,
            token_batches(),
            {"acc": Accuracy()},
            loss_fn=lambda m, b: lk.cross_entropy(m.head(m.embed(b["tokens"])), b["targets"]),
        )
    with pytest.raises(ValueError, match="pass predict=|Pass predict="):
        evaluate(state, token_batches(), {"acc": Accuracy()})
    assert state.model.training


def test_evaluate_refuses_a_consumed_state():
    model = mlp()
    state = _state(model)
    state.replace(step=1)
    with pytest.raises(lk.StaleStateError):
        evaluate(
            state, [(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))], {"acc": Accuracy()}
        )


# --- across ranks: each of 2 gloo processes evaluates half the data -------------------------


def _worker(rank, init_file, out_dir):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:

        class TwoRanks(lk.SingleDevice):
            world_size = 2

        state = lk.TrainState.create(
            TinyLM(vocab=VOCAB),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            strategy=TwoRanks("cpu"),
        )
        object.__setattr__(state.strategy, "rank", rank)
        shard = token_batches()[rank::2]  # uneven: rank 0 gets 2 batches, rank 1 gets 1
        result = evaluate(
            state, shard, {"acc": Accuracy(), "top3": TopKAccuracy(3)}, loss_fn=token_loss
        )
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(result, file)
    finally:
        torch.distributed.destroy_process_group()


def _single_process_result():
    return evaluate(
        _state(TinyLM(vocab=VOCAB)),
        token_batches(),
        {"acc": Accuracy(), "top3": TopKAccuracy(3)},
        loss_fn=token_loss,
    )


def test_evaluate_sums_every_rank_state_before_computing(monkeypatch):
    """Two ranks simulated in one process: all_reduce adds the other rank's packed state."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    packed = {}

    def capture(tensor, op=None):
        packed["other"] = tensor.clone()

    def add_other(tensor, op=None):
        tensor += packed["other"]

    class TwoRanks(lk.SingleDevice):
        world_size = 2

    def run(shard, all_reduce):
        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
        state = lk.TrainState.create(
            TinyLM(vocab=VOCAB),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            strategy=TwoRanks("cpu"),
        )
        return evaluate(
            state, shard, {"acc": Accuracy(), "top3": TopKAccuracy(3)}, loss_fn=token_loss
        )

    run(token_batches()[1::2], capture)  # "rank 1": one batch
    combined = run(token_batches()[0::2], add_other)  # "rank 0": two batches, plus rank 1
    monkeypatch.undo()
    assert combined == pytest.approx(_single_process_result(), rel=1e-12)


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning")
def test_evaluate_reduces_loss_and_metrics_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children skip re-importing torch (spawn costs ~10 s on a small machine).
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    single = _single_process_result()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == pytest.approx(single, rel=1e-12)
