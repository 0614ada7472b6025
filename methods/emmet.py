"""EMMET (Gupta et al., "A Unified Framework for Model Editing", 2024): batched ROME, i.e. the
preservation-memorization objective with *equality* constraints on the edited keys.

Targets at the last edited layer and MEMIT's residual schedule over ``layers``
(:mod:`methods.locate`), but at each layer l the share R_l (d_out, n) of the residual is
written by

    Delta_l = R_l (K^T C^-1 K + mu_e I)^-1 K^T C^-1,   C = lambda_m C0_l + mu_u I,

(:func:`methods.solvers.emmet_A` with ``C`` and ``ridge = mu_e``), K (d_in, n) the keys,
C0_l (d_in, d_in) the key second moment. With ``mu_e = 0`` it is the solution of
``min tr(Delta C Delta^T) s.t. Delta K = R_l``: every edit is realised exactly on its key.
As in the authors' code, ``mu_e`` (``emmet_lambda``, 0.1) is added only for batches of more than
one edit (to condition ``K^T C^-1 K``), ``lambda_m`` is ``mom2_update_weight`` and ``mu_u``
``update_norm_lambda`` (0 in every published setting). Sequential editing keeps the written
weights; no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel
from methods.base import EditOutcome, EditRequest
from methods.locate import LocateHparams, Solver, edit_batch, layer_statistics
from methods.locate import prepare as prepare  # runner hook
from methods.solvers import emmet_A

NAME = "emmet"


@dataclass
class Hparams(LocateHparams):
    """``mom2_update_weight``: lambda_m; ``emmet_lambda``: ridge mu_e on K^T C^-1 K (batches
    of n > 1); ``update_norm_lambda``: mu_u, added to C."""

    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.mom2_update_weight <= 0 or self.emmet_lambda < 0 or self.update_norm_lambda < 0:
            raise UserError("hparams: mom2_update_weight must be > 0, emmet_lambda and "
                            "update_norm_lambda >= 0")


def preservation_matrix(C0: torch.Tensor, hp: Hparams) -> torch.Tensor:
    """C = lambda_m C0 + mu_u I (d_in, d_in)."""
    C = hp.mom2_update_weight * C0
    if hp.update_norm_lambda:
        C = C + hp.update_norm_lambda * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return C


def solver_for(lm: Any, hp: Hparams) -> Solver:
    C0, _, _ = layer_statistics(lm, hp, hp.layers)

    def solve(layer: int, R: torch.Tensor, K: torch.Tensor, *_: Any) -> torch.Tensor:
        ridge = hp.emmet_lambda if K.shape[1] > 1 else 0.0
        return emmet_A(K, preservation_matrix(C0[layer].to(K.dtype), hp), ridge)

    return solve


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    diags, _, timings = edit_batch(lm, requests, hparams,
                                   lambda hp, st: solver_for(lm, hp), state)
    return EditOutcome(diagnostics=diags, state=state, timings=timings)
