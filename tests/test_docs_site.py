"""The docs site: it builds strictly (warnings are errors), every page is in its navigation,
and every public name has an entry in the API reference.

The build runs mkdocs in a subprocess (as `nox -s docs` does), into a temporary directory,
offline; it is skipped where mkdocs, mkdocs-material or mkdocstrings are not installed (the
dev extra installs them, so CI builds it).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PACKAGES = ("loopkit", "loopkit.testing", "loopkit.compat")


def build_site(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of `config_file` into `site_dir`; the finished process."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # Not --quiet: it hides the warnings from the count that --strict fails on.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    command += ["--config-file", str(config_file), "--site-dir", str(site_dir)]
    # A generous limit that only catches a hang; a build takes a few seconds.
    return subprocess.run(
        command, cwd=config_file.parent, env=env, capture_output=True, text=True, timeout=600
    )


def nav_pages(nav: Any) -> list[str]:
    """Every page path named anywhere in an mkdocs `nav` (nested lists and dicts), in order."""
    if isinstance(nav, str):
        return [nav]
    children = nav.values() if isinstance(nav, dict) else nav if isinstance(nav, list) else []
    return [page for child in children for page in nav_pages(child)]


def nav_problems(config_text: str, docs_dir: Path) -> list[str]:
    """Pages under `docs_dir` that the config's nav does not list, and pages listed twice."""
    import yaml  # the dev extra has it; mkdocs depends on it

    listed = nav_pages(yaml.safe_load(config_text)["nav"])
    pages = {p.relative_to(docs_dir).as_posix() for p in docs_dir.rglob("*.md")}
    twice = sorted({page for page in listed if listed.count(page) > 1})
    return [f"{page}: not in the nav" for page in sorted(pages - set(listed))] + [
        f"{page}: in the nav twice" for page in twice
    ]


def public_names_missing_from_api(api_dir: Path) -> list[str]:
    """Public names of loopkit, loopkit.testing and loopkit.compat with no `::: name` entry."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(api_dir.glob("*.md")))
    documented = set(re.findall(r"^:::\s*(\S+)\s*$", text, flags=re.MULTILINE))
    missing = []
    for package in API_PACKAGES:
        for name in importlib.import_module(package).__all__:
            if f"{package}.{name}" not in documented:
                missing.append(f"{package}.{name}")
    return missing


def test_site_builds_strictly(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    built = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}{built.stderr}"
    reference = (tmp_path / "site" / "api" / "step" / "index.html").read_text(encoding="utf-8")
    assert "loopkit.TrainState" in reference
    assert (tmp_path / "site" / "examples" / "custom_loop" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav_once() -> None:
    pytest.importorskip("yaml")
    problems = nav_problems((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), DOCS)
    assert not problems, f"fix the nav in mkdocs.yml: {problems}"


def test_every_public_name_is_in_the_api_reference() -> None:
    missing = public_names_missing_from_api(DOCS / "api")
    assert not missing, (
        f"add a `::: <name>` entry for each to the page of its module under docs/api/: {missing}"
    )
