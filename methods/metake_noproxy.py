"""Ablation ``metake-noproxy``: MetaKE's outer steps with S := I (the solver left out of the
loop: the target is added at the subject site as in the open-loop step), same budget and
penalties. If MetaKE's gain survives here, it comes from extra optimisation, not the proxy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods import metake
from methods.base import EditOutcome, EditRequest
from methods.metake import prepare as prepare  # runner hook

NAME = "metake-noproxy"


@dataclass
class Hparams(metake.Hparams):
    proxy: bool = False


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    return metake.edit_with(lm, requests, hparams, state, metake.refine)
