"""r-ROME (Gupta et al., "Rebuilding ROME: Resolving Model Collapse during Sequential Model
Editing", 2024): ROME with one consistent key.

The published ROME code writes ``Delta = (v - W k_plain) u^T / (u^T k_plain)`` with
``u = C0^-1 k_avg``: the direction uses the template-averaged key, the denominator the plain
prompt's key. r-ROME uses the averaged key in both places,

    Delta = (z - h) (C0^-1 k_avg)^T / (k_avg^T C0^-1 k_avg),    Delta k_avg = z - h,

with k_avg (d_in,) averaged as MEMIT's ``compute_ks`` does (half the plain prompt, half the
mean of the prefixed ones), z (d_model,) the target optimised at the edited layer's output
(MEMIT's ``compute_z``), h the layer output at the plain prompt, C0 (d_in, d_in) the key
second moment, and MEMIT's context templates (``[[10, 5]]``, braces replaced by spaces). The
solver is ROME's (``methods.rome``) with these switches fixed, so the two stay one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness.errors import UserError
from methods import rome
from methods.base import EditOutcome, EditRequest
from methods.locate import prepare as prepare  # runner hook

NAME = "r-rome"


@dataclass
class Hparams(rome.Hparams):
    """ROME's hparams with r-ROME's switches as defaults (published GPT-2 XL file)."""

    CONTEXT_BRACES: ClassVar[str] = " "  # r-ROME generates prefixes as MEMIT does

    v_num_grad_steps: int = 20
    v_weight_decay: float = 0.5
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    key_averaging: str = "original"
    value_site: str = "residual"
    denominator_key: str = "averaged"
    mom2_adjustment: bool = True

    def validate(self) -> None:
        super().validate()
        if self.denominator_key != "averaged":
            raise UserError("r-rome hparams: 'denominator_key' must be 'averaged' (the "
                            "consistent key is what r-ROME is); use --method rome for 'plain'")


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    return rome.edit(lm, requests, hparams, state)
