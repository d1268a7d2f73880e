"""loopkit.testing's own pieces: the CheckSetup record, chain_parts, and the module layout."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

import loopkit as lk
import loopkit.testing
from loopkit.testing.search import MLPFactory
from loopkit.testing.setup import CheckSetup, default_optimizer, default_step
from loopkit.testing.stale_reuse import chain_parts

TESTING = Path(loopkit.testing.__file__).parent
MODULES = sorted(p for p in TESTING.glob("*.py"))
MLP = MLPFactory(d_in=4, hidden=(8,), d_out=3)


def classification_loss(model: torch.nn.Module, batch) -> lk.Loss:
    x, y = batch
    return lk.cross_entropy(model(x), y)


# --- CheckSetup ------------------------------------------------------------------------------


def test_check_setup_is_a_frozen_keyword_only_record_with_the_check_defaults() -> None:
    setup = CheckSetup.create("check_x", MLP, classification_loss)
    assert setup.optimizer == default_optimizer() and setup.precision == lk.Precision("fp32")
    assert (setup.schedule, setup.seed, setup.device, setup.make_step) == (None, 0, "cpu", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setup.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        CheckSetup("check_x", MLP, classification_loss)  # type: ignore[misc]
    assert CheckSetup.create("check_x", MLP, classification_loss, precision="bf16").precision == (
        lk.Precision("bf16")
    )


def test_check_setup_from_arguments_takes_the_setup_pieces_a_check_was_given() -> None:
    def check_x(make_model: Any, loss_fn: Any, *, batches: Any, seed: int = 0) -> CheckSetup:
        return CheckSetup.from_arguments("check_x", locals())

    setup = check_x(MLP, classification_loss, batches=[1, 2], seed=3)
    assert setup == CheckSetup.create("check_x", MLP, classification_loss, seed=3)
    assert (setup.precision, setup.schedule, setup.strategy) == (lk.Precision("fp32"), None, None)


def test_check_setup_builds_fresh_independent_records_and_the_default_chain() -> None:
    setup = CheckSetup.create("check_x", MLP, classification_loss, seed=5)
    a, b = setup.new_state(), setup.new_state()
    assert a.model is not b.model and a.seed == 5 and isinstance(a.strategy, lk.SingleDevice)
    assert setup.step_maker() == default_step(classification_loss)
    assert setup.step_maker(max_norm=1.0) == default_step(classification_loss, 1.0)
    assert repr(setup.step(2)) == repr(default_step(classification_loss)(2))
    assert setup.step_name is None


def test_check_setup_names_a_make_step_that_returns_no_transform() -> None:
    setup = CheckSetup.create("check_x", MLP, classification_loss, make_step=str)  # type: ignore[arg-type]
    assert setup.step_name == "str"
    with pytest.raises(TypeError, match=r"check_x\(make_step=str\): make_step\(1\) returned '1'"):
        setup.step(1)


def test_check_setup_tolerance_is_bitwise_on_cpu_only_when_asked() -> None:
    setup = CheckSetup.create("check_x", MLP, classification_loss)
    assert setup.tolerance(None, None, bitwise=True).bitwise
    assert str(setup.tolerance(None, None)) == "rtol=1e-07, atol=1e-10 (default for torch.float64)"
    assert setup.tolerance(1e-3, 0.0, bitwise=True).rtol == 1e-3


# --- chain_parts -----------------------------------------------------------------------------


class HasParts:
    """A user's transform that happens to have a `parts` attribute: one opaque part."""

    parts = (lk.identity(), lk.identity())

    def __call__(self, state: lk.TrainState, batch, /) -> lk.TrainState:
        return state


def test_chain_parts_opens_loopkit_chains_only() -> None:
    forward, step = lk.forward(classification_loss), lk.optimizer_step()
    assert chain_parts(lk.chain(forward, lk.chain(lk.accumulate(2), step))) == (
        forward,
        lk.accumulate(2),
        step,
    )
    assert chain_parts(forward) == (forward,)
    user = HasParts()
    assert chain_parts(user) == (user,)


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_testing_module_declares_all_and_imports_no_private_names(path: Path) -> None:
    tree = ast.parse(path.read_text())
    assigned = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert "__all__" in assigned, f"{path.name} has no __all__"
    name = "loopkit.testing" if path.stem == "__init__" else f"loopkit.testing.{path.stem}"
    module = importlib.import_module(name)
    assert all(hasattr(module, name) for name in module.__all__)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name} imports private {private} from {node.module}"


def test_no_vaguely_named_files_beside_checks() -> None:
    names = {p.name for p in MODULES}
    assert not names & {"_run.py", "_spawn.py", "checker.py"}
    assert {"checks.py", "search.py", "strategies.py", "setup.py", "pytest_plugin.py"} <= names


@pytest.mark.parametrize(
    "stem",
    [
        "accumulation",
        "determinism",
        "resume",
        "sanity",
        "stale_reuse",
        "reference",
        "strategy_equivalence",
    ],
)
def test_each_check_module_stays_small(stem: str) -> None:
    lines = (TESTING / f"{stem}.py").read_text().count("\n")
    assert lines < 400, f"loopkit/testing/{stem}.py has {lines} lines"
