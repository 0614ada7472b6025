"""Evaluation suites. Each module exposes ``NAME``, ``DEFAULT_FILES`` (candidate file names in the
data directory, first found wins), ``CANONICAL_URL``, ``load(path) -> list[EditRequest]`` and
``evaluate(lm, requests, reference=None) -> list[dict]`` (one record per case)."""

from __future__ import annotations

import importlib
from types import ModuleType

from harness.errors import UserError

SUITES: dict[str, str] = {
    "counterfact": "suites.counterfact",
}


def get_suite(name: str) -> ModuleType:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; known: {', '.join(sorted(SUITES))}")
    return importlib.import_module(SUITES[name])
