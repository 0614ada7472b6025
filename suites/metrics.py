"""Pure metric functions on log-probabilities (no model), one per published definition.

CounterFact (Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022,
sec. 4.2 and appendix): with P[o] = exp(mean per-token log p(o | prompt)) the probability of an
object (multi-token objects scored by their mean per-token log-probability),

* Efficacy Success  ES = E_rewrite[ 1{ P[o_new] > P[o_true] } ]
* Efficacy Magnitude EM = E_rewrite[ P[o_new] - P[o_true] ]
* Paraphrase Success/Magnitude PS, PM: the same over the paraphrase prompts
* Neighbourhood Success NS = E_neigh[ 1{ P[o_true] > P[o_new] } ], NM = E[ P[o_true] - P[o_new] ]
* Score S = harmonic mean of ES, PS, NS (MEMIT, Meng et al. ICLR 2023).

Comparing P's is the same as comparing mean log-probabilities; ties count as failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def success(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(n,) float 1.0 where mean log-prob ``first`` > ``second`` (strictly), else 0.0."""
    return (first > second).float()


def magnitude(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(n,) exp(first) - exp(second): the probability gap of the ROME paper's *M metrics."""
    return first.exp() - second.exp()


def margin(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(n,) first - second: log-probability margin, e.g. m = log p(o_new) - log p(o_true)."""
    return first - second


def mean_logprob(per_token: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n,) mean per-token log-probability of each target (ROME's multi-token score)."""
    return torch.stack([t.float().mean() for t in per_token])


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0, NaN if any is NaN (no silent dropping)."""
    vals = list(values)
    if not vals or any(math.isnan(v) for v in vals):
        return float("nan")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


#: per-edit diagnostics (METAKE.md) whose means go into every run summary
SUMMARY_DIAGNOSTICS = ("rho", "z_error", "phi")


def diagnostic_means(records: Sequence[dict]) -> dict[str, float]:
    """``mean_<name>`` over the records' finite ``diagnostics[name]`` for
    :data:`SUMMARY_DIAGNOSTICS` (absent when no record has it, e.g. noop or FT)."""
    out: dict[str, float] = {}
    for name in SUMMARY_DIAGNOSTICS:
        vals = [d[name] for r in records
                if isinstance(d := r.get("diagnostics") or {}, dict)
                and isinstance(d.get(name), int | float) and math.isfinite(d[name])]
        if vals:
            out[f"mean_{name}"] = sum(vals) / len(vals)
    return out


def field_means(records: Sequence[dict], fields: Sequence[str],
                percent: Callable[[str], bool]) -> dict[str, float]:
    """Mean of each field over the records that have it (None skipped: failed cases), times 100
    where ``percent(field)``; fields no record has are left out."""
    out: dict[str, float] = {}
    for f in fields:
        vals = [r[f] for r in records if r.get(f) is not None]
        if vals:
            m = sum(vals) / len(vals)
            out[f] = 100.0 * m if percent(f) else m
    return out

