"""The tests T1-T8 of ``docs/METAKE.md``, run on loaded runs of one (suite, model, preset).

Every test function returns a list of result rows (a claim may need several sub-tests), each a
dict with ``claim, test, statistic, value, ci_lo, ci_hi, p, p_holm, n, unit, n_clusters, mde,
falsified_if, verdict, detail`` (plus ``suite, model, preset``). :func:`run_claims` runs all
eight; :func:`finalise` applies Holm's correction (Holm 1979, statsmodels ``multipletests``)
over every row with a p-value in the report (the family: tests x models x datasets x presets)
and sets the verdicts; :func:`summarise` gives one verdict per claim.

Inference unit (stated in every row's ``unit``)
* Runs of two arms are paired by seed (the seeds both arms have) and case; a case's value is
  its mean over those seeds (seeds averaged per case before any case-level test). Without a
  common seed, runs pair only if they share the model's weights.
* Sequential runs: the **batch** is the cluster (its cases share one edited model and the
  same point of the sequence; batch b holds the same cases in every seed). Batch mode: the
  case (with its seeds averaged) is the unit.
* Seeds as a second cluster: a sequential run scores every case on its one final model, so a
  run moves all its cases together (measured on SmolLM2, 3 seeds: half the variance of
  MetaKE - AlphaEdit fluency). With two or more paired seeds every location test below is
  joined by the two-way seed x unit t test (:func:`reports.inference.seed_batch_t_test`):
  the row takes the larger p, the union of the intervals and the larger MDE. With one seed
  the inference is conditional on that run (the row's unit says so).
* Paired location tests (T2, T3, T5, T7): a cluster sign-flip randomisation test of the mean
  paired difference (exact for up to 12 clusters; :mod:`reports.inference`), with a wild
  cluster bootstrap-t interval (Webb weights). No fallback to resampling cases: with few
  batches the interval widens and a test that cannot reach alpha says so in its MDE.
* T1: AUC of the baseline's rho / phi separating its successes from its failures (every
  seed's edit of a case is one observation); p-value by permuting cases within batches,
  jointly over seeds.
* T4 (redesigned; a ceiling cannot produce it): within batches, cases are paired by the
  baseline's outcome (neighbours in y_base); the claim predicts that in each pair the case
  with the lower baseline rho has the higher MetaKE outcome. Statistic: mean sign
  concordance of (rho_base, y_MetaKE) over the pairs; p by a sign-flip test of the products
  of rank differences (pairs independent). At equal baseline outcome a ceiling on y_MetaKE
  only pushes the statistic towards 0 or above (conservative).
* T6: non-inferiority with margin ``Settings.margin`` points, one-sided cluster sign-flip
  test of H0 mean(d) <= -margin. T7's negative control: equivalence by two one-sided tests
  (TOST) with margin ``Settings.equivalence`` (primary outcome's units).
* T8: one value per batch (mean over cases and seeds), Spearman against the batch index with
  a permutation p-value (batches, not cases, are the units).
* Every row's ``mde``: the smallest effect (in the row's statistic's units) the test detects
  with 80% power at alpha 0.05 (unadjusted), from its null spread; inf when it cannot reach
  alpha at all. "Not supported" with a large MDE reads as underpowered.
* Verdicts: a directional claim is supported when Holm's adjusted p < alpha *and* the effect
  has the claimed sign. Data that contradicts a claim (no difference at all, a constant
  gain, constant rho) gives "not supported"; "not testable" only where the data cannot
  speak (runs or diagnostics missing, no failure to predict, one batch).
* Primary outcome (T4, T5, T7): ``efficacy_margin`` on CounterFact (log p(new) - log p(true),
  more power than binary efficacy near its ceiling), ``efficacy_accuracy`` on zsRE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar

from harness.errors import UserError
from reports import inference as inf
from reports import stats
from reports.load import Runs, check_comparable

ALPHA = 0.05
NI_MARGIN = 1.0  # points on the table's scale (percent for rates)
#: T7 negative control: equivalence margin of the ROME gain, in the primary outcome's units
EQUIVALENCE = {"efficacy_margin": 0.25, "efficacy_accuracy": 0.02}

ALPHAEDIT, MEMIT, ROME, METAKE = "alphaedit", "memit", "rome", "metake"
METAKE_BY_SOLVER = {ALPHAEDIT: METAKE, MEMIT: "metake-memit", ROME: "metake-rome"}
NOPROXY, RESCALED = "metake-noproxy", "alphaedit-rescaled"

PRIMARY = {"counterfact": "efficacy_margin", "zsre": "efficacy_accuracy"}
EFFICACY = {"counterfact": "efficacy_success", "zsre": "efficacy_accuracy"}
#: T6: (column, table label, scale to the table's points)
LOCALITY = {"counterfact": [("neighborhood_success", "Spe", 100.0),
                            ("ngram_entropy", "Flu", 100.0)],
            "zsre": [("specificity_accuracy", "Spe", 100.0)]}
#: T3: MetaKE diagnostics compared with the open-loop target's; the open-loop value is read
#: from ``diag_<name>_open_loop`` in the MetaKE run, else from the baseline run's ``diag_<name>``
OPEN_LOOP_SUFFIX = "_open_loop"

CLAIMS: dict[str, tuple[str, str]] = {
    "T1": ("The disconnect exists: AlphaEdit failures are predicted by low rho / low phi",
           "the AUCs of rho and of phi (success vs failure) are not above 0.5 (within-batch "
           "permutation test)"),
    "T2": ("MetaKE realises more: rho up, z-error down versus AlphaEdit and MEMIT",
           "rho not higher or z-error not lower than either baseline (cluster sign-flip test)"),
    "T3": ("Alignment: a(R) up and kernel energy down versus the open-loop target; "
           "shift cosine > 0",
           "alignment not higher, kernel energy not lower, or shift cosine not > 0"),
    "T4": ("Gains concentrate where truncation was worst",
           "at equal baseline outcome, lower baseline rho does not go with a higher MetaKE "
           "outcome (matched-pair concordance not negative)"),
    "T5": ("The proxy, not extra compute: MetaKE beats metake-noproxy and alphaedit-rescaled",
           "MetaKE's primary outcome not higher than either ablation's"),
    "T6": ("Locality and fluency not worse (non-inferiority, margin 1 point)",
           "non-inferiority (H0: MetaKE - baseline <= -1 point) not shown"),
    "T7": ("Gains order AlphaEdit > MEMIT > ROME ~ 0",
           "gain(AlphaEdit) not > gain(MEMIT), gain(MEMIT) not > gain(ROME), or ROME's gain "
           "not shown equivalent to 0 (TOST)"),
    "T8": ("Sequential editing: rho declines as edits accumulate; MetaKE flattens the decline",
           "Spearman(batch, mean baseline rho) not negative, or Spearman(batch, mean "
           "MetaKE - baseline rho) not positive (batches as units)"),
}
#: how sub-tests combine into a claim's verdict
ANY_OF = {"T1"}  # T1: low rho or low phi predicts failure; all others need every sub-test


class NotTestable(Exception):
    """A test lacks runs or data; the message says which."""


@dataclass
class Settings:
    baseline: str = ALPHAEDIT
    treatment: str = METAKE
    alpha: float = ALPHA
    n_resamples: int = 2000
    seed: int = 0
    margin: float = NI_MARGIN
    equivalence: dict[str, float] = field(default_factory=lambda: dict(EQUIVALENCE))
    #: Monte Carlo draws of the randomisation tests (above the exact sizes)
    n_draws: int = inf.DEFAULT_DRAWS


# ---------------------------------------------------------------- pairing
@dataclass
class Paired:
    """Case-aligned values of two arms: ``frame`` indexed by case id with x, y, batch."""

    frame: pd.DataFrame
    seeds: list[Any]
    runs_x: list[str]
    runs_y: list[str]
    sequential: bool
    n_failed: int = 0  # cases with a failed edit in either arm (any paired seed)
    #: with two or more paired seeds: x, y per (seed, case_id) (MultiIndex), else None
    by_seed: pd.DataFrame | None = None

    def cells(self, which: str = "diff", scale: float = 1.0) -> np.ndarray | None:
        """The (seeds, units) table of cell means of ``scale * (x - y)`` (``which="diff"``)
        or of ``scale * x`` (``"x"``), for the two-way seed x unit test; None with fewer
        than two paired seeds. Units follow :attr:`units` (batch, or case in batch mode)."""
        if self.by_seed is None or self.by_seed.empty:
            return None
        f = self.by_seed
        v = (f["x"] - f["y"]) if which == "diff" else f["x"]
        case = f.index.get_level_values("case_id")
        batch = self.frame["batch"].reindex(case).to_numpy()
        unit = batch if self.sequential else np.asarray(case, dtype=object)
        table = pd.DataFrame({"seed": f.index.get_level_values("seed"), "unit": unit,
                              "v": scale * v.to_numpy(float)})
        out = table.groupby(["seed", "unit"])["v"].mean().unstack("unit")
        return out.to_numpy(float) if len(out) >= 2 else None

    @property
    def units(self) -> np.ndarray:
        """Inference units: the batch in sequential runs, else the case."""
        if self.sequential:
            return ("b:" + self.frame["batch"].astype(str)).to_numpy(object)
        return ("c:" + self.frame.index.astype(str)).to_numpy(object)

    @property
    def groups(self) -> np.ndarray | None:
        """Cluster labels for a bootstrap (batches of sequential runs), else None (cases)."""
        return self.units if self.sequential else None

    def unit_name(self) -> str:
        g = len(set(self.units))
        seeds = (f"{len(self.seeds)} seeds averaged per case; seed x unit two-way test too"
                 if len(self.seeds) > 1 else "one seed: conditional on the run")
        if self.sequential:
            return f"batch ({g} clusters; {seeds})"
        return f"case ({g}; {seeds})"


def arm_rows(runs: Runs, arm: str) -> pd.DataFrame:
    return runs.rows_of(arm)


def require(runs: Runs, arms: Sequence[str], columns: Sequence[str] = ()) -> None:
    """Raise :class:`NotTestable` naming missing arms, or columns without data in an arm."""
    missing = [a for a in arms if arm_rows(runs, a).empty]
    if missing:
        raise NotTestable(f"missing runs {', '.join(missing)}")
    lacking = []
    for a in arms:
        rows = arm_rows(runs, a)
        for c in columns:
            if c not in rows.columns or rows[c].notna().sum() == 0:
                lacking.append(f"{_short(c)} in {a} runs")
    if lacking:
        raise NotTestable(f"no {'; no '.join(lacking)}")


def _short(column: str) -> str:
    return column.removeprefix("diag_")


def case_means(rows: pd.DataFrame, column: str, case_order: Sequence[str]) -> pd.Series:
    """A column's per-case mean over the runs in ``rows`` (seeds), in ``case_order``."""
    return rows.groupby("case_id", sort=False)[column].mean().reindex(case_order)


def _seed_runs(rows: pd.DataFrame) -> dict[Any, list[str]]:
    """seed -> run ids of ``rows``."""
    ids = rows[["seed", "run_id"]].drop_duplicates()
    out: dict[Any, list[str]] = {}
    for seed, rid in zip(ids["seed"], ids["run_id"], strict=True):
        out.setdefault(seed, []).append(str(rid))
    return out


def _case_info(runs: Runs, arm: str, seeds: tuple[Any, ...]) -> tuple[pd.DataFrame, list[str]]:
    """(rows of ``arm`` restricted to ``seeds``, case order), memoised on ``runs``."""
    key = ("rows", arm, seeds)
    if key not in runs.cache:
        rows = arm_rows(runs, arm)
        if seeds:
            rows = rows[rows["seed"].isin(seeds)]
        order = [str(c) for c in (runs.manifests[str(rows["run_id"].iloc[0])].get("data")
                                  or {}).get("case_ids") or rows["case_id"].unique()]
        runs.cache[key] = (rows, order)
    return runs.cache[key]


def _case_stat(runs: Runs, arm: str, seeds: tuple[Any, ...], column: str) -> pd.Series:
    """Per-case mean of ``column`` (``batch``: first; ``failed``: any) over the runs of
    ``arm`` with ``seeds``, in case order; memoised."""
    key = ("stat", arm, seeds, column)
    if key not in runs.cache:
        rows, order = _case_info(runs, arm, seeds)
        g = rows.groupby("case_id", sort=False)[column]
        agg = g.first() if column == "batch" else g.any() if column == "failed" else g.mean()
        runs.cache[key] = agg.reindex(order)
    return runs.cache[key]


def pair(runs: Runs, arm_x: str, arm_y: str, col_x: str, col_y: str | None = None) -> Paired:
    """Pair ``col_x`` of ``arm_x`` with ``col_y`` (default the same) of ``arm_y`` by seed and
    case (see the module notes); raises :class:`NotTestable` if runs are missing or not
    comparable."""
    col_y = col_y or col_x
    require(runs, [arm_x], [col_x])
    require(runs, [arm_y], [col_y])
    for arm in (arm_x, arm_y):
        if ("seeds", arm) not in runs.cache:
            runs.cache[("seeds", arm)] = _seed_runs(arm_rows(runs, arm))
    sx, sy = runs.cache[("seeds", arm_x)], runs.cache[("seeds", arm_y)]
    common = tuple(sorted(set(k for k in sx if pd.notna(k)) & set(k for k in sy
                                                                  if pd.notna(k))))
    if common:
        pairs = [(a, b) for seed in common for a in sx[seed] for b in sy[seed]]
    else:
        ids = [r for v in sx.values() for r in v] + [r for v in sy.values() for r in v]
        pairs = [(ids[0], b) for b in ids[1:]]
    key = ("comparable", tuple(pairs))
    if key not in runs.cache:
        try:
            for a, b in pairs:
                if a != b:
                    check_comparable({a: runs.manifests[a], b: runs.manifests[b]})
            runs.cache[key] = None
        except UserError as exc:
            runs.cache[key] = f"{arm_x} and {arm_y} have no seed in common and {exc}"
    if runs.cache[key] is not None:
        raise NotTestable(runs.cache[key])
    frame = pd.DataFrame({"x": _case_stat(runs, arm_x, common, col_x),
                          "y": _case_stat(runs, arm_y, common, col_y),
                          "batch": _case_stat(runs, arm_x, common, "batch")})
    failed = (_case_stat(runs, arm_x, common, "failed").fillna(False).astype(bool)
              | _case_stat(runs, arm_y, common, "failed").fillna(False).astype(bool))
    frame = frame[frame["x"].notna() & frame["y"].notna()]
    if frame.empty:
        raise NotTestable(f"no case with both {_short(col_x)} of {arm_x} and "
                          f"{_short(col_y)} of {arm_y}")
    rows_x, _ = _case_info(runs, arm_x, common)
    by_seed = None
    if len(common) >= 2:
        rows_y, _ = _case_info(runs, arm_y, common)
        by_seed = pd.DataFrame({
            "x": rows_x.groupby(["seed", "case_id"])[col_x].mean(),
            "y": rows_y.groupby(["seed", "case_id"])[col_y].mean()}).dropna()
        by_seed = by_seed[by_seed.index.get_level_values("case_id").isin(frame.index)]
    return Paired(frame, list(common), sorted({r for v in sx.values() for r in v}),
                  sorted({r for v in sy.values() for r in v}),
                  bool(rows_x["sequential"].any()), int(failed.sum()), by_seed)


# ---------------------------------------------------------------- rows
def _row(claim: str, test: str, statistic: str, value: float = math.nan,
         ci: tuple[float, float] = (math.nan, math.nan), p: float | None = math.nan,
         n: int = 0, direction_ok: bool | None = None, detail: str = "",
         verdict: str | None = None, unit: str = "", n_clusters: int = 0,
         mde: float = math.nan) -> dict[str, Any]:
    return {"claim": claim, "test": test, "statistic": statistic, "value": value,
            "ci_lo": ci[0], "ci_hi": ci[1], "p": p, "p_holm": math.nan, "n": n,
            "unit": unit, "n_clusters": n_clusters, "mde": mde,
            "falsified_if": CLAIMS[claim][1], "direction_ok": direction_ok,
            "verdict": verdict, "detail": detail}


def _not_testable(claim: str, test: str, statistic: str, reason: str) -> dict[str, Any]:
    return _row(claim, test, statistic, p=None, verdict=f"not testable: {reason}")


def _guard(claim: str, test: str, statistic: str,
           fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except NotTestable as exc:
        return _not_testable(claim, test, statistic, str(exc))


def is_binary(*arrays: Any) -> bool:
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    return vals.size > 0 and bool(np.all((vals == 0) | (vals == 1)))


@dataclass
class LocationTest:
    """A paired (or one-sample) location test at the design's inference unit."""

    test: str  # "sign-flip" | "mcnemar"
    mean: float
    lo: float
    hi: float
    p: float
    n: int
    n_clusters: int
    mde: float
    ci_method: str
    b: int | None = None
    c: int | None = None
    n_seeds: int = 1  # seeds in the two-way seed x unit test (1: none ran)
    seed_share: float = math.nan  # share of the two-way variance the seeds add


def location_test(d: Any, units: Any, alpha: float = ALPHA, seed: int = 0,
                  n_draws: int = inf.DEFAULT_DRAWS, mu0: float = 0.0,
                  alternative: str = "two-sided", confidence: float = 0.95,
                  binary_pairs: tuple[Any, Any] | None = None,
                  cells: np.ndarray | None = None) -> LocationTest:
    """Cluster sign-flip test of mean(d) = mu0 with a wild cluster bootstrap-t interval and
    the MDE; for 0/1 pairs (``binary_pairs=(x, y)``) with the case as unit, the exact McNemar
    test (statsmodels) instead, which is the sign-flip test's exact binomial form.

    With ``cells`` (the (seeds, units) table of cell means of d, two or more seeds) the
    seeds are a second cluster dimension: the two-way seed x unit t test
    (:func:`reports.inference.seed_batch_t_test`) runs too, and the row takes the larger p,
    the union of the two intervals and the larger MDE (valid when either test is: the
    randomisation test without run effects, the two-way test with them)."""
    d = np.asarray(d, dtype=float)
    ci = inf.wild_cluster_ci(d, units, confidence, seed=seed,
                             alternative="greater" if alternative == "greater"
                             else "two-sided")
    flip = inf.sign_flip_test(d, units, mu0, alternative, n_draws, seed)
    g = flip.n_clusters
    exact = flip.method in ("exact", "degenerate")
    mde = inf.mde(flip.se, g, alpha, alternative=alternative,
                  exact_min_p=inf.min_p(g, alternative) if exact else None)
    if binary_pairs is not None and mu0 == 0 and alternative == "two-sided":
        x, y = (np.asarray(a, dtype=float) for a in binary_pairs)
        if len(set(map(str, units))) == x.size and is_binary(x, y):
            b = int(np.sum((x == 1) & (y == 0)))
            c = int(np.sum((x == 0) & (y == 1)))
            p = float(mcnemar([[0, b], [c, 0]], exact=True).pvalue) if b + c else 1.0
            res = LocationTest("mcnemar", flip.mean, ci.lo, ci.hi, p, flip.n, g, mde,
                               ci.method, b, c)
            return _with_seeds(res, cells, mu0, alternative, confidence, alpha)
    res = LocationTest("sign-flip", flip.mean, ci.lo, ci.hi, flip.p, flip.n, g, mde,
                       f"{ci.method}; sign-flip {flip.method}")
    return _with_seeds(res, cells, mu0, alternative, confidence, alpha)


def _with_seeds(res: LocationTest, cells: np.ndarray | None, mu0: float, alternative: str,
                confidence: float, alpha: float) -> LocationTest:
    """``res`` joined with the two-way seed x unit test of ``cells`` (see location_test)."""
    if cells is None:
        return res
    tw = inf.seed_batch_t_test(cells, mu0, alternative, confidence)
    if not np.isfinite(tw.p):
        return res
    res.p = max(res.p, tw.p)
    res.lo = float(np.nanmin([res.lo, tw.lo]))
    res.hi = float(np.nanmax([res.hi, tw.hi]))
    res.mde = max(res.mde, inf.mde_t(tw.se, tw.df, alpha, alternative=alternative))
    res.n_seeds, res.seed_share = tw.n_seeds, tw.seed_share
    res.ci_method += (f"; joined with the {tw.method} over {tw.n_seeds} seeds x "
                      f"{tw.n_units} units (seeds add {100 * tw.seed_share:.0f}% of its "
                      f"variance)")
    return res


def _paired_row(claim: str, test: str, pr: Paired, sign: int, s: Settings) -> dict[str, Any]:
    """A paired row; the claim holds if the mean difference's sign is ``sign``."""
    x, y = pr.frame["x"].to_numpy(float), pr.frame["y"].to_numpy(float)
    res = location_test(x - y, pr.units, s.alpha, s.seed, s.n_draws, binary_pairs=(x, y),
                        cells=pr.cells())
    ok = bool(np.sign(res.mean) == sign) if np.isfinite(res.mean) else False
    name = ("mean difference x - y, cluster sign-flip" if res.test == "sign-flip"
            else "difference of proportions, exact McNemar")
    detail = (f"mean x={np.mean(x):.4g}, mean y={np.mean(y):.4g}; seeds "
              f"{pr.seeds or 'pooled'}; CI {res.ci_method}")
    if res.test == "mcnemar":
        detail += f"; b={res.b}, c={res.c}"
    if not np.any(x != y):
        detail += "; no case differs (contradicts the claim)"
    if pr.n_failed:
        detail += f"; {pr.n_failed} cases with a failed edit"
    return _row(claim, test, name, res.mean, (res.lo, res.hi), res.p, res.n, ok, detail,
                unit=pr.unit_name(), n_clusters=res.n_clusters, mde=res.mde)


def _metric(runs: Runs, table: dict[str, str]) -> str:
    suite = str(runs.frame["suite"].iloc[0])
    if suite in table:
        return table[suite]
    for col in dict.fromkeys(table.values()):
        if col in runs.frame.columns:
            return col
    raise NotTestable(f"no primary outcome known for suite {suite!r}")


def _strata(batch: pd.Series, sequential: bool) -> np.ndarray:
    """Batches as strata when they hold >= 2 cases (sequential runs, or batch mode with
    batches), else one stratum."""
    if sequential or batch.value_counts().max() >= 2:
        return batch.astype(str).to_numpy(object)
    return np.zeros(len(batch), dtype=object)


# ---------------------------------------------------------------- T1..T8
def t1_disconnect(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T1: AUC of rho (and phi) separating the baseline's successes from its failures
    (failure: efficacy below 1; a failed edit is a failure but has no rho); p-value by
    permuting cases within batches, jointly over seeds."""
    out = []
    for diag in ("diag_rho", "diag_phi"):
        test = f"AUC of {_short(diag)}: {s.baseline} successes vs failures"

        def run(diag: str = diag, test: str = test) -> dict[str, Any]:
            eff = _metric(runs, EFFICACY)
            require(runs, [s.baseline], [diag, eff])
            rows = arm_rows(runs, s.baseline)
            order = list(dict.fromkeys(rows["case_id"]))
            score = rows.pivot_table(index="run_id", columns="case_id", values=diag,
                                     aggfunc="first", dropna=False).reindex(columns=order)
            y = rows.pivot_table(index="run_id", columns="case_id", values=eff,
                                 aggfunc="first", dropna=False).reindex(columns=order)
            y = y.reindex(index=score.index)
            ok = np.isfinite(score.to_numpy(float)) & np.isfinite(y.to_numpy(float))
            success = np.where(ok, (y.to_numpy(float) >= 1.0).astype(float), np.nan)
            n_fail = int(np.sum(ok & (success == 0)))
            n_succ = int(np.sum(ok & (success == 1)))
            if n_fail == 0 or n_succ == 0:
                raise NotTestable(f"{n_fail} failures among {n_fail + n_succ} "
                                  f"{s.baseline} edits with {_short(diag)} (need both "
                                  f"outcomes)")
            batch = rows.groupby("case_id", sort=False)["batch"].first().reindex(order)
            seq = bool(rows["sequential"].any())
            r = inf.stratified_auc_test(score.to_numpy(float), success, _strata(batch, seq),
                                        n_draws=min(s.n_draws, 1999), seed=s.seed)
            if not np.isfinite(r.statistic):
                raise NotTestable(f"no case has {_short(diag)} and efficacy in every run")
            g = int(batch.nunique()) if seq else len(order)
            mde = inf.mde(r.null_sd, g, s.alpha)
            n_failed = int(rows["failed"].sum())
            return _row("T1", test, "AUC = U/(n1 n2), within-batch permutation", r.statistic,
                        p=r.p, n=r.n, direction_ok=r.statistic > 0.5,
                        detail=(f"{n_fail} failures ({eff} < 1), {n_succ} successes over "
                                f"{score.shape[0]} runs; MDE as AUC - 0.5"
                                + (f"; {n_failed} failed edits (no {_short(diag)})"
                                   if n_failed else "")),
                        unit=("case x seed, permuted within batches" if seq
                              else "case x seed, permuted jointly over seeds"),
                        n_clusters=g, mde=mde)

        out.append(_guard("T1", test, "AUC", run))
    return out


def t2_realisation(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T2: MetaKE vs each of AlphaEdit and MEMIT: rho up, z-error down (paired by case)."""
    out = []
    for base in [b for b in dict.fromkeys([s.baseline, MEMIT]) if b != s.treatment]:
        for diag, sign in (("diag_rho", 1), ("diag_z_error", -1)):
            test = f"{_short(diag)}: {s.treatment} vs {base} ({'up' if sign > 0 else 'down'})"
            out.append(_guard("T2", test, "mean difference",
                              lambda b=base, d=diag, g=sign, t=test:
                              _paired_row("T2", t, pair(runs, s.treatment, b, d), g, s)))
    return out


def t3_alignment(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T3: alignment up and kernel energy down versus the open-loop target (paired by case);
    shift cosine > 0 (one-sample cluster sign-flip)."""
    out = []
    for diag, sign in (("diag_alignment", 1), ("diag_kernel_energy", -1)):
        test = f"{_short(diag)}: {s.treatment} vs open-loop target"

        def run(diag: str = diag, sign: int = sign, test: str = test) -> dict[str, Any]:
            require(runs, [s.treatment], [diag])
            rows = arm_rows(runs, s.treatment)
            own = diag + OPEN_LOOP_SUFFIX
            if own in rows.columns and rows[own].notna().any():
                pr = pair(runs, s.treatment, s.treatment, diag, own)
                row = _paired_row("T3", test, pr, sign, s)
                row["detail"] += f"; open loop: {_short(own)} of the same runs"
                if (pr.frame["x"] == pr.frame["y"]).all() and diag == "diag_kernel_energy":
                    row["detail"] += ("; ker S is trivial here: every edit key keeps a part "
                                      "outside the preserved space, so no residual can fall "
                                      "in it")
                return row
            try:
                pr = pair(runs, s.treatment, s.baseline, diag)
            except NotTestable as exc:
                raise NotTestable(f"no {_short(own)} in {s.treatment} runs, and as the "
                                  f"open-loop reference: {exc}") from exc
            row = _paired_row("T3", test, pr, sign, s)
            row["detail"] += f"; open loop: {_short(diag)} of the {s.baseline} runs"
            return row

        out.append(_guard("T3", test, "mean difference", run))

    test = f"shift_cos of {s.treatment} > 0"

    def cos() -> dict[str, Any]:
        require(runs, [s.treatment], ["diag_shift_cos"])
        pr = pair(runs, s.treatment, s.treatment, "diag_shift_cos")
        x = pr.frame["x"].to_numpy(float)
        res = location_test(x, pr.units, s.alpha, s.seed, s.n_draws, cells=pr.cells("x"))
        return _row("T3", test, "mean, one-sample cluster sign-flip", res.mean,
                    (res.lo, res.hi), res.p, res.n, bool(res.mean > 0),
                    f"CI {res.ci_method}", unit=pr.unit_name(), n_clusters=res.n_clusters,
                    mde=res.mde)

    out.append(_guard("T3", test, "mean", cos))
    return out


def t4_gain_vs_rho(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T4 at equal baseline outcome (module notes): within batches, cases paired by the
    baseline's primary outcome; the claim predicts a negative concordance between the
    baseline's rho and the treatment's outcome."""
    test = f"concordance(rho of {s.baseline}, {s.treatment} outcome | {s.baseline} outcome)"

    def run() -> dict[str, Any]:
        out_col = _metric(runs, PRIMARY)
        outcome = pair(runs, s.treatment, s.baseline, out_col)
        rho = pair(runs, s.baseline, s.baseline, "diag_rho", out_col)
        f = outcome.frame.join(rho.frame["x"].rename("rho"), how="inner").dropna()
        if len(f) < 4:
            raise NotTestable(f"{len(f)} cases with rho and both outcomes (need 4)")
        strata = _strata(f["batch"], outcome.sequential)
        signs, prods = inf.matched_pair_products(strata, f["y"], f["rho"], f["x"])
        if signs.size == 0:
            raise NotTestable("no stratum holds two cases to pair")
        pairs_ = np.arange(signs.size)
        flip = inf.sign_flip_test(prods, pairs_, 0.0, "two-sided", s.n_draws, s.seed)
        ci = inf.wild_cluster_ci(signs, pairs_, seed=s.seed)
        sflip = inf.sign_flip_test(signs, pairs_, 0.0, "two-sided", 0, s.seed)
        mde = inf.mde(sflip.se, signs.size, s.alpha)
        value = float(signs.mean())
        detail = (f"{signs.size} pairs matched on {s.baseline}'s {out_col} within "
                  f"{'batches' if outcome.sequential else 'the run'}; p: sign-flip of rank-"
                  f"difference products; seeds {outcome.seeds or 'pooled'}")
        if not np.any(prods):
            detail += "; no pair differs in both (contradicts the claim)"
        return _row("T4", test, "mean sign concordance over matched pairs", value,
                    (ci.lo, ci.hi), flip.p, int(signs.size), value < 0, detail,
                    unit=f"matched pair ({signs.size}) within batch", n_clusters=signs.size,
                    mde=mde)

    return [_guard("T4", test, "concordance", run)]


def t5_ablations(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T5: MetaKE vs the no-proxy and rescaled-target ablations on the primary outcome."""
    out = []
    for abl in (NOPROXY, RESCALED):
        test = f"primary outcome: {s.treatment} vs {abl}"

        def run(abl: str = abl, test: str = test) -> dict[str, Any]:
            col = _metric(runs, PRIMARY)
            row = _paired_row("T5", test, pair(runs, s.treatment, abl, col), 1, s)
            row["detail"] = f"{col}; " + row["detail"]
            return row

        out.append(_guard("T5", test, "mean difference", run))
    return out


def t6_locality(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T6: non-inferiority of MetaKE vs the baseline on locality and fluency, margin
    ``s.margin`` points: one-sided cluster sign-flip test of H0 mean(d) <= -margin and a
    one-sided 95% wild cluster bootstrap lower bound."""
    suite = str(runs.frame["suite"].iloc[0])
    out = []
    for col, label, scale in LOCALITY.get(suite, LOCALITY["counterfact"]):
        test = f"{label} ({col}): {s.treatment} non-inferior to {s.baseline}"

        def run(col: str = col, scale: float = scale, test: str = test) -> dict[str, Any]:
            try:
                pr = pair(runs, s.treatment, s.baseline, col)
            except NotTestable as exc:
                hint = (" (fluency needs runs with --generation-tokens)"
                        if col == "ngram_entropy" else "")
                raise NotTestable(f"{exc}{hint}") from exc
            d = (pr.frame["x"] - pr.frame["y"]).to_numpy(float) * scale
            res = location_test(d, pr.units, s.alpha, s.seed, s.n_draws, mu0=-s.margin,
                                alternative="greater", cells=pr.cells(scale=scale))
            detail = (f"H0: mean <= -{s.margin:g}; shown with 80% power only if the true "
                      f"difference >= {-s.margin + res.mde:+.3g}; lower bound {res.ci_method}")
            if pr.n_failed:
                detail += f"; {pr.n_failed} cases with a failed edit"
            return _row("T6", test, f"mean difference (points), margin {s.margin:g}",
                        res.mean, (res.lo, math.inf), res.p, res.n,
                        bool(res.mean > -s.margin), detail, unit=pr.unit_name(),
                        n_clusters=res.n_clusters, mde=res.mde)

        out.append(_guard("T6", test, "mean difference", run))
    return out


def t7_ordering(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T7: gain (MetaKE with solver X minus X) ordered AlphaEdit > MEMIT > ROME ~ 0.

    Paired cluster sign-flip tests of the per-case gains; ROME's gain is a negative control
    shown by equivalence (TOST, margin ``s.equivalence`` of the primary outcome)."""
    def gains(*solvers: str) -> tuple[dict[str, Paired], str]:
        col = _metric(runs, PRIMARY)
        missing = [a for solver in solvers for a in (solver, METAKE_BY_SOLVER[solver])
                   if arm_rows(runs, a).empty]
        if missing:
            raise NotTestable(f"missing runs {', '.join(missing)}")
        return {solver: pair(runs, METAKE_BY_SOLVER[solver], solver, col)
                for solver in solvers}, col

    rows = []
    for hi, lo in ((ALPHAEDIT, MEMIT), (MEMIT, ROME)):
        test = f"gain({hi}) > gain({lo})"

        def run(hi: str = hi, lo: str = lo, test: str = test) -> dict[str, Any]:
            g, col = gains(hi, lo)
            a, b = g[hi], g[lo]
            both = pd.DataFrame({"x": a.frame["x"] - a.frame["y"],
                                 "y": (b.frame["x"] - b.frame["y"]).reindex(a.frame.index),
                                 "batch": a.frame["batch"]}).dropna()
            by_seed = None
            if a.by_seed is not None and b.by_seed is not None:
                by_seed = pd.DataFrame({"x": a.by_seed["x"] - a.by_seed["y"],
                                        "y": b.by_seed["x"] - b.by_seed["y"]}).dropna()
            pr = Paired(both, sorted(set(a.seeds) & set(b.seeds)), [], [], a.sequential,
                        max(a.n_failed, b.n_failed), by_seed)
            row = _paired_row("T7", test, pr, 1, s)
            row["detail"] = f"gains in {col}; " + row["detail"]
            return row

        rows.append(_guard("T7", test, "mean difference", run))

    test = "gain(rome) ~ 0 (negative control, TOST)"

    def control() -> dict[str, Any]:
        g, col = gains(ROME)
        pr = g[ROME]
        m = s.equivalence.get(col)
        if m is None:
            raise NotTestable(f"no equivalence margin for {col}")
        d = (pr.frame["x"] - pr.frame["y"]).to_numpy(float)
        lo = location_test(d, pr.units, s.alpha, s.seed, s.n_draws, mu0=-m,
                           alternative="greater", confidence=0.95, cells=pr.cells())
        hi = location_test(-d, pr.units, s.alpha, s.seed, s.n_draws, mu0=-m,
                           alternative="greater", confidence=0.95,
                           cells=pr.cells(scale=-1.0))
        ci = inf.wild_cluster_ci(d, pr.units, 0.90, seed=s.seed)
        cells = pr.cells()
        if cells is not None:  # the TOST's 90% interval joins the two-way one (seeds)
            tw = inf.seed_batch_t_test(cells, confidence=0.90)
            if np.isfinite(tw.p):
                ci = inf.ClusterCI(ci.value, float(np.nanmin([ci.lo, tw.lo])),
                                   float(np.nanmax([ci.hi, tw.hi])), ci.n, ci.n_clusters,
                                   ci.se, f"{ci.method}, joined with the {tw.method}")
        p = max(lo.p, hi.p)
        ok = bool(abs(lo.mean) < m)
        return _row("T7", test, f"mean ROME gain, TOST margin +-{m:g}", lo.mean,
                    (ci.lo, ci.hi), p, lo.n, ok,
                    f"gain in {col}; 90% CI ({ci.method}); {_tost_power(m, lo.mde)}; "
                    f"{rome_variant(runs)}",
                    unit=pr.unit_name(), n_clusters=lo.n_clusters, mde=lo.mde)

    rows.append(_guard("T7", test, "mean", control))
    return rows


def _tost_power(margin: float, mde: float) -> str:
    """What a TOST at +-``margin`` can show with 80% power given the one-sided test's MDE."""
    if not np.isfinite(mde) or mde >= margin:
        return (f"equivalence cannot be shown with 80% power at this n for any true gain "
                f"(MDE {mde:.3g} >= margin {margin:g})")
    return f"equivalence shown with 80% power only if |true gain| <= {margin - mde:.3g}"


#: ROME hparams that say which ROME a run is (the faithful preset: the original's)
ROME_SWITCHES = ("denominator_key", "key_averaging", "mom2_adjustment", "requests_written",
                 "value_site")


def rome_variant(runs: Runs) -> str:
    """Which ROME the T7 control compared: the ROME arm's switches from its manifests, and
    MetaKE's ROME lower level (always the C0-whitened solve with the template-averaged key:
    ``methods.solvers.rome_A``, r-ROME's variant, whatever the ROME arm used)."""
    seen = []
    for rid in runs.run_ids:
        if runs.arm_of(rid) != ROME:
            continue
        hp = runs.manifests[rid].get("hparams") or {}
        text = ", ".join(f"{k}={hp[k]}" for k in ROME_SWITCHES if k in hp) or "legacy hparams"
        if text not in seen:
            seen.append(text)
    arm = "; ".join(seen) or "no ROME run"
    return (f"ROME arm: {arm}; metake-rome's lower level: C0-whitened solve with the "
            f"template-averaged key (r-ROME's variant)")


def _per_batch(rows: pd.DataFrame, column: str) -> pd.Series:
    """Mean of ``column`` per batch over cases and seeds."""
    return rows.groupby("batch")[column].mean().dropna()


def t8_sequential(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T8: in sequential runs the per-batch mean rho declines with the batch index
    (Spearman < 0 for the baseline) and MetaKE's decline is flatter (Spearman(batch, mean
    rho_MetaKE - rho_base) > 0); batches are the units (permutation p-values)."""
    def seq(arm: str) -> pd.DataFrame:
        require(runs, [arm], ["diag_rho"])
        rows = arm_rows(runs, arm)
        rows = rows[rows["sequential"]]
        if rows.empty:
            raise NotTestable(f"no sequential runs of {arm}")
        if rows["batch"].nunique() < 2:
            raise NotTestable(f"{arm}'s sequential runs have a single batch")
        return rows

    def trend_row(test: str, per_batch: pd.Series, sign: int, what: str) -> dict[str, Any]:
        g = len(per_batch)
        r = inf.permutation_spearman(per_batch.to_numpy(float),
                                     per_batch.index.to_numpy(float), s.n_draws, s.seed)
        if not np.isfinite(r.statistic):  # constant: no trend at all
            return _row("T8", test, "Spearman rho over batches", 0.0, p=1.0, n=g,
                        direction_ok=False,
                        detail=f"{what} is constant across batches (contradicts the claim)",
                        unit=f"batch ({g})", n_clusters=g, mde=math.inf)
        mde = (inf.mde_correlation(g, s.alpha) if 2 / math.factorial(g) <= s.alpha
               else math.inf)
        return _row("T8", test, "Spearman rho over batches", r.statistic, p=r.p, n=g,
                    direction_ok=bool(np.sign(r.statistic) == sign),
                    detail=f"{what}; p: {r.method}", unit=f"batch ({g})", n_clusters=g,
                    mde=mde)

    test_a = f"Spearman(batch, mean rho of {s.baseline}) < 0"

    def decline() -> dict[str, Any]:
        rows = seq(s.baseline)
        return trend_row(test_a, _per_batch(rows, "diag_rho"), -1,
                         f"mean rho of {s.baseline} per batch over cases and seeds")

    test_b = f"Spearman(batch, mean rho of {s.treatment} - rho of {s.baseline}) > 0"

    def flatter() -> dict[str, Any]:
        a, b = seq(s.treatment), seq(s.baseline)
        pr = pair(runs.subset(set(a["run_id"]) | set(b["run_id"])), s.treatment, s.baseline,
                  "diag_rho")
        d = (pr.frame["x"] - pr.frame["y"]).groupby(pr.frame["batch"]).mean().dropna()
        return trend_row(test_b, d, 1, "mean paired rho difference per batch")

    return [_guard("T8", test_a, "Spearman rho", decline),
            _guard("T8", test_b, "Spearman rho", flatter)]


TESTS: dict[str, Callable[[Runs, Settings], list[dict[str, Any]]]] = {
    "T1": t1_disconnect, "T2": t2_realisation, "T3": t3_alignment, "T4": t4_gain_vs_rho,
    "T5": t5_ablations, "T6": t6_locality, "T7": t7_ordering, "T8": t8_sequential,
}


def run_claims(runs: Runs, settings: Settings | None = None) -> list[dict[str, Any]]:
    """All rows of T1-T8 for one (suite, model, preset) group, not yet Holm-corrected."""
    s = settings or Settings()
    suite = str(runs.frame["suite"].iloc[0])
    model = str(runs.frame["model"].iloc[0])
    preset = str(runs.frame["preset"].iloc[0]) if "preset" in runs.frame else "legacy"
    rows = []
    for fn in TESTS.values():
        for row in fn(runs, s):
            rows.append({"suite": suite, "model": model, "preset": preset, **row})
    return rows


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) adjusted p-values (statsmodels ``multipletests``); NaN stays NaN and does
    not count in the family size."""
    return stats.holm(p)


def finalise(rows: list[dict[str, Any]], alpha: float = ALPHA) -> pd.DataFrame:
    """Holm-adjust every row with a p-value (one family) and set each row's verdict."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    p = pd.to_numeric(frame["p"], errors="coerce").astype(float)
    frame["p"] = p
    frame["p_holm"] = holm(p.to_numpy())
    verdicts = []
    for _, r in frame.iterrows():
        if isinstance(r["verdict"], str):
            verdicts.append(r["verdict"])
        else:
            ok = bool(r["direction_ok"]) and np.isfinite(r["p_holm"]) and r["p_holm"] < alpha
            verdicts.append("supported" if ok else "not supported")
    frame["verdict"] = verdicts
    return frame.drop(columns=["direction_ok"])


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One verdict per (claim, suite, model, preset). T1 (low rho *or* low phi) is supported
    by one supported sub-test and falsified only when all ran and failed; the other claims
    need every sub-test: one that ran and failed falsifies the claim, a missing one leaves it
    not testable (with the reasons)."""
    out = []
    cols = ["claim", "suite", "model", "preset", "statement", "verdict", "sub-tests supported",
            "falsified if"]
    if frame.empty:
        return pd.DataFrame(columns=cols)
    if "preset" not in frame:
        frame = frame.assign(preset="legacy")
    for (claim, suite, model, preset), g in frame.groupby(["claim", "suite", "model",
                                                          "preset"], sort=False):
        v = list(g["verdict"])
        supported = [x == "supported" for x in v]
        untestable = [x for x in v if x.startswith("not testable")]
        reasons = "not testable: " + "; ".join(
            dict.fromkeys(x.removeprefix("not testable: ") for x in untestable))
        if claim in ANY_OF:  # falsified only when every sub-test ran and failed
            verdict = ("supported" if any(supported) else reasons if untestable
                       else "not supported")
        else:  # falsified as soon as one sub-test ran and failed
            verdict = ("supported" if all(supported) else "not supported"
                       if "not supported" in v else reasons)
        out.append({"claim": claim, "suite": suite, "model": model, "preset": preset,
                    "statement": CLAIMS[claim][0], "verdict": verdict,
                    "sub-tests supported": f"{sum(supported)}/{len(v)}",
                    "falsified if": CLAIMS[claim][1]})
    return pd.DataFrame(out, columns=cols)
