"""``keh compare``: is a candidate method worse than its baseline, case by case?

The regression gate for method variants. Baseline and candidate are each one arm (one method,
one preset, one hparams setting) in one or more run directories (seeds); both must cover the
same cases of the same data file on the same model weights.

Per metric m (higher is better, else the sign is flipped), with the case's mean over its seeds
on each side, the paired difference is

    d_i = mean_seeds cand_i(m) - mean_seeds base_i(m),        i = 1..n cases

and with the metric's margin delta > 0 two one-sided tests of the mean difference D are run
at the design's independent units:

* worse:         H0: D >= -delta  against  H1: D < -delta   (the candidate is worse by more
  than the margin: exit 1);
* non-inferior:  H0: D <= -delta  against  H1: D > -delta   (the candidate is shown to be
  at most delta worse).

Each is the larger p-value of two cluster-level tests (:func:`margin_tests`): a cluster
sign-flip test (:func:`reports.inference.sign_flip_test`, exact for symmetric cluster totals)
and a cluster bootstrap-t test (:func:`reports.inference.cluster_bootstrap_t_test`, which
follows skewed totals); for 0/1 outcomes Tango's exact unconditional score test
(:func:`reports.inference.paired_binary_margin_test`) replaces the bootstrap-t, and alone
decides where every unit is one case. Rejecting only when both tests reject keeps the level
wherever either test is valid; ``tests/test_compare.py`` simulates the boundary
(D = -delta exactly) for 0/1 and skewed outcomes, single cases and batches.

Each family (worse, non-inferior) is Holm-adjusted across the metrics (statsmodels). The
interval beside each difference is the wild cluster bootstrap-t interval at level 1 - 2 alpha,
the two-sided interval whose ends are the one-sided tests' bounds.

Units: cases edited together share one weight update, so the unit is the connected group of
cases that share a batch in any of the runs (the batch in sequential or batched runs, the
case with ``--batch-size 1``; the report, :mod:`reports.tables`, takes the case in batch
mode, where a batch's cases share one edit only). A sign-flip test over
G units cannot give p below 1 / 2^G; the gate says so instead of claiming non-inferiority.

Verdicts: ``worse`` (Holm-adjusted worse-p < alpha), ``non-inferior`` (Holm-adjusted
non-inferior p < alpha), else ``inconclusive``. Exit status (:func:`exit_status`): 1 if any
metric is ``worse`` (or, with ``require_noninferiority``, any is not ``non-inferior``), else 0;
bad input raises :class:`~harness.errors.UserError` (exit 2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import UserError
from methods import get_method
from methods.base import with_defaults
from reports import inference as inf
from reports import power
from reports.load import Runs, design_differences, load_runs, preset_of, revision_notes
from reports.paired import NotTestable, Paired, margin_tests, pair_rows

#: default metrics per suite: efficacy, generalisation, locality, and the log-probability margin
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "counterfact": ("efficacy_success", "paraphrase_success", "neighborhood_success",
                    "efficacy_margin"),
    "zsre": ("efficacy_accuracy", "paraphrase_accuracy", "specificity_accuracy",
             "efficacy_margin"),
}
#: default non-inferiority margins, in the metric's own units (rates are fractions: 0.02 is
#: 2 points); other metrics need ``--margin``
DEFAULT_MARGINS: dict[str, float] = {
    "efficacy_success": 0.02, "paraphrase_success": 0.02, "neighborhood_success": 0.02,
    "efficacy_accuracy": 0.02, "paraphrase_accuracy": 0.02, "specificity_accuracy": 0.02,
    "efficacy_margin": 0.25,
}
#: planning values of the default CounterFact metrics for the gate's designs
#: (reports.power), measured 2026-12-07 between two runs of AlphaEdit (seeds 0 and 1) on
#: SmolLM2, CounterFact cases 0-159, batch mode in batches of 10 (the default protocol):
#: discordant cases per direction for the rates, the sd of the paired difference for the
#: margin
_MEASURED = "AlphaEdit seeds 0 vs 1, SmolLM2, CounterFact 0-159, batches of 10"
PLANNING: dict[str, power.Planning] = {
    "efficacy_success": power.Planning(True, 0.038, _MEASURED),
    "paraphrase_success": power.Planning(True, 0.009, _MEASURED),
    "neighborhood_success": power.Planning(True, 0.003, _MEASURED),
    "efficacy_margin": power.Planning(False, 0.77, _MEASURED),
}
#: metrics where lower is better (compared with the sign flipped)
LOWER_IS_BETTER = frozenset({"diag_z_error", "diag_kernel_energy", "diag_delta_norm"})
ALPHA = 0.05
N_DRAWS = 9999

WORSE, NONINFERIOR, INCONCLUSIVE = "worse", "non-inferior", "inconclusive"


@dataclass
class MetricResult:
    """One metric's comparison (values in the metric's units, higher is better unless
    ``lower_is_better``; ``diff`` and its interval are candidate - baseline as measured)."""

    metric: str
    margin: float
    lower_is_better: bool
    baseline: float
    candidate: float
    diff: float
    lo: float
    hi: float
    n_cases: int
    n_units: int
    p_worse: float
    p_noninferior: float
    p_worse_holm: float = math.nan
    p_noninferior_holm: float = math.nan
    verdict: str = INCONCLUSIVE
    #: the true drop (metric units, positive) the worse test detects with 80% power at
    #: Holm's first step (:func:`reports.power.mde_worse`)
    mde: float = math.nan
    n_failed_baseline: int = 0
    n_failed_candidate: int = 0
    note: str = ""


@dataclass
class Comparison:
    """All metrics, the design and the warnings; :func:`exit_status` gives the gate."""

    baseline: str
    candidate: str
    suite: str
    model: str
    unit: str
    alpha: float
    results: list[MetricResult]
    warnings: list[str] = field(default_factory=list)
    #: the smallest p any metric can reach after Holm (:func:`reports.power.holm_floor`)
    holm_floor: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                         for k, v in r.items()} for r in d["results"]]
        return d


# ---------------------------------------------------------------- input checks
def _hparams(manifest: dict[str, Any]) -> dict[str, Any]:
    """A run's hparams with the fields added since it was made at their defaults (so a run
    from before a new field is the same setting as one made now with its default)."""
    hp = manifest.get("hparams") or {}
    try:
        return with_defaults(get_method(str(manifest.get("method"))).Hparams, hp)
    except UserError:  # a method this checkout does not know: as recorded
        return hp


def _side(runs: Runs, role: str) -> str:
    """The one arm of a side (``method [preset]``); an error naming the runs otherwise."""
    labels: dict[tuple[str, str], list[str]] = {}
    for rid, m in runs.manifests.items():
        label = f"{runs.arm_of(rid)} [{preset_of(m)}]"
        key = (label, json.dumps(_hparams(m), sort_keys=True, default=str))
        labels.setdefault(key, []).append(rid)
    if len(labels) > 1:
        parts = "; ".join(f"{k[0]}: {', '.join(v)}" for k, v in labels.items())
        raise UserError(f"--{role} runs must be one method with one setting (seeds may "
                        f"differ); got several: {parts}")
    seeds = [m.get("seed") for m in runs.manifests.values()]
    if len(set(map(str, seeds))) != len(seeds):
        raise UserError(f"--{role} runs repeat a seed ({', '.join(runs.manifests)}): give one "
                        f"run per seed")
    return next(iter(labels))[0]


def _check_same_design(base: Runs, cand: Runs) -> None:
    """Same suite, data file, case set and model weights on both sides (exit 2 otherwise);
    batching may differ (the units are joined across runs: :func:`reports.paired.units_of`)."""
    items = [("baseline", rid, m) for rid, m in base.manifests.items()] + \
            [("candidate", rid, m) for rid, m in cand.manifests.items()]
    role0, rid0, m0 = items[0]
    problems = [f"{role0} {rid0} vs {role} {rid}: " + "; ".join(diff)
                for role, rid, m in items[1:]
                if (diff := design_differences(m0, m, same_model=True, same_batches=False))]
    if problems:
        raise UserError("the runs cannot be paired case by case: " + " | ".join(problems)
                        + ". Compare runs made on the same cases, data file and model.")


# ---------------------------------------------------------------- the comparison
def _pair(base: Runs, cand: Runs, metric: str) -> Paired:
    """The two sides of ``metric`` paired by seed slot and case (:func:`pair_rows`)."""
    try:
        pr = pair_rows(cand.frame, base.frame, metric, names=("candidate", "baseline"))
    except NotTestable as exc:
        raise UserError(f"{metric}: {exc}") from None
    if pr.n_unmeasured:
        raise UserError(f"{metric}: {pr.n_unmeasured} failed edits have no measured outcome "
                        f"(runs written before keh measured failed cases), so the sides "
                        f"cannot be compared by intention to treat; rerun them")
    return pr


def compare_runs(base: Runs, cand: Runs, metrics: Sequence[str] | None = None,
                 margins: Mapping[str, float] | None = None, alpha: float = ALPHA,
                 lower_is_better: Sequence[str] = (), n_draws: int = N_DRAWS,
                 seed: int = 0, allow_underpowered: bool = False) -> Comparison:
    """Compare two loaded sides (module notes). Raises :class:`UserError` on bad input and,
    unless ``allow_underpowered``, when the design cannot reach ``alpha`` after Holm."""
    if not 0 < alpha < 0.5:
        raise UserError(f"--alpha must be in (0, 0.5) (got {alpha})")
    base_label = _side(base, "baseline")
    cand_label = _side(cand, "candidate")
    _check_same_design(base, cand)
    m0 = next(iter(base.manifests.values()))
    suite = str((m0.get("config") or {}).get("suite"))
    model = str((m0.get("config") or {}).get("model"))
    if metrics is None:
        if suite not in DEFAULT_METRICS:
            raise UserError(f"suite {suite!r} has no default metrics; give --metrics")
        metrics = [m for m in DEFAULT_METRICS[suite]
                   if m in base.frame.columns and base.frame[m].notna().any()]
    if not metrics:
        raise UserError("--metrics names no metric")
    margins = dict(margins or {})
    unknown = sorted(set(margins) - set(metrics))
    if unknown:
        raise UserError(f"--margin names metric(s) not compared: {', '.join(unknown)} "
                        f"(compared: {', '.join(metrics)})")
    for metric in metrics:
        for runs, side in ((base, "baseline"), (cand, "candidate")):
            if metric not in runs.frame.columns or not runs.frame[metric].notna().any():
                raise UserError(f"metric {metric!r} is not in the {side} runs' records; "
                                f"known: {', '.join(_metric_names(runs))}")
        if metric not in margins and metric not in DEFAULT_MARGINS:
            raise UserError(f"metric {metric!r} has no default margin; give --margin "
                            f"{metric}=VALUE (in the metric's units)")
        if not float(margins.get(metric, DEFAULT_MARGINS.get(metric, math.nan))) > 0:
            raise UserError(f"--margin {metric}={margins.get(metric)}: a margin must be > 0")
    flip = set(lower_is_better) | (LOWER_IS_BETTER & set(metrics))
    paired = {metric: _pair(base, cand, metric) for metric in metrics}
    floors = {}
    for metric, pr in paired.items():
        single = pr.n_units == len(pr.frame) and pr.by_slot is None
        floors[metric] = power.floor_p(pr.n_units, single and pr.binary() is not None,
                                       len(pr.frame), n_draws)
    floor = power.holm_floor(min(floors.values()), len(metrics))
    if floor >= alpha and not allow_underpowered:
        g = next(iter(paired.values())).n_units
        need = power.units_for_floor(len(metrics), alpha)
        raise UserError(f"this design cannot say 'worse': {g} units give a smallest p of "
                        f"{floor:.3g} after Holm over {len(metrics)} metrics (alpha {alpha:g}); "
                        f"it needs at least {need} units (batches in sequential runs, "
                        f"batches or single edits in batch mode), or --allow-underpowered")
    results: list[MetricResult] = []
    warnings: list[str] = []
    if floor >= alpha:
        warnings.append(f"underpowered: the smallest p this design can reach after Holm is "
                        f"{floor:.3g} >= alpha {alpha:g}; no metric can come out worse")
    for metric, pr in paired.items():
        margin = float(margins.get(metric, DEFAULT_MARGINS[metric]))
        sign = -1.0 if metric in flip else 1.0
        t = margin_tests(pr.diff(sign), pr.units, margin, alpha, n_draws, seed,
                         pr.binary(sign), pr.cells(scale=sign))
        mde = power.mde_worse(t.se, t.df, margin, alpha, len(metrics))
        results.append(MetricResult(
            metric, margin, metric in flip, float(pr.frame["y"].mean()),
            float(pr.frame["x"].mean()), sign * t.diff, *sorted((sign * t.lo, sign * t.hi)),
            int(pr.frame.shape[0]), t.n_units, t.p_worse, t.p_noninferior, mde=mde,
            n_failed_baseline=int(base.frame["failed"].astype(bool).sum()),
            n_failed_candidate=int(cand.frame["failed"].astype(bool).sum()), note=t.note))
    _holm(results, alpha)
    for r in results:
        if r.verdict == INCONCLUSIVE:
            warnings.append(f"{r.metric}: non-inferiority within {r.margin:g} not shown "
                            f"(difference {r.diff:+.4g}, {r.n_units} units; a drop below "
                            f"{r.mde:.3g} is missed with probability > 0.2)"
                            + (f"; {r.note}" if r.note else ""))
    both = Runs(pd.concat([base.frame, cand.frame]), {**base.manifests, **cand.manifests})
    warnings += revision_notes(both)
    first = next(iter(paired.values()))
    return Comparison(base_label, cand_label, suite, model, first.unit_name(), alpha, results,
                      warnings, floor)


def _metric_names(runs: Runs) -> list[str]:
    from reports.load import metric_columns

    return metric_columns(runs.frame)


def _holm(results: list[MetricResult], alpha: float) -> None:
    """Holm-adjust each family across metrics and set the verdicts."""
    if not results:
        return
    for attr in ("p_worse", "p_noninferior"):
        p = np.array([getattr(r, attr) for r in results], dtype=float)
        adj = inf.holm(p)
        for r, a in zip(results, adj, strict=True):
            setattr(r, attr + "_holm", float(a))
    for r in results:
        if r.p_worse_holm < alpha:
            r.verdict = WORSE
        elif r.p_noninferior_holm < alpha:
            r.verdict = NONINFERIOR
        else:
            r.verdict = INCONCLUSIVE


def exit_status(c: Comparison, require_noninferiority: bool = False) -> int:
    """1 if a metric is worse beyond its margin (or, with ``require_noninferiority``, not
    shown non-inferior), else 0."""
    if any(r.verdict == WORSE for r in c.results):
        return 1
    if require_noninferiority and any(r.verdict != NONINFERIOR for r in c.results):
        return 1
    return 0


# ---------------------------------------------------------------- output
def _num(x: float, digits: int = 4) -> str:
    return "–" if not np.isfinite(x) else f"{x:.{digits}g}"


def table(c: Comparison) -> pd.DataFrame:
    """The printed table: metric, baseline, candidate, difference with its interval, the
    Holm-adjusted p-values and the verdict."""
    level = round(100 * (1 - 2 * c.alpha))
    rows = []
    for r in c.results:
        rows.append({
            "metric": r.metric + (" (lower better)" if r.lower_is_better else ""),
            "margin": f"{r.margin:g}",
            "baseline": _num(r.baseline), "candidate": _num(r.candidate),
            f"diff [{level}% CI]": f"{r.diff:+.4g} [{_num(r.lo)}, {_num(r.hi)}]",
            "MDE (drop)": _num(r.mde, 3),
            "p worse": _num(r.p_worse_holm, 3), "p non-inf": _num(r.p_noninferior_holm, 3),
            "failed (base/cand)": f"{r.n_failed_baseline}/{r.n_failed_candidate}",
            "verdict": r.verdict,
        })
    return pd.DataFrame(rows)


def render(c: Comparison) -> str:
    head = (f"candidate {c.candidate} vs baseline {c.baseline} — {c.suite}, {c.model}; "
            f"units: {c.unit}; one-sided tests at each margin (the larger p of a cluster "
            f"sign-flip and a cluster bootstrap-t test; Tango's exact test for 0/1 outcomes), "
            f"p Holm-adjusted across metrics, alpha {c.alpha:g} (smallest reachable "
            f"{c.holm_floor:.2g}); MDE: the drop below the baseline detected with 80% power; "
            f"failed edits counted by intention to treat")
    body = table(c).to_string(index=False)
    warn = "".join(f"\nwarning: {w}" for w in c.warnings)
    return f"{head}\n{body}{warn}"


def write_json(c: Comparison, path: str | Path, status: int) -> None:
    data = c.as_dict()
    data["exit_status"] = status
    Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def parse_margins(items: Sequence[str]) -> dict[str, float]:
    """``["efficacy_success=0.05", ...]`` (also comma-separated) -> {metric: margin}."""
    out: dict[str, float] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            if "=" not in part:
                raise UserError(f"--margin expects METRIC=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            try:
                out[k.strip()] = float(v)
            except ValueError:
                raise UserError(f"--margin {part!r}: {v!r} is not a number") from None
    return out


def run_compare(baseline: Sequence[str], candidate: Sequence[str],
                metrics: Sequence[str] | None = None, margins: Mapping[str, float] | None = None,
                alpha: float = ALPHA, lower_is_better: Sequence[str] = (),
                require_noninferiority: bool = False, json_path: str | None = None,
                out: Any = print, allow_underpowered: bool = False) -> int:
    """Load both sides, compare, print the table, write ``json_path``; the exit status."""
    base, cand = load_runs(baseline), load_runs(candidate)
    overlap = sorted(set(base.manifests) & set(cand.manifests))
    if overlap:
        raise UserError(f"run(s) {', '.join(overlap)} given as both baseline and candidate")
    c = compare_runs(base, cand, metrics, margins, alpha, lower_is_better,
                     allow_underpowered=allow_underpowered)
    status = exit_status(c, require_noninferiority)
    out(render(c))
    if json_path:
        write_json(c, json_path, status)
    return status
