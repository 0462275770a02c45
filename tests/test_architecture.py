"""docs/architecture.md maps every module to a layer, and imports only go down the layers (or stay level)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support import REPO

PACKAGE = REPO / "safegate"
DOC = REPO / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*`(safegate/[\w/]+\.py)`\s*\|\s*(\d+)\s*\|")


def _layers() -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for line in DOC.read_text().splitlines() if (m := ROW.match(line))}


def _module_path(name: str) -> str | None:
    """safegate.a.b -> safegate/a/b.py (or its package __init__)."""
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return str(candidate.relative_to(REPO))
    return None


def _imports(path: Path) -> set[str]:
    """The safegate modules *path* imports at run time (imports only for type checking do not count)."""
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
            found |= {a.name for a in node.names if a.name.startswith("safegate")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safegate"):
            if node.module != "safegate":  # the package itself is only the way to its modules here
                found.add(node.module)
            # `from safegate import history` names a module too.
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_path(f"{node.module}.{a.name}")}
    return found


def test_every_module_is_in_the_map() -> None:
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")}
    layers = _layers()
    assert modules - set(layers) == set(), "modules missing from docs/architecture.md"
    assert set(layers) - modules == set(), "docs/architecture.md names modules that do not exist"


def test_imports_go_down_the_layers() -> None:
    layers = _layers()
    wrong = []
    for module, layer in layers.items():
        for name in _imports(REPO / module):
            target = _module_path(name)
            if target is not None and target != module and layers.get(target, 0) > layer:
                wrong.append(f"{module} (layer {layer}) imports {target} (layer {layers[target]})")
    assert not wrong, wrong


def test_modules_and_classes_stay_small() -> None:
    big = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 400:
            big.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.ClassDef) and node.end_lineno and node.end_lineno - node.lineno + 1 > 250:
                big.append(f"{path.relative_to(REPO)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not big, big


def test_every_subpackage_is_installed() -> None:
    """A subpackage missing from pyproject's list works from the checkout and breaks every `pip install .`."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "safegate").rglob("__init__.py")}
    assert found == listed
