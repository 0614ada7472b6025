"""ROME (Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022).

One edit at a time, one layer: target v for the value at the subject's last token, then the
rank-one write

    Delta = (v - z) u^T / (u^T k_d),   u = C0^-1 k_avg (``mom2_adjustment``) or k_avg,

(``methods.solvers.rome_A_general``) with k_avg the key averaged over all context templates
(the original ``compute_u``) and z the current value at the plain prompt. Switches, each with
the published code's behaviour available exactly:

* ``denominator_key``: ``plain`` (published ``compute_v``: k_d is the plain rewrite prompt's
  key, so the write is exact there: W' k_plain = v) | ``averaged`` (k_d = k_avg, exact at the
  averaged key; r-ROME's fix and the tuned preset).
* ``value_site``: ``mlp`` (published: v is optimised at, and clamped relative to, the MLP
  output) | ``residual`` (the decoder layer's output).
* ``mom2_adjustment``: whiten u by C0^-1 (published GPT-2 XL / GPT-J files) or not (the
  published Llama-3-8B file).

A batch of several requests is applied as consecutive single edits (ROME has no batch form),
``requests_written``:

* ``all`` (default; the ROME and MEMIT repositories' ``apply_rome_to_model`` loops over the
  requests it is given): every request of the batch is written, one after the other.
* ``first``: only the batch's first request is written, the others are evaluated unedited
  (diagnostic ``written`` = 0). This is what the AlphaEdit repository's sequential loop does to
  ROME: its ``evaluate.py`` passes each chunk of ``num_edits`` requests, and its
  ``apply_rome_to_model`` keeps ``request[0]``. Offered only to reproduce ROME rows produced by
  that loop (methods/hparams/README.md measures it); it is not the ROME algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from harness.errors import UserError
from methods.base import EditOutcome, EditRequest
from methods.locate import LocateHparams, Solver, _check_choice, edit_batch, layer_statistics
from methods.locate import prepare as prepare  # runner hook
from methods.solvers import rome_A_general

NAME = "rome"
DENOMINATOR_KEYS = ("plain", "averaged")
REQUESTS_WRITTEN = ("all", "first")


@dataclass
class Hparams(LocateHparams):
    """Defaults: the published GPT-2 XL file's switches (see the module notes)."""

    CONTEXT_BRACES: ClassVar[str] = ""  # ROME drops braces from generated prefixes

    layers: list[int] = field(default_factory=lambda: [6])
    clamp_norm_factor: float = 4.0
    context_templates: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    key_averaging: str = "uniform"
    value_site: str = "mlp"
    denominator_key: str = "plain"
    mom2_adjustment: bool = True
    requests_written: str = "all"

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            raise UserError(f"rome hparams: 'layers' must name one layer, got {self.layers}")
        _check_choice("denominator_key", self.denominator_key, DENOMINATOR_KEYS)
        _check_choice("requests_written", self.requests_written, REQUESTS_WRITTEN)


def solver_for(lm: Any, hp: LocateHparams) -> Solver:
    """ROME's solver. ``hp`` may be another method's hparams (MetaKE's ROME control): the
    ROME switches then take the tuned preset's values (C0-whitened, averaged key)."""
    mom2 = getattr(hp, "mom2_adjustment", True)
    den = getattr(hp, "denominator_key", "averaged")
    C0 = layer_statistics(lm, hp, hp.layers)[0] if mom2 else None

    def solve(layer: int, R: torch.Tensor, K: torch.Tensor, K_plain: torch.Tensor):
        if K.shape[1] != 1:
            raise ValueError("ROME writes one edit at a time")
        k_d = K_plain[:, 0] if den == "plain" else K[:, 0]
        return rome_A_general(K[:, 0], k_d, None if C0 is None else C0[layer].to(K.dtype))

    return solve


def edit(lm: Any, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    diags: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    written = requests if hparams.requests_written == "all" else requests[:1]
    for r in written:
        d, _, t = edit_batch(lm, [r], hparams, lambda hp, st: solver_for(lm, hp), state)
        diags += [{**x, "written": 1.0} for x in d]
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
    diags += [{"written": 0.0} for _ in requests[len(written):]]
    return EditOutcome(diagnostics=diags, state=state, timings=timings)
