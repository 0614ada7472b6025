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
from typing import Any, ClassVar

import torch

from harness.corpus import SAMPLING_MODES
from harness.errors import UserError
from harness.models import LoadedModel, resolve_dtype
from harness.stats import cached_projector, second_moment_stats
from methods import alignment
from methods.base import EditRequest
from methods.keys import (
    KEY_AVERAGING,
    VALUE_SITES,
    averaged_keys,
    context_templates,
    original_context_templates,
    parse_template_texts,
)
from methods.solvers import nullspace_projector, spread_residual
from methods.targets import StopRule, TargetHparams


@dataclass
class LocateHparams(TargetHparams):
    """Shared by ROME/MEMIT/AlphaEdit/MetaKE. ``layers``: edited layers (the last one carries
    the target). Statistics (:mod:`harness.stats`) over ``stats_corpus`` (None: WikiText-2 in
    the data dir): ``stats_sampling`` "records" (the original's: ``stats_records`` articles,
    its ``mom2_n_samples``, each its own sequence), "lines" (records = lines) or "tokens"
    (``stats_tokens`` tokens in chunks of ``stats_seq_len``). ``nullspace_threshold`` also
    defines phi for methods without a projector.
    ``solve_dtype``: dtype of the closed-form solves (float64 default: exact on CPU).

    Context templates (:mod:`methods.keys`), first match wins:
    ``context_template_texts``: exactly these templates, in the original code's form
    (``["{}", "X. {}", ...]``); ``n_context`` (with ``context_length``, default 10): the
    earlier loop's prefixes (``n_context`` of ``context_length`` new tokens, one per
    starter in turn, whitespace collapsed; ``tuned`` preset); else ``context_templates``:
    the published schedule of ``[length, n]`` pairs (``length`` tokens in total, ``n // 5``
    per starter word). ``key_averaging``: ``original`` (MEMIT ``compute_ks``: half the plain
    prompt's key, half the mean of the prefixed ones) | ``uniform`` (mean over all
    templates)."""

    CONTEXT_BRACES: ClassVar[str] = " "  # what the original puts for "{" / "}" in prefixes

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    context_template_texts: list[str] | None = None
    n_context: int | None = None
    context_length: int | None = None
    key_averaging: str = "original"
    stats_tokens: int = 100_000
    stats_corpus: str | None = None
    stats_seq_len: int = 256
    stats_sampling: str = "tokens"
    stats_records: int = 100_000
    nullspace_threshold: float = 2e-2
    solve_dtype: str = "float64"

    def validate(self) -> None:
        if not self.layers:
            raise UserError("hparams: 'layers' must name at least one layer")
        if sorted(self.layers) != list(self.layers) or len(set(self.layers)) != len(self.layers):
            raise UserError(f"hparams: 'layers' must be strictly increasing, got {self.layers}")
        steps = self.v_num_grad_steps if self.v_steps is None else self.v_steps
        if steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise UserError("hparams: v_num_grad_steps (or v_steps), v_lr and "
                            "clamp_norm_factor must be positive")
        if self.stats_tokens < 1000:
            raise UserError("hparams: stats_tokens must be at least 1000")
        _check_choice("stats_sampling", self.stats_sampling, SAMPLING_MODES)
        if self.stats_records < 1:
            raise UserError("hparams: stats_records must be at least 1")
        _check_choice("key_averaging", self.key_averaging, KEY_AVERAGING)
        _check_choice("value_site", self.value_site, VALUE_SITES)
        for pair in self.context_templates:
            if len(pair) != 2 or pair[0] < 1 or pair[1] < 0:
                raise UserError("hparams: field 'context_templates' must be [[length, n], ...] "
                                f"with length >= 1 and n >= 0, got {self.context_templates}")
        if self.context_template_texts is not None:
            if self.n_context is not None:
                raise UserError("hparams: set context_template_texts or n_context, not both")
            parse_template_texts(self.context_template_texts)
        if self.n_context is not None and self.n_context < 0:
            raise UserError(f"hparams: n_context must be >= 0, got {self.n_context}")
        if self.context_length is not None and (self.n_context is None
                                                or self.context_length < 1):
            raise UserError("hparams: context_length (>= 1) only applies with n_context")
        resolve_dtype(self.solve_dtype)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"hparams: field {name!r} must be one of {', '.join(allowed)}, "
                        f"got {value!r}")


def templates_for(lm: LoadedModel, hp: LocateHparams) -> list[str]:
    """The context prefixes of ``hp`` (``""`` first), generated once per model and seed."""
    if hp.context_template_texts is not None:
        return parse_template_texts(hp.context_template_texts)
    seed = int(lm.info.get("seed", 0))
    if hp.n_context is not None:
        length = 10 if hp.context_length is None else hp.context_length
        return context_templates(lm, hp.n_context, length, seed=seed)
    return original_context_templates(lm, hp.context_templates, seed=seed,
                                      braces=type(hp).CONTEXT_BRACES)


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
    want = (hp.stats_corpus, hp.stats_tokens, hp.stats_seq_len, hp.stats_sampling,
            hp.stats_records)
    missing = [layer for layer in layers if (want, layer) not in memo]
    if missing:
        res = second_moment_stats(lm, missing, hp.stats_corpus, hp.stats_tokens,
                                  hp.stats_seq_len, sampling=hp.stats_sampling,
                                  n_records=hp.stats_records)
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
            memo[k] = cached_projector(lm, layer, C0[layer], keys[layer],
                                       hp.nullspace_threshold, nullspace_projector)
        out[layer] = memo[k]
    return out


def prepare(lm: LoadedModel, hp: LocateHparams) -> None:
    """Runner hook, called once before the first batch (and again when a run resumes, before
    the checkpointed weights are loaded): compute on the unedited model what every batch
    reuses (key statistics, projectors, context prefixes), so that a resumed run uses the same
    ones as an uninterrupted run."""
    check_layers(lm, hp.layers)
    projectors(lm, hp, hp.layers)
    templates_for(lm, hp)


def start_batch(lm: LoadedModel, hp: LocateHparams
                ) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """A batch's first step outside :func:`edit_batch`: the layers checked, the projectors
    (the phi diagnostic; cached) and the timings dict with their ``stats_s``."""
    check_layers(lm, hp.layers)
    t0 = time.perf_counter()
    P = projectors(lm, hp, hp.layers)
    return P, {"stats_s": time.perf_counter() - t0}


#: solver(layer, R (d_out, n), K (d_in, n), K_plain (d_in, n)) -> A (n, d_in), Delta = R A.
#: K: the context-averaged keys; K_plain: the plain rewrite prompt's keys (ROME's denominator)
Solver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
        plain: dict[int, torch.Tensor] = {}
        K, Z = averaged_keys(lm, requests, templates, [layer], [last], hp.key_averaging,
                             hp.value_site, plain)
        R = (V - Z[last]).to(sdt)
        if i == 0:
            residual_first = R
        R_l = spread_residual(R, i, len(hp.layers))
        A = solver(layer, R_l, K[layer].to(sdt), plain[layer].to(sdt))
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
    """Per-edit phi, rho, z_error, residual and update norms (METAKE.md), after the write.
    rho and z_error are read on the plain rewrite prompt at ``hp.value_site``: ROME with
    ``denominator_key: plain`` is exact there (rho = 1 up to rounding), with ``averaged``
    it is exact at the averaged key instead."""
    last = hp.layers[-1]
    _, Zpost = averaged_keys(lm, requests, templates[:1], [], [last],
                             value_site=hp.value_site)
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
               stop_rule: StopRule | None = None,
               ) -> tuple[list[dict[str, Any]], WriteResult, dict[str, float]]:
    """Targets -> (optional refinement of V, MetaKE) -> multi-layer write -> diagnostics.
    ``stop_rule``: an extra stopping rule of the target step (ENCORE's MPES;
    :func:`methods.targets.compute_targets`)."""
    check_layers(lm, hp.layers)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    P = projectors(lm, hp, hp.layers)
    timings["stats_s"] = time.perf_counter() - t0
    templates = templates_for(lm, hp)
    t0 = time.perf_counter()
    from methods.targets import compute_targets

    Z0, V, info, problem = compute_targets(lm, requests, hp.layers[-1], hp, templates,
                                           stop_rule=stop_rule)
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
