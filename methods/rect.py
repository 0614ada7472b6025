"""RECT over MEMIT (Gu et al., "Model Editing Harms General Abilities of Large Language Models:
Regularization to the Rescue", EMNLP 2024).

Each batch is a MEMIT write (:mod:`methods.memit`); then, for every edited layer l, of the
batch's update ``Delta_l = W_l,after - W_l,before`` (d_out, d_in) only the entries with the
largest relative change ``|Delta_ij / (W_ij,before + eps)|`` are kept, the top ``rect_keep``
fraction; the others are zeroed (:func:`methods.regularizers.rect_sparsify`):

    W_l <- W_l,before + M_l * Delta_l,   M_l = top-k mask of |Delta_l / (W_l,before + eps)|.

As in AlphaEdit's ``MEMIT_rect`` (the baseline of the published comparisons) the layers of a
batch are solved with the full updates of the lower layers in place, and the mask is applied
to each layer's update once the batch is solved. ``rect_keep``: 0.4 in that code (``k_percent
= 40``); RECT's own released code (its ROME variant) zeroes 80 per cent, i.e. keeps 0.2.
Sequential editing keeps the written weights; no state. The diagnostics are measured after
the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel
from methods import memit
from methods.base import EditOutcome, EditRequest
from methods.locate import prepare as prepare  # runner hook
from methods.prune import edit_then_regularise
from methods.regularizers import top_k_relative_mask

NAME = "rect"


@dataclass
class Hparams(memit.Hparams):
    """``rect_keep``: fraction of each layer's update entries kept, in (0, 1];
    ``rect_eps``: the eps of the relative change."""

    rect_keep: float = 0.4
    rect_eps: float = 1e-8

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.rect_keep <= 1.0:
            raise UserError(f"hparams: field 'rect_keep' must be in (0, 1], got {self.rect_keep}")
        if self.rect_eps < 0:
            raise UserError(f"hparams: field 'rect_eps' must be >= 0, got {self.rect_eps}")


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    def sparsify(layer: int, before: torch.Tensor, after: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        delta = after.double() - before.double()
        mask = top_k_relative_mask(delta, before, hparams.rect_keep, hparams.rect_eps)
        kept = float((delta * mask).norm() / delta.norm().clamp_min(1e-30))
        return before.double() + delta * mask, {f"rect_kept_norm_fraction.{layer}": kept}

    diags, _, timings = edit_then_regularise(
        lm, requests, hparams, lambda hp, st: memit.solver_for(lm, hp), state, sparsify)
    return EditOutcome(diagnostics=diags, state=state, timings=timings)
