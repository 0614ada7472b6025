"""Shared orchestration of the locate-then-edit family (ROME, MEMIT, AlphaEdit, MetaKE).

One batch: targets V at the last edited layer l* (:mod:`methods.targets`), then for each
edited layer l (in order) the keys K at l and the current states at l* are read in one forward
pass, the remaining residual R = V - Z_cur is spread over the layers left
(:func:`methods.solvers.spread_residual`), a solver maps it to an update Delta = R A, and W_l is
written. Diagnostics of METAKE.md are measured after the write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.errors import UserError
from harness.models import LoadedModel, resolve_dtype
from harness.stats import cached_projector, second_moment_stats
from methods import alignment
from methods.base import EditRequest
from methods.keys import averaged_keys, context_templates
from methods.solvers import spread_residual
from methods.targets import TargetHparams


@dataclass
class LocateHparams(TargetHparams):
    """Shared by ROME/MEMIT/AlphaEdit/MetaKE. ``layers``: edited layers (the last one carries
    the target). Statistics: ``stats_tokens`` tokens of ``stats_corpus`` (None: WikiText-2 in
    the data dir). ``nullspace_threshold`` also defines phi for methods without a projector.
    ``solve_dtype``: dtype of the closed-form solves (float64 default: exact on CPU)."""

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    n_context: int = 5
    context_length: int = 10
    stats_tokens: int = 100_000
    stats_corpus: str | None = None
    stats_seq_len: int = 256
    nullspace_threshold: float = 2e-2
    solve_dtype: str = "float64"

    def validate(self) -> None:
        if not self.layers:
            raise UserError("hparams: 'layers' must name at least one layer")
        if sorted(self.layers) != list(self.layers) or len(set(self.layers)) != len(self.layers):
            raise UserError(f"hparams: 'layers' must be strictly increasing, got {self.layers}")
        if self.v_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise UserError("hparams: v_steps, v_lr and clamp_norm_factor must be positive")
        if self.stats_tokens < 1000:
            raise UserError("hparams: stats_tokens must be at least 1000")
        resolve_dtype(self.solve_dtype)


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> None:
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad:
        raise UserError(f"hparams: layers {bad} outside 0..{lm.n_layers - 1} for {lm.name}")


def layer_statistics(lm: LoadedModel, hp: LocateHparams, layers: Sequence[int]
                     ) -> tuple[dict[int, torch.Tensor], dict[int, str], dict[str, Any]]:
    """C0 per layer (d_in, d_in), their cache keys, and provenance for the manifest.
    Kept on the model object for the rest of the process (the stats are of the unedited
    model, keyed by its hash; they do not change as edits accumulate)."""
    memo = lm.info.setdefault("_stats", {})
    want = (hp.stats_corpus, hp.stats_tokens, hp.stats_seq_len)
    missing = [layer for layer in layers if (want, layer) not in memo]
    if missing:
        res = second_moment_stats(lm, missing, hp.stats_corpus, hp.stats_tokens,
                                  hp.stats_seq_len)
        prov = res.provenance()
        for layer in missing:
            memo[(want, layer)] = (res.C0[layer], res.keys[layer], prov[str(layer)])
    C0 = {layer: memo[(want, layer)][0] for layer in layers}
    keys = {layer: memo[(want, layer)][1] for layer in layers}
    prov = {str(layer): memo[(want, layer)][2] for layer in layers}
    return C0, keys, prov


def projectors(lm: LoadedModel, hp: LocateHparams, layers: Sequence[int]
               ) -> dict[int, torch.Tensor]:
    """AlphaEdit null-space projectors P (d_in, d_in) per layer, cached on disk."""
    C0, keys, _ = layer_statistics(lm, hp, layers)
    memo = lm.info.setdefault("_projectors", {})
    out = {}
    for layer in layers:
        k = (keys[layer], hp.nullspace_threshold)
        if k not in memo:
            memo[k] = cached_projector(lm, layer, C0[layer], keys[layer], hp.nullspace_threshold)
        out[layer] = memo[k]
    return out


def prepare(lm: LoadedModel, hp: LocateHparams) -> None:
    """Runner hook, called once before the first batch (and again when a run resumes, before
    the checkpointed weights are loaded): compute on the unedited model what every batch
    reuses (key statistics, projectors, context prefixes), so that a resumed run uses the same
    ones as an uninterrupted run."""
    check_layers(lm, hp.layers)
    projectors(lm, hp, hp.layers)
    context_templates(lm, hp.n_context, hp.context_length, seed=int(lm.info.get("seed", 0)))


#: solver(layer, R (d_out, n), K (d_in, n)) -> A (n, d_in), Delta = R A
Solver = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class WriteResult:
    """Per-layer keys K (d_in, n) and solver matrices A (n, d_in) used, update norms."""

    keys: dict[int, torch.Tensor]
    A: dict[int, torch.Tensor]
    update_norms: dict[int, float]
    residual_first: torch.Tensor


def write_layers(lm: LoadedModel, requests: Sequence[EditRequest], hp: LocateHparams,
                 V: torch.Tensor, templates: Sequence[str], solver: Solver) -> WriteResult:
    """Write targets V (d_model, n) into ``hp.layers`` (MEMIT's multi-layer schedule)."""
    last = hp.layers[-1]
    sdt = resolve_dtype(hp.solve_dtype)
    keys, As, norms = {}, {}, {}
    residual_first = torch.empty(0)
    for i, layer in enumerate(hp.layers):
        K, Z = averaged_keys(lm, requests, templates, [layer], [last])
        R = (V - Z[last]).to(sdt)
        if i == 0:
            residual_first = R
        R_l = spread_residual(R, i, len(hp.layers))
        A = solver(layer, R_l, K[layer].to(sdt))
        delta = R_l @ A
        if not torch.isfinite(delta).all():
            from methods.solvers import NumericalError

            raise NumericalError(f"non-finite update at layer {layer}")
        lm.apply_delta(layer, delta)
        keys[layer], As[layer], norms[layer] = K[layer], A, float(delta.norm())
    return WriteResult(keys=keys, A=As, update_norms=norms, residual_first=residual_first)


def diagnostics(lm: LoadedModel, requests: Sequence[EditRequest], hp: LocateHparams,
                Z0: torch.Tensor, V: torch.Tensor, templates: Sequence[str],
                written: WriteResult, P_last: torch.Tensor | None,
                extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per-edit phi, rho, z_error, residual and update norms (METAKE.md), after the write."""
    last = hp.layers[-1]
    _, Zpost = averaged_keys(lm, requests, templates[:1], [], [last])
    zp = Zpost[last].double()
    z0, v = Z0.double(), V.double()
    rho = alignment.realisation(zp, z0, v)
    zerr = alignment.z_error(zp, z0, v)
    k_last = written.keys[last].double()
    phi = alignment.key_feasibility(P_last.double(), k_last) if P_last is not None else None
    upd = sum(written.update_norms.values())
    out = []
    for j in range(len(requests)):
        d: dict[str, Any] = {
            "rho": float(rho[j]), "z_error": float(zerr[j]),
            "residual_norm": float((v[:, j] - z0[:, j]).norm()),
            "z0_norm": float(z0[:, j].norm()),
            "key_norm": float(k_last[:, j].norm()),
            "update_norm": upd,
        }
        if phi is not None:
            d["phi"] = float(phi[j])
        if extra is not None:
            d.update(extra[j])
        out.append(d)
    return out


def edit_batch(lm: LoadedModel, requests: Sequence[EditRequest], hp: LocateHparams,
               solver_for: Callable[[LocateHparams, dict[str, Any]], Solver],
               state: dict[str, Any],
               refine: Callable[..., tuple[torch.Tensor, list[dict[str, Any]]]] | None = None,
               ) -> tuple[list[dict[str, Any]], WriteResult, dict[str, float]]:
    """Targets -> (optional refinement of V, MetaKE) -> multi-layer write -> diagnostics."""
    check_layers(lm, hp.layers)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    P = projectors(lm, hp, hp.layers)
    timings["stats_s"] = time.perf_counter() - t0
    templates = context_templates(lm, hp.n_context, hp.context_length,
                                  seed=int(lm.info.get("seed", 0)))
    t0 = time.perf_counter()
    from methods.targets import compute_targets

    Z0, V, info, problem = compute_targets(lm, requests, hp.layers[-1], hp, templates)
    timings["target_s"] = time.perf_counter() - t0
    if refine is not None:
        t0 = time.perf_counter()
        V, more = refine(lm, requests, hp, Z0, V, problem, templates, P, state)
        info = [{**a, **b} for a, b in zip(info, more, strict=True)]
        timings["refine_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = write_layers(lm, requests, hp, V, templates, solver_for(hp, state))
    timings["write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    diags = diagnostics(lm, requests, hp, Z0, V, templates, written, P[hp.layers[-1]], info)
    timings["diagnostics_s"] = time.perf_counter() - t0
    return diags, written, timings
