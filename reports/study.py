"""A claims study: the sub-tests of T1-T8 that a power-first design assigns to each of its
parts, one Holm family over all of them, and a three-way verdict per claim with the power
the design achieved (docs/RESULTS.md; the design in docs/DESIGN.md, "The claims study").

Parts: each part is a set of runs of one design (:data:`PARTS`: ``single``, independent
edits in batch mode with batches of one, every case its own unit; ``pairs``, batches of
two, the batch as unit; ``sequential``, edits that accumulate, the batch as unit). The tests
are :mod:`reports.claims`'s, run on each part's runs; a :class:`Target` names which rows of
which part the study reports and the smallest effect worth detecting for each, fixed before
the runs. m: the number of the study's rows with a p-value (the Holm family).

Verdicts per sub-test (:func:`verdict3`), both sides at the family's level:
* ``supported``: Holm-adjusted p < alpha over the study's rows, effect in the claimed
  direction (as :func:`reports.claims.finalise`). A supported effect may still be smaller
  than the smallest one worth detecting; the table shows both.
* ``contradicted``: the Bonferroni interval (each side at alpha / m: :func:`bounds`,
  value +- t_{1 - alpha/m} se) excludes every effect of the smallest size worth detecting in
  the claimed direction (a reverse effect included): the claim, at the size that matters,
  is ruled out. Non-inferiority rows (T6): the interval lies below -margin (the treatment is
  worse by more than the margin); T7's TOST: outside +-margin.
* ``inconclusive``: neither; the row's MDE says what the design could have detected.
A claim is supported when all its sub-tests are (T1: any), contradicted when one is (T1:
all), else inconclusive.

se: from the row's MDE (:func:`reports.inference.mde`: (q_{1-a0} + q_{0.8}) se, q the t
quantile on g - 1 df below 200 clusters, a0 = alpha / 2 two-sided, alpha one-sided); for
T8's Spearman, of Fisher's z, sqrt(1.06 / (g - 3)). Achieved power (``power``) at the
smallest effect worth detecting ``delta``, at Holm's strictest level (a lower bound for the
later steps): F(delta / se - q_{1 - alpha/(2m)}) for the two-sided tests of a directional
claim; F(margin / se - q_{1 - alpha/m}) for T6's non-inferiority at a true difference of
0; 2 F(margin / se - q_{1 - alpha/m}) - 1 for the TOST at a true gain of 0 (both one-sided
tests must reject). 0 where the MDE is infinite (the test cannot reach alpha); NaN where
nothing varies (not estimable). The Monte Carlo tests run with :data:`DRAWS` draws, enough
to reach alpha / m.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from reports import claims as claims_mod
from reports.load import load_runs

ALPHA = 0.05
POWER = 0.8
#: the parts a design can have (a grid entry's ``study`` key)
PARTS = ("single", "pairs", "sequential")
#: draws of the randomisation tests and bootstrap intervals (T1's AUC test uses the smaller
#: of the two): 1 / (draws + 1) well below alpha / m for the study's 26 rows
DRAWS = 9999


@dataclass(frozen=True)
class Target:
    """One pre-registered sub-test. ``pattern``: a regular expression matched against the
    claims row's ``test``; ``sign``: the claimed direction of the row's value (+1 up,
    -1 down; 0 for T6 and the TOST, whose rows carry their own boundary); ``delta``: the
    smallest effect worth detecting, in the row's units, as a distance from the null value
    (``null``: 0.5 for an AUC, 0 otherwise); ``kind``: ``two-sided``, ``ni`` (T6),
    ``tost`` (T7's control) or ``spearman`` (T8)."""

    claim: str
    part: str
    pattern: str
    sign: int
    delta: float
    why: str
    kind: str = "two-sided"
    null: float = 0.0


#: the design of docs/DESIGN.md ("The claims study"); deltas fixed before the runs
DESIGN: tuple[Target, ...] = (
    Target("T1", "single", r"^AUC of rho:", 1, 0.15, "AUC 0.65: a weaker predictor of failure "
           "is of no practical use", null=0.5),
    Target("T1", "single", r"^AUC of phi:", 1, 0.15, "as for rho", null=0.5),
    Target("T2", "single", r"^rho: .* vs alphaedit", 1, 0.05, "5% more of the planned shift "
           "realised"),
    Target("T2", "single", r"^z_error: .* vs alphaedit", -1, 0.05, "target error 5% of the "
           "planned shift lower"),
    Target("T2", "single", r"^rho: .* vs memit", 1, 0.05, "as against AlphaEdit"),
    Target("T2", "single", r"^z_error: .* vs memit", -1, 0.05, "as against AlphaEdit"),
    Target("T3", "pairs", r"^alignment:", 1, 0.05, "5% of the residual's norm better aligned"),
    Target("T3", "pairs", r"^kernel_energy:", -1, 0.05, "5% less energy in the kernel"),
    Target("T3", "single", r"^shift_cos", 1, 0.1, "cosine 0.1: a shift that barely points "
           "anywhere does not count"),
    Target("T4", "single", r"^concordance", -1, 0.2, "a concordance of -0.2: 60% of matched "
           "pairs in the claimed order"),
    Target("T5", "single", r"^primary outcome: .* vs metake-noproxy", 1, 1.0,
           "1 nat of efficacy margin: the odds of the new answer over the true one by a "
           "factor e (the gate's stated detectable drop)"),
    Target("T5", "single", r"^primary outcome: .* vs alphaedit-rescaled", 1, 1.0, "as above"),
    *(Target("T6", part, rf"^{label} \(", 0, 0.0, why, kind="ni")
      for part in ("single", "sequential")
      for label, why in (("Spe", "the claim's 1-point margin"), ("Flu", "the claim's margin"),
                         ("NS\\+", "the claim's margin"),
                         ("NKL", "margin in nats (docs/RESULTS.md, Margins)"),
                         ("NKL\\+", "margin in nats (docs/RESULTS.md, Margins)"))
      if not (part == "sequential" and label == "Flu")),
    Target("T7", "single", r"^gain\(alphaedit\) > gain\(memit\)", 1, 1.0, "1 nat, as T5"),
    Target("T7", "single", r"^gain\(memit\) > gain\(rome\)", 1, 1.0, "1 nat, as T5"),
    Target("T7", "single", r"TOST", 0, 0.0, "power at a true gain of 0", kind="tost"),
    Target("T8", "sequential", r"^Spearman\(batch, mean rho of alphaedit\)", -1, 0.5,
           "Spearman -0.5: a decline weaker than that is not a trend worth claiming",
           kind="spearman"),
    Target("T8", "sequential", r"^Spearman\(batch, mean rho of metake", 1, 0.5, "as above",
           kind="spearman"),
)


def _z(p: float) -> float:
    return float(stats.norm.ppf(p))


#: Fisher's z of a Spearman correlation has variance about 1.06 / (n - 3) (Fieller,
#: Hartley & Pearson 1957)
SPEARMAN_VAR = 1.06


def _dist(row: pd.Series) -> Any:
    """The reference distribution of the row's MDE (:func:`reports.inference.mde`): t on
    g - 1 degrees of freedom below 200 clusters, else normal."""
    g = int(row.get("n_clusters") or 0)
    return stats.t(g - 1) if 2 <= g < 200 else stats.norm


def _se(row: pd.Series, t: Target) -> float:
    """The row's standard error (module notes): from its MDE, inverting the quantiles that
    made it; for Spearman rows, of Fisher's z from the number of batches."""
    if t.kind == "spearman":
        g = int(row.get("n_clusters") or 0)
        return math.sqrt(SPEARMAN_VAR / (g - 3)) if g > 3 else math.inf
    mde = float(row["mde"])
    if not np.isfinite(mde):
        return math.inf
    a0 = ALPHA if t.kind in ("ni", "tost") else ALPHA / 2
    d = _dist(row)
    return mde / float(d.ppf(1 - a0) + d.ppf(POWER))


def achieved_power(row: pd.Series, t: Target, m: int, margin: float = 0.0) -> float:
    """Power at the target's smallest effect, at Holm's strictest level (module notes);
    ``margin``: the NI or TOST margin (their effect is the margin, at a true difference 0).
    NaN where the row has no spread at all (no case differs): not estimable."""
    se = _se(row, t)
    if not np.isfinite(se):
        return 0.0
    if se <= 0:
        return math.nan
    if t.kind == "spearman":
        return float(stats.norm.cdf(math.atanh(t.delta) / se - _z(1 - ALPHA / (2 * m))))
    d = _dist(row)
    if t.kind == "ni":
        return float(d.cdf(margin / se - d.ppf(1 - ALPHA / m)))
    if t.kind == "tost":  # both one-sided tests must reject: 2 P(one) - 1 at a true 0
        return max(0.0, float(2 * d.cdf(margin / se - d.ppf(1 - ALPHA / m)) - 1))
    return float(d.cdf(t.delta / se - d.ppf(1 - ALPHA / (2 * m))))


def _margin(row: pd.Series) -> float:
    """The NI or TOST margin named in the row's statistic ("margin 1", "margin +-0.25")."""
    found = re.search(r"margin (?:\+-)?([0-9.eE+-]+)", str(row["statistic"]))
    return float(found.group(1)) if found else math.nan


def bounds(row: pd.Series, t: Target, m: int) -> tuple[float, float]:
    """The row's two-sided interval at the Bonferroni level 1 - 2 alpha / m (each side at
    alpha / m, the level of the study's family), value +- q se; Fisher's z for Spearman."""
    v, se = float(row["value"]), _se(row, t)
    if not (np.isfinite(se) and np.isfinite(v)):
        return -math.inf, math.inf
    if t.kind == "spearman":
        z = math.atanh(float(np.clip(v, -0.999999, 0.999999)))
        q = _z(1 - ALPHA / m)
        return math.tanh(z - q * se), math.tanh(z + q * se)
    q = float(_dist(row).ppf(1 - ALPHA / m))
    return v - q * se, v + q * se


def verdict3(row: pd.Series, t: Target, m: int) -> str:
    """supported / contradicted / inconclusive for one sub-test (module notes)."""
    if str(row["verdict"]).startswith("not testable"):
        return str(row["verdict"])
    if row["verdict"] == "supported":
        return "supported"
    lo, hi = bounds(row, t, m)
    if t.kind == "ni":
        return "contradicted" if hi < -_margin(row) else "inconclusive"
    if t.kind == "tost":
        margin = _margin(row)
        return "contradicted" if lo > margin or hi < -margin else "inconclusive"
    edge = t.null + t.sign * t.delta  # the smallest effect worth detecting, on the row's scale
    ruled_out = hi < edge if t.sign > 0 else lo > edge
    return "contradicted" if ruled_out else "inconclusive"


def rows_of_part(run_dirs: Sequence[str | Path], settings: claims_mod.Settings
                 ) -> list[dict[str, Any]]:
    """Every claims row of the runs of one part (not yet Holm-corrected)."""
    runs = load_runs(run_dirs)
    rows: list[dict[str, Any]] = []
    for _, g in runs.groups():
        for _, sub in g.presets():
            rows += claims_mod.run_claims(sub, settings)
    return rows


def study(parts: dict[str, list[dict[str, Any]]], design: Sequence[Target] = DESIGN,
          alpha: float = ALPHA) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sub-test table, claim table) of the design's rows from ``parts`` (part name -> the
    claims rows of its runs): one Holm family over the selected rows."""
    picked: list[dict[str, Any]] = []
    targets: list[Target] = []
    for t in design:
        rows = [r for r in parts.get(t.part, [])
                if r["claim"] == t.claim and re.search(t.pattern, str(r["test"]))]
        if not rows:
            rows = [claims_mod._not_testable(t.claim, t.pattern, "", f"no {t.part} runs")]
        for r in rows:
            picked.append({**r, "part": t.part})
            targets.append(t)
    frame = claims_mod.finalise(picked, alpha)
    m = int(frame["p"].notna().sum())
    out = []
    for (_, row), t in zip(frame.iterrows(), targets, strict=True):
        margin = _margin(row) if t.kind in ("ni", "tost") else math.nan
        out.append({"claim": t.claim, "part": t.part, "test": row["test"],
                    "value": row["value"], "ci_lo": row["ci_lo"], "ci_hi": row["ci_hi"],
                    "p_holm": row["p_holm"], "mde": row["mde"],
                    "n_clusters": row.get("n_clusters", 0), "unit": row.get("unit", ""),
                    "delta": margin if t.kind in ("ni", "tost") else t.delta,
                    "power": achieved_power(row, t, max(m, 1), margin),
                    "verdict": verdict3(row, t, max(m, 1)), "why delta": t.why})
    sub = pd.DataFrame(out)
    claims = []
    for claim, g in sub.groupby("claim", sort=True):
        v = list(g["verdict"])
        if claim in claims_mod.ANY_OF:
            verdict = ("supported" if "supported" in v else
                       "contradicted" if all(x == "contradicted" for x in v) else "inconclusive")
        else:
            verdict = ("supported" if all(x == "supported" for x in v) else
                       "contradicted" if "contradicted" in v else "inconclusive")
        claims.append({"claim": claim, "statement": claims_mod.CLAIMS[claim][0],
                       "verdict": verdict,
                       "sub-tests": ", ".join(f"{x}" for x in v),
                       "lowest power": float(g["power"].min())})
    return sub, pd.DataFrame(claims)


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        return f"{x:.{digits}g}"
    return str(x)


def to_markdown(sub: pd.DataFrame, claims: pd.DataFrame) -> str:
    lines = ["| claim | verdict | lowest power | statement |", "| --- | --- | --- | --- |"]
    for _, r in claims.iterrows():
        lines.append(f"| {r['claim']} | {r['verdict']} | {_fmt(r['lowest power'], 2)} | "
                     f"{r['statement']} |")
    lines += ["", "| claim | part | sub-test | effect [interval] | smallest effect worth "
              "detecting | MDE | power | Holm p | units | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in sub.iterrows():
        lines.append(f"| {r['claim']} | {r['part']} | {r['test']} | {_fmt(r['value'])} "
                     f"[{_fmt(r['ci_lo'])}, {_fmt(r['ci_hi'])}] | {_fmt(r['delta'])} | "
                     f"{_fmt(r['mde'])} | {_fmt(r['power'], 2)} | {_fmt(r['p_holm'])} | "
                     f"{_fmt(r['n_clusters'])} | {r['verdict']} |")
    lines += ["", "Intervals: each row's own (95% two-sided; T6: the one-sided 95% lower bound, "
              "its test, and the 90% upper end; T7's TOST: 90%; T1 and T8: none). Verdicts "
              "use the family's level (reports/study.py). Power: at the smallest effect worth "
              "detecting, at Holm's strictest level; '–': not estimable (nothing varies)."]
    return "\n".join(lines) + "\n"


def write_study(parts: dict[str, list[Path]], out: str | Path,
                settings: claims_mod.Settings | None = None) -> str:
    """Run the study on the run directories of each part; write ``study.md``, ``study.csv``
    and ``study_claims.csv`` under ``out``; return the markdown."""
    settings = settings or claims_mod.Settings(n_resamples=DRAWS, n_draws=DRAWS)
    rows = {part: rows_of_part(dirs, settings) for part, dirs in parts.items() if dirs}
    sub, claims = study(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sub.to_csv(out / "study.csv", index=False)
    claims.to_csv(out / "study_claims.csv", index=False)
    text = to_markdown(sub, claims)
    (out / "study.md").write_text(text, encoding="utf-8")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m reports.study",
        description="The claims study's verdicts (docs/RESULTS.md) from its parts' runs.")
    ap.add_argument("--single", nargs="+", required=True, metavar="RUN_DIR",
                    help="runs of independent single edits (batch mode, batches of 1)")
    ap.add_argument("--pairs", nargs="+", default=[], metavar="RUN_DIR",
                    help="runs in batch mode with batches of two (T3's alignment)")
    ap.add_argument("--sequential", nargs="+", default=[], metavar="RUN_DIR",
                    help="sequential runs (T8, T6 under accumulation)")
    ap.add_argument("--out", required=True, help="directory for study.md and study.csv")
    ap.add_argument("--draws", type=int, default=DRAWS,
                    help="draws of the randomisation tests and bootstrap intervals")
    args = ap.parse_args(argv)
    parts = {part: [Path(d) for d in getattr(args, part)] for part in PARTS}
    text = write_study(parts, args.out, claims_mod.Settings(n_resamples=args.draws,
                                                                n_draws=args.draws))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
