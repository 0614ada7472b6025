"""The benchmark's headline contrasts: MetaKE, AlphaEdit and MEMIT each against the unedited
model (``noop``), and MetaKE against AlphaEdit, on efficacy and generalisation (the report's
Eff and Gen), with the report's own inference core (:mod:`reports.paired`): cases paired over
shared seeds, failed edits counted by intention to treat, the design's unit (the case where
each edit is its own batch, else the batch), the exact McNemar test for 0/1 outcomes with the
case as unit (else the cluster sign-flip test, joined with the seed x unit test over several
seeds), a wild cluster bootstrap-t interval (cut to [-100, 100] points, the range of a
difference of rates), the MDE at 80% power, and Holm's correction over the contrasts shown.
Contrasts whose arms are missing are left out."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: (method, against)
CONTRASTS = (("metake", "noop"), ("alphaedit", "noop"), ("memit", "noop"),
             ("metake", "alphaedit"))
#: suite -> (label, column) as in reports.tables.COLUMNS
METRICS = {"counterfact": (("Eff", "efficacy_success"), ("Gen", "paraphrase_success")),
           "zsre": (("Eff", "efficacy_accuracy"), ("Gen", "paraphrase_accuracy"))}


def headline_rows(run_dirs: Iterable[Path], alpha: float = 0.05) -> list[dict[str, Any]]:
    """One row per available contrast, suite, model, preset and metric (points, x100)."""
    from reports.inference import holm
    from reports.load import load_runs
    from reports.paired import NotTestable, pair, paired_test

    rows: list[dict[str, Any]] = []
    for (suite, model), group in load_runs(run_dirs).groups():
        for preset, runs in group.presets():
            arms = set(runs.frame["arm"])
            for method, against in CONTRASTS:
                if method not in arms or against not in arms:
                    continue
                for label, col in METRICS.get(suite, ()):
                    row = {"suite": suite, "model": model, "preset": preset,
                           "contrast": f"{method} - {against}", "metric": label}
                    try:
                        pr = pair(runs, method, against, col)
                    except NotTestable as exc:  # said, not dropped
                        rows.append({**row, "effect": math.nan, "lo": math.nan,
                                     "hi": math.nan, "p": math.nan, "mde": math.nan,
                                     "test": "", "unit": "", "n_failed": 0,
                                     "n_unmeasured": 0, "not_testable": str(exc)})
                        continue
                    res = paired_test(pr, alpha)
                    rows.append({**row, "effect": 100 * res.mean, "lo": _clip(100 * res.lo),
                                 "hi": _clip(100 * res.hi), "p": res.p, "mde": 100 * res.mde,
                                 "test": res.test, "unit": pr.unit_name(),
                                 "n_failed": pr.n_failed, "n_unmeasured": pr.n_unmeasured})
    tested = [r for r in rows if math.isfinite(r["p"])]
    for row, p in zip(tested, holm([r["p"] for r in tested]), strict=True):
        row["p_holm"] = float(p)
        row["verdict"] = "shown" if p < alpha else "not shown"
    for row in rows:
        if "not_testable" in row:
            row["p_holm"], row["verdict"] = math.nan, f"not testable: {row['not_testable']}"
    return rows


def _clip(bound: float) -> float:
    """An interval bound cut to [-100, 100] points (the range of a difference of rates);
    NaN (no interval: too few units) stays NaN."""
    return min(100.0, max(-100.0, bound)) if math.isfinite(bound) else math.nan


def _num(value: float, fmt: str) -> str:
    """``value`` formatted, or an en dash where it is not finite (no interval, no MDE)."""
    return format(value, fmt) if math.isfinite(value) else "\u2013"


def headline_markdown(rows: list[dict[str, Any]], alpha: float = 0.05) -> str:
    """The rows as a Markdown table with a caption that says what each column is."""
    import pandas as pd

    from reports.tables import fmt_p

    if not rows:
        return ""
    table = pd.DataFrame({
        "suite / model": [f"{r['suite']} / {r['model']} [{r['preset']}]" for r in rows],
        "contrast": [r["contrast"] for r in rows], "metric": [r["metric"] for r in rows],
        "difference [95% CI]": [f"{_num(r['effect'], '+.1f')} [{_num(r['lo'], '+.1f')}, "
                                f"{_num(r['hi'], '+.1f')}]" for r in rows],
        "MDE": [_num(r["mde"], ".1f") for r in rows],
        "p (Holm)": [fmt_p(r["p_holm"]) if math.isfinite(r["p_holm"]) else "\u2013"
                     for r in rows],
        "difference": [r["verdict"] for r in rows],
        "failed": [str(r["n_failed"]) + (f" ({r['n_unmeasured']} unmeasured, left out)"
                                         if r["n_unmeasured"] else "") for r in rows],
        "unit (test)": [f"{r['unit']}; {r['test']}" for r in rows]})
    return ("Headline contrasts: difference in points (x100), paired by case, with its 95% "
            "interval (not adjusted for multiplicity; '\u2013': too few units for one); MDE: "
            "the smallest difference the test detects with 80% power at alpha "
            f"{alpha} (unadjusted; '\u2013': none can be shown with so few units); p "
            f"two-sided, Holm-adjusted over these rows (this table's family); 'shown': "
            f"p (Holm) < {alpha}; failed: cases with a failed edit in either arm, counted "
            "by intention to treat.\n\n"
            + table.to_markdown(index=False, disable_numparse=True) + "\n")
