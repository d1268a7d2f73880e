"""param_groups (weight-decay split) and freeze."""

from __future__ import annotations

import pytest
import torch

import loopkit as lk


class Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4))  # 1-d, but neither a bias nor a norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_model() -> torch.nn.Module:
    return torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(5, 4),
            "linear": torch.nn.Linear(4, 4),
            "ln": torch.nn.LayerNorm(4),
            "bn": torch.nn.BatchNorm1d(4),
            "rms": torch.nn.RMSNorm(4),
            "gn": torch.nn.GroupNorm(2, 4),
            "scaled": Scaled(),
            "conv": torch.nn.Conv1d(4, 4, 3),
        }
    )


def names_of(model: torch.nn.Module, group: dict) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


def test_module_rule_no_decay_for_biases_and_norm_layers() -> None:
    model = make_model()
    groups = lk.param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert isinstance(groups[0]["weight_decay"], float)
    assert names_of(model, groups[0]) == {
        "embed.weight",
        "linear.weight",
        "scaled.scale",
        "conv.weight",
    }
    assert names_of(model, groups[1]) == {
        "linear.bias",
        "conv.bias",
        "ln.weight",
        "ln.bias",
        "bn.weight",
        "bn.bias",
        "rms.weight",
        "gn.weight",
        "gn.bias",
    }


def test_bare_parameters_use_the_ndim_rule() -> None:
    model = make_model()
    groups = lk.param_groups(model.parameters(), weight_decay=0.05)
    expected_decay = {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert names_of(model, groups[0]) == expected_decay
    assert names_of(model, groups[1]) == {n for n, _ in model.named_parameters()} - expected_decay
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


@pytest.mark.parametrize("bare", [False, True], ids=["module", "parameters"])
def test_frozen_parameters_are_left_out(bare: bool) -> None:
    model = make_model()
    frozen = lk.freeze(model, ["embed.", "ln."])
    groups = lk.param_groups(model.parameters() if bare else model, weight_decay=0.1)
    listed = set().union(*(names_of(model, g) for g in groups))
    assert listed == {n for n, _ in model.named_parameters()} - set(frozen)


def test_shared_parameters_are_listed_once_and_empty_groups_dropped() -> None:
    first = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(first, torch.nn.Tanh(), first)  # tied weight
    groups = lk.param_groups(model, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["params"] == [first.weight]
    # and the groups build a working optimizer (torch rejects a parameter listed twice)
    torch.optim.AdamW(groups, lr=1e-3)


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), True, "0.1"])
def test_bad_weight_decay(value: object) -> None:
    with pytest.raises(ValueError) as info:
        lk.param_groups(make_model(), weight_decay=value)  # type: ignore[arg-type]
    assert f"param_groups(weight_decay={value!r})" in str(info.value)


def test_freeze_by_prefix_prefixes_and_predicate_returns_the_names() -> None:
    model = make_model()
    assert lk.freeze(model, "linear.") == ["linear.weight", "linear.bias"]
    assert lk.freeze(model, ("ln.", "bn.")) == ["ln.weight", "ln.bias", "bn.weight", "bn.bias"]
    assert lk.freeze(model, lambda name: name.endswith("scale")) == ["scaled.scale"]
    frozen = {
        "linear.weight",
        "linear.bias",
        "ln.weight",
        "ln.bias",
        "bn.weight",
        "bn.bias",
        "scaled.scale",
    }
    for name, param in model.named_parameters():
        assert param.requires_grad is (name not in frozen), name


def test_freeze_matching_nothing_lists_the_top_level_names() -> None:
    model = make_model()
    with pytest.raises(ValueError) as info:
        lk.freeze(model, "encoder")
    message = str(info.value)
    assert "freeze(which='encoder')" in message and "'embed'" in message and "'linear'" in message
    assert all(p.requires_grad for p in model.parameters())
