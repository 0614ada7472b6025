"""AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models", ICLR 2025).

As MEMIT, but the update is projected onto the null space of the preserved keys' second moment
and of the keys of earlier edits:

    Delta_l = R_l K_l^T P (K_p K_p^T P + K_l K_l^T P + lambda I)^-1

with P = U0 U0^T from the eigenvectors of C0_l whose eigenvalue is below
``nullspace_threshold`` (``methods.solvers.alphaedit_A``). In sequential editing the state
carries K_p K_p^T per layer (``prev_cov.<layer>``), grown by K_l K_l^T after every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods.base import EditOutcome, EditRequest
from methods.locate import LocateHparams, Solver, edit_batch, projectors
from methods.locate import prepare as prepare  # runner hook
from methods.solvers import alphaedit_A

NAME = "alphaedit"


@dataclass
class Hparams(LocateHparams):
    """``L2``: the ridge lambda of the AlphaEdit solve."""

    L2: float = 10.0


def state_key(layer: int) -> str:
    return f"prev_cov.{layer}"


def solver_for(lm: Any, hp: LocateHparams, state: dict[str, Any], lam: float) -> Solver:
    P = projectors(lm, hp, hp.layers)

    def solve(layer: int, R, K, K_plain):
        prev = state.get(state_key(layer))
        return alphaedit_A(K, P[layer].to(K.dtype),
                           prev_cov=None if prev is None else prev.to(K.dtype), lam=lam)

    return solve


def accumulate(state: dict[str, Any], keys: dict[int, Any]) -> dict[str, Any]:
    """New state with K_p K_p^T += K K^T for every written layer (float64 on the device)."""
    new = dict(state)
    for layer, K in keys.items():
        K = K.double()
        prev = new.get(state_key(layer))
        new[state_key(layer)] = K @ K.T if prev is None else prev + K @ K.T
    return new


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    diags, written, timings = edit_batch(
        lm, requests, hparams, lambda hp, st: solver_for(lm, hp, st, hparams.L2), state)
    return EditOutcome(diagnostics=diags, state=accumulate(state, written.keys),
                       timings=timings)
