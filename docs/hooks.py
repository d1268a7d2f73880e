"""mkdocs hooks for loopkit's docs site: example pages, and griffe's `Example:` section.

- The guide pages link the runnable scripts as `../examples/NAME.py` (so the links work on
  GitHub too). Those files are outside docs/, so this hook publishes each examples/*.py as
  a generated page `examples/NAME.md` (its source, highlighted), plus `examples/index.md`
  listing them, and points those links at the pages. Nothing is copied into docs/.
- loopkit's docstrings follow Google style with an `Example:` section (STYLE.md). griffe
  parses only the plural `Examples:` as doctest examples and renders `Example:` as an
  admonition of plain markdown, where `>>>` lines and their output become text (and
  `[1, 3]` a broken link). `on_config` registers the singular as an alias (griffe offers
  no option for it); if griffe's internals move, the build stops and says so.
"""

from __future__ import annotations

import ast
import importlib
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

EXAMPLES_DIR = "examples"
_LINK = re.compile(r"\]\((?P<target>[^)\s#]+\.py)(?P<anchor>#[^)\s]*)?\)")


def on_config(config: Any) -> Any:
    """Let griffe's Google parser read `Example:` as the examples section."""
    from griffe import DocstringSectionKind

    google = _griffe_google_parser()
    google._section_kind.setdefault("example", DocstringSectionKind.examples)
    return config


def _griffe_google_parser() -> Any:
    # Private module: griffe 2 keeps it under griffe._internal, griffe 1 under _griffe.
    for name in ("griffe._internal.docstrings.google", "_griffe.docstrings.google"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if isinstance(getattr(module, "_section_kind", None), dict):
            return module
    raise RuntimeError(
        "docs/hooks.py: griffe's Google docstring parser moved; update _griffe_google_parser "
        "so that `Example:` sections keep rendering as doctest examples."
    )


def _examples(config: Any) -> list[Path]:
    root = Path(config["config_file_path"]).parent
    return sorted((root / EXAMPLES_DIR).glob("*.py"))


def _summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    return doc.strip().splitlines()[0] if doc else ""


def _example_page(path: Path) -> str:
    source = path.read_text(encoding="utf-8")
    return (
        f"# `examples/{path.name}`\n\n{_summary(path)}\n\n"
        f"Run it from the repository root: `python examples/{path.name}`.\n\n"
        f"````python\n{source.rstrip()}\n````\n"
    )


def _index_page(paths: list[Path]) -> str:
    lines = [
        "# Examples\n",
        "Runnable scripts in the repository's `examples/` folder; the",
        "test suite runs each of them (tests/test_examples.py) with a tiny config.\n",
    ]
    lines += [f"- [`{p.name}`]({p.stem}.md): {_summary(p)}" for p in paths]
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any) -> Files:
    """Add a generated page per examples/*.py and an index of them."""
    paths = _examples(config)
    for path in paths:
        files.append(
            File.generated(config, f"{EXAMPLES_DIR}/{path.stem}.md", content=_example_page(path))
        )
    files.append(File.generated(config, f"{EXAMPLES_DIR}/index.md", content=_index_page(paths)))
    _extend_nav(config["nav"], [f"{EXAMPLES_DIR}/{p.stem}.md" for p in paths])
    return files


def _extend_nav(nav: list[Any], pages: list[str]) -> None:
    """Turn mkdocs.yml's `- Examples: examples/index.md` entry into a section of all pages."""
    index = f"{EXAMPLES_DIR}/index.md"
    for position, entry in enumerate(nav):
        if isinstance(entry, dict) and list(entry.values()) == [index]:
            (title,) = entry
            nav[position] = {title: [index, *pages]}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point links at `../examples/NAME.py` to the generated page of that example."""
    page_dir = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match[str]) -> str:
        target = match.group("target")
        # The link as written is relative to the page's file in the repository's docs/.
        in_repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        head, name = posixpath.split(in_repo)
        if head != EXAMPLES_DIR:
            return match.group(0)
        page_uri = f"{EXAMPLES_DIR}/{name[: -len('.py')]}.md"
        return f"]({posixpath.relpath(page_uri, page_dir or '.')})"

    return _LINK.sub(replace, markdown)
