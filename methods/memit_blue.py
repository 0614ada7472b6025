"""MEMIT with BLUE (Boundary Layer UpdatE; Li et al., "Rethinking Residual Distribution in
Locate-then-Edit Model Editing", arXiv 2502.03748, NeurIPS 2025).

MEMIT computes one target at the last edited layer and spreads the residual over the window
(layer i of L takes ``R_i / (L - i)``). BLUE edits only the first and the last layer of the
window (``layers: [l_first, l_last]``, as in the authors' ``*-blue`` hparams) and computes the
residual *directly* at each of them, undistributed. For each layer l of ``layers``, in order:

    V_l = target at the output of layer l (the open-loop target step run at layer l on the
          current model, i.e. after the writes at the earlier layers);
    R_l = V_l - Z_l            (d_model, n); Z_l the current states at layer l, share 1;
    Delta_l = R_l A_l          A_l (n, d_in) the solver's matrix for keys K_l (d_in, n),
                               here MEMIT's K^T (lambda C0 + K K^T)^-1.

So with ``layers`` = the whole window it would be "every layer gets its own target"; the
published setting (and ours) lists the two boundary layers only. The diagnostics (rho,
z_error, ...) measure the whole batch at the last layer: the realisation of V_l_last - Z_pre,
Z_pre the states there before the batch's first write (the last layer's own residual can be
zero: once the first layer's write reaches the target, its target step stops at once and
rho of that residual would be 0/0). The earlier layers' target-step records carry the
prefix ``layer<l>_``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.models import LoadedModel, resolve_dtype
from methods import locate, memit
from methods.base import EditOutcome, EditRequest
from methods.keys import averaged_keys
from methods.locate import prepare as prepare  # runner hook
from methods.solvers import NumericalError
from methods.targets import TargetProblem, compute_targets

NAME = "memit-blue"

#: refine(layer, Z0, V, problem, templates) -> (V*, per-edit info), see :func:`edit_blue`
Refine = Callable[[int, torch.Tensor, torch.Tensor, TargetProblem, Sequence[str]],
                  tuple[torch.Tensor, list[dict[str, Any]]]]


@dataclass
class Hparams(memit.Hparams):
    """As MEMIT; ``layers`` names the boundary layers (first and last of the window)."""


def residual_plan(layers: Sequence[int]) -> list[tuple[int, int, float]]:
    """BLUE's write plan: (edited layer, layer whose output carries its target, share of the
    residual) = (l, l, 1.0) for every listed layer; MEMIT's would be (l_i, l_last, 1/(L-i))."""
    return [(layer, layer, 1.0) for layer in layers]


def edit_blue(lm: LoadedModel, requests: Sequence[EditRequest], hp: locate.LocateHparams,
              solver: locate.Solver, refine: Refine | None = None,
              ) -> tuple[list[dict[str, Any]], locate.WriteResult, dict[str, float]]:
    """Targets and writes layer by layer (:func:`residual_plan`), then the diagnostics.

    ``refine(layer, Z0, V, problem, templates) -> (V*, per-edit info)`` (MetaKE over BLUE)
    replaces each boundary layer's open-loop target V_l (d_model, n) before its write; Z0 are
    the states at that layer on the current model, ``problem`` the target step's."""
    locate.check_layers(lm, hp.layers)
    timings = {"stats_s": 0.0, "target_s": 0.0, "write_s": 0.0}
    t0 = time.perf_counter()
    P = locate.projectors(lm, hp, hp.layers)
    timings["stats_s"] = time.perf_counter() - t0
    templates = locate.templates_for(lm, hp)
    sdt = resolve_dtype(hp.solve_dtype)
    last = hp.layers[-1]
    _, Zpre = averaged_keys(lm, requests, templates[:1], [], [last], value_site=hp.value_site)
    keys, As, norms = {}, {}, {}
    residual_first = torch.empty(0)
    earlier: list[dict[str, Any]] = [{} for _ in requests]
    V = torch.empty(0)
    info: list[dict[str, Any]] = []
    for i, (layer, target_layer, share) in enumerate(residual_plan(hp.layers)):
        t0 = time.perf_counter()
        Z0, V, info, problem = compute_targets(lm, requests, target_layer, hp, templates)
        timings["target_s"] += time.perf_counter() - t0
        if refine is not None:
            t0 = time.perf_counter()
            V, more = refine(target_layer, Z0, V, problem, templates)
            info = [{**a, **b} for a, b in zip(info, more, strict=True)]
            timings["refine_s"] = timings.get("refine_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        plain: dict[int, torch.Tensor] = {}
        K, Z = averaged_keys(lm, requests, templates, [layer], [target_layer],
                             hp.key_averaging, hp.value_site, plain)
        R = share * (V - Z[target_layer]).to(sdt)
        if i == 0:
            residual_first = R
        A = solver(layer, R, K[layer].to(sdt), plain[layer].to(sdt))
        delta = R @ A
        if not torch.isfinite(delta).all():
            raise NumericalError(f"non-finite update at layer {layer}")
        lm.apply_delta(layer, delta)
        keys[layer], As[layer], norms[layer] = K[layer], A, float(delta.norm())
        timings["write_s"] += time.perf_counter() - t0
        if i < len(hp.layers) - 1:
            for e, d in zip(earlier, info, strict=True):
                e.update({f"layer{layer}_{k}": v for k, v in d.items()})
    written = locate.WriteResult(keys=keys, A=As, update_norms=norms,
                                 residual_first=residual_first)
    t0 = time.perf_counter()
    extra = [{**e, **d} for e, d in zip(earlier, info, strict=True)]
    diags = locate.diagnostics(lm, requests, hp, Zpre[last], V, templates, written,
                               P[last], extra)
    timings["diagnostics_s"] = time.perf_counter() - t0
    return diags, written, timings


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    diags, _, timings = edit_blue(lm, requests, hparams, memit.solver_for(lm, hparams))
    return EditOutcome(diagnostics=diags, state=state, timings=timings)

