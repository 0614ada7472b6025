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
from statsmodels.stats.multitest import multipletests

from harness.errors import UserError
from reports import inference as inf
from reports.load import Runs, differences, load_runs, preset_of

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

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                         for k, v in r.items()} for r in d["results"]]
        return d


# ---------------------------------------------------------------- input checks
def _side(runs: Runs, role: str) -> str:
    """The one arm of a side (``method [preset]``); an error naming the runs otherwise."""
    labels: dict[tuple[str, str], list[str]] = {}
    for rid, m in runs.manifests.items():
        label = f"{runs.arm_of(rid)} [{preset_of(m)}]"
        key = (label, json.dumps(m.get("hparams") or {}, sort_keys=True, default=str))
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
    batching may differ (the inference units are joined across runs by :func:`units_of`)."""
    items = [("baseline", rid, m) for rid, m in base.manifests.items()] + \
            [("candidate", rid, m) for rid, m in cand.manifests.items()]
    role0, rid0, m0 = items[0]
    problems = [f"{role0} {rid0} vs {role} {rid}: " + "; ".join(diff)
                for role, rid, m in items[1:]
                if (diff := differences(m0, m, same_model=True, same_batches=False))]
    if problems:
        raise UserError("the runs cannot be paired case by case: " + " | ".join(problems)
                        + ". Compare runs made on the same cases, data file and model.")


# ---------------------------------------------------------------- pairing and units
def units_of(frame: pd.DataFrame) -> pd.Series:
    """Inference unit per case: connected groups of cases that share a batch in any run
    (union-find over (run, batch)); case id -> unit label."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, g in frame.groupby(["run_id", "batch"], sort=False, dropna=False):
        ids = g["case_id"].astype(str).tolist()
        root = find(ids[0])
        for c in ids[1:]:
            r = find(c)
            if r != root:
                parent[r] = root
    cases = list(dict.fromkeys(frame["case_id"].astype(str)))
    return pd.Series([find(c) for c in cases], index=cases)


def case_means(runs: Runs, metric: str) -> pd.Series:
    """Per case, the mean of ``metric`` over the side's runs (seeds); NaN where every run
    lacks it."""
    f = runs.frame
    if metric not in f.columns or not f[metric].notna().any():
        return pd.Series(dtype=float)
    return f.groupby(f["case_id"].astype(str), sort=False)[metric].mean()


def binary_pairs(base: Runs, cand: Runs, metric: str, sign: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """(candidate, baseline) 0/1 outcomes per case and seed when ``metric`` is 0/1 in every
    run and both sides have as many runs (the k-th seed of one paired with the k-th of the
    other), else None. ``sign`` -1 swaps 0 and 1 (lower is better)."""
    def by_run(runs: Runs) -> list[pd.Series]:
        f = runs.frame
        out = []
        for _, g in sorted(f.groupby("run_id", sort=False), key=lambda kv: str(
                kv[1]["seed"].iloc[0])):
            out.append(g.set_index(g["case_id"].astype(str))[metric])
        return out

    sb, sc = by_run(base), by_run(cand)
    if len(sb) != len(sc):
        return None
    xs, ys = [], []
    for b, c in zip(sb, sc, strict=True):
        p = pd.concat({"b": b, "c": c}, axis=1).dropna()
        xs.append(p["c"].to_numpy(float))
        ys.append(p["b"].to_numpy(float))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.size == 0 or not np.all(np.isin(x, (0.0, 1.0)) & np.isin(y, (0.0, 1.0))):
        return None
    return (x, y) if sign > 0 else (1 - x, 1 - y)


def seed_cells(base: Runs, cand: Runs, metric: str, units: pd.Series, sign: float = 1.0
               ) -> np.ndarray | None:
    """The (runs, units) table of unit means of ``sign * (candidate - baseline)`` when both
    sides have as many runs, two or more (the k-th seed of one paired with the k-th of the
    other, as :func:`binary_pairs`), else None: the seed as a second cluster dimension
    (:func:`reports.inference.seed_batch_t_test`)."""
    def by_run(runs: Runs) -> list[pd.Series]:
        f = runs.frame
        groups = sorted(f.groupby("run_id", sort=False), key=lambda kv: str(
            kv[1]["seed"].iloc[0]))
        return [g.groupby(g["case_id"].astype(str))[metric].mean() for _, g in groups]

    sb, sc = by_run(base), by_run(cand)
    if len(sb) != len(sc) or len(sb) < 2:
        return None
    rows = []
    for b, c in zip(sb, sc, strict=True):
        d = (sign * (c - b)).dropna()
        rows.append(d.groupby(units.reindex(d.index).to_numpy(object)).mean())
    return pd.DataFrame(rows).to_numpy(float)


def _unit_words(units: pd.Series, frame: pd.DataFrame) -> str:
    g = units.nunique()
    seq = bool(frame["sequential"].any())
    if g == units.size:
        return f"cases ({g}; one edit each)"
    return f"groups of cases sharing a batch ({g}; {'sequential' if seq else 'batched'} runs)"


# ---------------------------------------------------------------- one metric
@dataclass
class MarginTests:
    """The two one-sided tests of one metric's paired differences (higher is better)."""

    diff: float
    lo: float
    hi: float
    n_units: int
    p_worse: float
    p_noninferior: float
    note: str


def margin_tests(d: Any, units: Any, margin: float, alpha: float = ALPHA,
                 n_draws: int = N_DRAWS, seed: int = 0,
                 binary_pairs: tuple[Any, Any] | None = None,
                 cells: np.ndarray | None = None) -> MarginTests:
    """Worse and non-inferior tests of mean(d) against -``margin`` (module notes).

    ``d``: (n,) paired differences candidate - baseline, oriented so that higher is better;
    ``units``: (n,) inference unit labels. The interval is the wild cluster bootstrap-t one at
    level 1 - 2 ``alpha``.

    ``binary_pairs``: (candidate, baseline) 0/1 outcomes, (m,) each, one per case and seed,
    oriented like ``d``. A sign-flip test at a non-zero margin is not valid for such data when
    most pairs tie (it reads "no case differs" as "no variance"), so they are also tested with
    Tango's exact unconditional score test (:func:`reports.inference.paired_binary_margin_test`):
    alone when every unit is one case with one seed, else a test rejects only if both the
    cluster sign-flip and Tango's test reject (p = the larger p; an intersection-union test, at
    most as large as the smaller of the two sizes, so valid where either one is). Other
    outcomes: the larger p of the sign-flip and the cluster bootstrap-t test, which follows
    skewed unit totals that the symmetric sign-flip null does not.

    ``cells``: the (seeds, units) table of unit means of ``d`` per paired seed (two or
    more): every case of a run is scored on that run's final model, so the seed is a
    second cluster dimension; the two-way seed x unit t test
    (:func:`reports.inference.seed_batch_t_test`) then joins both tests (the larger p) and
    the interval (the union)."""
    worse = inf.sign_flip_test(d, units, mu0=-margin, alternative="less", n_draws=n_draws,
                               seed=seed)
    noninf = inf.sign_flip_test(d, units, mu0=-margin, alternative="greater", n_draws=n_draws,
                                seed=seed)
    ci = inf.wild_cluster_ci(d, units, confidence=1 - 2 * alpha, seed=seed)
    if binary_pairs is not None:
        x, y = binary_pairs
        other = "Tango's exact score test"
        o_worse = inf.paired_binary_margin_test(x, y, -margin, "less")
        o_noninf = inf.paired_binary_margin_test(x, y, -margin, "greater")
    else:
        other = "the cluster bootstrap-t test"
        o_worse = inf.cluster_bootstrap_t_test(d, units, -margin, "less", seed=seed)
        o_noninf = inf.cluster_bootstrap_t_test(d, units, -margin, "greater", seed=seed)
    if binary_pairs is not None and worse.n_clusters == worse.n == o_worse.n:
        p_worse, p_noninf = o_worse.p, o_noninf.p  # one case per unit: the exact test alone
        notes = [f"0/1 outcome, one case per unit: {other}"]
    else:
        p_worse, p_noninf, notes = worse.p, noninf.p, []
        if np.isfinite(o_worse.p):
            p_worse, p_noninf = max(p_worse, o_worse.p), max(p_noninf, o_noninf.p)
            notes.append(f"the larger p of the cluster sign-flip test and {other}")
        floor = inf.min_p(worse.n_clusters, "greater")
        if worse.method in ("exact", "degenerate") and floor >= alpha:
            notes.append(f"{worse.n_clusters} units: a sign-flip test cannot reach "
                         f"p < {alpha:g} (smallest p {floor:.3g}); run more cases")
    lo, hi = ci.lo, ci.hi
    if cells is not None:
        tw_worse = inf.seed_batch_t_test(cells, -margin, "less", 1 - alpha)
        if np.isfinite(tw_worse.p):
            tw_noninf = inf.seed_batch_t_test(cells, -margin, "greater", 1 - alpha)
            p_worse, p_noninf = max(p_worse, tw_worse.p), max(p_noninf, tw_noninf.p)
            lo = float(np.nanmin([lo, tw_noninf.lo]))
            hi = float(np.nanmax([hi, tw_worse.hi]))
            notes.append(f"joined with the {tw_worse.method} over {tw_worse.n_seeds} seeds "
                         f"(seeds add {100 * tw_worse.seed_share:.0f}% of its variance)")
    return MarginTests(worse.mean, lo, hi, worse.n_clusters, p_worse, p_noninf,
                       "; ".join(notes))


# ---------------------------------------------------------------- the comparison
def compare_runs(base: Runs, cand: Runs, metrics: Sequence[str] | None = None,
                 margins: Mapping[str, float] | None = None, alpha: float = ALPHA,
                 lower_is_better: Sequence[str] = (), n_draws: int = N_DRAWS,
                 seed: int = 0) -> Comparison:
    """Compare two loaded sides (module notes). Raises :class:`UserError` on bad input."""
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
    both = pd.concat([base.frame, cand.frame], ignore_index=True)
    units = units_of(both)
    flip = set(lower_is_better) | (LOWER_IS_BETTER & set(metrics))
    results: list[MetricResult] = []
    warnings: list[str] = []
    for metric in metrics:
        xb, xc = case_means(base, metric), case_means(cand, metric)
        if xb.empty or xc.empty:
            side = "baseline" if xb.empty else "candidate"
            raise UserError(f"metric {metric!r} is not in the {side} runs' records; known: "
                            f"{', '.join(_metric_names(base if xb.empty else cand))}")
        if metric not in margins and metric not in DEFAULT_MARGINS:
            raise UserError(f"metric {metric!r} has no default margin; give --margin "
                            f"{metric}=VALUE (in the metric's units)")
        margin = float(margins.get(metric, DEFAULT_MARGINS.get(metric, math.nan)))
        if not margin > 0:
            raise UserError(f"--margin {metric}={margin}: a margin must be > 0")
        pair = pd.concat({"b": xb, "c": xc}, axis=1).dropna()
        sign = -1.0 if metric in flip else 1.0
        d = sign * (pair["c"] - pair["b"]).to_numpy(float)
        t = margin_tests(d, units.reindex(pair.index).to_numpy(object), margin, alpha,
                         n_draws, seed, binary_pairs(base, cand, metric, sign),
                         seed_cells(base, cand, metric, units, sign))
        results.append(MetricResult(
            metric, margin, metric in flip, float(pair["b"].mean()), float(pair["c"].mean()),
            sign * t.diff, *sorted((sign * t.lo, sign * t.hi)), int(pair.shape[0]),
            t.n_units, t.p_worse, t.p_noninferior, note=t.note))
    _holm(results, alpha)
    for r in results:
        if r.verdict == INCONCLUSIVE:
            warnings.append(f"{r.metric}: non-inferiority within {r.margin:g} not shown "
                            f"(difference {r.diff:+.4g}, {r.n_units} units)"
                            + (f"; {r.note}" if r.note else ""))
    return Comparison(base_label, cand_label, suite, model, _unit_words(units, both), alpha,
                      results, warnings)


def _metric_names(runs: Runs) -> list[str]:
    from reports.load import metric_columns

    return metric_columns(runs.frame)


def _holm(results: list[MetricResult], alpha: float) -> None:
    """Holm-adjust each family across metrics and set the verdicts."""
    if not results:
        return
    for attr in ("p_worse", "p_noninferior"):
        p = np.array([getattr(r, attr) for r in results], dtype=float)
        ok = np.isfinite(p)
        adj = np.full(p.shape, math.nan)
        if ok.any():
            adj[ok] = multipletests(p[ok], method="holm")[1]
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
            "p worse": _num(r.p_worse_holm, 3), "p non-inf": _num(r.p_noninferior_holm, 3),
            "verdict": r.verdict,
        })
    return pd.DataFrame(rows)


def render(c: Comparison) -> str:
    head = (f"candidate {c.candidate} vs baseline {c.baseline} — {c.suite}, {c.model}; "
            f"units: {c.unit}; one-sided tests at each margin (the larger p of a cluster "
            f"sign-flip and a cluster bootstrap-t test; Tango's exact test for 0/1 outcomes), "
            f"p Holm-adjusted across metrics, alpha {c.alpha:g}")
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
                out: Any = print) -> int:
    """Load both sides, compare, print the table, write ``json_path``; the exit status."""
    base, cand = load_runs(baseline), load_runs(candidate)
    overlap = sorted(set(base.manifests) & set(cand.manifests))
    if overlap:
        raise UserError(f"run(s) {', '.join(overlap)} given as both baseline and candidate")
    c = compare_runs(base, cand, metrics, margins, alpha, lower_is_better)
    status = exit_status(c, require_noninferiority)
    out(render(c))
    if json_path:
        write_json(c, json_path, status)
    return status
