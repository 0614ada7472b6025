"""Evaluation suites. Each module exposes ``NAME``, ``DEFAULT_FILES`` (candidate file names in the
data directory, first found wins), ``CANONICAL_URL``, ``SUMMARY_FIELDS``,
``load(path) -> list[EditRequest]``, ``evaluate(lm, requests, batch_size) -> list[dict]`` (one
record per case) and ``summarize(records) -> dict[str, float]``.

Optional: ``reference(lm, requests, batch_size) -> list[dict]``, which the runner calls on the
unedited model before any edit (one dict per request of the run); ``evaluate`` then takes the
matching slice as ``reference=``. ``evaluate`` may also take ``generation_tokens=`` (the runner
passes it only when ``RunConfig.generation_tokens > 0``, and refuses suites that lack it), and
then ``decoding=`` and ``seed=`` (``RunConfig.fluency_decoding`` and ``seed``).
``LOAD_OPTIONS`` (optional): ``{load keyword: RunConfig field}`` of suite options passed to
``load`` (:func:`load_kwargs`; e.g. zsRE's ``target`` from ``zsre_target``)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from harness.errors import UserError

SUITES: dict[str, str] = {
    "counterfact": "suites.counterfact",
    "zsre": "suites.zsre",
}


def get_suite(name: str) -> ModuleType:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; known: {', '.join(sorted(SUITES))}")
    return importlib.import_module(SUITES[name])


def load_kwargs(suite: ModuleType, cfg: Any) -> dict[str, Any]:
    """Keyword arguments of ``suite.load`` from the run config (the suite's ``LOAD_OPTIONS``)."""
    return {kw: getattr(cfg, name) for kw, name in getattr(suite, "LOAD_OPTIONS", {}).items()}
