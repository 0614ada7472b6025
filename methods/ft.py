"""FT-L: constrained fine-tuning of one MLP output matrix (Zhu et al. 2020, "Modifying Memories
in Transformer Models"; the FT-L baseline of the ROME paper, Meng et al. 2022).

Minimises the mean per-token NLL of ``target_new`` after the rewrite prompt, averaged over the
batch, by Adam on the rewrite matrix W of one layer only, projecting after every step onto the
L-infinity ball |W' - W|_inf <= ``norm_constraint`` around the pre-edit weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from harness.errors import UserError
from harness.scoring import mean_nll
from methods.base import EditOutcome, EditRequest

NAME = "ft"


@dataclass
class Hparams:
    """``layers``: the single layer whose rewrite matrix is tuned. ``lr``: Adam step size.
    ``steps``: optimisation steps per batch. ``norm_constraint``: L-inf radius (same units as
    the weights). ``early_stop_nll``: stop when the mean NLL falls below this."""

    layers: list[int] = field(default_factory=lambda: [0])
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float = 5e-4
    weight_decay: float = 0.0
    early_stop_nll: float = 1e-2

    def validate(self) -> None:
        if len(self.layers) != 1:
            raise UserError(f"ft hparams: 'layers' must name exactly one layer, got {self.layers}")
        if self.steps < 1 or self.lr <= 0 or self.norm_constraint <= 0:
            raise UserError("ft hparams: steps, lr and norm_constraint must be positive")


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    layer = hparams.layers[0]
    if not 0 <= layer < lm.n_layers:
        raise UserError(f"ft hparams: layer {layer} outside 0..{lm.n_layers - 1}")
    param = lm.module(lm.spec.rewrite(layer)).weight
    original = param.detach().clone()
    prompts = [r.rewrite_prompt for r in requests]
    targets = [r.target_new for r in requests]
    param.requires_grad_(True)
    opt = torch.optim.Adam([param], lr=hparams.lr, weight_decay=hparams.weight_decay)
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(hparams.steps):
                opt.zero_grad(set_to_none=True)
                nll = mean_nll(lm, prompts, targets)
                loss = nll.mean()
                losses.append(float(loss.detach()))
                if losses[-1] < hparams.early_stop_nll:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    lo = original - hparams.norm_constraint
                    hi = original + hparams.norm_constraint
                    param.copy_(torch.clamp(param, lo, hi))
    finally:
        param.requires_grad_(False)
        param.grad = None
    delta_norm = float((param.detach() - original).float().norm())
    diags = [{"update_norm": delta_norm, "ft_loss_first": losses[0], "ft_loss_last": losses[-1],
              "ft_steps": len(losses)} for _ in requests]
    return EditOutcome(diagnostics=diags, state=state)
