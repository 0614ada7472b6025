"""The paste-ready paper table: per model and preset, AlphaEdit's Table-1 layout.

Columns: CounterFact Eff, Gen, Spe, Flu, Consis and zsRE Eff, Gen, Spe (the suites' main
columns, :data:`reports.tables.COLUMNS`), x100; one row per arm. A cell is the mean over cases
and seeds with its 95% wild cluster bootstrap-t interval over the design's inference unit
(``mean [lo, hi]``); '–' where a run did not record the metric (Flu and Consis need
``--generation-tokens``; Consis also reference texts).

Bold: in each column the arm with the highest mean is set in bold only when it is better than
*every* other arm by the paired test of the report (:func:`reports.paired.paired_test` on the
paired per-case differences at the design's unit), two-sided at ``alpha`` after Holm over
that column's comparisons. Two-sided, because the arm tested is the one the data put on top:
a one-sided test in the direction the data chose would bold one of two equal arms at rate
2 alpha. A column whose best arm does not beat all the others has no bold cell: ties are not
broken by point estimates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from reports import inference as inf
from reports.load import Runs
from reports.paired import NotTestable, pair, paired_test
from reports.tables import COLUMNS, Table, _ci_cells, slug

#: the suites of the layout, in column order
SUITES = ("counterfact", "zsre")
SUITE_LABEL = {"counterfact": "CF", "zsre": "zsRE"}


def best_arm(runs: Runs, arms: list[str], col: str, means: Mapping[str, float],
             alpha: float, seed: int = 0) -> str | None:
    """The arm with the highest mean in ``col`` if the paired test shows it better than every
    other arm (two-sided, Holm over the comparisons), else None."""
    ranked = [a for a in arms if np.isfinite(means.get(a, np.nan))]
    if len(ranked) < 2:
        return None
    top = max(ranked, key=lambda a: means[a])
    p_values = []
    for other in ranked:
        if other == top:
            continue
        try:
            pr = pair(runs, top, other, col)
        except NotTestable:
            return None
        res = paired_test(pr, alpha, seed)
        if not (np.isfinite(res.p) and res.mean > 0):
            return None
        p_values.append(res.p)
    adjusted = inf.holm(p_values)
    return top if all(p < alpha for p in adjusted) else None


def paper_table(model: str, parts: Mapping[str, Runs], n_resamples: int = 2000,
                seed: int = 0, alpha: float = 0.05, preset: str = "") -> Table | None:
    """``parts``: suite -> the runs of ``model`` (one preset) on that suite."""
    spec = [(suite, f"{SUITE_LABEL[suite]} {label}", col) for suite in SUITES
            if suite in parts for label, col in COLUMNS[suite]]
    if not spec:
        return None
    arms: list[str] = []
    for suite in SUITES:
        if suite in parts:
            arms += [a for a in dict.fromkeys(parts[suite].frame["arm"]) if a not in arms]
    failed = {a: sum(int(parts[suite].rows_of(a)["failed"].astype(bool).sum())
                     for suite in SUITES if suite in parts) for a in arms}
    raw_rows: list[dict[str, Any]] = [{"method": a, "n_failed": failed[a]} for a in arms]
    disp_rows: list[dict[str, Any]] = [{"method": a, "n_failed": failed[a]} for a in arms]
    bold: set[tuple[int, str]] = set()
    for suite, label, col in spec:
        runs = parts[suite]
        means: dict[str, float] = {}
        for i, arm in enumerate(arms):
            rows = runs.rows_of(arm)
            if len(rows):
                raw, disp = _ci_cells(rows, [(label, col)], n_resamples, seed)
            else:  # the arm did not run on this suite
                raw, disp = {label: np.nan, f"{label}_lo": np.nan, f"{label}_hi": np.nan}, \
                    {label: "–"}
            raw_rows[i].update(raw)
            disp_rows[i].update(disp)
            means[arm] = raw[label]
        top = best_arm(runs, arms, col, means, alpha, seed)
        if top is not None:
            bold.add((arms.index(top), label))
    caption = (f"{model}{f' ({preset} preset)' if preset else ''}: CounterFact and zsRE, "
               "mean over cases and seeds x100 with 95% wild cluster bootstrap-t CI; bold: "
               f"better than every other row by the paired test (two-sided, Holm within the "
               f"column, alpha {alpha}); no bold where the best row is not; '–': not recorded; "
               "n_failed: failed edits (both suites), counted as failures in Eff and Gen.")
    name = f"paper_{slug(model)}" + (f"_{slug(preset)}" if preset else "")
    return Table(name, caption, pd.DataFrame(raw_rows), pd.DataFrame(disp_rows),
                 frozenset(bold))
