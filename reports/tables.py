"""Tables: per-suite main table (mean and 95% CI per metric, the field's usual columns, and
``n_failed``), outcome table, diagnostics tables (one per family, :data:`DIAG_FAMILIES`, at
most :data:`MAX_DIAG_COLUMNS` diagnostics each), downstream table, pairwise comparisons;
each written as Markdown, LaTeX (booktabs) and CSV.

Columns follow ROME/MEMIT/AlphaEdit: CounterFact ``Eff`` (efficacy success), ``Gen``
(paraphrase success), ``Spe`` (neighbourhood success), ``Flu`` (generation n-gram entropy,
record field ``ngram_entropy``), ``Consis`` (TF-IDF similarity to reference texts, record field
``reference_score``; missing, shown as "–", where the data has no reference texts, never 0)
and ``Score`` (harmonic mean of Eff, Gen, Spe); zsRE ``Eff``, ``Gen``, ``Spe`` (token
accuracies). Like ROME's ``summarize.py`` every one is multiplied by 100. Failed edits count
as failures in Eff and Gen (intention to treat, :mod:`reports.load`).

Every row names its method with its preset (``alphaedit [faithful]``; ``[legacy]`` for runs
from before presets). CIs: wild cluster bootstrap-t (:func:`reports.inference.wild_cluster_ci`)
over the design's inference unit: the batch in sequential runs (however few; no fallback to
cases), the case with all its seeds in batch mode. The unit is named in every caption.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from reports import inference as inf
from reports.claims import interval_label as claims_label
from reports.load import Runs, diagnostic_columns
from reports.paired import NotTestable, mean_ci, pair, paired_test, unit_labels, units_of

#: suite -> [(label, column)]; values are scaled by SCALE for display and tests
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "counterfact": [("Eff", "efficacy_success"), ("Gen", "paraphrase_success"),
                    ("Spe", "neighborhood_success"), ("Flu", "ngram_entropy"),
                    ("Consis", "reference_score")],
    "zsre": [("Eff", "efficacy_accuracy"), ("Gen", "paraphrase_accuracy"),
             ("Spe", "specificity_accuracy")],
}
#: shown whenever the first column (generation on) is, even without data (missing, not 0)
TOGETHER = {"reference_score": "ngram_entropy"}
SCORE: dict[str, tuple[str, ...]] = {"counterfact": ("Eff", "Gen", "Spe")}
#: further outcomes shown in the outcome table
OUTCOMES: dict[str, list[tuple[str, str]]] = {
    "counterfact": [("Margin", "efficacy_margin"), ("EM", "efficacy_magnitude"),
                    ("PM", "paraphrase_magnitude"), ("NM", "neighborhood_magnitude"),
                    ("NS+", "neighborhood_plus_success"), ("NM+", "neighborhood_plus_magnitude"),
                    ("NKL", "neighborhood_kl"), ("NKL+", "neighborhood_plus_kl")],
    "zsre": [("Spe agree", "specificity_unedited_agreement")],
}
#: teacher-forced (TF) and generation-based (greedy answer: exact match, token F1) side by side
_TF = {"counterfact": ("efficacy_success", "paraphrase_success", "neighborhood_success"),
       "zsre": ("efficacy_accuracy", "paraphrase_accuracy", "specificity_accuracy")}
GENERATION: dict[str, list[tuple[str, str]]] = {
    suite: [cell for label, group, col in zip(("Eff", "Gen", "Spe"),
                                              ("efficacy", "paraphrase", "neighborhood"), tf,
                                              strict=True)
            for cell in ((f"{label} TF", col), (f"{label} EM", f"gen_{group}_em"),
                         (f"{label} F1", f"gen_{group}_f1"))]
    for suite, tf in _TF.items()}
UNSCALED = {"efficacy_margin", "neighborhood_kl", "neighborhood_plus_kl"}
#: diagnostics per table (beside method and runs): keeps every table readable
MAX_DIAG_COLUMNS = 8


def runs_word(n: int) -> str:
    """``"1 run"`` / ``"n runs"`` for captions, legends and labels."""
    return f"{n} run" if n == 1 else f"{n} runs"


def scale_of(column: str) -> float:
    """Display scale: x100 for rates, magnitudes, fluency and consistency (ROME's
    convention); 1 for the log-probability margin and the diagnostics."""
    return 1.0 if column in UNSCALED or column.startswith("diag_") else 100.0


#: columns that are proportions (displayed x100, so within [0, 100])
RATE_SUFFIXES = ("_success", "_accuracy", "_em", "_f1")


def clip_to_range(column: str, lo: float, hi: float) -> tuple[float, float]:
    """An interval cut to the column's range: [0, 100] for rates (a t interval can leave it),
    unchanged for magnitudes, margins, fluency and diagnostics (they can be negative)."""
    if column.endswith(RATE_SUFFIXES):
        return (max(lo, 0.0) if np.isfinite(lo) else lo,
                min(hi, 100.0) if np.isfinite(hi) else hi)
    return lo, hi


def columns_for(suite: str, frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The main table's (label, column) pairs present in ``frame`` (unknown suites: every
    ``*_success``/``*_accuracy`` column); ``Consis`` appears with ``Flu`` even when missing."""
    spec = COLUMNS.get(suite)
    if spec is None:
        spec = [(c, c) for c in frame.columns if c.endswith(("_success", "_accuracy"))]

    def has(col: str) -> bool:
        return col in frame.columns and bool(frame[col].notna().any())

    return [(label, col) for label, col in spec
            if has(col) or (col in TOGETHER and has(TOGETHER[col]))]


def resampling_unit(frame: pd.DataFrame) -> str:
    """The inference unit of every arm's means (:func:`reports.paired.units_of` over its
    runs), in words with the number of units: ``batches (10; sequential runs)``."""
    kinds: dict[str, set[int]] = {}
    for _, rows in frame.groupby(["arm", "preset"] if "preset" in frame else ["arm"],
                                 sort=False):
        units = units_of(rows)
        single = units.nunique() == units.size
        kind = (("cases (one edit per unit; sequential runs)" if rows["sequential"].any()
                 else "cases (one edit per unit)") if single else "batches (sequential runs)"
                if rows["sequential"].any() else "batches (batch mode, edited together)")
        kinds.setdefault(kind, set()).add(int(units.nunique()))
    return " and ".join(f"{k.split(' (')[0]} ({'/'.join(map(str, sorted(v)))}; "
                        f"{k.split(' (')[1]}" for k, v in kinds.items())


def arm_label(arm: str, preset: Any) -> str:
    """A method with its preset: ``alphaedit [tuned]``."""
    return f"{arm} [{preset}]"


def _hm(means: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return means.shape[0] / np.sum(1.0 / means, axis=0)


@dataclass
class Table:
    """A table as numbers (``raw``, for CSV) and as display strings (``display``); ``bold``:
    (row position, column name) cells set in bold in Markdown and LaTeX."""

    name: str
    caption: str
    raw: pd.DataFrame
    display: pd.DataFrame
    bold: frozenset[tuple[int, str]] = frozenset()


def _fmt(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}f}"


def fmt_ci(value: float, lo: float, hi: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def fmt_p(p: float) -> str:
    if p is None or (isinstance(p, float) and not np.isfinite(p)):
        return "–"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"


def _digits(column: str) -> int:
    return 1 if scale_of(column) == 100.0 else 3


def _arm_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label "arm [preset]", rows) per arm and preset, in frame order."""
    preset = frame["preset"] if "preset" in frame else pd.Series("legacy", index=frame.index)
    return [(arm_label(a, p), g) for (a, p), g in
            frame.assign(preset=preset).groupby(["arm", "preset"], sort=False)]


def _arm_summary(label: str, rows: pd.DataFrame, full: bool = True) -> dict[str, Any]:
    """The row head of an arm: method, runs (with ``full``: seeds and cases) and the failed
    edits (always: every table that reports an arm counts its failures)."""
    out: dict[str, Any] = {"method": label, "runs": rows["run_id"].nunique()}
    if full:
        seeds = sorted(rows["seed"].dropna().unique().tolist())
        out.update({"seeds": ",".join(str(int(s)) for s in seeds),
                    "cases": rows["case_id"].nunique()})
    out["n_failed"] = int(rows["failed"].astype(bool).sum())
    return out


def _ci_cells(rows: pd.DataFrame, spec: Sequence[tuple[str, str]], n_resamples: int,
              seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and 95% interval of each column of ``spec`` over the arm's units
    (:func:`reports.paired.mean_ci`); raw numbers and display strings."""
    raw, disp = {}, {}
    for label, col in spec:
        if col not in rows.columns:
            values = np.full(len(rows), np.nan)
        else:
            values = rows[col].to_numpy(float) * scale_of(col)
        ci = mean_ci(rows, values, n_draws=n_resamples, seed=seed)
        lo, hi = clip_to_range(col, ci.lo, ci.hi)
        raw.update({label: ci.value, f"{label}_lo": lo, f"{label}_hi": hi})
        disp[label] = fmt_ci(ci.value, lo, hi, _digits(col))
    return raw, disp


def main_table(runs: Runs, n_resamples: int = 2000, seed: int = 0) -> Table | None:
    """Per arm and preset: mean and 95% CI of each usual column (x100), Score for
    CounterFact, and the number of failed edits."""
    frame = runs.frame
    suite, model = str(frame["suite"].iloc[0]), str(frame["model"].iloc[0])
    spec = columns_for(suite, frame)
    if not spec:
        return None
    raw_rows, disp_rows = [], []
    for label, rows in _arm_groups(frame):
        raw, disp = _arm_summary(label, rows), _arm_summary(label, rows)
        r, d = _ci_cells(rows, spec, n_resamples, seed)
        raw.update(r)
        disp.update(d)
        parts = [c for lab, c in spec if lab in SCORE.get(suite, ())]
        if len(parts) == len(SCORE.get(suite, ())) and parts:
            cols = rows[parts].to_numpy(float) * 100.0
            ci = inf.cluster_bootstrap_ci(cols, _hm, unit_labels(rows), n_draws=n_resamples,
                                          seed=seed)
            raw.update({"Score": ci.value, "Score_lo": ci.lo, "Score_hi": ci.hi})
            disp["Score"] = fmt_ci(ci.value, ci.lo, ci.hi, 1)
        raw_rows.append(raw)
        disp_rows.append(disp)
    labels = ", ".join(f"{lab} = {col}" for lab, col in spec)
    n_failed = int(frame["failed"].astype(bool).sum())
    caption = (f"{suite} / {model}: mean over cases and seeds (x100; {labels}"
               + ("; Score = harmonic mean of Eff, Gen, Spe, CI by a cluster bootstrap with "
                  f">= {inf.MIN_CLUSTERS} units" if suite in SCORE else "")
               + f") with 95% wild cluster bootstrap-t CI; inference unit: "
               f"{resampling_unit(frame)}. Failed edits count as failures in Eff and Gen "
               f"(intention to treat): n_failed = {n_failed}"
               + (" (see the flagged runs)" if n_failed else "")
               + "; '–': not recorded (Consis needs reference texts).")
    return Table(f"main_{slug(suite)}_{slug(model)}", caption, pd.DataFrame(raw_rows),
                 pd.DataFrame(disp_rows))


def _spec_rows(frame: pd.DataFrame, spec: Sequence[tuple[str, str]], n_resamples: int,
               seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw and display rows per arm and preset: mean and 95% CI of each column of ``spec``."""
    raw_rows, disp_rows = [], []
    for label, rows in _arm_groups(frame):
        raw, disp = _arm_summary(label, rows, False), _arm_summary(label, rows, False)
        r, d = _ci_cells(rows, spec, n_resamples, seed)
        raw.update(r)
        disp.update(d)
        raw_rows.append(raw)
        disp_rows.append(disp)
    return raw_rows, disp_rows


def _present(frame: pd.DataFrame, spec: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(lab, c) for lab, c in spec if c in frame.columns and frame[c].notna().any()]


def outcome_table(runs: Runs, n_resamples: int = 2000, seed: int = 0) -> Table | None:
    """Per arm and preset: further outcomes (margin, magnitudes, CounterFact+ NS+ and NKL)."""
    frame = runs.frame
    suite, model = str(frame["suite"].iloc[0]), str(frame["model"].iloc[0])
    spec = _present(frame, OUTCOMES.get(suite, []))
    if not spec:
        return None
    raw_rows, disp_rows = _spec_rows(frame, spec, n_resamples, seed)
    caption = (f"{suite} / {model}: further outcomes ("
               + ", ".join(f"{lab} = {c}" for lab, c in spec)
               + "; rates and magnitudes x100, margin in log-prob units, NKL = KL(edited || "
               "unedited) of the next token after the neighbourhood prompts in nats, + = "
               "CounterFact+: the edit statement prepended), mean with 95% wild cluster "
               f"bootstrap-t CI over {resampling_unit(frame)}; failed edits (n_failed) keep the "
               f"outcomes measured on the model they left (intention to treat).")
    return Table(f"outcomes_{slug(suite)}_{slug(model)}", caption, pd.DataFrame(raw_rows),
                 pd.DataFrame(disp_rows))


def generation_table(runs: Runs, n_resamples: int = 2000, seed: int = 0) -> Table | None:
    """Per arm and preset: each of Eff/Gen/Spe teacher-forced (TF) beside the greedy answer's
    exact match (EM) and token F1 (:mod:`suites.answers`); None when no run generated."""
    frame = runs.frame
    suite, model = str(frame["suite"].iloc[0]), str(frame["model"].iloc[0])
    spec = _present(frame, GENERATION.get(suite, []))
    if not any(c.startswith("gen_") for _, c in spec):
        return None
    raw_rows, disp_rows = _spec_rows(frame, spec, n_resamples, seed)
    caption = (f"{suite} / {model}: teacher-forced (TF) against generation-based success "
               "(greedy answer of at most the run's answer_tokens new tokens, cut at the first "
               "line or sentence end; EM = SQuAD-normalised exact match, F1 = token F1 against "
               "target_new for Eff/Gen and the true answer for Spe), x100, mean with 95% wild "
               f"cluster bootstrap-t CI over {resampling_unit(frame)}; failed edits (n_failed) "
               "count as failures in Eff and Gen.")
    return Table(f"generation_{slug(suite)}_{slug(model)}", caption, pd.DataFrame(raw_rows),
                 pd.DataFrame(disp_rows))


#: diagnostics tables by family, in the report's order: (slug, title, predicate on the column
#: name without "diag_"); a column goes to the first family that takes it ("other" takes the rest)
DIAG_FAMILIES: tuple[tuple[str, str, Callable[[str], bool]], ...] = (
    ("target", "target step",
     lambda c: c in {"key_norm", "z0_norm", "residual_norm", "delta_norm", "delta_clamped",
                     "target_nll_init", "target_nll_final", "target_steps"}),
    ("write", "write (realisation)",
     lambda c: c in {"rho", "z_error", "phi", "update_norm", "written", "rescale"}),
    ("upper", "MetaKE's upper level",
     lambda c: c.split("_open_loop")[0] in {"alignment", "kernel_energy"}
     or c.startswith(("proxy_", "rho_pred", "shift_"))),
    ("boundary", "BLUE's first boundary layer (layerN_*)",
     lambda c: c.startswith("layer") and "_" in c and c.split("_")[0][5:].isdigit()),
    ("solver", "solver-specific (per layer .N)", lambda c: c.startswith(("prune_", "rect_"))),
    ("other", "other", lambda c: True),
)


def diagnostics_tables(runs: Runs, n_resamples: int = 2000, seed: int = 0) -> list[Table]:
    """Per arm and preset: the mean of every per-edit diagnostic, one table per family
    (:data:`DIAG_FAMILIES`, in its order; a family wider than :data:`MAX_DIAG_COLUMNS` is
    split in parts), each with only the arms that recorded one of its diagnostics."""
    frame = runs.frame
    suite, model = str(frame["suite"].iloc[0]), str(frame["model"].iloc[0])
    family_of = {c: next(f for f, _, takes in DIAG_FAMILIES if takes(c.removeprefix("diag_")))
                 for c in diagnostic_columns(frame)}
    families: list[tuple[str, str, list[str]]] = []
    for fam, title, _ in DIAG_FAMILIES:
        mine = [c for c, f in family_of.items() if f == fam]
        wide = len(mine) > MAX_DIAG_COLUMNS
        families += [(fam + (f"_{k // MAX_DIAG_COLUMNS + 1}" if wide else ""), title,
                      mine[k:k + MAX_DIAG_COLUMNS]) for k in range(0, len(mine), MAX_DIAG_COLUMNS)]
    out = []
    for fam_slug, title, chunk in families:
        spec = [(c.removeprefix("diag_"), c) for c in chunk]
        raw_rows, disp_rows = [], []
        for label, rows in _arm_groups(frame):
            if not rows[chunk].notna().any().any():
                continue
            raw, disp = _arm_summary(label, rows, False), _arm_summary(label, rows, False)
            r, d = _ci_cells(rows, spec, n_resamples, seed)
            raw.update(r)
            disp.update(d)
            raw_rows.append(raw)
            disp_rows.append(disp)
        caption = (f"{suite} / {model}: per-edit diagnostics, {title}; mean with 95% wild "
                   f"cluster bootstrap-t CI over {resampling_unit(frame)}; only the methods "
                   f"that record them; '–': not recorded by that method.")
        name = f"diagnostics_{slug(suite)}_{slug(model)}_{fam_slug}"
        out.append(Table(name, caption, pd.DataFrame(raw_rows), pd.DataFrame(disp_rows)))
    return out


def _edits_label(rows: pd.DataFrame, runs: Runs) -> int:
    """Edits the evaluated model holds at a checkpoint (batch mode: one batch)."""
    if "edits_in_model" in rows and rows["edits_in_model"].notna().all():
        return int(rows["edits_in_model"].iloc[0])
    n_edits = int(rows["n_edits"].iloc[0])
    m = runs.manifests.get(str(rows["run_id"].iloc[0])) or {}
    cfg = m.get("config") or {}
    if not cfg.get("sequential", True) and n_edits > 0 and cfg.get("batch_size"):
        return min(n_edits, int(cfg["batch_size"]))
    return n_edits


def downstream_table(runs: Runs) -> Table | None:
    """Downstream accuracy at the first and last checkpoint of each arm (curve.jsonl): the
    mean accuracy over runs with a Wilson (1927) interval on the examples of one run (the
    same examples in every run; identical unedited scores are not pooled as if new data)."""
    c = runs.curves
    if c.empty or not (c["kind"] == "downstream").any():
        return None
    c = c[c["kind"] == "downstream"].dropna(subset=["value"])
    presets = {rid: (runs.frame.loc[runs.frame["run_id"] == rid, "preset"].iloc[0]
                     if "preset" in runs.frame else "legacy") for rid in c["run_id"].unique()}
    c = c.assign(label=[arm_label(a, presets[r]) for a, r in zip(c["arm"], c["run_id"],
                                                                  strict=True)])
    suite, model = str(runs.frame["suite"].iloc[0]), str(runs.frame["model"].iloc[0])
    raw_rows, disp_rows = [], []
    for (label, task), g in c.groupby(["label", "name"], sort=False):
        for where, n_edits in (("first", g["n_edits"].min()), ("last", g["n_edits"].max())):
            if where == "last" and n_edits == g["n_edits"].min():
                continue
            pts = g[g["n_edits"] == n_edits]
            acc, lo, hi, n = pooled_accuracy(pts)
            edits = _edits_label(pts, runs)
            n_failed = int(runs.frame.loc[runs.frame["run_id"].isin(pts["run_id"]),
                                          "failed"].astype(bool).sum())
            raw_rows.append({"method": label, "task": task, "n_edits": n_edits,
                             "edits_in_model": edits, "runs": pts["run_id"].nunique(),
                             "n_failed": n_failed, "n": n, "acc": acc, "lo": lo, "hi": hi})
            disp_rows.append({"method": label, "task": task, "edits in model": edits,
                              "runs": pts["run_id"].nunique(), "n_failed": n_failed,
                              "examples": n,
                              "acc (%)": fmt_ci(100 * acc, 100 * lo, 100 * hi, 1)})
    caption = (f"{suite} / {model}: downstream accuracy at the first and last checkpoint; "
               f"'edits in model': the edits the evaluated model holds (batch mode: one "
               f"batch). Mean over runs; 95% Wilson interval on the examples of one run.")
    return Table(f"downstream_{slug(suite)}_{slug(model)}", caption, pd.DataFrame(raw_rows),
                 pd.DataFrame(disp_rows))


def pooled_accuracy(points: pd.DataFrame) -> tuple[float, float, float, int]:
    """(mean accuracy over runs, Wilson lo, hi, n examples of one run): the runs evaluate the
    same examples, so their counts are not added up; without n, the mean and no interval."""
    n = pd.to_numeric(points["n"], errors="coerce")
    acc = points["value"].astype(float)
    mean = float(acc.mean())
    if n.notna().all() and n.min() > 0:
        total = int(n.min())
        k = round(mean * total)
        ci = sps.binomtest(k, total).proportion_ci(confidence_level=0.95, method="wilson")
        return mean, float(ci.low), float(ci.high), total
    return mean, math.nan, math.nan, 0


def pairwise_metrics(runs: Runs) -> list[tuple[str, str]]:
    """(label, column) compared pairwise: the main columns, the margin, rho and z-error."""
    suite = str(runs.frame["suite"].iloc[0])
    spec = [(lab, c) for lab, c in columns_for(suite, runs.frame)
            if runs.frame[c].notna().any()]
    extra = [("Margin", "efficacy_margin"), ("rho", "diag_rho"), ("z_error", "diag_z_error")]
    return spec + [(lab, c) for lab, c in extra
                   if c in runs.frame.columns and runs.frame[c].notna().any()]


def pairwise_rows(runs: Runs, baseline: str, n_resamples: int = 1000,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Every arm against ``baseline`` (all pairs when the baseline is absent), per metric
    and preset (arms of different presets are not compared): mean paired difference with a
    cluster sign-flip test (exact McNemar for 0/1 outcomes with the case as unit) and a wild
    cluster bootstrap-t CI; values in table units. Not Holm-adjusted here."""
    out = []
    presets = runs.presets() if "preset" in runs.frame else [("legacy", runs)]
    for preset, sub in presets:
        suite, model = str(sub.frame["suite"].iloc[0]), str(sub.frame["model"].iloc[0])
        arms = list(dict.fromkeys(sub.frame["arm"]))
        if baseline in arms:
            pairs = [(a, baseline) for a in arms if a != baseline]
        else:
            pairs = [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]
        for a, b in pairs:
            for label, col in pairwise_metrics(sub):
                base = {"suite": suite, "model": model, "preset": preset, "method": a,
                        "vs": b, "metric": label}
                try:
                    pr = pair(sub, a, b, col)
                except NotTestable as exc:
                    out.append({**base, "note": f"not testable: {exc}"})
                    continue
                x, y = pr.frame["x"].to_numpy(float), pr.frame["y"].to_numpy(float)
                res = paired_test(pr, seed=seed)
                k = scale_of(col)
                out.append({**base, "n": res.n, "unit": pr.unit_name(), "test": res.test,
                            "mean_method": k * float(np.mean(x)),
                            "mean_vs": k * float(np.mean(y)), "effect": k * res.mean,
                            "ci_lo": k * res.lo, "ci_hi": k * res.hi, "mde": k * res.mde,
                            "p": res.p, "seeds": ",".join(pr.slots),
                            "note": pr.itt_note()})
    return out


def pairwise_table(rows: list[dict[str, Any]], baseline: str, alpha: float = 0.05) -> Table:
    """Holm-adjust (one family: this table) and format the pairwise rows."""
    raw = pd.DataFrame(rows)
    if raw.empty:
        return Table("pairwise", "No pairwise comparison (a single method per group).", raw,
                     raw)
    for c in ("n", "unit", "test", "mean_method", "mean_vs", "effect", "ci_lo", "ci_hi",
              "mde", "p", "seeds"):
        if c not in raw.columns:
            raw[c] = np.nan
    raw["p"] = pd.to_numeric(raw["p"], errors="coerce").astype(float)
    raw["p_holm"] = inf.holm(raw["p"].to_numpy())
    disp = pd.DataFrame({
        "suite / model": raw["suite"] + " / " + raw["model"],
        "method": [arm_label(m, p) for m, p in zip(raw["method"], raw["preset"], strict=True)],
        "vs": raw["vs"], "metric": raw["metric"],
        "unit (n)": [f"{u} (n={int(n)})" if pd.notna(n) else "–"
                     for u, n in zip(raw["unit"], raw["n"], strict=True)],
        "means": [f"{_sig(a)} vs {_sig(b)}" if pd.notna(a) else "–"
                  for a, b in zip(raw["mean_method"], raw["mean_vs"], strict=True)],
        "difference [95% CI]": [
            f"{_sig(e)} [{_sig(lo)}, {_sig(hi)}]" if pd.notna(e) else "–"
            for e, lo, hi in zip(raw["effect"], raw["ci_lo"], raw["ci_hi"], strict=True)],
        "MDE": raw["mde"].map(_sig),
        "p": raw["p"].map(fmt_p), "p (Holm)": raw["p_holm"].map(fmt_p),
        "note": [f"{t}; seeds {s}; {n}".strip("; ") if isinstance(t, str) else n
                 for t, s, n in zip(raw["test"], raw["seeds"], raw["note"].fillna(""),
                                    strict=True)],
    })
    caption = (f"Paired comparisons (by case, seeds averaged per case, within a preset) "
               f"against {baseline} (all pairs where it is absent). Difference: mean of "
               f"method - vs in table units (x100 for rates) with a 95% wild cluster "
               f"bootstrap-t CI; p: cluster sign-flip randomisation test at the stated unit "
               f"(exact McNemar for 0/1 outcomes with the case as unit), two-sided, "
               f"Holm-adjusted over this table (alpha {alpha}); MDE: smallest difference "
               f"detectable with 80% power at alpha (unadjusted).")
    return Table("pairwise", caption, raw, disp)


def _sig(v: Any) -> str:
    """Three significant digits (small differences stay visible); '–' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    v = float(v)
    return ("∞" if v > 0 else "-∞") if math.isinf(v) else f"{v:.3g}"


def _fmt_mde(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return "∞ (cannot reach alpha)" if math.isinf(float(v)) else f"{float(v):.3g}"


def claims_tables(detail: pd.DataFrame, summary: pd.DataFrame) -> tuple[Table, Table]:
    """Display tables of the claim verdicts (summary) and of every sub-test."""
    sdisp = summary.copy()
    if detail.empty:
        return (Table("claims_summary", "Claims", summary, sdisp),
                Table("claims", "Claim tests", detail, detail))
    preset = detail["preset"] if "preset" in detail else pd.Series("legacy", index=detail.index)
    ddisp = pd.DataFrame({
        "claim": detail["claim"],
        "suite / model [preset]": detail["suite"] + " / " + detail["model"] + " ["
        + preset.astype(str) + "]",
        "test": detail["test"], "statistic": detail["statistic"],
        "value [interval]": [f"{fmt_ci(v, lo, hi, 3)} ({claims_label(c, t)})" if
                             np.isfinite(lo) or np.isfinite(hi) else fmt_ci(v, lo, hi, 3)
                             for v, lo, hi, c, t in
                             zip(detail["value"], detail["ci_lo"].astype(float),
                                 detail["ci_hi"].astype(float), detail["claim"],
                                 detail["test"], strict=True)],
        "unit (n)": [f"{u} (n={int(n)})" if isinstance(u, str) and u else "–"
                     for u, n in zip(detail["unit"].fillna(""), detail["n"].fillna(0),
                                     strict=True)],
        "MDE (80%)": detail["mde"].map(_fmt_mde),
        "p": detail["p"].map(fmt_p), "p (Holm)": detail["p_holm"].map(fmt_p),
        "verdict": detail["verdict"],
        "detail": detail["detail"].fillna(""),
    })
    return (Table("claims_summary", "Verdicts of the claims of docs/METAKE.md (T1-T8), per "
                  "suite, model and preset; each claim with what would falsify it.",
                  summary, sdisp),
            Table("claims", "Every sub-test of T1-T8 with its inference unit, the smallest "
                  "effect it detects with 80% power at alpha 0.05 (MDE, in the statistic's "
                  "units; a 'not supported' with a large MDE is underpowered, not evidence "
                  "against the claim) and Holm-adjusted p-values (one family over all tests, "
                  "models, suites and presets).", detail, ddisp))


# ---------------------------------------------------------------- writers
def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text)).strip("-") or "x"


def to_markdown(display: pd.DataFrame, bold: frozenset[tuple[int, str]] = frozenset()) -> str:
    """A GitHub-flavoured Markdown table (pipes escaped); ``bold`` cells in ``**``."""
    if display.empty:
        return "_(empty)_\n"
    cols = [str(c) for c in display.columns]

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    def body(i: int, c: str, v: Any) -> str:
        return f"**{cell(v)}**" if (i, c) in bold else cell(v)

    lines = ["| " + " | ".join(map(cell, cols)) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(body(i, c, v) for c, v in zip(cols, row, strict=True)) + " |"
              for i, row in enumerate(display.itertuples(index=False))]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "<": r"$<$", ">": r"$>$", "–": "--", "∞": r"$\infty$",
        "≈": r"$\approx$", "≥": r"$\geq$", "≤": r"$\leq$", "ρ": r"$\rho$", "φ": r"$\phi$"}


def tex_escape(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(display: pd.DataFrame, caption: str, label: str,
             bold: frozenset[tuple[int, str]] = frozenset()) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``); ``bold`` cells in ``\\textbf``."""
    cols = [str(c) for c in display.columns]

    def numeric(values: pd.Series) -> bool:
        return all(str(v)[:1] in "0123456789-–<∞" for v in values if str(v))

    align = "".join("r" if len(display) and numeric(display[c]) else "l"
                    for c in display.columns)
    lines = [r"\begin{table}[t]", r"\centering\small",
             rf"\caption{{{tex_escape(caption)}}}", rf"\label{{tab:{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    def body(i: int, c: str, v: Any) -> str:
        return rf"\textbf{{{tex_escape(v)}}}" if (i, c) in bold else tex_escape(v)

    lines += [" & ".join(body(i, c, v) for c, v in zip(cols, row, strict=True)) + r" \\"
              for i, row in enumerate(display.itertuples(index=False))]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: Table, directory: Path) -> dict[str, Path]:
    """``<name>.md``, ``<name>.tex`` and ``<name>.csv`` (numbers) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {ext: directory / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")}
    paths["md"].write_text(f"{table.caption}\n\n{to_markdown(table.display, table.bold)}",
                           encoding="utf-8")
    paths["tex"].write_text(to_latex(table.display, table.caption, table.name, table.bold),
                            encoding="utf-8")
    table.raw.to_csv(paths["csv"], index=False)
    return paths


def write_tables(tables: Sequence[Table], directory: Path) -> list[dict[str, Path]]:
    return [write_table(t, directory) for t in tables]
