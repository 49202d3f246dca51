"""Docs that run: every ```python block of README.md and docs/*.md is a test (`docs/loaders.md:63`), run in file
order in a working directory holding small generated data (tests/docs_data.py: `data/train`, `data/test`,
`data/train-converted`). The blocks of one page share one namespace, like a notebook's cells: a block may use
the names of the blocks above it (selecting one block with -k runs the page's earlier blocks first).

The fence's info string may carry tags after `python`: `gpu` (skipped, saying so, where torch sees no CUDA
device) and `norun: why` (never run; the reason is the skip message). Every other fence is checked too: a
block that looks like Python but is not fenced as ```python (a typo such as ```pyhton, or no language) fails
`test_no_python_block_is_missed`, so the collector cannot miss a block silently."""

from __future__ import annotations

import ast
import difflib
import gc
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from docs_data import make_docs_data

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>.*?)[ \t]*$")
PYTHON = ("python", "py", "python3")
TAGS = ("gpu", "norun")


def pages() -> list[Path]:
    """README.md and every page under docs/, in that order (pages added later are picked up)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence, from 1
    info: str  # the fence's info string
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def language(self) -> str:
        return self.info.split(None, 1)[0].lower() if self.info else ""

    @property
    def tags(self) -> dict[str, str]:
        """Tag → its text after a colon, from the info string after the language (`python norun: why`)."""
        rest = self.info.split(None, 1)[1] if " " in self.info.strip() else ""
        found = re.findall(r"(\w+)(?::\s*([^,]*))?", rest)
        return {name: why.strip() for name, why in found if name in TAGS}


def page_name(path: Path) -> str:
    """A page as test ids name it: relative to the repository (`docs/loaders.md`)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown page (``` or ~~~ fences, at any indentation, as in list items)."""
    blocks, open_, lines = [], None, path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if open_ is None:
            if m and not (m["fence"][0] == "`" and "`" in m["info"]):
                open_, body = (i, m["indent"], m["fence"], m["info"]), []
            continue
        start, indent, fence, info = open_
        if m and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) and not m["info"]:
            code = textwrap.dedent("\n".join(body)) if indent else "\n".join(body)
            blocks.append(Block(page_name(path), start, info, code + "\n"))
            open_ = None
        else:
            body.append(line)
    assert open_ is None, f"{page_name(path)}:{open_[0]}: a code fence that is never closed"
    return blocks


def python_blocks() -> list[Block]:
    return [b for p in pages() for b in fenced_blocks(p) if b.language in PYTHON]


BLOCKS = python_blocks()


@dataclass
class Notebook:
    """One page's shared namespace, how far its blocks have run, and the first that failed."""

    blocks: list[Block]
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    ran: int = 0
    failed: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


NOTEBOOKS: dict[str, Notebook] = {}


def skip_reason(block: Block) -> str | None:
    tags = block.tags
    if "norun" in tags:
        return f"marked norun: {tags['norun'] or 'no reason given'}"
    if "gpu" in tags:
        import torch

        if not torch.cuda.is_available():
            return "marked gpu: needs a CUDA device, torch sees none"
    return None


def run_block(book: Notebook, block: Block) -> None:
    """Execute `block` in its page's namespace (code compiled with the page and line as its file name, so a
    traceback points into the page)."""
    code = compile("\n" * block.line + block.code, block.page, "exec")
    start = time.perf_counter()
    try:
        exec(code, book.namespace)
    except BaseException:
        book.failed = book.failed or block.id
        raise
    finally:
        book.seconds[block.id] = time.perf_counter() - start


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_docs_data(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="module", autouse=True)
def registries_restored():
    """Blocks may register a backend or a method (docs/architecture.md adds one): the registries as they were
    after the module, so that the rest of the suite sees only the built-in ones."""
    from viewpipe.pipelines import base
    from viewpipe.trainers import base as methods

    base.backends()
    saved = dict(base.BACKENDS), dict(methods.METHODS)
    yield
    for registry, before in zip((base.BACKENDS, methods.METHODS), saved):
        registry.clear()
        registry.update(before)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (the loaders' threads beside torch's: conftest)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block: Block, docs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = NOTEBOOKS.setdefault(block.page, Notebook([b for b in BLOCKS if b.page == block.page]))
    monkeypatch.chdir(docs_dir)
    position = book.blocks.index(block)
    for earlier in book.blocks[book.ran : position]:  # (when blocks run out of order, e.g. one chosen with -k)
        if book.failed is None and skip_reason(earlier) is None:
            run_block(book, earlier)
    book.ran = max(book.ran, position + 1)
    try:
        if book.failed is not None:
            pytest.skip(f"an earlier block of this page failed: {book.failed}")
        if (why := skip_reason(block)) is not None:
            pytest.skip(why)
        run_block(book, block)
    finally:
        if book.ran == len(book.blocks):  # the page's last block: its objects (loaders, states) go
            book.namespace.clear()
            gc.collect()


def looks_like_python(code: str) -> bool:
    """Code that parses as Python and imports something: Python whatever its fence says."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(tree))


def test_no_python_block_is_missed() -> None:
    """Every block that is Python, or is fenced as something like it (```pyhton, ```Python3), is collected;
    and the count per page is printed (`pytest -s`)."""
    collected = {b.id for b in BLOCKS}
    missed = []
    for page in pages():
        for b in fenced_blocks(page):
            name = b.language.strip("{}.")
            near = name.startswith("py") or difflib.SequenceMatcher(None, name, "python").ratio() >= 0.6
            if b.id not in collected and (near or looks_like_python(b.code)):
                missed.append(f"{b.id} (```{b.info})")
    raw = sum(len(re.findall(r"^[ \t]*(?:```|~~~)[ \t]*(?:python3?|py)\b", p.read_text(), re.M | re.I)) for p in pages())
    assert raw == len(BLOCKS), f"{raw} python fences in the pages, {len(BLOCKS)} collected"
    assert not missed, f"blocks that look like Python but are not fenced as ```python: {missed}"
    counts = {page_name(p): sum(b.page == page_name(p) for b in BLOCKS) for p in pages()}
    print(f"\n{len(BLOCKS)} python blocks: " + ", ".join(f"{page} {n}" for page, n in counts.items()))


def test_the_collector_finds_what_it_looks_for(tmp_path: Path) -> None:
    """Fences at any indentation, ~~~ fences, longer fences holding shorter ones, tags; typos are caught."""
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        ```python
        a = 1
        ```
        - a list item:

          ```python gpu
          b = 2
          ```
        ````markdown
        ```python
        not a block of its own
        ```
        ````
        ~~~python norun: shows a signature
        def f(x): ...
        ~~~
        ```pyhton
        import os
        ```
        ```
        from pathlib import Path
        ```
        """))
    blocks = fenced_blocks(page)
    assert [(b.line, b.language, b.tags) for b in blocks] == [
        (1, "python", {}), (6, "python", {"gpu": ""}), (9, "markdown", {}),
        (14, "python", {"norun": "shows a signature"}), (17, "pyhton", {}), (20, "", {})]
    assert blocks[1].code == "b = 2\n" and "not a block" in blocks[2].code
    assert [looks_like_python(b.code) for b in blocks[4:]] == [True, True]
