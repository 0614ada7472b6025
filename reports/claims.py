"""The tests T1-T8 of ``docs/METAKE.md``, run on loaded runs of one (suite, model, preset).

Every test function returns a list of result rows (a claim may need several sub-tests), each a
dict with ``claim, test, statistic, value, ci_lo, ci_hi, p, p_holm, n, unit, n_clusters, mde,
falsified_if, verdict, detail`` (plus ``suite, model, preset``). :func:`run_claims` runs all
eight; :func:`finalise` applies Holm's correction (Holm 1979, :func:`reports.inference.holm`)
over every row with a p-value in the report (the family: tests x models x datasets x presets)
and sets the verdicts; :func:`summarise` gives one verdict per claim.

Inference unit (stated in every row's ``unit``): the core's, :mod:`reports.paired`
* Runs of two arms are paired by seed (the seeds both arms have, else the k-th of each) and
  case; a case's value is its mean over the paired seeds. Every outcome comes in by
  intention to treat (failed edits counted, :mod:`reports.load`).
* The unit is the batch: its cases share one weight update (and, in sequential runs, one
  point of the sequence; batch b holds the same cases in every seed), in batch mode as in
  sequential runs; with batches of one edit, the case.
* Seeds as a second cluster: every case of a run is scored on that run's models, so a run
  moves all its cases together (measured on SmolLM2, 3 seeds: half the variance of
  MetaKE - AlphaEdit fluency). With two or more paired seeds every location test below is
  joined by the two-way seed x unit t test (:func:`reports.inference.seed_batch_t_test`):
  the row takes the larger p, the union of the intervals and the larger MDE. With one seed
  the inference is conditional on that run (the row's unit says so).
* Paired location tests (T2, T3, T5, T7): a cluster sign-flip randomisation test of the mean
  paired difference (exact for up to 12 clusters; :mod:`reports.inference`), with a wild
  cluster bootstrap-t interval (Webb weights). No fallback to resampling cases: with few
  batches the interval widens and a test that cannot reach alpha says so in its MDE.
* T1: AUC of the baseline's rho / phi separating its successes from its failures over the
  (success, failure) pairs within one batch and one run (every seed's edit of a case is one
  observation); p-value by permuting cases within batches, jointly over seeds: the statistic
  and its null use the same pairs, so a decline across batches (later batches lower in rho
  and in success) never counts. With single edits: one stratum, the ordinary AUC.
* T4 (a ceiling cannot produce it): within units, cases are paired by the baseline's outcome
  (neighbours in y_base); the claim predicts that in each pair the case with the lower
  baseline rho has the higher MetaKE outcome. Statistic: mean sign concordance of
  (rho_base, y_MetaKE) over the pairs; its test (cluster sign-flip), interval (wild cluster
  bootstrap-t) and MDE all on the pairs' sign products, clustered by the batch that holds
  each pair (the pair itself with single edits). At equal baseline outcome a ceiling on
  y_MetaKE only pushes the statistic towards 0 or above (conservative).
* T6: non-inferiority with margin ``Settings.margin`` points (Spe, Flu and CounterFact+'s NS+)
  or ``Settings.kl_margin`` nats (CounterFact+'s neighbourhood KL, plain and prepended:
  lower is better), one-sided cluster sign-flip test of H0 mean(d) <= -margin. T7's
  negative control: equivalence by two one-sided tests
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

from reports import inference as inf
from reports.load import Runs
from reports.paired import (
    NotTestable,
    Paired,
    location_test,
    pair,
    paired_test,
    short,
    units_of,
)

ALPHA = 0.05
NI_MARGIN = 1.0  # points on the table's scale (percent for rates)
#: T6's margin for the neighbourhood KL (nats per prompt, MetaKE - baseline); why this value:
#: docs/RESULTS.md ("Margins")
KL_MARGIN = 0.05
#: T7 negative control: equivalence margin of the ROME gain, in the primary outcome's units
EQUIVALENCE = {"efficacy_margin": 0.25, "efficacy_accuracy": 0.02}

ALPHAEDIT, MEMIT, ROME, METAKE = "alphaedit", "memit", "rome", "metake"
METAKE_BY_SOLVER = {ALPHAEDIT: METAKE, MEMIT: "metake-memit", ROME: "metake-rome"}
NOPROXY, RESCALED = "metake-noproxy", "alphaedit-rescaled"

PRIMARY = {"counterfact": "efficacy_margin", "zsre": "efficacy_accuracy"}
EFFICACY = {"counterfact": "efficacy_success", "zsre": "efficacy_accuracy"}
#: T6: (column, table label, scale to the table's units, +1 where higher is better). The
#: CounterFact+ rows (Hoelscher-Obermaier et al. 2023): NS+ is NS with the edit statement
#: prepended to each neighbourhood prompt; NKL / NKL+ the KL(edited || unedited) of the
#: next-token distribution on the plain / prepended neighbourhood prompts (nats; the paper's
#: NKL is the prepended one), where lower is better.
LOCALITY = {"counterfact": [("neighborhood_success", "Spe", 100.0, 1),
                            ("ngram_entropy", "Flu", 100.0, 1),
                            ("neighborhood_plus_success", "NS+", 100.0, 1),
                            ("neighborhood_kl", "NKL", 1.0, -1),
                            ("neighborhood_plus_kl", "NKL+", 1.0, -1)],
            "zsre": [("specificity_accuracy", "Spe", 100.0, 1)]}
#: T6 columns whose margin is in nats (``Settings.kl_margin``), not points
KL_COLUMNS = {"neighborhood_kl", "neighborhood_plus_kl"}
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
    "T6": ("Locality and fluency not worse (non-inferiority, margin 1 point; NKL 0.05 nats)",
           "non-inferiority (H0: MetaKE - baseline <= -1 point on Spe, Flu, NS+; MetaKE's "
           "NKL, NKL+ >= baseline's + 0.05 nats) not shown"),
    "T7": ("Gains order AlphaEdit > MEMIT > ROME ~ 0",
           "gain(AlphaEdit) not > gain(MEMIT), gain(MEMIT) not > gain(ROME), or ROME's gain "
           "not shown equivalent to 0 (TOST)"),
    "T8": ("Sequential editing: rho declines as edits accumulate; MetaKE flattens the decline",
           "Spearman(batch, mean baseline rho) not negative, or Spearman(batch, mean "
           "MetaKE - baseline rho) not positive (batches as units)"),
}
#: how sub-tests combine into a claim's verdict
ANY_OF = {"T1"}  # T1: low rho or low phi predicts failure; all others need every sub-test


@dataclass
class Settings:
    baseline: str = ALPHAEDIT
    treatment: str = METAKE
    alpha: float = ALPHA
    n_resamples: int = 2000
    seed: int = 0
    margin: float = NI_MARGIN
    kl_margin: float = KL_MARGIN
    equivalence: dict[str, float] = field(default_factory=lambda: dict(EQUIVALENCE))
    #: Monte Carlo draws of the randomisation tests (above the exact sizes)
    n_draws: int = inf.DEFAULT_DRAWS


# ---------------------------------------------------------------- arms
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


_short = short


# ---------------------------------------------------------------- rows
def interval_label(claim: str, test: str) -> str:
    """What a row's (ci_lo, ci_hi) is: T6's one-sided 95% lower bound (its test) with the
    upper end of the 90% two-sided interval; the TOST's 90% interval; else 95% two-sided."""
    if claim == "T6":
        return "one-sided 95% lower bound, 90% upper end"
    return "90% CI" if "TOST" in test else "95% CI"


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


def _paired_row(claim: str, test: str, pr: Paired, sign: int, s: Settings) -> dict[str, Any]:
    """A paired row; the claim holds if the mean difference's sign is ``sign``."""
    x, y = pr.frame["x"].to_numpy(float), pr.frame["y"].to_numpy(float)
    res = paired_test(pr, s.alpha, s.seed, s.n_draws, ci_draws=s.n_resamples)
    ok = bool(np.sign(res.mean) == sign) if np.isfinite(res.mean) else False
    name = ("mean difference x - y, cluster sign-flip" if res.test == "sign-flip"
            else "difference of proportions, exact McNemar")
    detail = (f"mean x={np.mean(x):.4g}, mean y={np.mean(y):.4g}; seeds "
              f"{', '.join(pr.slots)}; CI {res.ci_method}")
    if res.test == "mcnemar":
        detail += f"; b={res.b}, c={res.c}"
    if not np.any(x != y):
        detail += "; no case differs (contradicts the claim)"
    if pr.n_failed:
        detail += f"; {pr.itt_note()}"
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


def _strata(units: np.ndarray) -> np.ndarray:
    """The units as strata when some unit holds two or more cases (batches), else one
    stratum (single edits: independent cases)."""
    units = np.asarray(units, dtype=object)
    if pd.Series(units).value_counts().max() >= 2:
        return units
    return np.zeros(len(units), dtype=object)


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
            strata = _strata(units_of(rows).reindex([str(c) for c in order]).to_numpy(object))
            r = inf.stratified_auc_test(score.to_numpy(float), success, strata,
                                        n_draws=min(s.n_draws, s.n_resamples), seed=s.seed)
            if not np.isfinite(r.statistic):
                raise NotTestable(f"no stratum holds both a success and a failure of "
                                  f"{s.baseline} with {_short(diag)}")
            g = len(set(strata)) if len(set(strata)) > 1 else len(order)
            mde = inf.mde(r.null_sd, g, s.alpha)
            n_failed = int(rows["failed"].sum())
            within = len(set(strata)) > 1
            return _row("T1", test, "AUC of pairs within a batch and run, permutation within "
                        "batches" if within else "AUC = U/(n1 n2), permutation", r.statistic,
                        p=r.p, n=r.n, direction_ok=r.statistic > 0.5,
                        detail=(f"{n_fail} failures ({eff} < 1), {n_succ} successes over "
                                f"{score.shape[0]} runs; MDE as AUC - 0.5"
                                + (f"; {n_failed} failed edits (no {_short(diag)})"
                                   if n_failed else "")),
                        unit=(f"case x seed, permuted within batches ({g})" if within
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
        res = location_test(x, pr.units, s.alpha, s.seed, s.n_draws, cells=pr.cells("x"),
                            ci_draws=s.n_resamples)
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
        strata = _strata(f["unit"].to_numpy(object))
        signs, _, where = inf.matched_pair_products(strata, f["y"], f["rho"], f["x"])
        if signs.size == 0:
            raise NotTestable("no stratum holds two cases to pair")
        unit = where if len(set(strata)) > 1 else np.arange(signs.size)
        # one statistic for the estimate, the test, the interval and the MDE: the mean sign
        # concordance of the pairs, clustered by the unit that holds each pair
        res = location_test(signs, unit, s.alpha, s.seed, s.n_draws, ci_draws=s.n_resamples)
        if np.isfinite(res.mean) and not np.any(signs):
            res.p = 1.0
        detail = (f"{signs.size} pairs matched on {s.baseline}'s {out_col} within "
                  f"{'units' if len(set(strata)) > 1 else 'the run'}; cluster sign-flip test "
                  f"of the pairs' sign products; CI {res.ci_method}; seeds "
                  f"{', '.join(outcome.slots)}")
        if not np.any(signs):
            detail += "; no pair differs in both (contradicts the claim)"
        return _row("T4", test, "mean sign concordance over matched pairs", res.mean,
                    (res.lo, res.hi), res.p, int(signs.size), bool(res.mean < 0), detail,
                    unit=(f"{'batch' if len(set(strata)) > 1 else 'matched pair'} holding the "
                          f"pair ({res.n_clusters})"), n_clusters=res.n_clusters, mde=res.mde)

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
    """T6: non-inferiority of MetaKE vs the baseline on locality and fluency: one-sided
    cluster sign-flip test of H0 mean(d) <= -margin and a one-sided 95% wild cluster
    bootstrap lower bound (the row's ci_hi: the upper end of the 90% two-sided interval,
    below -margin when the treatment is shown worse by the margin), where d = treatment -
    baseline on the table's scale (points) for rates and fluency, d = baseline - treatment
    (nats) for the neighbourhood KL (lower is better); margins ``s.margin`` points and
    ``s.kl_margin`` nats."""
    suite = str(runs.frame["suite"].iloc[0])
    out = []
    for col, label, scale, better in LOCALITY.get(suite, LOCALITY["counterfact"]):
        test = f"{label} ({col}): {s.treatment} non-inferior to {s.baseline}"

        def run(col: str = col, scale: float = scale, better: int = better,
                test: str = test) -> dict[str, Any]:
            try:
                pr = pair(runs, s.treatment, s.baseline, col)
            except NotTestable as exc:
                hint = (" (fluency needs runs with --generation-tokens)"
                        if col == "ngram_entropy" else "")
                raise NotTestable(f"{exc}{hint}") from exc
            margin, units = ((s.kl_margin, "nats") if col in KL_COLUMNS
                             else (s.margin, "points"))
            d = pr.diff(better * scale)
            cells = pr.cells(scale=better * scale)
            res = location_test(d, pr.units, s.alpha, s.seed, s.n_draws, mu0=-margin,
                                alternative="greater", cells=cells, ci_draws=s.n_resamples)
            # the upper end of the 90% two-sided interval (whose lower end is the test's
            # one-sided 95% bound): below -margin it shows the treatment worse by the margin
            hi = location_test(d, pr.units, s.alpha, s.seed, s.n_draws, confidence=0.90,
                               cells=cells, ci_draws=s.n_resamples).hi
            detail = (f"H0: mean <= -{margin:g}; shown with 80% power only if the true "
                      f"difference >= {-margin + res.mde:+.3g}; interval: one-sided 95% lower "
                      f"bound ({res.ci_method}), upper end of the 90% two-sided interval")
            if better < 0:
                detail = (f"d = {s.baseline} - {s.treatment} (lower is better); mean "
                          f"{s.treatment}={pr.frame['x'].mean():.4g}, mean "
                          f"{s.baseline}={pr.frame['y'].mean():.4g}; ") + detail
            if pr.n_failed:
                detail += f"; {pr.itt_note()}"
            what = f"{s.baseline} - {s.treatment}" if better < 0 else "difference"
            return _row("T6", test, f"mean {what} ({units}), margin {margin:g}",
                        res.mean, (res.lo, hi), res.p, res.n,
                        bool(res.mean > -margin), detail, unit=pr.unit_name(),
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
                                 "unit": a.frame["unit"], "batch": a.frame["batch"]}).dropna()
            by_slot = None
            if a.by_slot is not None and b.by_slot is not None:
                by_slot = pd.DataFrame({"x": a.by_slot["x"] - a.by_slot["y"],
                                        "y": b.by_slot["x"] - b.by_slot["y"]}).dropna()
            pr = Paired(both, [x for x in a.slots if x in b.slots], [], [], a.sequential,
                        max(a.n_failed, b.n_failed), max(a.n_unmeasured, b.n_unmeasured),
                        by_slot)
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
                           alternative="greater", confidence=0.95, cells=pr.cells(),
                           ci_draws=s.n_resamples)
        hi = location_test(-d, pr.units, s.alpha, s.seed, s.n_draws, mu0=-m,
                           alternative="greater", confidence=0.95,
                           cells=pr.cells(scale=-1.0), ci_draws=s.n_resamples)
        # the TOST's 90% interval (two-sided, joined with the two-way one with seeds)
        ci = location_test(d, pr.units, s.alpha, s.seed, s.n_draws, confidence=0.90,
                           cells=pr.cells(), ci_draws=s.n_resamples)
        p = max(lo.p, hi.p)
        ok = bool(abs(lo.mean) < m)
        return _row("T7", test, f"mean ROME gain, TOST margin +-{m:g}", lo.mean,
                    (ci.lo, ci.hi), p, lo.n, ok,
                    f"gain in {col}; 90% CI ({ci.ci_method}); {_tost_power(m, lo.mde)}; "
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


holm = inf.holm


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
