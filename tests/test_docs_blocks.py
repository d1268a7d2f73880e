"""Every ```python block of README.md and docs/*.md runs as written.

The rules (docs/writing-docs.md): the blocks of one page run in order, in one namespace (a
page's earlier blocks are the context of its later ones), with the working directory a fresh
temporary directory per page, on CPU. A block is skipped only when the line right before its
fence is `<!-- fragment: why -->`. One pytest item per block, named `page:line` (the line of
its opening fence); running one item alone runs the page's earlier blocks first. Tracebacks
name the page and its line numbers, since each block is compiled at its place in the page.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = re.compile(r"^\s*<!--\s*fragment:(?P<why>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
PYTHON_INFOS = {"python", "py"}


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: where it is, its code and why it is skipped, if it is."""

    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    source: str  # dedented, compiled with line numbers of the page
    fragment: str | None  # the reason given in `<!-- fragment: ... -->`, or None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def parse_blocks(text: str, page: str) -> list[Block]:
    """The python blocks of a markdown page, in order (other fences are stepped over)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        end = i + 1
        while end < len(lines) and not re.match(
            rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]
        ):
            end += 1
        info = opening["info"].strip().split()
        if info and info[0].lower() in PYTHON_INFOS:
            body = [row.removeprefix(indent) for row in lines[i + 1 : end]]
            marker = FRAGMENT.match(lines[i - 1]) if i > 0 else None
            why = marker["why"].strip() if marker else None
            # Blank lines up to the fence keep the page's line numbers in tracebacks.
            source = "\n" * (i + 1) + textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(page, i + 1, source, why))
        i = end + 1
    return blocks


def read_blocks(path: Path) -> list[Block]:
    """The python blocks of a page of this repository."""
    return parse_blocks(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


BLOCKS = [block for path in PAGES for block in read_blocks(path)]


@dataclass
class _PageRun:
    """A page's shared namespace and working directory, and how far its blocks have run."""

    directory: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    done: int = 0  # blocks of the page already run (fragments count as run)
    failed: str | None = None


_RUNS: dict[str, _PageRun] = {}


def _run_through(run: _PageRun, page_blocks: list[Block], last: int) -> None:
    """Run the page's blocks up to `last` (inclusive) that have not run yet, in order."""
    while run.done <= last:
        block = page_blocks[run.done]
        if run.failed is not None:
            pytest.fail(f"{block.id}: an earlier block of the page failed: {run.failed}")
        if block.fragment is None:
            try:
                exec(compile(block.source, str(ROOT / block.page), "exec"), run.namespace)
            except BaseException as error:
                run.failed = f"{block.id} ({type(error).__name__})"
                raise
        run.done += 1


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_block_runs(
    block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    page_blocks = [b for b in BLOCKS if b.page == block.page]
    index = page_blocks.index(block)
    run = _RUNS.get(block.page)
    if run is None or run.done > index:  # first block of the page, or run again
        run = _RUNS[block.page] = _PageRun(tmp_path_factory.mktemp(re.sub(r"\W+", "_", block.page)))
        run.namespace["__name__"] = "__docs__"
    monkeypatch.chdir(run.directory)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU, where CUDA is not initialised yet
    _run_through(run, page_blocks, index)  # the earlier blocks are this one's context
    if block.fragment is not None:
        pytest.skip(f"{block.id} is a fragment: {block.fragment}")


def test_fragment_markers_are_well_formed() -> None:
    """A marker names why, and sits right before a python fence (else it marks nothing)."""
    problems = []
    for path in PAGES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if "<!-- fragment" not in line:
                continue
            marker = FRAGMENT.match(line)
            nxt = lines[number] if number < len(lines) else ""
            opening = FENCE.match(nxt)
            is_python = opening is not None and (opening["info"].strip().split() or [""])[0] in (
                PYTHON_INFOS
            )
            if marker is None or not marker["why"].strip() or not is_python:
                problems.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()!r}")
    assert not problems, (
        "each `<!-- fragment: <why> -->` needs a reason and must be the line right before a "
        "```python fence:\n" + "\n".join(problems)
    )


SAMPLE = """# A page

```python
x = 1
```

```bash
python -c "print(1)"
```

````markdown
```python
not_a_block_of_this_page
```
````

1. A list item:

   <!-- fragment: needs a cluster -->
   ```python
   launch()
   ```

   ~~~py
   y = x + 1
   ~~~
"""


def test_the_reader_finds_each_python_block_where_it_is() -> None:
    blocks = parse_blocks(SAMPLE, "page.md")
    assert [(b.line, b.fragment) for b in blocks] == [
        (3, None),
        (20, "needs a cluster"),
        (24, None),
    ]
    namespace: dict[str, Any] = {}
    for block in (blocks[0], blocks[2]):
        exec(compile(block.source, "page.md", "exec"), namespace)
    assert namespace["y"] == 2  # indented blocks are dedented; one namespace per page
    error = compile(blocks[1].source, "page.md", "exec")  # a traceback names the page's line
    with pytest.raises(NameError) as raised:
        exec(error, {})
    assert raised.traceback[-1].lineno + 1 == 21  # `launch()` is line 21 of the page
    assert any(b.page == "README.md" for b in BLOCKS)
