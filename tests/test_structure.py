"""The layout's rules, read from the source: callers never ask which backend they hold (a backend is named
only in its own file and in configuration), and every function is short enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKEND_NAMES = {"dali", "ffcv", "memory", "torch"}
FORMATS = {"dali", "ffcv"}  # the converted formats, named as the backends that read them
# the modules of the pipelines layer that every backend shares (a backend's own file may name it)
SHARED_PIPELINES = ("__init__", "base", "config", "plan", "position", "finish")
MAX_LINES = 60


def callers() -> list[Path]:
    """Every module outside the backends' own files: tools, trainers, the core, the shared pipelines modules."""
    files = [p for d in ("tools", "trainers", "viewpipe") for p in sorted((ROOT / d).glob("*.py"))]
    return files + [ROOT / "pipelines" / f"{m}.py" for m in SHARED_PIPELINES]


def backend_name(node: ast.AST, names: set[str] = BACKEND_NAMES) -> bool:
    """A str constant naming a backend, or a tuple/list/set holding one."""
    if isinstance(node, ast.Constant):
        return node.value in names
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(backend_name(e, names) for e in node.elts)


def branches_on_a_backend(tree: ast.AST) -> list[int]:
    """Lines that compare a backend (something named so, other than the format it `reads`) with a backend's
    name (`d.backend == "dali"`), pick a backend by condition (`"dali" if gpu else "ffcv"`) or list the
    backends for a command-line option (`choices=["torch", "dali", ...]`; the converted formats' names,
    "dali" and "ffcv", may be listed as formats)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = [ast.unparse(s) for s in sides if not backend_name(s)]
            if any(backend_name(s) for s in sides) and any("backend" in n and ".reads" not in n for n in named):
                lines.append(node.lineno)
        elif isinstance(node, ast.IfExp) and all(isinstance(x, ast.Constant) and backend_name(x)
                                                  for x in (node.body, node.orelse)):
            lines.append(node.lineno)
        elif (isinstance(node, ast.keyword) and node.arg == "choices"
              and backend_name(node.value, BACKEND_NAMES - FORMATS)):
            lines.append(node.value.lineno)
    return lines


def test_no_caller_branches_on_a_backend_name() -> None:
    found = {str(p.relative_to(ROOT)): lines for p in callers()
             if (lines := branches_on_a_backend(ast.parse(p.read_text())))}
    assert not found, f"backends named outside their own files (use the Loader interface): {found}"


def test_the_check_finds_what_it_looks_for() -> None:
    """The rule above on the shapes it must catch, and on what it must leave alone (formats, impl names)."""
    caught = ['if d.backend == "dali": pass', 'x = "dali" if gpu else "ffcv"', 'p.add_argument(choices=["torch", "dali"])',
              'ok = cfg.data.backend in ("dali", "ffcv")']
    left = ['if "ffcv" in formats: pass', 'if self.impl == "torch": pass', 'formats = ("dali", "ffcv")',
            'p.add_argument(choices=["ffcv", "dali", "both"])', 'ok = get_backend(b).reads in (None, "dali")']
    assert all(branches_on_a_backend(ast.parse(code)) for code in caught)
    assert not any(branches_on_a_backend(ast.parse(code)) for code in left)


def test_no_function_is_longer_than_sixty_lines() -> None:
    long = []
    for d in ("viewpipe", "pipelines", "trainers"):
        for p in sorted((ROOT / d).glob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_LINES} lines: {long}"
