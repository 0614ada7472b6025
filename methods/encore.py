"""ENCORE (Gupta et al., "Lifelong Sequential Knowledge Editing without Model Degradation",
arXiv 2502.01636; Findings of EMNLP 2025 as "Lifelong Knowledge Editing requires Better
Regularization"): MEMIT with two regularisers, as the authors' released code
(github.com/scalable-model-editing/knowledge-editing-regularization, ``encore/``) computes them.

1. **Most-probable early stopping (MPES)** in the target step (:mod:`methods.targets`): a
   request's target optimisation stops once every target token is the most probable token
   (argmax) on its rewrite prompts, ``mpes_patience`` times (the code's ``prob_cutoff = -p``: a
   counter of iterations with all tokens top-1, never reset; the check runs before the
   iteration's update, like the loss threshold). The released code checks the prompts with a
   context prefix only (``log_probs[1:]``: the plain rewrite prompt, row 0, is left out):
   ``mpes_prompts: prefixed``; ``all`` counts the plain prompt too.
2. **Norm constraint** on the update: a penalty ``mu |Delta|_F^2`` in MEMIT's objective, and in
   sequential editing the keys of earlier batches preserved like the corpus keys
   (``add_prev_edits``). At each edited layer l the share R_l (d_out, n) of the residual is
   written as

       Delta_l = R_l K^T (lambda_m C0_l + mu I + K_p K_p^T + K K^T)^-1

   (:func:`preservation_matrix` and :func:`methods.solvers.memit_A` with lambda 1), K (d_in, n)
   the batch's keys, C0_l (d_in, d_in) the key second moment, ``lambda_m`` =
   ``mom2_update_weight``, ``mu`` = ``update_norm_lambda``, K_p K_p^T the accumulated keys of
   the earlier batches (state ``prev_cov.<layer>``, as AlphaEdit's, unscaled by lambda_m as in
   the released code). With ``mpes_patience: 0``, ``update_norm_lambda: 0`` and
   ``add_prev_edits: false`` it is MEMIT.

The code's other early-stopping form (``prob_cutoff > 0``: stop once the mean target
probability exceeds it) is in no released file and not implemented. Targets, keys, context
templates and the residual schedule are MEMIT's (``compute_z``/``compute_ks`` of the release
equal MEMIT's but for the MPES lines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel
from methods import alphaedit, memit
from methods.base import EditOutcome, EditRequest
from methods.locate import Solver, edit_batch, layer_statistics
from methods.locate import prepare as prepare  # runner hook
from methods.solvers import memit_A
from methods.targets import StopRule, TargetProblem

NAME = "encore"
MPES_PROMPTS = ("prefixed", "all")


@dataclass
class Hparams(memit.Hparams):
    """``mpes_patience``: iterations with every target token top-1 before a request's target
    step stops (0: off; the code's ``-prob_cutoff``); ``mpes_prompts``: prefixed | all (module
    notes); ``update_norm_lambda``: mu, the norm constraint; ``add_prev_edits``: keep the keys
    of earlier batches in the preservation term (sequential editing)."""

    mpes_patience: int = 2
    mpes_prompts: str = "prefixed"
    update_norm_lambda: float = 20.0
    add_prev_edits: bool = True

    def validate(self) -> None:
        super().validate()
        if self.mpes_prompts not in MPES_PROMPTS:
            raise UserError(f"hparams: field 'mpes_prompts' must be one of "
                            f"{', '.join(MPES_PROMPTS)}, got {self.mpes_prompts!r}")


def preservation_matrix(C0: torch.Tensor, lam: float, mu: float,
                        prev_cov: torch.Tensor | None = None) -> torch.Tensor:
    """C = lam C0 + mu I + K_p K_p^T (d_in, d_in): C0 (d_in, d_in) the key second moment,
    ``prev_cov`` (d_in, d_in) the accumulated keys of earlier edits or None (= 0). MEMIT's
    solve with this C and weight 1 is ENCORE's update (module notes)."""
    C = lam * C0
    if mu:
        C = C + mu * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    if prev_cov is not None:
        C = C + prev_cov.to(dtype=C.dtype, device=C.device)
    return C


def encore_A(K: torch.Tensor, C0: torch.Tensor, lam: float, mu: float,
             prev_cov: torch.Tensor | None = None) -> torch.Tensor:
    """ENCORE's A-matrix (n, d_in): ``K^T (lam C0 + mu I + K_p K_p^T + K K^T)^-1`` for keys K
    (d_in, n); the update is ``Delta = R A``."""
    return memit_A(K, preservation_matrix(C0, lam, mu, prev_cov), 1.0)


def solver_for(lm: Any, hp: Any, state: dict[str, Any], lam: float, mu: float,
               add_prev: bool) -> Solver:
    C0, _, _ = layer_statistics(lm, hp, hp.layers)

    def solve(layer: int, R: torch.Tensor, K: torch.Tensor, *_: Any) -> torch.Tensor:
        prev = state.get(alphaedit.state_key(layer)) if add_prev else None
        return encore_A(K, C0[layer].to(K.dtype), lam, mu, prev)

    return solve


def mpes_rule(patience: int, include_plain: bool) -> StopRule:
    """Most-probable early stopping as a stop rule of the target step: request i stops once,
    in ``patience`` loss evaluations (counted over the whole step, not reset), every target
    token of its rewrite rows (the prefixed ones only unless ``include_plain``) was the argmax.
    A request with no counted token (only the plain template, prefixed prompts only) counts as
    all-correct, as in the released code (an empty comparison)."""
    counter: dict[str, torch.Tensor] = {}

    def rule(problem: TargetProblem, active: torch.Tensor) -> torch.Tensor:
        rows, correct = problem.last_correct
        owner = problem.owner[rows]
        template = rows - problem.plain_rows[owner]  # 0 = the plain rewrite prompt
        keep = template >= (0 if include_plain else 1)
        wrong = torch.zeros(problem.n, dtype=torch.long, device=rows.device)
        wrong = wrong.index_add(0, owner[keep], (~correct[keep]).long())
        all_top1 = (wrong == 0) & active.to(rows.device)
        if "n" not in counter:
            counter["n"] = torch.zeros(problem.n, dtype=torch.long, device=rows.device)
        counter["n"] += all_top1.long()
        return (counter["n"] >= patience).to(active.device)

    return rule


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    rule = (mpes_rule(hparams.mpes_patience, hparams.mpes_prompts == "all")
            if hparams.mpes_patience > 0 else None)
    diags, written, timings = edit_batch(
        lm, requests, hparams,
        lambda hp, st: solver_for(lm, hp, st, hp.mom2_update_weight, hp.update_norm_lambda,
                                  hp.add_prev_edits),
        state, stop_rule=rule)
    new_state = alphaedit.accumulate(state, written.keys) if hparams.add_prev_edits else state
    return EditOutcome(diagnostics=diags, state=new_state, timings=timings)
