"""docs/architecture.md ranks every package and loose module; imports never go up the ranks and never cycle, over
the real import graph (function-level imports included); the listing stays a map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support import REPO

PACKAGE = REPO / "safegate"
DOC = REPO / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*`safegate/([\w.]+/?)`\s*\|\s*(\d+)\s*\|")
MAX_LOOSE = 10


def _ranks() -> dict[str, int]:
    """'config/' or 'api.py' -> rank, as the doc's table says."""
    return {m.group(1): int(m.group(2)) for line in DOC.read_text().splitlines() if (m := ROW.match(line))}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _unit(module: str) -> str:
    """The table row a module belongs to: its package ('config/') or itself ('api.py')."""
    parts = module.split(".")
    if module == "safegate":
        return "__init__.py"
    if len(parts) > 2 or (PACKAGE / parts[1]).is_dir():
        return parts[1] + "/"
    return parts[1] + ".py"


def _imports(path: Path) -> set[str]:
    """The safegate modules *path* imports at run time, anywhere in it (imports only for type checking excluded)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safegate"):
            for alias in node.names:
                # `from safegate.config import history` names a module; `from safegate.units import Size` does not.
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_map_names_exactly_the_packages_and_loose_modules() -> None:
    assert set(_ranks()) == {_unit(m) for m in MODULES}


def test_imports_never_go_up_the_ranks() -> None:
    ranks = _ranks()
    wrong = [f"{a} (rank {ranks[_unit(a)]}) imports {b} (rank {ranks[_unit(b)]})"
             for a, targets in GRAPH.items() for b in targets
             if _unit(a) != _unit(b) and ranks[_unit(b)] > ranks[_unit(a)]]
    assert not wrong, wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_at_most_ten_modules_loose_at_the_top() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE, loose


def test_the_map_fits_one_screen() -> None:
    assert len(DOC.read_text().splitlines()) <= 50


def test_every_failure_becomes_an_exit_code_in_one_place() -> None:
    # Both entry points hand their command to cli.plain.exit_status; nothing reaches into typer's privates.
    for entry in ("safegate/cli/fastpath.py", "safegate/cli/app.py"):
        assert "exit_status(lambda" in (REPO / entry).read_text(), entry
    for name, path in MODULES.items():
        assert "typer._click" not in path.read_text(), name
        if name != "safegate.cli.plain":
            assert not re.search(r"\b(reported|failure_code|interrupted)\(", path.read_text()), name


def test_packages_are_found_not_listed() -> None:
    """A package missing from a hand list works from the checkout and breaks every `pip install .`."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"] == {"find": {"include": ["safegate*"]}}
