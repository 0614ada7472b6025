"""NSE: neuron-level sequential editing (Jiang et al., "Neuron-Level Sequential Editing for
Large Language Models", arXiv 2410.04045), as the authors' released code
(github.com/jianghoucheng/NSE, ``nse/nse_main.py`` with ``experiments/evaluate.py``) does it.

MEMIT's targets, keys and residual schedule (:mod:`methods.locate`) with three changes:

1. **Weight rewinding for the values.** Every request's target v_i (d_model) at the last edited
   layer is optimised on the *unedited* weights (the release computes all targets on the
   original model before the first edit and caches them), here by restoring the edited
   layers' original weights W0 for the target step (``value_rewind``; all edits live in those
   matrices). The residual is then taken against the current, edited model. That pre-pass
   passes the raw CounterFact record to ``compute_z``, before the leading space MEMIT's
   ``execute_memit`` puts on ``target_new``, so its targets make "English" likely, not
   " English" (``value_target_space: false`` reproduces it; ``true`` is MEMIT's).
2. **Neuron selection.** At each edited layer l, of the d_in input neurons of W_l only those
   carrying the batch's key mass are written (:func:`methods.solvers.select_neurons`: the
   largest ``sum_j |k_j|`` whose cumulative share is within ``neuron_threshold``), and the
   update is MEMIT's solve in that subspace with the keys of earlier batches preserved
   (:func:`methods.solvers.subspace_memit_A`):

       Delta_l[:, S] = R_l K_S^T (lambda C0_SS + (K_p K_p^T)_SS + K_S K_S^T)^-1,

   zero elsewhere; K_p K_p^T (state ``prev_cov.<layer>``, unscaled by lambda as in the
   release) grows after every batch by the keys of *all* its requests read on the edited
   model.
3. **Iterative rewriting.** Up to ``nse_max_iterations - 1`` rounds: each round writes (over
   all layers, MEMIT's schedule) only the requests whose residual norm |v_i - z_i| on the
   current model lies in (``nse_alpha``, ``nse_upper_bound``); the loop ends early when none
   does (the release's loop runs ``max_iterations`` times and breaks before writing in the
   last).

The diagnostics (rho, z_error, ...) measure the realisation of v_i - z_i with z_i the state
before the batch; ``nse_rounds`` counts the rounds that wrote request i.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel
from methods import alphaedit, locate, memit
from methods.base import EditOutcome, EditRequest
from methods.keys import averaged_keys
from methods.solvers import select_neurons, subspace_memit_A
from methods.targets import compute_targets

NAME = "nse"


@dataclass
class Hparams(memit.Hparams):
    """``nse_alpha`` / ``nse_upper_bound``: a request is (re)written while its residual norm
    lies strictly between them (the release's ``alpha``, ``upper_bound``);
    ``nse_max_iterations``: the release's ``max_iterations`` (at most this minus one rounds);
    ``neuron_threshold``: share of the key mass the selected neurons carry (1: all neurons but
    those the float rounding of the last cumulative sums leaves out, as the release);
    ``value_rewind``: targets on the unedited weights (the release) or on the current ones;
    ``value_target_space``: the targets' tokens with the space before target_new that MEMIT's
    ``execute_memit`` adds (true) or without it (false: the release's pre-pass, which calls
    ``compute_z`` on the raw CounterFact record, so "English" is optimised, not " English")."""

    nse_alpha: float = 2.5
    nse_upper_bound: float = 50.0
    nse_max_iterations: int = 3
    neuron_threshold: float = 1.0
    value_rewind: bool = True
    value_target_space: bool = False

    def validate(self) -> None:
        super().validate()
        if not self.nse_alpha < self.nse_upper_bound:
            raise UserError(f"hparams: nse_alpha ({self.nse_alpha}) must be below "
                            f"nse_upper_bound ({self.nse_upper_bound})")
        if not 0.0 < self.neuron_threshold <= 1.0:
            raise UserError(f"hparams: field 'neuron_threshold' must be in (0, 1], got "
                            f"{self.neuron_threshold}")


def prepare(lm: LoadedModel, hp: Hparams) -> None:
    """Runner hook (unedited model): MEMIT's caches and the original weights W0 of the edited
    layers (float32 copies), for the weight rewinding."""
    locate.prepare(lm, hp)
    memo = lm.info.setdefault("_nse_w0", {})
    for layer in hp.layers:
        memo[layer] = lm.rewrite_weight(layer).detach().float().clone()


def _originals(lm: LoadedModel, hp: Hparams) -> dict[int, torch.Tensor]:
    memo = lm.info.get("_nse_w0", {})
    if any(layer not in memo for layer in hp.layers):
        prepare(lm, hp)  # called without the runner: the model is taken as unedited now
        memo = lm.info["_nse_w0"]
    return {layer: memo[layer] for layer in hp.layers}


def _set_weights(lm: LoadedModel, weights: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, W in weights.items():
            w = lm.rewrite_weight(layer)
            w.copy_(W.to(device=w.device, dtype=w.dtype))


def rewound_targets(lm: LoadedModel, requests: list[EditRequest], hp: Hparams,
                    templates: list[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """V (d_model, n): the target step at the last edited layer, run on the original weights
    W0 of ``hp.layers`` when ``value_rewind`` (the current ones restored afterwards)."""
    space = hp.value_target_space
    if not hp.value_rewind:
        _, V, info, _ = compute_targets(lm, requests, hp.layers[-1], hp, templates,
                                        target_space=space)
        return V, info
    current = {layer: lm.rewrite_weight(layer).detach().clone() for layer in hp.layers}
    _set_weights(lm, _originals(lm, hp))
    try:
        _, V, info, _ = compute_targets(lm, requests, hp.layers[-1], hp, templates,
                                        target_space=space)
    finally:
        _set_weights(lm, current)
    return V, info


def solver_for(lm: LoadedModel, hp: Hparams, state: dict[str, Any],
               selected: dict[int, int] | None = None) -> locate.Solver:
    """MEMIT's solve in the subspace of the selected neurons, with the earlier batches' keys
    (``selected`` records the number of neurons chosen per layer)."""
    C0, _, _ = locate.layer_statistics(lm, hp, hp.layers)

    def solve(layer: int, R: torch.Tensor, K: torch.Tensor, *_: Any) -> torch.Tensor:
        neurons = select_neurons(K.float(), hp.neuron_threshold)
        if selected is not None:
            selected[layer] = len(neurons)
        C = hp.mom2_update_weight * C0[layer].to(K.dtype)
        prev = state.get(alphaedit.state_key(layer))
        if prev is not None:
            C = C + prev.to(K.dtype)
        return subspace_memit_A(K, C, neurons)

    return solve


def edit(lm: LoadedModel, requests: list[EditRequest], hparams: Hparams,
         state: dict[str, Any]) -> EditOutcome:
    hp = hparams
    P, timings = locate.start_batch(lm, hp)
    last = hp.layers[-1]
    templates = locate.templates_for(lm, hp)
    t0 = time.perf_counter()
    V, info = rewound_targets(lm, requests, hp, templates)
    timings["target_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    before = {layer: lm.rewrite_weight(layer).detach().clone() for layer in hp.layers}
    _, Zpre = averaged_keys(lm, requests, templates[:1], [], [last], value_site=hp.value_site)
    rounds = torch.zeros(len(requests), dtype=torch.long)
    selected: dict[int, int] = {}
    first_selected: dict[int, int] = {}
    for m in range(hp.nse_max_iterations):
        _, Z = averaged_keys(lm, requests, templates[:1], [], [last], value_site=hp.value_site)
        norms = (V - Z[last]).norm(dim=0)
        mask = (norms > hp.nse_alpha) & (norms < hp.nse_upper_bound)
        if not bool(mask.any()) or m == hp.nse_max_iterations - 1:
            break
        idx = torch.nonzero(mask)[:, 0]
        locate.write_layers(lm, [requests[i] for i in idx.tolist()], hp, V[:, idx], templates,
                            solver_for(lm, hp, state, selected))
        rounds[idx.cpu()] += 1
        if not first_selected:
            first_selected = dict(selected)
    K_all, _ = averaged_keys(lm, requests, templates, hp.layers, [], hp.key_averaging)
    timings["write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    norms_per_layer = {layer: float((lm.rewrite_weight(layer).double()
                                     - before[layer].double()).norm()) for layer in hp.layers}
    written = locate.WriteResult(keys=K_all, A={}, update_norms=norms_per_layer,
                                 residual_first=torch.empty(0))
    d_in = K_all[last].shape[0]
    batch = {f"nse_neuron_share.{layer}": n / d_in for layer, n in first_selected.items()}
    extra = [{**a, **batch, "nse_rounds": int(rounds[i])} for i, a in enumerate(info)]
    diags = locate.diagnostics(lm, requests, hp, Zpre[last], V, templates, written, P[last],
                               extra)
    timings["diagnostics_s"] = time.perf_counter() - t0
    return EditOutcome(diagnostics=diags, state=alphaedit.accumulate(state, K_all),
                       timings=timings)
