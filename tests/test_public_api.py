"""The public names: importable, documented; built transforms print like their call."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest

import loopkit
import loopkit as lk

INIT = Path(loopkit.__file__)


def _source_modules() -> dict[str, str]:
    """name -> the loopkit module __init__ imports it from (read from the source)."""
    sources = {}
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                sources[alias.asname or alias.name] = (
                    f"loopkit.{node.module}" if node.module else (f"loopkit.{alias.name}")
                )
    return sources


SOURCES = _source_modules()


def _alias_docstring(module_name: str, name: str) -> str | None:
    """The string literal right after `name = ...` in a module (how aliases are documented)."""
    module = importlib.import_module(module_name)
    assert module.__file__ is not None
    body = ast.parse(Path(module.__file__).read_text()).body
    for node, following in zip(body, body[1:], strict=False):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else ([node.target] if isinstance(node, ast.AnnAssign) else [])
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return following.value.value if isinstance(following.value.value, str) else None
    return None


def test_all_is_sorted_unique_and_matches_the_imports() -> None:
    assert len(set(lk.__all__)) == len(lk.__all__)
    assert lk.__all__ == sorted(lk.__all__)
    assert set(lk.__all__) <= set(SOURCES)


@pytest.mark.parametrize("name", lk.__all__)
def test_public_name_is_importable_and_documented(name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from loopkit import {name}", namespace)  # noqa: S102
    obj = namespace[name]
    assert obj is getattr(lk, name)
    if inspect.ismodule(obj):
        doc = obj.__doc__
    elif (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("loopkit"):
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        # dataclasses write "Name(field: type, ...)" when the class has no docstring
        assert not (doc or "").startswith(f"{obj.__name__}("), f"{name} has only a generated doc"
    else:  # a type alias: documented by the string literal under its assignment
        doc = _alias_docstring(SOURCES[name], name)
    assert isinstance(doc, str) and doc.strip(), f"loopkit.{name} has no docstring"


def test_every_public_function_documents_itself() -> None:
    """Factories and helpers also document what they raise or return (Google style)."""
    for name in ["forward", "accumulate", "clip", "chain", "every", "when", "freeze"]:
        doc = getattr(lk, name).__doc__
        assert "Raises:" in doc, name


# --- built transforms print like the call that built them, and compare by value --------------


def f(model, batch):  # noqa: D103 - a module-level loss_fn so its name reads back
    return model(batch).mean()


def g(model, batch):  # noqa: D103
    return model(batch).sum()


REPRS = [
    (lambda: lk.forward(f), "forward(f)"),
    (lambda: lk.accumulate(4), "accumulate(4)"),
    (lambda: lk.clip(1.0), "clip(1.0)"),
    (lambda: lk.clip(0.5, norm_type=1.0), "clip(0.5, norm_type=1.0)"),
    (lambda: lk.optimizer_step(), "optimizer_step()"),
    (lambda: lk.identity(), "identity()"),
    (
        lambda: lk.chain(lk.accumulate(2), lk.optimizer_step()),
        "chain(accumulate(2), optimizer_step())",
    ),
    (lambda: lk.every(3, lk.clip(2.0)), "every(3, clip(2.0))"),
]


@pytest.mark.parametrize(("build", "text"), REPRS, ids=[r[1] for r in REPRS])
def test_transform_prints_like_its_call_and_reads_back_equal(build, text: str) -> None:
    transform = build()
    assert repr(transform) == text
    again = build()
    assert again is not transform and again == transform and hash(again) == hash(transform)
    rebuilt = eval(text, {**vars(lk), "f": f})  # noqa: S307 - our own repr
    assert rebuilt == transform


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (lk.forward(f), lk.forward(g)),
        (lk.accumulate(4), lk.accumulate(2)),
        (lk.clip(1.0), lk.clip(2.0)),
        (lk.clip(1.0), lk.clip(1.0, norm_type=1.0)),
        (lk.accumulate(1), lk.optimizer_step()),
        (lk.every(2, lk.clip(1.0)), lk.every(2, lk.clip(3.0))),
    ],
    ids=lambda t: repr(t),
)
def test_transforms_with_different_arguments_differ(a: Any, b: Any) -> None:
    assert a != b


def test_transforms_are_frozen() -> None:
    with pytest.raises(AttributeError):
        lk.accumulate(2).k = 3  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        lk.clip(1.0).max_norm = 2.0  # type: ignore[attr-defined]
