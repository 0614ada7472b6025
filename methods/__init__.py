"""Editing methods. The registry below is the one place a method is named.

A new method is one module here (exposing ``NAME``, a ``Hparams`` dataclass and
``edit(lm, requests, hparams, state) -> EditOutcome``) plus ``hparams/<name>/<model>.yaml``, and
one line in :data:`METHODS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from harness.errors import UserError

#: method name -> module path (imported lazily so that ``keh --help`` stays fast)
METHODS: dict[str, str] = {
    "noop": "methods.noop",
    "ft": "methods.ft",
    "rome": "methods.rome",
    "r-rome": "methods.r_rome",
    "memit": "methods.memit",
    "alphaedit": "methods.alphaedit",
    "metake": "methods.metake",
    "metake-noproxy": "methods.metake_noproxy",
    "alphaedit-rescaled": "methods.alphaedit_rescaled",
    "prune": "methods.prune",
    "rect": "methods.rect",
    "emmet": "methods.emmet",
    "memit-blue": "methods.memit_blue",
    "alphaedit-blue": "methods.alphaedit_blue",
    "ultraedit": "methods.ultraedit",
    "encore": "methods.encore",
    "namet": "methods.namet",
    "nse": "methods.nse",
}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
