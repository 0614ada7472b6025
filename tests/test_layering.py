"""The base modules read top to bottom: models, nethook, scoring and stats (and every harness
module they import, at any depth, lazily or not) import nothing from methods/, suites/ or
reports/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ("harness.models", "harness.nethook", "harness.scoring", "harness.stats", "harness.corpus")
UPPER = ("methods", "suites", "reports")


def _imports(module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``module``'s source."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").is_file())
    return out


def test_base_modules_import_no_upper_layer():
    seen: set[str] = set()
    todo = list(BASE)
    bad = []
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for name in _imports(mod):
            top = name.split(".")[0]
            if top in UPPER:
                bad.append(f"{mod} imports {name}")
            elif top == "harness" and (ROOT / (name.replace(".", "/") + ".py")).is_file():
                todo.append(name)
    assert not bad, bad
    assert "harness.paths" in seen  # the walk follows harness imports
