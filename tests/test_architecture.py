"""The house rules, read from the source with `ast`: layers, no circles, no lookups by name.

Layers, lowest first (docs/architecture.md draws them). A module may import modules of its
own layer or below, never above; imports under `if TYPE_CHECKING:` are for annotations
only and are not counted. loopkit's own modules are imported at module level only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import loopkit

ROOT = Path(loopkit.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("_types", "_version"),
    ("precision", "schedules", "loss", "normalise", "_batch", "_rng", "_tree", "params",
     "_sharded"),
    ("strategies",),
    ("state",),
    ("compose", "transforms", "compiled", "fingerprint", "guards", "averaging"),
    ("checkpoint", "evaluate", "metrics", "callbacks", "logging", "data", "config",
     "run_lock", "_cadence", "_eval_tracking", "_nonfinite_watch", "_resume", "_saving",
     "_interrupts", "run_config", "tracking"),
    ("fit", "forensics", "replay", "lr_finder"),
    ("compat", "testing", "certify"),
    ("__init__", "__main__", "cli"),
]  # fmt: skip


def _layer_of(module: str) -> int:
    """The layer of `loopkit.a.b` from its first component under loopkit."""
    top = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(
        f"{module}: not placed in a layer; add it to LAYERS in tests/test_architecture.py "
        "and to docs/architecture.md."
    )


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The loopkit modules an ImportFrom names (the module and any submodules imported)."""
    if node.level == 0:
        base = node.module or ""
        if base != "loopkit" and not base.startswith("loopkit."):
            return []
    else:
        package = module.split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    if node.module is None and len(submodules) == len(node.names):
        return submodules  # `from . import x`: only the submodules are used
    return [base, *submodules]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(runtime imports of loopkit modules at module level, those inside functions/classes)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    top: list[tuple[str, int]] = []
    nested: list[tuple[str, int]] = []

    def visit(node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom):
                for target in _resolve(module, path, child):
                    (top if depth == 0 else nested).append((target, child.lineno))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "loopkit" or alias.name.startswith("loopkit."):
                        (top if depth == 0 else nested).append((alias.name, child.lineno))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, depth + 1 if inner else depth)

    visit(tree, 0)
    return top, nested


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_its_layer_or_below(module: str) -> None:
    own = _layer_of(module)
    top, _ = _imports(module)
    upward = [
        f"{target} (line {line}, layer {_layer_of(target)})"
        for target, line in top
        if target in MODULES and _layer_of(target) > own
    ]
    assert not upward, f"{module} (layer {own}) imports a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_loopkit_import_inside_a_function(module: str) -> None:
    _, nested = _imports(module)
    assert not nested, f"{module} imports loopkit modules inside functions: {nested}"


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _ in _imports(m)[0] if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ importing its own submodules is how re-exports work; a
    # submodule importing its package back is the cycle to catch.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not t.startswith(f"{module}.")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)


def _strategy_lookups(module: str) -> list[str]:
    path = MODULES[module]
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.args
            and "strategy" in ast.get_source_segment(source, node.args[0]).lower()  # type: ignore[union-attr]
        ):
            found.append(f"line {node.lineno}: {ast.get_source_segment(source, node)}")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_strategy_member_looked_up_by_name(module: str) -> None:
    found = _strategy_lookups(module)
    assert not found, (
        f"{module} looks a strategy member up by name: {found}. Every member is declared "
        "in the Strategy protocol (loopkit/_types.py); use it directly."
    )


def test_every_public_module_declares_all() -> None:
    missing = [
        m
        for m, path in MODULES.items()
        if not any(part.startswith("_") for part in m.split(".")[1:])
        and m.split(".")[-1] not in ("__main__", "pytest_plugin")
        and "__all__" not in path.read_text()
    ]
    assert not missing, f"public modules without __all__: {missing}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The walkers see each kind of breach (so a clean pass above means something)."""
    global MODULES
    bad = tmp_path / "loopkit"
    bad.mkdir()
    (bad / "state.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .fit import fit\n"
        "if TYPE_CHECKING:\n    from .compat import Trainer\n"
        "def f(state):\n    from . import checkpoint\n"
        "    return getattr(state.strategy, 'dp_rank', 0)\n"
    )
    saved = MODULES
    MODULES = {**saved, "loopkit.state": bad / "state.py"}
    try:
        top, nested = _imports("loopkit.state")
        assert [t for t, _ in top] == ["loopkit.fit"]  # the TYPE_CHECKING import is not counted
        assert [t for t, _ in nested] == ["loopkit.checkpoint"]
        with pytest.raises(AssertionError, match="imports a higher layer"):
            test_imports_only_its_layer_or_below("loopkit.state")
        assert _strategy_lookups("loopkit.state")
    finally:
        MODULES = saved
