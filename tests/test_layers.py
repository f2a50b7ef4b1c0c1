"""The layers point down only: ``ipsr_model`` (torch) ← ``ipsr_platform`` ← ``jobs``, ``serving`` ← the CLI layer
(``ipsr_platform.cli``: the ``ipsr`` command and the commands only it runs, which drive jobs and serving).

Every import counts, also those inside functions (a deferred import is still a dependency). A module's layer is
its package's — the longest package prefix in ``RANK`` —, with no list of exempted modules; ``jobs`` and
``serving`` share a layer and import neither each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"ipsr_model": 0, "ipsr_platform": 1, "jobs": 2, "serving": 2, "ipsr_platform.cli": 3}
PACKAGES = ("ipsr_model", "ipsr_platform", "jobs", "serving")


def _rank(module: str) -> int:
    return RANK[_package(module)]


def _package(module: str) -> str:
    """The longest package of RANK that ``module`` belongs to."""
    return max((p for p in RANK if module == p or module.startswith(p + ".")), key=len)


def _module(name: str) -> str | None:
    """``name`` as a module of this repository (``pkg.mod`` or ``pkg.sub.mod``; a package is its ``__init__``)."""
    path = ROOT / name.replace(".", "/")
    return name if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else None


def imports() -> set[tuple[str, str]]:
    """(importer, imported) over every import statement of the four packages, resolved to modules."""
    edges = set()
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = file.relative_to(ROOT).with_suffix("").parts
            importer = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [_module(f"{node.module}.{a.name}") or node.module for a in node.names]
                else:
                    continue
                for target in targets:
                    if target.split(".")[0] in PACKAGES and _module(target) and target != importer:
                        edges.add((importer, target))
    return edges


def test_the_layer_map_sees_every_package():
    assert _rank("ipsr_platform.cli.quickstart") == 3 and _rank("ipsr_platform.commands") == 1
    assert ("ipsr_platform.cli.quickstart", "jobs.train") in imports()  # deferred imports count


def test_no_module_imports_a_layer_above_it():
    upward = {
        (a, b)
        for a, b in imports()
        if _rank(b) > _rank(a) or (_rank(a) == 2 and _rank(b) == 2 and _package(a) != _package(b))
    }
    assert upward == set(), "imports against the layer order"


def test_no_import_cycles():
    edges = imports()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return False

    cycles = sorted((a, b) for a, b in edges if reaches(b, a))
    assert cycles == [], cycles
