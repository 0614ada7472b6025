"""MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023).

Targets at the last edited layer, then for each edited layer l the spread residual R_l is
written by Delta_l = R_l K_l^T (lambda_m C0_l + K_l K_l^T)^-1 (``methods.solvers.memit_A``).
Sequential editing simply keeps the written weights; no solver state is carried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods.base import EditOutcome, EditRequest
from methods.locate import LocateHparams, Solver, edit_batch, layer_statistics
from methods.locate import prepare as prepare  # runner hook
from methods.solvers import memit_A

NAME = "memit"


@dataclass
class Hparams(LocateHparams):
    """``mom2_update_weight``: lambda_m, the weight of the preserved-key covariance."""

    mom2_update_weight: float = 15000.0


def solver_for(lm: Any, hp: Hparams) -> Solver:
    C0, _, _ = layer_statistics(lm, hp, hp.layers)

    def solve(layer: int, R, K, K_plain):
        return memit_A(K, C0[layer].to(K.dtype), hp.mom2_update_weight)

    return solve


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    diags, _, timings = edit_batch(lm, requests, hparams,
                                   lambda hp, st: solver_for(lm, hp), state)
    return EditOutcome(diagnostics=diags, state=state, timings=timings)
