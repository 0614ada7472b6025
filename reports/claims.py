"""The tests T1-T8 of ``docs/METAKE.md``, run on loaded runs of one (suite, model) group.

Every test function returns a list of result rows (a claim may need several sub-tests), each a
dict with ``claim, test, statistic, value, ci, p, p_holm, n, falsified_if, verdict, detail``
(plus ``suite, model``). A test that cannot be run says why in its verdict
(``"not testable: missing runs metake-memit"``); nothing is dropped. :func:`run_claims` runs all
eight; :func:`finalise` applies Holm's correction (Holm 1979) over every row with a p-value in
the report (the family: tests x models x datasets) and sets the verdicts; :func:`summarise`
gives one verdict per claim.

Conventions
* Arms (see :mod:`reports.load`): ``metake`` (AlphaEdit solver), ``metake-memit``,
  ``metake-rome``, ``metake-noproxy`` (outer steps with S := I), ``alphaedit-rescaled``
  (open-loop target rescaled by 1/rho), and the baselines ``alphaedit``, ``memit``, ``rome``.
* Pairing: runs of two arms are paired by seed (the seeds both arms have; runs of a random
  model differ in weights between seeds) and by case; a case's value is its mean over the
  paired seeds. Without common seeds, runs pair across seeds only if they share the model's
  weights (:func:`reports.load.check_comparable`), otherwise the test is not testable.
* Two-sided p-values; a directional claim is supported when Holm's adjusted p < alpha *and*
  the effect has the claimed sign (non-inferiority is one-sided by construction).
* Bootstrap CIs resample whole batches in sequential runs (cluster bootstrap) when there are
  at least :data:`reports.stats.MIN_CLUSTERS` batches, else cases.
* Primary outcome (T4, T5, T7): ``efficacy_margin`` on CounterFact (log p(new) - log p(true),
  more power than binary efficacy near its ceiling), ``efficacy_accuracy`` on zsRE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from harness.errors import UserError
from reports import stats
from reports.load import Runs, check_comparable

ALPHA = 0.05
NI_MARGIN = 1.0  # points on the table's scale (percent for rates)

ALPHAEDIT, MEMIT, ROME, METAKE = "alphaedit", "memit", "rome", "metake"
METAKE_BY_SOLVER = {ALPHAEDIT: METAKE, MEMIT: "metake-memit", ROME: "metake-rome"}
NOPROXY, RESCALED = "metake-noproxy", "alphaedit-rescaled"

PRIMARY = {"counterfact": "efficacy_margin", "zsre": "efficacy_accuracy"}
EFFICACY = {"counterfact": "efficacy_success", "zsre": "efficacy_accuracy"}
#: T6: (column, table label, scale to the table's points)
LOCALITY = {"counterfact": [("neighborhood_success", "Spe", 100.0), ("fluency", "Flu", 100.0)],
            "zsre": [("specificity_accuracy", "Spe", 100.0)]}
#: T3: MetaKE diagnostics compared with the open-loop target's; the open-loop value is read
#: from ``diag_<name>_open_loop`` in the MetaKE run, else from the baseline run's ``diag_<name>``
OPEN_LOOP_SUFFIX = "_open_loop"

CLAIMS: dict[str, tuple[str, str]] = {
    "T1": ("The disconnect exists: AlphaEdit failures are predicted by low rho / low phi",
           "the AUC CIs of rho and of phi (success vs failure) include 0.5 or lie below it"),
    "T2": ("MetaKE realises more: rho up, z-error down versus AlphaEdit and MEMIT",
           "rho not higher or z-error not lower than either baseline (paired Wilcoxon)"),
    "T3": ("Alignment: a(R) up and kernel energy down versus the open-loop target; "
           "shift cosine > 0",
           "alignment not higher, kernel energy not lower, or shift cosine not > 0"),
    "T4": ("Gains concentrate where truncation was worst",
           "Spearman(baseline rho, per-case gain) not negative"),
    "T5": ("The proxy, not extra compute: MetaKE beats metake-noproxy and alphaedit-rescaled",
           "MetaKE's primary outcome not higher than either ablation's"),
    "T6": ("Locality and fluency not worse (non-inferiority, margin 1 point)",
           "the one-sided 95% lower bound of MetaKE - baseline is below -1 point"),
    "T7": ("Gains order AlphaEdit > MEMIT > ROME ~ 0",
           "gain(AlphaEdit) <= gain(MEMIT), gain(MEMIT) <= gain(ROME), or ROME's gain CI "
           "excludes 0"),
    "T8": ("Sequential editing: rho declines as edits accumulate; MetaKE flattens the decline",
           "Spearman(batch, baseline rho) not negative, or Spearman(batch, MetaKE rho - "
           "baseline rho) not positive"),
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


# ---------------------------------------------------------------- pairing
@dataclass
class Paired:
    """Case-aligned values of two arms: ``frame`` indexed by case id with x, y, batch."""

    frame: pd.DataFrame
    seeds: list[Any]
    runs_x: list[str]
    runs_y: list[str]
    sequential: bool

    @property
    def groups(self) -> np.ndarray | None:
        """Bootstrap units: batches of sequential runs if there are enough, else cases."""
        batch = self.frame["batch"]
        if self.sequential and batch.nunique() >= stats.MIN_CLUSTERS:
            return batch.to_numpy()
        return None


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


def pair(runs: Runs, arm_x: str, arm_y: str, col_x: str, col_y: str | None = None) -> Paired:
    """Pair ``col_x`` of ``arm_x`` with ``col_y`` (default the same) of ``arm_y`` by seed and
    case (see the module notes); raises :class:`NotTestable` if runs are missing or not
    comparable."""
    col_y = col_y or col_x
    require(runs, [arm_x], [col_x])
    require(runs, [arm_y], [col_y])
    rx, ry = arm_rows(runs, arm_x), arm_rows(runs, arm_y)
    common = sorted(set(rx["seed"].dropna()) & set(ry["seed"].dropna()))
    if common:
        rx, ry = rx[rx["seed"].isin(common)], ry[ry["seed"].isin(common)]
        pairs = [(a, b) for s in common
                 for a in rx.loc[rx["seed"] == s, "run_id"].unique()
                 for b in ry.loc[ry["seed"] == s, "run_id"].unique()]
    else:
        ids = list(rx["run_id"].unique()) + list(ry["run_id"].unique())
        pairs = [(ids[0], b) for b in ids[1:]]
    try:
        for a, b in pairs:
            check_comparable({a: runs.manifests[a], b: runs.manifests[b]})
    except UserError as exc:
        raise NotTestable(f"{arm_x} and {arm_y} have no seed in common and {exc}") from exc
    order = [str(c) for c in (runs.manifests[rx["run_id"].iloc[0]].get("data") or {})
             .get("case_ids") or rx["case_id"].unique()]
    frame = pd.DataFrame({"x": case_means(rx, col_x, order), "y": case_means(ry, col_y, order),
                          "batch": rx.groupby("case_id", sort=False)["batch"].first()
                          .reindex(order)})
    frame = frame[frame["x"].notna() & frame["y"].notna()]
    if frame.empty:
        raise NotTestable(f"no case with both {_short(col_x)} of {arm_x} and "
                          f"{_short(col_y)} of {arm_y}")
    sequential = bool(rx["sequential"].any())
    return Paired(frame, common, list(rx["run_id"].unique()), list(ry["run_id"].unique()),
                  sequential)


# ---------------------------------------------------------------- rows
def _row(claim: str, test: str, statistic: str, value: float = math.nan,
         ci: tuple[float, float] = (math.nan, math.nan), p: float | None = math.nan,
         n: int = 0, direction_ok: bool | None = None, detail: str = "",
         verdict: str | None = None) -> dict[str, Any]:
    return {"claim": claim, "test": test, "statistic": statistic, "value": value,
            "ci_lo": ci[0], "ci_hi": ci[1], "p": p, "p_holm": math.nan, "n": n,
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


def _paired_row(claim: str, test: str, pr: Paired, sign: int, s: Settings) -> dict[str, Any]:
    """A paired Wilcoxon/McNemar row; the claim holds if the effect's sign is ``sign``."""
    res = stats.paired_test(pr.frame["x"], pr.frame["y"], pr.groups, seed=s.seed,
                            n_resamples=min(s.n_resamples, 1000))
    name = ("HL shift (x - y), Wilcoxon" if res.test == "wilcoxon"
            else "difference of proportions, exact McNemar")
    ok = bool(np.sign(res.effect_size) == sign) if np.isfinite(res.effect_size) else False
    detail = (f"{res.effect_name}={res.effect_size:+.3f}; mean x={res.mean_x:.4g}, "
              f"mean y={res.mean_y:.4g}; seeds {pr.seeds or 'pooled'}")
    if res.test == "mcnemar":
        detail += f"; b={res.b}, c={res.c}"
    return _row(claim, test, name, res.effect, (res.effect_lo, res.effect_hi), res.p, res.n,
                ok, detail)


def _metric(runs: Runs, table: dict[str, str]) -> str:
    suite = str(runs.frame["suite"].iloc[0])
    if suite in table:
        return table[suite]
    for col in dict.fromkeys(table.values()):
        if col in runs.frame.columns:
            return col
    raise NotTestable(f"no primary outcome known for suite {suite!r}")


# ---------------------------------------------------------------- T1..T8
def t1_disconnect(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T1: AUC of rho (and phi) separating the baseline's successes from its failures
    (failure: efficacy below 1; every edit of every seed counts); supported if the AUC CI
    lies above 0.5."""
    out = []
    for diag in ("diag_rho", "diag_phi"):
        test = f"AUC of {_short(diag)}: {s.baseline} successes vs failures"

        def run(diag: str = diag, test: str = test) -> dict[str, Any]:
            eff = _metric(runs, EFFICACY)
            require(runs, [s.baseline], [diag, eff])
            rows = arm_rows(runs, s.baseline)
            rows = rows[rows[diag].notna() & rows[eff].notna()]
            fail = rows[eff] < 1.0
            if fail.all() or not fail.any():
                raise NotTestable(f"{int(fail.sum())} failures among {len(rows)} "
                                  f"{s.baseline} edits (need both outcomes)")
            r = stats.auc_test(rows.loc[~fail, diag], rows.loc[fail, diag],
                               n_resamples=s.n_resamples, seed=s.seed)
            ok = bool(np.isfinite(r.lo) and r.lo > 0.5)
            return _row("T1", test, "AUC = U/(n1 n2), Mann-Whitney", r.auc, (r.lo, r.hi), r.p,
                        r.n_pos + r.n_neg, ok,
                        f"{r.n_neg} failures ({eff} < 1), {r.n_pos} successes")

        out.append(_guard("T1", test, "AUC", run))
    return out


def t2_realisation(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T2: paired Wilcoxon of MetaKE vs each of AlphaEdit and MEMIT: rho up, z-error down."""
    out = []
    for base in [b for b in dict.fromkeys([s.baseline, MEMIT]) if b != s.treatment]:
        for diag, sign in (("diag_rho", 1), ("diag_z_error", -1)):
            test = f"{_short(diag)}: {s.treatment} vs {base} ({'up' if sign > 0 else 'down'})"
            out.append(_guard("T2", test, "HL shift", lambda b=base, d=diag, g=sign, t=test:
                              _paired_row("T2", t, pair(runs, s.treatment, b, d), g, s)))
    return out


def t3_alignment(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T3: alignment up and kernel energy down versus the open-loop target (paired by case);
    one-sample Wilcoxon of the shift cosine against 0."""
    out = []
    for diag, sign in (("diag_alignment", 1), ("diag_kernel_energy", -1)):
        test = f"{_short(diag)}: {s.treatment} vs open-loop target"

        def run(diag: str = diag, sign: int = sign, test: str = test) -> dict[str, Any]:
            require(runs, [s.treatment], [diag])
            rows = arm_rows(runs, s.treatment)
            own = diag + OPEN_LOOP_SUFFIX
            if own in rows.columns and rows[own].notna().any():
                pr = pair(runs, s.treatment, s.treatment, diag, own)
                if (pr.frame["x"] == pr.frame["y"]).all():
                    raise NotTestable(
                        f"{_short(diag)} equals {_short(own)} for every case "
                        f"(value {pr.frame['x'].iloc[0]:.3g})"
                        + ("; ker S is trivial here: every edit key keeps a part outside the "
                           "preserved space, so no residual can fall in it"
                           if diag == "diag_kernel_energy" else ""))
                row = _paired_row("T3", test, pr, sign, s)
                row["detail"] += f"; open loop: {_short(own)} of the same runs"
                return row
            try:
                pr = pair(runs, s.treatment, s.baseline, diag)
            except NotTestable as exc:
                raise NotTestable(f"no {_short(own)} in {s.treatment} runs, and as the "
                                  f"open-loop reference: {exc}") from exc
            row = _paired_row("T3", test, pr, sign, s)
            row["detail"] += f"; open loop: {_short(diag)} of the {s.baseline} runs"
            return row

        out.append(_guard("T3", test, "HL shift", run))

    test = f"shift_cos of {s.treatment} > 0"

    def cos() -> dict[str, Any]:
        require(runs, [s.treatment], ["diag_shift_cos"])
        rows = arm_rows(runs, s.treatment)
        order = list(dict.fromkeys(rows["case_id"]))
        x = case_means(rows, "diag_shift_cos", order)
        batch = rows.groupby("case_id", sort=False)["batch"].first().reindex(order)
        ok = x.notna()
        groups = (batch[ok].to_numpy() if rows["sequential"].any()
                  and batch[ok].nunique() >= stats.MIN_CLUSTERS else None)
        res = stats.wilcoxon_paired(x[ok], np.zeros(int(ok.sum())), groups, seed=s.seed,
                                    n_resamples=min(s.n_resamples, 1000))
        return _row("T3", test, "HL location, one-sample Wilcoxon", res.effect,
                    (res.effect_lo, res.effect_hi), res.p, res.n,
                    bool(res.effect_size > 0), f"rank-biserial r={res.effect_size:+.3f}")

    out.append(_guard("T3", test, "HL location", cos))
    return out


def t4_gain_vs_rho(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T4: Spearman between the baseline's rho and the per-case gain (treatment - baseline)
    in the primary outcome; the claim predicts a negative correlation."""
    test = f"Spearman(rho of {s.baseline}, gain of {s.treatment})"

    def run() -> dict[str, Any]:
        out_col = _metric(runs, PRIMARY)
        gain = pair(runs, s.treatment, s.baseline, out_col)
        rho = pair(runs, s.baseline, s.baseline, "diag_rho", out_col)
        x = rho.frame["x"].reindex(gain.frame.index)
        y = gain.frame["x"] - gain.frame["y"]
        r = stats.spearman(x, y, n_resamples=s.n_resamples, seed=s.seed)
        if not np.isfinite(r.rho):
            raise NotTestable("rho or the gain is constant across cases")
        return _row("T4", test, "Spearman rho", r.rho, (r.lo, r.hi), r.p, r.n, r.rho < 0,
                    f"gain in {out_col}; seeds {gain.seeds or 'pooled'}")

    return [_guard("T4", test, "Spearman rho", run)]


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

        out.append(_guard("T5", test, "HL shift", run))
    return out


def t6_locality(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T6: non-inferiority of MetaKE vs the baseline on locality and fluency, margin
    ``s.margin`` points (one-sided t-test; bootstrap lower bound)."""
    suite = str(runs.frame["suite"].iloc[0])
    out = []
    for col, label, scale in LOCALITY.get(suite, LOCALITY["counterfact"]):
        test = f"{label} ({col}): {s.treatment} non-inferior to {s.baseline}"

        def run(col: str = col, scale: float = scale, test: str = test) -> dict[str, Any]:
            pr = pair(runs, s.treatment, s.baseline, col)
            r = stats.noninferiority(pr.frame["x"] * scale, pr.frame["y"] * scale, s.margin,
                                     pr.groups, n_resamples=s.n_resamples, seed=s.seed)
            return _row("T6", test, f"mean difference (points), margin {s.margin:g}",
                        r.mean_diff, (r.lower, math.inf), r.p, r.n, r.noninferior,
                        f"one-sided t-test H0: mean <= -{s.margin:g}")

        out.append(_guard("T6", test, "mean difference", run))
    return out


def t7_ordering(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T7: gain (MetaKE with solver X minus X) ordered AlphaEdit > MEMIT > ROME ~ 0.

    Paired Wilcoxon of the per-case gains; ROME's gain is a negative control (its HL CI must
    contain 0; no p-value enters the family)."""
    def gains(*solvers: str) -> tuple[dict[str, pd.Series], str]:
        """Per-case gains of MetaKE-with-solver over the solver, for ``solvers`` only (a
        sub-test needs only its own arms)."""
        col = _metric(runs, PRIMARY)
        missing = [a for solver in solvers for a in (solver, METAKE_BY_SOLVER[solver])
                   if arm_rows(runs, a).empty]
        if missing:
            raise NotTestable(f"missing runs {', '.join(missing)}")
        out = {}
        for solver in solvers:
            pr = pair(runs, METAKE_BY_SOLVER[solver], solver, col)
            out[solver] = pr.frame["x"] - pr.frame["y"]
        return out, col

    rows = []
    for hi, lo in ((ALPHAEDIT, MEMIT), (MEMIT, ROME)):
        test = f"gain({hi}) > gain({lo})"

        def run(hi: str = hi, lo: str = lo, test: str = test) -> dict[str, Any]:
            g, col = gains(hi, lo)
            both = pd.concat([g[hi], g[lo]], axis=1, join="inner").dropna()
            pr = Paired(pd.DataFrame({"x": both.iloc[:, 0], "y": both.iloc[:, 1],
                                      "batch": 0}), [], [], [], False)
            row = _paired_row("T7", test, pr, 1, s)
            row["detail"] = f"gains in {col}; " + row["detail"]
            return row

        rows.append(_guard("T7", test, "HL shift", run))

    test = "gain(rome) ~ 0 (negative control)"

    def control() -> dict[str, Any]:
        g, col = gains(ROME)
        d = g[ROME].dropna()
        ci = stats.hodges_lehmann_ci(d, seed=s.seed, n_resamples=min(s.n_resamples, 1000))
        ok = bool(np.isfinite(ci.lo) and ci.lo <= 0 <= ci.hi)
        return _row("T7", test, "HL shift of the ROME gain (CI must contain 0)", ci.value,
                    (ci.lo, ci.hi), None, ci.n, ok, f"gain in {col}; not in the Holm family")

    rows.append(_guard("T7", test, "HL shift", control))
    return rows


def t8_sequential(runs: Runs, s: Settings) -> list[dict[str, Any]]:
    """T8: in sequential runs rho declines with the batch index (Spearman < 0 for the
    baseline) and MetaKE's decline is flatter (Spearman(batch, rho_MetaKE - rho_base) > 0);
    Theil-Sen (Sen 1968) slopes of per-batch mean rho in the detail."""
    def seq(arm: str) -> pd.DataFrame:
        require(runs, [arm], ["diag_rho"])
        rows = arm_rows(runs, arm)
        rows = rows[rows["sequential"]]
        if rows.empty:
            raise NotTestable(f"no sequential runs of {arm}")
        if rows["batch"].nunique() < 2:
            raise NotTestable(f"{arm}'s sequential runs have a single batch")
        return rows

    def slope(rows: pd.DataFrame) -> float:
        per_batch = rows.groupby("batch")["diag_rho"].mean().dropna()
        if len(per_batch) < 2:
            return math.nan
        return float(sps.theilslopes(per_batch.to_numpy(), per_batch.index.to_numpy(float))
                     .slope)

    test_a = f"Spearman(batch, rho) of {s.baseline} < 0"

    def decline() -> dict[str, Any]:
        rows = seq(s.baseline)
        order = list(dict.fromkeys(rows["case_id"]))
        rho = case_means(rows, "diag_rho", order)
        batch = rows.groupby("case_id", sort=False)["batch"].first().reindex(order)
        r = stats.spearman(batch, rho, n_resamples=s.n_resamples, seed=s.seed)
        if not np.isfinite(r.rho):
            raise NotTestable(f"rho of {s.baseline} is constant")
        return _row("T8", test_a, "Spearman rho", r.rho, (r.lo, r.hi), r.p, r.n, r.rho < 0,
                    f"Theil-Sen slope of mean rho per batch: {slope(rows):+.4g}")

    test_b = f"Spearman(batch, rho of {s.treatment} - rho of {s.baseline}) > 0"

    def flatter() -> dict[str, Any]:
        a, b = seq(s.treatment), seq(s.baseline)
        pr = pair(runs.subset(set(a["run_id"]) | set(b["run_id"])), s.treatment, s.baseline,
                  "diag_rho")
        d = pr.frame["x"] - pr.frame["y"]
        r = stats.spearman(pr.frame["batch"], d, n_resamples=s.n_resamples, seed=s.seed)
        if not np.isfinite(r.rho):
            raise NotTestable("the rho difference is constant across batches")
        return _row("T8", test_b, "Spearman rho", r.rho, (r.lo, r.hi), r.p, r.n, r.rho > 0,
                    f"Theil-Sen slopes: {s.treatment} {slope(a):+.4g}, "
                    f"{s.baseline} {slope(b):+.4g}")

    return [_guard("T8", test_a, "Spearman rho", decline),
            _guard("T8", test_b, "Spearman rho", flatter)]


TESTS: dict[str, Callable[[Runs, Settings], list[dict[str, Any]]]] = {
    "T1": t1_disconnect, "T2": t2_realisation, "T3": t3_alignment, "T4": t4_gain_vs_rho,
    "T5": t5_ablations, "T6": t6_locality, "T7": t7_ordering, "T8": t8_sequential,
}


def run_claims(runs: Runs, settings: Settings | None = None) -> list[dict[str, Any]]:
    """All rows of T1-T8 for one (suite, model) group, not yet Holm-corrected."""
    s = settings or Settings()
    suite = str(runs.frame["suite"].iloc[0])
    model = str(runs.frame["model"].iloc[0])
    rows = []
    for fn in TESTS.values():
        for row in fn(runs, s):
            rows.append({"suite": suite, "model": model, **row})
    return rows


def finalise(rows: list[dict[str, Any]], alpha: float = ALPHA) -> pd.DataFrame:
    """Holm-adjust every row with a p-value (one family) and set each row's verdict."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    p = pd.to_numeric(frame["p"], errors="coerce").astype(float)
    frame["p"] = p
    frame["p_holm"] = stats.holm(p.to_numpy())
    verdicts = []
    for _, r in frame.iterrows():
        if isinstance(r["verdict"], str):
            verdicts.append(r["verdict"])
        elif not np.isfinite(r["p"]):  # a criterion without a p-value (negative control)
            verdicts.append("supported" if r["direction_ok"] else "not supported")
        else:
            ok = bool(r["direction_ok"]) and r["p_holm"] < alpha
            verdicts.append("supported" if ok else "not supported")
    frame["verdict"] = verdicts
    return frame.drop(columns=["direction_ok"])


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One verdict per (claim, suite, model). T1 (low rho *or* low phi) is supported by one
    supported sub-test and falsified only when all ran and failed; the other claims need every
    sub-test: one that ran and failed falsifies the claim, a missing one leaves it not
    testable (with the reasons)."""
    out = []
    if frame.empty:
        return pd.DataFrame(columns=["claim", "suite", "model", "statement", "verdict"])
    for (claim, suite, model), g in frame.groupby(["claim", "suite", "model"], sort=False):
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
        n_ok = sum(supported)
        out.append({"claim": claim, "suite": suite, "model": model,
                    "statement": CLAIMS[claim][0], "verdict": verdict,
                    "sub-tests supported": f"{n_ok}/{len(v)}"})
    return pd.DataFrame(out)
