"""No edit: the unedited model's scores (the reference row of every table)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods.base import EditOutcome, EditRequest

NAME = "noop"


@dataclass
class Hparams:
    """No hyperparameters."""


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    return EditOutcome(diagnostics=[{} for _ in requests], state=state)
