"""The inference core: pairing runs by seed and case, the unit of inference, seed cells, and
the location and margin tests on paired differences.

Every consumer (the claims T1-T8, the report's tables and pairwise comparisons, the paper
table's bold, ``keh compare`` and ``nox -s regress``, the benchmark's console table) calls
this module; none re-implements a step of it.

Outcomes come in by intention to treat (:func:`reports.load.combine`, rule in
:func:`suites.itt.intention_to_treat`): a failed edit scores 0 in the edit's own success
rates, and every other outcome is the value measured on the model the failure left (the
unedited model in batch mode, the final model in sequential mode). Runs written before keh
measured failed cases have no such value: :class:`Paired` counts those cases
(``n_unmeasured``) and every consumer says so (the gate refuses them).

Unit of inference (:func:`units_of`): cases edited together share one weight update, so the
unit is the connected group of cases that share a batch in any of the runs involved (union
over (run, batch)): the batch in sequential and batched runs, the case with ``--batch-size
1``. One definition for every mode and every caller.

Seeds (:func:`seed_slots`): runs of two arms pair by the seeds both have; without a common
seed but with as many seeds on each side, the k-th seed of one pairs with the k-th of the
other (a method against itself with other seeds); otherwise each side's runs are averaged.
A case's value is its mean over the paired slots. With two or more slots the seed is a
second, crossed cluster (every case of a run is scored on that run's models, so a run moves
its cases together): :meth:`Paired.cells` gives the (slots, units) table of cell means for
the two-way test (:func:`reports.inference.seed_batch_t_test`), which joins every test here
(the larger p, the union of the intervals, the larger MDE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar

from harness.errors import UserError
from reports import inference as inf
from reports.load import Runs, check_comparable

ALPHA = 0.05


class NotTestable(Exception):
    """A test lacks runs or data; the message says which."""


# ---------------------------------------------------------------- units
def _union_units(run: np.ndarray, batch: np.ndarray, case: np.ndarray) -> np.ndarray:
    """Unit root (a case index) of every case code 0..max(case): cases sharing a (run, batch)
    are joined (union-find). Arrays are per row; ``case`` holds integer codes."""
    n = int(case.max()) + 1 if case.size else 0
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    key = pd.factorize(pd.Series(run, dtype=object).astype(str) + "\x00"
                       + pd.Series(batch, dtype=object).astype(str))[0]
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    for group in np.split(case[order], bounds):
        root = find(int(group[0]))
        for c in group[1:]:
            r = find(int(c))
            if r != root:
                parent[max(r, root)] = min(r, root)
                root = min(r, root)
    return np.array([find(i) for i in range(n)], dtype=int)


def units_of(frame: pd.DataFrame) -> pd.Series:
    """Inference unit per case: connected groups of cases that share a batch in any run of
    ``frame`` (union-find over (run, batch)); case id -> unit label (the group's first case
    in frame order).

    ``frame``: rows with ``run_id``, ``batch`` and ``case_id`` (one per case and run)."""
    case_ids = frame["case_id"].astype(str).to_numpy(object)
    codes, cases = pd.factorize(case_ids)
    roots = _union_units(frame["run_id"].to_numpy(object), frame["batch"].to_numpy(object),
                         codes)
    return pd.Series(np.asarray(cases, dtype=object)[roots], index=list(cases), dtype=object)


def unit_labels(rows: pd.DataFrame) -> np.ndarray:
    """The unit (:func:`units_of` over ``rows``) of every row of ``rows``."""
    units = units_of(rows)
    return units.reindex(rows["case_id"].astype(str)).to_numpy(object)


def unit_words(units: Sequence[Any], sequential: bool, n_seeds: int = 1) -> str:
    """The unit in words with its count, e.g. ``batch (10 clusters; sequential runs)``."""
    labels = list(units)
    g = len(set(labels))
    seeds = ("" if n_seeds < 2 else
             f"; {n_seeds} seeds averaged per case, seed x unit two-way test too")
    if g == len(labels):
        where = "; sequential runs, every case scored on the final model" if sequential else ""
        return f"case ({g}; one edit per unit{where}{seeds})"
    mode = "sequential runs" if sequential else "batch mode, cases edited together"
    return f"batch ({g} clusters; {mode}{seeds})"


# ---------------------------------------------------------------- pairing
def _seed_runs(rows: pd.DataFrame) -> dict[Any, list[str]]:
    """seed -> run ids of ``rows`` (in seed order)."""
    ids = rows[["seed", "run_id"]].drop_duplicates()
    out: dict[Any, list[str]] = {}
    for seed, rid in sorted(zip(ids["seed"], ids["run_id"], strict=True),
                            key=lambda t: (pd.isna(t[0]), str(t[0]))):
        out.setdefault(seed, []).append(str(rid))
    return out


def seed_slots(rows_x: pd.DataFrame, rows_y: pd.DataFrame
               ) -> list[tuple[str, list[str], list[str]]]:
    """(label, runs of x, runs of y) per paired seed slot (module notes)."""
    sx, sy = _seed_runs(rows_x), _seed_runs(rows_y)
    common = [s for s in sx if pd.notna(s) and s in sy]
    if common:
        return [(f"s{s}", sx[s], sy[s]) for s in common]
    if len(sx) == len(sy) and all(pd.notna(s) for s in [*sx, *sy]):
        return [(f"s{a}~s{b}", sx[a], sy[b]) for a, b in zip(sx, sy, strict=True)]
    return [("all", [r for v in sx.values() for r in v], [r for v in sy.values() for r in v])]


@dataclass
class Paired:
    """Case-aligned values of two arms (module notes).

    ``frame``: indexed by case id, columns ``x``, ``y`` (means over the paired slots),
    ``unit``, ``batch``; ``by_slot``: x, y per (slot, case_id) with two or more slots, else
    None. ``n_failed``: cases with a failed edit in either arm (any paired run), counted in
    by intention to treat; ``n_unmeasured``: failed cases without a measured outcome (runs
    from before keh measured them), left out."""

    frame: pd.DataFrame
    slots: list[str]
    runs_x: list[str]
    runs_y: list[str]
    sequential: bool
    n_failed: int = 0
    n_unmeasured: int = 0
    by_slot: pd.DataFrame | None = None

    @property
    def units(self) -> np.ndarray:
        return self.frame["unit"].to_numpy(object)

    @property
    def n_units(self) -> int:
        return int(self.frame["unit"].nunique())

    def diff(self, scale: float = 1.0) -> np.ndarray:
        return scale * (self.frame["x"] - self.frame["y"]).to_numpy(float)

    def cells(self, which: str = "diff", scale: float = 1.0) -> np.ndarray | None:
        """The (slots, units) table of cell means of ``scale * (x - y)`` (``"diff"``) or
        ``scale * x`` (``"x"``) for the two-way test; None with fewer than two slots."""
        if self.by_slot is None or self.by_slot.empty:
            return None
        f = self.by_slot
        v = (f["x"] - f["y"]) if which == "diff" else f["x"]
        case = f.index.get_level_values("case_id")
        table = pd.DataFrame({"slot": f.index.get_level_values("slot"),
                              "unit": self.frame["unit"].reindex(case).to_numpy(object),
                              "v": scale * v.to_numpy(float)})
        out = table.groupby(["slot", "unit"])["v"].mean().unstack("unit")
        return out.to_numpy(float) if len(out) >= 2 else None

    def binary(self, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
        """(x, y) 0/1 outcomes per (slot, case) when both are 0/1 everywhere, else None;
        ``sign`` -1 swaps 0 and 1 (lower is better)."""
        f = self.by_slot if self.by_slot is not None else self.frame
        x, y = f["x"].to_numpy(float), f["y"].to_numpy(float)
        if x.size == 0 or not inf.is_binary(x, y):
            return None
        return (x, y) if sign > 0 else (1 - x, 1 - y)

    def unit_name(self) -> str:
        return unit_words(self.units, self.sequential, len(self.slots) if
                          self.by_slot is not None else 1)

    def itt_note(self) -> str:
        """What intention to treat did here, for a row's detail ('' without failures)."""
        if not self.n_failed:
            return ""
        note = f"{self.n_failed} cases with a failed edit, counted by intention to treat"
        if self.n_unmeasured:
            note += (f" ({self.n_unmeasured} without a measured outcome, from runs before "
                     f"keh measured failed cases: left out)")
        return note


def pair_rows(rows_x: pd.DataFrame, rows_y: pd.DataFrame, col_x: str,
              col_y: str | None = None, manifests: dict[str, dict] | None = None,
              names: tuple[str, str] = ("x", "y")) -> Paired:
    """Pair ``col_x`` of ``rows_x`` with ``col_y`` (default the same) of ``rows_y`` by seed
    slot and case (module notes). With ``manifests``, every paired run pair must be
    comparable case by case (:func:`reports.load.check_comparable`), else
    :class:`NotTestable`."""
    col_y = col_y or col_x
    for rows, col, name in ((rows_x, col_x, names[0]), (rows_y, col_y, names[1])):
        if rows.empty:
            raise NotTestable(f"missing runs {name}")
        if col not in rows.columns or rows[col].notna().sum() == 0:
            raise NotTestable(f"no {short(col)} in {name} runs")
    slots = seed_slots(rows_x, rows_y)
    if manifests is not None:
        for _, rx, ry in slots:
            for a in rx:
                for b in ry:
                    if a != b:
                        try:
                            check_comparable({a: manifests[a], b: manifests[b]})
                        except UserError as exc:
                            how = (":" if slots[0][0].startswith("s") and "~" not in
                                   slots[0][0] else " have no seed in common and")
                            raise NotTestable(f"{names[0]} and {names[1]}{how} {exc}") from None
    # numpy from here: case codes in rows_x's order, one column of per-slot means per side
    both = pd.concat([rows_x[["run_id", "case_id", "batch", "failed"]],
                      rows_y[["run_id", "case_id", "batch", "failed"]]], ignore_index=True)
    run = both["run_id"].astype(str).to_numpy(object)
    used = np.isin(run, [r for s in slots for r in s[1] + s[2]])
    codes, cases = pd.factorize(both["case_id"].astype(str).to_numpy(object))
    n_cases, nx = len(cases), len(rows_x)
    values = np.concatenate([rows_x[col_x].to_numpy(float), rows_y[col_y].to_numpy(float)])
    side = np.arange(len(both)) < nx

    def slot_means(runs_of_slot: list[str], on_x: bool) -> np.ndarray:
        keep = used & (side == on_x) & np.isin(run, runs_of_slot)
        total = np.bincount(codes[keep], weights=values[keep], minlength=n_cases)
        count = np.bincount(codes[keep], minlength=n_cases).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count  # NaN where a run lacks the case or the value

    xs = np.column_stack([slot_means(rx, True) for _, rx, _ in slots])
    ys = np.column_stack([slot_means(ry, False) for _, _, ry in slots])
    present = np.bincount(codes[used & side], minlength=n_cases) > 0
    failed = np.bincount(codes[used], weights=both["failed"].to_numpy(bool)[used],
                         minlength=n_cases) > 0
    ok = present & np.isfinite(xs).all(axis=1) & np.isfinite(ys).all(axis=1)
    roots = _union_units(run[used], both["batch"].to_numpy(object)[used], codes[used])
    unit = np.asarray(cases, dtype=object)[roots] if roots.size else np.array([], object)
    first_batch = pd.Series(both["batch"].to_numpy(object)[used]).groupby(
        codes[used]).first().reindex(range(n_cases)).to_numpy(object)
    idx = np.flatnonzero(ok)
    case_index = pd.Index(np.asarray(cases, dtype=object)[idx], name="case_id")
    frame = pd.DataFrame({"x": xs[idx].mean(axis=1), "y": ys[idx].mean(axis=1),
                          "unit": unit[idx], "batch": first_batch[idx]}, index=case_index)
    if frame.empty:
        raise NotTestable(f"no case with both {short(col_x)} of {names[0]} and "
                          f"{short(col_y)} of {names[1]}")
    by_slot = None
    if len(slots) >= 2:
        labels = [s[0] for s in slots]
        by_slot = pd.DataFrame(
            {"x": xs[idx].T.ravel(), "y": ys[idx].T.ravel()},
            index=pd.MultiIndex.from_product([labels, case_index], names=["slot", "case_id"]))
    seq_rows = pd.concat([rows_x["sequential"], rows_y["sequential"]]).to_numpy(bool)
    return Paired(frame, [s[0] for s in slots], sorted({r for s in slots for r in s[1]}),
                  sorted({r for s in slots for r in s[2]}), bool(seq_rows[:nx].any()),
                  int((failed & present).sum()), int((failed & present & ~ok).sum()),
                  by_slot)


def pair(runs: Runs, arm_x: str, arm_y: str, col_x: str, col_y: str | None = None) -> Paired:
    """:func:`pair_rows` of two arms of ``runs`` (memoised on ``runs``)."""
    key = ("pair", arm_x, arm_y, col_x, col_y)
    if key not in runs.cache:
        try:
            runs.cache[key] = pair_rows(runs.rows_of(arm_x), runs.rows_of(arm_y), col_x, col_y,
                                        runs.manifests, (arm_x, arm_y))
        except NotTestable as exc:
            runs.cache[key] = exc
    hit = runs.cache[key]
    if isinstance(hit, NotTestable):
        raise hit
    return hit


def short(column: str) -> str:
    return column.removeprefix("diag_")


# ---------------------------------------------------------------- means of one arm
def mean_ci(rows: pd.DataFrame, values: np.ndarray, confidence: float = 0.95,
            n_draws: int = 1999, seed: int = 0) -> inf.ClusterCI:
    """Mean of ``values`` (one per row of ``rows``, NaN allowed) with its wild cluster
    bootstrap-t interval over the units of ``rows``; with two or more seeds, the union with
    the two-way seed x unit interval."""
    units = unit_labels(rows)
    ci = inf.wild_cluster_ci(values, units, confidence, n_draws=n_draws, seed=seed)
    if "seed" not in rows.columns or rows["seed"].nunique() < 2:
        return ci
    table = pd.DataFrame({"seed": rows["seed"].to_numpy(), "unit": units, "v": values})
    cells = table.groupby(["seed", "unit"])["v"].mean().unstack("unit").to_numpy(float)
    tw = inf.seed_batch_t_test(cells, confidence=confidence)
    if not np.isfinite(tw.p):
        return ci
    return inf.ClusterCI(ci.value, float(np.nanmin([ci.lo, tw.lo])),
                         float(np.nanmax([ci.hi, tw.hi])), ci.n, ci.n_clusters, ci.se,
                         f"{ci.method}, joined with the {tw.method}")


# ---------------------------------------------------------------- location test
@dataclass
class LocationTest:
    """A paired (or one-sample) location test at the design's unit."""

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
                  cells: np.ndarray | None = None, ci_draws: int = 1999) -> LocationTest:
    """Cluster sign-flip test of mean(d) = mu0 with a wild cluster bootstrap-t interval and
    the MDE; for 0/1 pairs (``binary_pairs=(x, y)``, one per case) with the case as unit,
    the exact McNemar test (statsmodels), the sign-flip test's exact binomial form.

    With ``cells`` (the (seeds, units) table of cell means of d, two or more seeds) the two-way
    seed x unit t test (:func:`reports.inference.seed_batch_t_test`) runs too, and the result
    takes the larger p, the union of the two intervals and the larger MDE (valid when either
    test is: the randomisation test without run effects, the two-way test with them)."""
    d = np.asarray(d, dtype=float)
    ci = inf.wild_cluster_ci(d, units, confidence, n_draws=ci_draws, seed=seed,
                             alternative="greater" if alternative == "greater"
                             else "two-sided")
    flip = inf.sign_flip_test(d, units, mu0, alternative, n_draws, seed)
    g = flip.n_clusters
    exact = flip.method in ("exact", "degenerate")
    mde = inf.mde(flip.se, g, alpha, alternative=alternative,
                  exact_min_p=inf.min_p(g, alternative) if exact else None)
    if binary_pairs is not None and mu0 == 0 and alternative == "two-sided":
        x, y = (np.asarray(a, dtype=float) for a in binary_pairs)
        if len(set(map(str, units))) == x.size == d.size and inf.is_binary(x, y):
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


def paired_test(pr: Paired, alpha: float = ALPHA, seed: int = 0,
                n_draws: int = inf.DEFAULT_DRAWS, scale: float = 1.0,
                alternative: str = "two-sided", ci_draws: int = 1999) -> LocationTest:
    """:func:`location_test` of ``scale * (x - y)`` of a :class:`Paired` at its units, with
    its seed cells and (for 0/1 outcomes, one slot) McNemar's test."""
    x, y = pr.frame["x"].to_numpy(float), pr.frame["y"].to_numpy(float)
    pairs = (x, y) if pr.by_slot is None and scale > 0 else None
    return location_test(pr.diff(scale), pr.units, alpha, seed, n_draws,
                         alternative=alternative, binary_pairs=pairs,
                         cells=pr.cells(scale=scale), ci_draws=ci_draws)


# ---------------------------------------------------------------- margin tests (the gate)
@dataclass
class MarginTests:
    """The two one-sided tests of one metric's paired differences (higher is better)."""

    diff: float
    lo: float
    hi: float
    n_units: int
    p_worse: float
    p_noninferior: float
    se: float
    df: float
    note: str


def margin_tests(d: Any, units: Any, margin: float, alpha: float = ALPHA,
                 n_draws: int = 9999, seed: int = 0,
                 binary_pairs: tuple[Any, Any] | None = None,
                 cells: np.ndarray | None = None) -> MarginTests:
    """Worse (H1: mean(d) < -margin) and non-inferior (H1: mean(d) > -margin) tests.

    ``d``: (n,) paired differences candidate - baseline, oriented so that higher is better;
    ``units``: (n,) unit labels. The interval is the wild cluster bootstrap-t one at level
    1 - 2 ``alpha`` (the two one-sided tests' bounds).

    Each p is the larger of two tests (an intersection-union test: valid where either is):
    the cluster sign-flip test and, for 0/1 outcomes (``binary_pairs``: (candidate,
    baseline), one per case and seed), Tango's exact unconditional score test
    (:func:`reports.inference.paired_binary_margin_test`; alone when every unit is one case
    with one seed, where a sign-flip at a non-zero margin reads "no case differs" as "no
    variance"), else the cluster bootstrap-t test (skewed unit totals). With ``cells`` (two
    or more seeds) the two-way seed x unit t test joins both (larger p, union of intervals).
    ``se``/``df``: the standard error and degrees of freedom of the mean difference the
    MDE is computed from (CR1 over units, or the two-way one when it is larger)."""
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
    lo, hi = ci.lo, ci.hi
    se, df = ci.se, float(max(ci.n_clusters - 1, 0))
    if cells is not None:
        tw_worse = inf.seed_batch_t_test(cells, -margin, "less", 1 - alpha)
        if np.isfinite(tw_worse.p):
            tw_noninf = inf.seed_batch_t_test(cells, -margin, "greater", 1 - alpha)
            p_worse, p_noninf = max(p_worse, tw_worse.p), max(p_noninf, tw_noninf.p)
            lo = float(np.nanmin([lo, tw_noninf.lo]))
            hi = float(np.nanmax([hi, tw_worse.hi]))
            if not tw_worse.se <= se:
                se, df = tw_worse.se, tw_worse.df
            notes.append(f"joined with the {tw_worse.method} over {tw_worse.n_seeds} seeds "
                         f"(seeds add {100 * tw_worse.seed_share:.0f}% of its variance)")
    return MarginTests(worse.mean, lo, hi, worse.n_clusters, p_worse, p_noninf, se, df,
                       "; ".join(notes))
