"""AlphaEdit with BLUE (Boundary Layer UpdatE; Li et al., arXiv 2502.03748, NeurIPS 2025).

The write plan of :mod:`methods.memit_blue` (only the listed boundary layers, each with its
own directly computed residual R_l, share 1) with AlphaEdit's solver at each of them:

    Delta_l = R_l K_l^T P_l (K_p K_p^T P_l + K_l K_l^T P_l + L2 I)^-1

(:func:`methods.solvers.alphaedit_A`, P_l the null-space projector of C0_l). In sequential
editing the state carries K_p K_p^T of the edited layers (``prev_cov.<layer>``), grown by
K_l K_l^T after every batch, as for AlphaEdit. The authors' ``*-blue`` files also change the
ridge (L2 = 80 GPT-2 XL, 95 GPT-J, 1 Llama-3-8B, instead of 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.models import LoadedModel
from methods import alphaedit
from methods.base import EditOutcome, EditRequest
from methods.locate import prepare as prepare  # runner hook
from methods.memit_blue import edit_blue

NAME = "alphaedit-blue"


@dataclass
class Hparams(alphaedit.Hparams):
    """As AlphaEdit; ``layers`` names the boundary layers (first and last of the window)."""


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    solver = alphaedit.solver_for(lm, hparams, state, hparams.L2)
    diags, written, timings = edit_blue(lm, requests, hparams, solver)
    return EditOutcome(diagnostics=diags, state=alphaedit.accumulate(state, written.keys),
                       timings=timings)
