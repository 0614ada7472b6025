"""Tables: per-suite main table (mean and 95% bootstrap CI per metric, the field's usual
columns), outcome/diagnostic table, downstream table, pairwise comparisons; each written as
Markdown, LaTeX (booktabs) and CSV.

Columns follow ROME/MEMIT/AlphaEdit: CounterFact ``Eff`` (efficacy success), ``Gen``
(paraphrase success), ``Spe`` (neighbourhood success), ``Flu`` (generation n-gram entropy),
``Consis`` (reference TF-IDF similarity) and ``Score`` (harmonic mean of Eff, Gen, Spe);
zsRE ``Eff``, ``Gen``, ``Spe`` (token accuracies). Like ROME's ``summarize.py`` every one is
multiplied by 100. CIs: bootstrap of the mean over cases and seeds (BCa, seeded), resampling
whole batches in sequential runs (if at least ``stats.MIN_CLUSTERS``) and whole cases (all
their seeds) otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from reports import stats
from reports.claims import NotTestable, pair
from reports.load import Runs, diagnostic_columns

#: suite -> [(label, column)]; values are scaled by SCALE for display and tests
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "counterfact": [("Eff", "efficacy_success"), ("Gen", "paraphrase_success"),
                    ("Spe", "neighborhood_success"), ("Flu", "fluency"),
                    ("Consis", "consistency")],
    "zsre": [("Eff", "efficacy_accuracy"), ("Gen", "paraphrase_accuracy"),
             ("Spe", "specificity_accuracy")],
}
SCORE: dict[str, tuple[str, ...]] = {"counterfact": ("Eff", "Gen", "Spe")}
#: further outcomes shown in the outcome table (beside the diagnostics)
OUTCOMES: dict[str, list[tuple[str, str]]] = {
    "counterfact": [("Margin", "efficacy_margin"), ("EM", "efficacy_magnitude"),
                    ("PM", "paraphrase_magnitude"), ("NM", "neighborhood_magnitude")],
    "zsre": [("Spe agree", "specificity_unedited_agreement")],
}
UNSCALED = {"efficacy_margin"}


def scale_of(column: str) -> float:
    """Display scale: x100 for rates, magnitudes, fluency and consistency (ROME's
    convention); 1 for the log-probability margin and the diagnostics."""
    return 1.0 if column in UNSCALED or column.startswith("diag_") else 100.0


def columns_for(suite: str, frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The main table's (label, column) pairs present in ``frame`` (unknown suites: every
    ``*_success``/``*_accuracy`` column)."""
    spec = COLUMNS.get(suite)
    if spec is None:
        spec = [(c, c) for c in frame.columns if c.endswith(("_success", "_accuracy"))]
    return [(label, col) for label, col in spec
            if col in frame.columns and frame[col].notna().any()]


def cluster_labels(rows: pd.DataFrame) -> np.ndarray:
    """Resampling units: the batch in sequential runs (the same cases in every seed) when
    there are at least ``stats.MIN_CLUSTERS`` batches, else the case with all its seeds."""
    case = "c:" + rows["case_id"].astype(str).to_numpy(object)
    seq = rows["sequential"].to_numpy(bool)
    if not seq.any() or rows.loc[seq, "batch"].nunique() < stats.MIN_CLUSTERS:
        return case
    batch = "b:" + rows["batch"].astype(str).to_numpy(object)
    return np.where(seq, batch, case)


def resampling_unit(frame: pd.DataFrame) -> str:
    """'batches' or 'cases': what the bootstrap of :func:`cluster_labels` resamples."""
    labels = cluster_labels(frame)
    return "batches" if any(str(x).startswith("b:") for x in labels) else "cases"


def _hm(means: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return means.shape[0] / np.sum(1.0 / means, axis=0)


@dataclass
class Table:
    """A table as numbers (``raw``, for CSV) and as display strings (``display``)."""

    name: str
    caption: str
    raw: pd.DataFrame
    display: pd.DataFrame


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


def _arm_summary(rows: pd.DataFrame) -> dict[str, Any]:
    seeds = sorted(rows["seed"].dropna().unique().tolist())
    return {"method": rows["arm"].iloc[0], "runs": rows["run_id"].nunique(),
            "seeds": ",".join(str(int(s)) for s in seeds), "cases": rows["case_id"].nunique()}


def main_table(runs: Runs, n_resamples: int = 2000, seed: int = 0) -> Table | None:
    """Per arm: mean and 95% CI of each usual column (x100), plus Score for CounterFact."""
    frame = runs.frame
    suite, model = str(frame["suite"].iloc[0]), str(frame["model"].iloc[0])
    spec = columns_for(suite, frame)
    if not spec:
        return None
    raw_rows, disp_rows = [], []
    for _arm, rows in frame.groupby("arm", sort=False):
        raw, disp = _arm_summary(rows), _arm_summary(rows)
        groups = cluster_labels(rows)
        for label, col in spec:
            ci = stats.bootstrap_mean_ci(rows[col] * scale_of(col), groups,
                                         n_resamples=n_resamples, seed=seed)
            raw.update({label: ci.value, f"{label}_lo": ci.lo, f"{label}_hi": ci.hi})
            disp[label] = fmt_ci(ci.value, ci.lo, ci.hi, _digits(col))
        parts = [c for lab, c in spec if lab in SCORE.get(suite, ())]
        if len(parts) == len(SCORE.get(suite, ())) and parts:
            cols = rows[parts].to_numpy(float) * 100.0
            ci = stats.cluster_bootstrap(cols, _hm, groups, n_resamples=n_resamples,
                                         seed=seed)
            raw.update({"Score": ci.value, "Score_lo": ci.lo, "Score_hi": ci.hi})
            disp["Score"] = fmt_ci(ci.value, ci.lo, ci.hi, 1)
        raw_rows.append(raw)
        disp_rows.append(disp)
    labels = ", ".join(f"{lab} = {col}" for lab, col in spec)
    caption = (f"{suite} / {model}: mean over cases and seeds with 95% bootstrap CI over "
               f"{resampling_unit(frame)} (x100; "
               f"{labels}" + ("; Score = harmonic mean of Eff, Gen, Spe" if suite in SCORE
                              else "") + ").")
    return Table(f"main_{slug(suite)}_{slug(model)}", caption, pd.DataFrame(raw_rows),
                 pd.DataFrame(disp_rows))


def outcome_table(runs: Runs, n_resamples: int = 2000, seed: int = 0) -> Table | None:
    """Per arm: further outcomes (margin, magnitudes) and the mean of every diagnostic."""
    frame = runs.frame
    suite, model = str(frame["suite"].iloc[0]), str(frame["model"].iloc[0])
    spec = [(lab, c) for lab, c in OUTCOMES.get(suite, [])
            if c in frame.columns and frame[c].notna().any()]
    spec += [(c.removeprefix("diag_"), c) for c in diagnostic_columns(frame)]
    if not spec:
        return None
    raw_rows, disp_rows = [], []
    for _arm, rows in frame.groupby("arm", sort=False):
        raw, disp = _arm_summary(rows), _arm_summary(rows)
        groups = cluster_labels(rows)
        for label, col in spec:
            ci = stats.bootstrap_mean_ci(rows[col] * scale_of(col), groups,
                                         n_resamples=n_resamples, seed=seed)
            raw.update({label: ci.value, f"{label}_lo": ci.lo, f"{label}_hi": ci.hi})
            disp[label] = fmt_ci(ci.value, ci.lo, ci.hi, _digits(col))
        raw_rows.append(raw)
        disp_rows.append(disp)
    caption = (f"{suite} / {model}: further outcomes (magnitudes x100, margin in log-prob "
               f"units) and per-edit diagnostics, mean with 95% bootstrap CI; '–': not "
               f"recorded by that method.")
    return Table(f"outcomes_{slug(suite)}_{slug(model)}", caption, pd.DataFrame(raw_rows),
                 pd.DataFrame(disp_rows))


def downstream_table(runs: Runs) -> Table | None:
    """Downstream accuracy at the first and last checkpoint of each arm (curve.jsonl):
    accuracy pooled over runs with a Wilson (1927) score interval (scipy ``binomtest``)."""
    c = runs.curves
    if c.empty or not (c["kind"] == "downstream").any():
        return None
    c = c[c["kind"] == "downstream"].dropna(subset=["value"])
    suite, model = str(runs.frame["suite"].iloc[0]), str(runs.frame["model"].iloc[0])
    raw_rows, disp_rows = [], []
    for (arm, task), g in c.groupby(["arm", "name"], sort=False):
        for where, n_edits in (("first", g["n_edits"].min()), ("last", g["n_edits"].max())):
            if where == "last" and n_edits == g["n_edits"].min():
                continue
            pts = g[g["n_edits"] == n_edits]
            acc, lo, hi, n = pooled_accuracy(pts)
            raw_rows.append({"method": arm, "task": task, "n_edits": n_edits,
                             "runs": pts["run_id"].nunique(), "n": n, "acc": acc, "lo": lo,
                             "hi": hi})
            disp_rows.append({"method": arm, "task": task, "edits": int(n_edits),
                              "runs": pts["run_id"].nunique(),
                              "acc (%)": fmt_ci(100 * acc, 100 * lo, 100 * hi, 1)})
    caption = (f"{suite} / {model}: downstream accuracy before/after the sequence of edits "
               f"(first and last checkpoint), pooled over runs, 95% Wilson interval.")
    return Table(f"downstream_{slug(suite)}_{slug(model)}", caption, pd.DataFrame(raw_rows),
                 pd.DataFrame(disp_rows))


def pooled_accuracy(points: pd.DataFrame) -> tuple[float, float, float, int]:
    """(accuracy, Wilson lo, hi, n) pooling checkpoints' acc x n; without n, the mean acc."""
    n = pd.to_numeric(points["n"], errors="coerce")
    acc = points["value"].astype(float)
    if n.notna().all() and n.sum() > 0:
        k = round(float((acc * n).sum()))
        total = int(n.sum())
        ci = sps.binomtest(k, total).proportion_ci(confidence_level=0.95, method="wilson")
        return k / total, float(ci.low), float(ci.high), total
    return float(acc.mean()), math.nan, math.nan, 0


def pairwise_metrics(runs: Runs) -> list[tuple[str, str]]:
    """(label, column) compared pairwise: the main columns, the margin, rho and z-error."""
    suite = str(runs.frame["suite"].iloc[0])
    spec = columns_for(suite, runs.frame)
    extra = [("Margin", "efficacy_margin"), ("rho", "diag_rho"), ("z_error", "diag_z_error")]
    return spec + [(lab, c) for lab, c in extra
                   if c in runs.frame.columns and runs.frame[c].notna().any()]


def pairwise_rows(runs: Runs, baseline: str, n_resamples: int = 1000,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Every arm against ``baseline`` (all pairs when the baseline is absent), per metric:
    exact McNemar for 0/1 outcomes, else Wilcoxon signed-rank with the Hodges-Lehmann shift
    and rank-biserial r; values in table units. Not Holm-adjusted here."""
    suite, model = str(runs.frame["suite"].iloc[0]), str(runs.frame["model"].iloc[0])
    arms = list(dict.fromkeys(runs.frame["arm"]))
    if baseline in arms:
        pairs = [(a, baseline) for a in arms if a != baseline]
    else:
        pairs = [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]
    out = []
    for a, b in pairs:
        for label, col in pairwise_metrics(runs):
            base = {"suite": suite, "model": model, "method": a, "vs": b, "metric": label}
            try:
                pr = pair(runs, a, b, col)
            except NotTestable as exc:
                out.append({**base, "note": f"not testable: {exc}"})
                continue
            # tests on the raw values (0/1 for McNemar); every location scales linearly
            res = stats.paired_test(pr.frame["x"], pr.frame["y"], pr.groups,
                                    n_resamples=n_resamples, seed=seed)
            k = scale_of(col)
            out.append({**base, "n": res.n, "test": res.test, "mean_method": k * res.mean_x,
                        "mean_vs": k * res.mean_y, "effect": k * res.effect,
                        "ci_lo": k * res.effect_lo, "ci_hi": k * res.effect_hi,
                        "effect_size": res.effect_size,
                        "effect_size_name": res.effect_name, "p": res.p,
                        "seeds": ",".join(map(str, pr.seeds)) or "pooled", "note": ""})
    return out


def pairwise_table(rows: list[dict[str, Any]], baseline: str, alpha: float = 0.05) -> Table:
    """Holm-adjust (one family: this table) and format the pairwise rows."""
    raw = pd.DataFrame(rows)
    if raw.empty:
        return Table("pairwise", "No pairwise comparison (a single method per group).", raw,
                     raw)
    for c in ("n", "test", "mean_method", "mean_vs", "effect", "ci_lo", "ci_hi",
              "effect_size", "effect_size_name", "p", "seeds"):
        if c not in raw.columns:
            raw[c] = np.nan
    raw["p"] = pd.to_numeric(raw["p"], errors="coerce").astype(float)
    raw["p_holm"] = stats.holm(raw["p"].to_numpy())
    disp = pd.DataFrame({
        "suite / model": raw["suite"] + " / " + raw["model"],
        "method": raw["method"], "vs": raw["vs"], "metric": raw["metric"],
        "n": raw["n"].map(lambda v: "–" if pd.isna(v) else str(int(v))),
        "means": [f"{_fmt(a, 2)} vs {_fmt(b, 2)}" if pd.notna(a) else "–"
                  for a, b in zip(raw["mean_method"], raw["mean_vs"], strict=True)],
        "effect [95% CI]": [fmt_ci(e, lo, hi, 2) for e, lo, hi in
                            zip(raw["effect"], raw["ci_lo"], raw["ci_hi"], strict=True)],
        "effect size": [f"{n_} {_fmt(v, 2)}" if pd.notna(v) else "–" for v, n_ in
                        zip(raw["effect_size"], raw["effect_size_name"], strict=True)],
        "test": raw["test"].fillna("–"),
        "seeds": raw["seeds"].fillna("–"),
        "p": raw["p"].map(fmt_p), "p (Holm)": raw["p_holm"].map(fmt_p),
        "note": raw["note"].fillna(""),
    })
    caption = (f"Paired comparisons (by case, over common seeds) against {baseline} (all "
               f"pairs where it is absent). Effect: Hodges-Lehmann shift (Wilcoxon) or "
               f"difference of proportions (exact McNemar), in table units (x100 for rates), "
               f"95% bootstrap CI; effect size: matched-pairs rank-biserial r or (b-c)/(b+c); "
               f"p two-sided, Holm-adjusted over this table (alpha {alpha}).")
    return Table("pairwise", caption, raw, disp)


def claims_tables(detail: pd.DataFrame, summary: pd.DataFrame) -> tuple[Table, Table]:
    """Display tables of the claim verdicts (summary) and of every sub-test."""
    sdisp = summary.rename(columns={"claim": "claim", "statement": "statement"})
    if detail.empty:
        return (Table("claims_summary", "Claims", summary, sdisp),
                Table("claims", "Claim tests", detail, detail))
    ddisp = pd.DataFrame({
        "claim": detail["claim"], "suite / model": detail["suite"] + " / " + detail["model"],
        "test": detail["test"], "statistic": detail["statistic"],
        "value [95% CI]": [fmt_ci(v, lo, hi, 3) for v, lo, hi in
                           zip(detail["value"], detail["ci_lo"], detail["ci_hi"],
                               strict=True)],
        "n": detail["n"].map(lambda v: str(int(v)) if pd.notna(v) and v else "–"),
        "p": detail["p"].map(fmt_p), "p (Holm)": detail["p_holm"].map(fmt_p),
        "verdict": detail["verdict"], "falsified if": detail["falsified_if"],
        "detail": detail["detail"].fillna(""),
    })
    return (Table("claims_summary", "Verdicts of the claims of docs/METAKE.md (T1-T8).",
                  summary, sdisp),
            Table("claims", "Every sub-test of T1-T8 with Holm-adjusted p-values (one family "
                  "over all tests, models and suites).", detail, ddisp))


# ---------------------------------------------------------------- writers
def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text)).strip("-") or "x"


def to_markdown(display: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes escaped)."""
    if display.empty:
        return "_(empty)_\n"
    cols = [str(c) for c in display.columns]

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, cols)) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in display.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "<": r"$<$", ">": r"$>$", "–": "--", "∞": r"$\infty$",
        "≈": r"$\approx$", "≥": r"$\geq$", "≤": r"$\leq$", "ρ": r"$\rho$", "φ": r"$\phi$"}


def tex_escape(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(display: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``)."""
    cols = [str(c) for c in display.columns]

    def numeric(values: pd.Series) -> bool:
        return all(str(v)[:1] in "0123456789-–<∞" for v in values if str(v))

    align = "".join("r" if len(display) and numeric(display[c]) else "l"
                    for c in display.columns)
    lines = [r"\begin{table}[t]", r"\centering\small",
             rf"\caption{{{tex_escape(caption)}}}", rf"\label{{tab:{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(v) for v in row) + r" \\"
              for row in display.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: Table, directory: Path) -> dict[str, Path]:
    """``<name>.md``, ``<name>.tex`` and ``<name>.csv`` (numbers) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {ext: directory / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")}
    paths["md"].write_text(f"{table.caption}\n\n{to_markdown(table.display)}",
                           encoding="utf-8")
    paths["tex"].write_text(to_latex(table.display, table.caption, table.name),
                            encoding="utf-8")
    table.raw.to_csv(paths["csv"], index=False)
    return paths


def write_tables(tables: Sequence[Table], directory: Path) -> list[dict[str, Path]]:
    return [write_table(t, directory) for t in tables]
