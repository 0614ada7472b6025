"""PRUNE over MEMIT (Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025).

Each batch is a MEMIT write (:mod:`methods.memit`). After it, for every edited layer l the
accumulated edit ``Delta_l = W_l - W0_l`` (d_out, d_in; ``W0_l`` the unedited weight) is
restrained (:func:`methods.regularizers.restrain_singular_values`):

    Delta_l = U diag(s) V^T,   s_i -> F(s_i) = log_a(s_i) - log_a(b_l) + b_l   if s_i >= b_l,

with ``b_l = sigma_max(W0_l)`` and ``a = prune_alpha``; ``W_l <- W0_l + U diag(F(s)) V^T``.
This bounds the growth of the edited matrix's condition number.

``prune_mode`` (both record in the manifest through the hparams):

* ``posthoc`` (default; what PRUNE's released code and AlphaEdit's ``MEMIT_prune`` baseline
  do): the editing trajectory is plain sequential MEMIT; the restraint is applied to the
  accumulated edit of that trajectory when the model is evaluated. Here the unrestrained
  ``Delta_l`` is carried in the state (``prune_raw.<layer>``, float32), each batch starts from
  ``W0 + Delta_raw`` and ends at ``W0 + F(Delta_raw)``, so whenever the harness evaluates
  (after the last batch, or at ``--eval-every`` checkpoints) the model is the restrained one.
* ``every_batch``: the restrained weights are the start of the next batch (the restraint
  compounds over the sequence); no extra state.

The published comparisons used the natural log (``prune_alpha = e``; AlphaEdit's code). The
per-edit diagnostics (rho, z_error, update_norm) are measured after the restraint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel
from methods import locate, memit
from methods.base import EditOutcome, EditRequest
from methods.regularizers import restrain_singular_values

NAME = "prune"
MODES = ("posthoc", "every_batch")


@dataclass
class Hparams(memit.Hparams):
    """``prune_alpha``: base of F's logarithm (> 1); ``prune_mode``: posthoc | every_batch."""

    prune_alpha: float = math.e
    prune_mode: str = "posthoc"

    def validate(self) -> None:
        super().validate()
        if not self.prune_alpha > 1.0:
            raise UserError(f"hparams: field 'prune_alpha' must be > 1, got {self.prune_alpha}")
        if self.prune_mode not in MODES:
            raise UserError(f"hparams: field 'prune_mode' must be one of {', '.join(MODES)}, "
                            f"got {self.prune_mode!r}")


def raw_key(layer: int) -> str:
    return f"prune_raw.{layer}"


def prepare(lm: LoadedModel, hp: Hparams) -> None:
    """Runner hook (unedited model): MEMIT's caches plus W0_l (float32 copies) and
    b_l = sigma_max(W0_l) for every edited layer."""
    locate.prepare(lm, hp)
    memo = lm.info.setdefault("_prune_w0", {})
    for layer in hp.layers:
        W0 = lm.rewrite_weight(layer).detach().float().clone()
        bound = float(torch.linalg.matrix_norm(W0.double(), ord=2))
        memo[layer] = (W0, bound)


def _originals(lm: LoadedModel, hp: Hparams) -> dict[int, tuple[torch.Tensor, float]]:
    memo = lm.info.get("_prune_w0", {})
    if any(layer not in memo for layer in hp.layers):
        prepare(lm, hp)  # called without the runner: the model is taken as unedited now
        memo = lm.info["_prune_w0"]
    return {layer: memo[layer] for layer in hp.layers}


def _set_weight(lm: LoadedModel, layer: int, W: torch.Tensor) -> None:
    with torch.no_grad():
        w = lm.rewrite_weight(layer)
        w.copy_(W.to(device=w.device, dtype=w.dtype))


Transform = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def edit_then_regularise(lm: LoadedModel, requests: Sequence[EditRequest], hp: Any,
                         solver_for: Callable[[Any, dict[str, Any]], locate.Solver],
                         state: dict[str, Any], transform: Transform
                         ) -> tuple[list[dict[str, Any]], locate.WriteResult, dict[str, float]]:
    """One locate-then-edit batch (:func:`methods.locate.edit_batch`), then for every edited
    layer ``W_l <- transform(layer, W_before_l, W_after_l)`` (both (d_out, d_in)), then the
    diagnostics again on the transformed model (targets and keys of the write are reused).
    ``transform`` returns the new weight and per-batch info merged into every edit's record."""
    before = {layer: lm.rewrite_weight(layer).detach().clone() for layer in hp.layers}
    seen: dict[str, Any] = {}

    def capture(_lm, reqs, _hp, Z0, V, _problem, templates, P, _state):
        seen.update(Z0=Z0, V=V, templates=templates, P=P)
        return V, [{} for _ in reqs]

    diags, written, timings = locate.edit_batch(lm, requests, hp, solver_for, state,
                                                refine=capture)
    timings.pop("refine_s", None)
    info: dict[str, Any] = {}
    norms = {}
    for layer in hp.layers:
        W_new, extra = transform(layer, before[layer], lm.rewrite_weight(layer).detach())
        _set_weight(lm, layer, W_new)
        norms[layer] = float((lm.rewrite_weight(layer).double() - before[layer].double()).norm())
        info.update(extra)
    written = locate.WriteResult(keys=written.keys, A=written.A, update_norms=norms,
                                 residual_first=written.residual_first)
    P = seen["P"]
    again = locate.diagnostics(lm, requests, hp, seen["Z0"], seen["V"], seen["templates"],
                               written, P[hp.layers[-1]] if P is not None else None)
    diags = [{**d, **a, **info} for d, a in zip(diags, again, strict=True)]
    return diags, written, timings


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    W0 = _originals(lm, hparams)
    posthoc = hparams.prune_mode == "posthoc"
    if posthoc:  # back onto the unrestrained trajectory
        for layer in hparams.layers:
            raw = state.get(raw_key(layer))
            if raw is not None:
                base = W0[layer][0].to(raw.device).double()
                _set_weight(lm, layer, base + raw.double())
    new_state = dict(state)

    def restrain(layer: int, _before: torch.Tensor, after: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        base, bound = W0[layer]
        base = base.to(after.device).double()
        raw = after.double() - base
        if posthoc:
            new_state[raw_key(layer)] = raw.float()
        restrained, n = restrain_singular_values(raw, bound, hparams.prune_alpha)
        return base + restrained, {f"prune_n_restrained.{layer}": n,
                                   f"prune_bound.{layer}": bound}

    diags, _, timings = edit_then_regularise(
        lm, requests, hparams, lambda hp, st: memit.solver_for(lm, hp), state, restrain)
    return EditOutcome(diagnostics=diags, state=new_state, timings=timings)
