"""Development sessions: nox -s tests | lint | typecheck | docs | bench."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
CONSTRAINTS = ("-c", "constraints.txt")
MKDOCS_ENV = {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about mkdocs 2


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against the installed package (LOOPKIT_HYPOTHESIS=heavy for more)."""
    session.install(*CONSTRAINTS, ".[dev]")
    session.run("pytest", *session.posargs)


LINTED = ("loopkit", "tests")


@nox.session
def lint(session: nox.Session) -> None:
    """Check formatting and lint with ruff, over the package and its tests."""
    session.install("ruff")
    session.run("ruff", "format", "--check", *LINTED, *session.posargs)
    session.run("ruff", "check", *LINTED, *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package and its tests with mypy (the files are in pyproject's [tool.mypy])."""
    session.install(*CONSTRAINTS, ".[dev]")
    session.run("mypy", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Run the doctests, the examples and the docs' Python blocks; build the site strictly."""
    session.install(*CONSTRAINTS, ".[dev]")  # the dev extra includes the `docs` extra
    session.run(
        "pytest",
        "--doctest-modules",
        "loopkit",
        "tests/test_examples.py",
        "tests/test_docs_blocks.py",
        *session.posargs,
    )
    # Warnings are errors; offline (no plugin fetches anything); the site goes to .nox/.
    site_dir = os.path.join(session.create_tmp(), "site")
    session.run("mkdocs", "build", "--strict", "--site-dir", site_dir, env=MKDOCS_ENV)
    session.log(f"site: {site_dir}")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark loopkit's step against a hand-written loop (not part of the default set)."""
    session.install(*CONSTRAINTS, ".[dev]")
    session.run("python", "benchmarks/bench_step.py", *session.posargs)
