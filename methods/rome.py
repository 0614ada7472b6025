"""ROME (Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022).

One edit at a time, one layer: key k (context-averaged), target v for the MLP output at the
subject's last token, rank-one write Delta = (v - W k) (C0^-1 k)^T / (k^T C0^-1 k)
(``methods.solvers.rome_A``), which realises v at k exactly. A batch of several requests is
applied as consecutive single edits (ROME has no batch form).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.errors import UserError
from methods.base import EditOutcome, EditRequest
from methods.locate import LocateHparams, Solver, edit_batch, layer_statistics
from methods.locate import prepare as prepare  # runner hook
from methods.solvers import rome_A

NAME = "rome"


@dataclass
class Hparams(LocateHparams):
    layers: list[int] = field(default_factory=lambda: [6])
    clamp_norm_factor: float = 4.0

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            raise UserError(f"rome hparams: 'layers' must name one layer, got {self.layers}")


def solver_for(lm: Any, hp: Hparams) -> Solver:
    C0, _, _ = layer_statistics(lm, hp, hp.layers)

    def solve(layer: int, R, K):
        if K.shape[1] != 1:
            raise ValueError("ROME writes one edit at a time")
        return rome_A(K[:, 0], C0[layer].to(K.dtype))

    return solve


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    diags: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for r in requests:
        d, _, t = edit_batch(lm, [r], hparams, lambda hp, st: solver_for(lm, hp), state)
        diags += d
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
    return EditOutcome(diagnostics=diags, state=state, timings=timings)
