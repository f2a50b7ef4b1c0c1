"""The layers point down only: ``ipsr_model`` (torch) ← ``ipsr_platform`` ← ``jobs``, ``serving`` ← the CLI.

Every import counts, also those inside functions (a deferred import is still a dependency). The CLI layer is
``ipsr_platform/cli.py`` and the two commands only it runs, ``submit`` and ``quickstart`` (they drive jobs and
serving). ``KNOWN`` lists the edges that still break the order, each with its reason: the test fails on any new
one, and on a listed one that has gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ipsr_model", "ipsr_platform", "jobs", "serving")
CLI = {"ipsr_platform.cli", "ipsr_platform.submit", "ipsr_platform.quickstart"}
RANK = {"ipsr_model": 0, "ipsr_platform": 1, "jobs": 2, "serving": 2}

# Edges that still break the order (none: the list only shrinks, and the test says when an entry is stale).
KNOWN: set[tuple[str, str]] = set()


def _rank(module: str) -> int:
    return 3 if module in CLI else RANK[module.split(".")[0]]


def imports() -> set[tuple[str, str]]:
    """(importer, imported) over every import statement of the four packages, resolved to modules."""
    edges = set()
    for package in PACKAGES:
        for file in sorted((ROOT / package).glob("*.py")):
            importer = f"{package}.{file.stem}"
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [f"{node.module}.{a.name}" if (ROOT / node.module.replace(".", "/") / f"{a.name}.py")
                               .is_file() else node.module for a in node.names]
                else:
                    continue
                for target in targets:
                    if target.split(".")[0] in PACKAGES and target.count(".") == 1 and target != importer:
                        edges.add((importer, target))
    return edges


def test_no_module_imports_a_layer_above_it():
    upward = {(a, b) for a, b in imports() if _rank(b) > _rank(a) or (_rank(a) == 2 and a.split(".")[0] !=
                                                                      b.split(".")[0] and _rank(b) == 2)}
    assert upward - KNOWN == set(), "new imports against the layer order"
    assert KNOWN - upward == set(), "these are fixed: remove them from KNOWN"


def test_no_import_cycles_beyond_the_known_edges():
    edges = imports() - KNOWN
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
