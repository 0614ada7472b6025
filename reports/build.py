"""One report directory from run directories: ``index.md``, ``tables/`` (md, tex, csv) and
``figures/`` (png). ``keh report RUN_DIR... --out DIR`` and ``nox -s report`` call
:func:`build_report`.

Runs are grouped by (suite, model); within a group every run must share the design (suite,
data file, case ids and order, batching: :func:`reports.load.check_comparable`), and runs
compared case by case must also share model weights and the preset (``config.preset``;
"legacy" for runs from before presets): claims and pairwise comparisons run per preset, and
every table names each method's preset. Claims T1-T8 of ``docs/METAKE.md`` form one Holm
family over all groups and presets; the pairwise comparisons another. Runs with failed edits
are flagged at the top of the report.

``index.html`` (:mod:`reports.html`): the same report as one self-contained page, with sortable
tables, inline SVG figures and a per-case explorer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from reports import claims as claims_mod
from reports import html as html_report
from reports import paper, plots, tables
from reports.load import (
    Runs,
    arm_of,
    case_ids_hash,
    check_comparable,
    load_runs,
    model_name_of,
    preset_of,
    revision_notes,
    seed_of,
    suite_of,
)

METHODS_TEXT = """\
* Intention to treat: a failed edit counts as a failure in the edit's success rates (Eff,
  Gen, their generation-based forms), and every other outcome is the value measured on the
  model the failure left (batch mode: the unedited model; sequential: the final model);
  every table that reports a method counts its failed edits (n_failed).
* Inference unit: the batch (its edits share one weight update; in sequential runs also one
  point of the sequence; batch b holds the same cases in every seed), in batch mode as in
  sequential runs; with single edits in batch mode, the case. Seeds are averaged per case
  before any case-level test. With two or more seeds the run is a second cluster (all cases
  of a run are scored on its models): a two-way seed x unit t test (ANOVA variance
  components, Satterthwaite df; Cameron, Gelbach & Miller 2011) joins every paired test and
  interval, the larger p and the union of the intervals; with one seed the inference is
  conditional on that run. Every caption and claim row names its unit and the number of
  clusters.
* Means with 95% wild cluster bootstrap-t intervals (Cameron, Gelbach & Miller 2008; Webb's
  six-point weights for few clusters, CR1 standard errors), seeded. With few batches the
  interval widens; there is no fallback to resampling cases. Score (a harmonic mean): cluster
  bootstrap with at least 10 units, else no interval.
* Paired comparisons by case over the seeds both methods share: the mean difference with a
  cluster sign-flip randomisation test (exact over all 2^G sign patterns for up to 12
  clusters, Monte Carlo above; for 0/1 outcomes with the case as unit the exact McNemar test,
  statsmodels) and a wild cluster bootstrap-t interval.
* T1: AUC over the (success, failure) pairs within a batch and run, p-value by permuting cases
  within batches, jointly over seeds. T4: cases matched on the baseline's outcome within
  batches; sign concordance of (baseline rho, MetaKE outcome), its test, interval and MDE on
  the pairs' sign products clustered by batch (a ceiling cannot produce it). T6:
  non-inferiority by a one-sided cluster sign-flip test against -margin. T7's negative
  control: equivalence by two one-sided tests (TOST) with a stated margin. T8: Spearman of
  per-batch means against the batch index, permutation p-value (batches are the units).
* Every claim row states its minimum detectable effect at 80% power (alpha 0.05, unadjusted);
  "not supported" with a large MDE means underpowered.
* Holm's step-down correction (Holm 1979): one family for all claim tests (all suites, models
  and presets), one for the pairwise table. A directional claim is supported when its
  Holm-adjusted p < alpha and the effect has the claimed sign; data that contradicts a claim
  gives "not supported"; a claim whose runs or diagnostics are missing is reported as not
  testable, never dropped. The paper table's bold: the top row better than every other row
  by two-sided paired tests, Holm within the column. The calibration of these tests (false
  support within each sub-test's nominal level, power on planted effects near the MDE, at
  10 and 20 batches, with run effects) is checked by tests/test_calibration.py.
"""


def _short(h: Any, n: int = 12) -> str:
    return str(h)[:n] if h else "–"


def _runs_table(runs: Runs) -> pd.DataFrame:
    rows = []
    for rid, m in runs.manifests.items():
        cfg, data, git = m.get("config") or {}, m.get("data") or {}, m.get("git") or {}
        rows.append({
            "run": rid, "method": arm_of(m), "preset": preset_of(m), "suite": suite_of(m),
            "model": model_name_of(m), "seed": seed_of(m), "cases": data.get("n_cases"),
            "n_failed": int(runs.frame.loc[runs.frame["run_id"] == rid, "failed"].sum()),
            "batch": cfg.get("batch_size"),
            "mode": "sequential" if cfg.get("sequential") else "batch",
            "config hash": m.get("config_hash"), "data sha256": _short(data.get("sha256")),
            "case ids": case_ids_hash(m),
            "model sha256": _short((m.get("model") or {}).get("sha256")),
            "git": _short(git.get("commit"), 8) + ("+dirty" if git.get("dirty") else ""),
        })
    return pd.DataFrame(rows)


def _failure_lines(runs: Runs) -> list[str]:
    """One warning line per run with failed edits (empty when none failed)."""
    f = runs.frame
    out = []
    for rid, g in f[f["failed"].astype(bool)].groupby("run_id", sort=False):
        errors = "; ".join(dict.fromkeys(str(e) for e in g["error"].dropna()))[:200]
        out.append(f"- **{rid}** ({runs.arm_of(str(rid))}): {len(g)} of "
                   f"{int((f['run_id'] == rid).sum())} edits failed ({errors or 'no message'}); "
                   f"by intention to treat they count as failures in Eff/Gen and keep the "
                   f"outcomes measured on the model they left; no diagnostics")
    return out


def _data_lines(runs: Runs) -> list[str]:
    seen: dict[tuple, list[str]] = {}
    for rid, m in runs.manifests.items():
        d = m.get("data") or {}
        key = (suite_of(m), d.get("path"), d.get("sha256"), d.get("n_cases"), case_ids_hash(m))
        seen.setdefault(key, []).append(rid)
    out = []
    for (suite, path, sha, n, ids), rids in seen.items():
        out.append(f"- {suite}: `{path}` sha256 `{sha}`, {n} cases (case-id list "
                   f"`{ids}`), {len(rids)} runs")
    return out


def _model_lines(runs: Runs) -> list[str]:
    seen: dict[str, dict[str, list[Any]]] = {}
    for m in runs.manifests.values():
        info = m.get("model") or {}
        seen.setdefault(model_name_of(m), {}).setdefault(str(info.get("sha256")), []).append(
            seed_of(m))
    out = []
    for name, shas in seen.items():
        parts = [f"`{_short(sha)}` (seeds {', '.join(map(str, sorted(set(s), key=str)))})"
                 for sha, s in shas.items()]
        out.append(f"- {name}: sha256 " + "; ".join(parts))
    return out


def _versions_table(runs: Runs) -> pd.DataFrame:
    sets: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for rid, m in runs.manifests.items():
        v = m.get("versions") or {}
        sets.setdefault(json.dumps(v, sort_keys=True), (v, []))[1].append(rid)
    keys = sorted({k for v, _ in sets.values() for k in v})
    cols = {}
    for i, (v, rids) in enumerate(sets.values()):
        cols[f"set {i + 1} ({tables.runs_word(len(rids))})"] = [str(v.get(k, "–")) for k in keys]
    return pd.DataFrame({"package": keys, **cols})


def _hparams_lines(runs: Runs) -> list[str]:
    """One line per arm with its hparams; where runs of one arm differ (e.g. a key added by a
    later revision), the first set in full and, for each other set, only what differs."""
    seen: dict[str, dict[str, tuple[dict[str, Any], list[str]]]] = {}
    for rid, m in runs.manifests.items():
        hp = m.get("hparams") or {}
        seen.setdefault(arm_of(m), {}).setdefault(json.dumps(hp, sort_keys=True),
                                                  (hp, []))[1].append(rid)
    lines = []
    for arm, sets in seen.items():
        (first, rids0), *others = sets.values()
        lines.append(f"- {arm} ({tables.runs_word(len(rids0))}): "
                     f"`{json.dumps(first, sort_keys=True)}`")
        for hp, rids in others:
            diff = {k: hp.get(k, "(absent)") for k in sorted(set(first) | set(hp))
                    if first.get(k, "(absent)") != hp.get(k, "(absent)")}
            lines.append(f"  - {arm}, {tables.runs_word(len(rids))} more, differing only in: "
                         f"`{json.dumps(diff, sort_keys=True)}`")
    return lines


def _cost_table(runs: Runs) -> pd.DataFrame:
    rows = []
    for arm in dict.fromkeys(arm_of(m) for m in runs.manifests.values()):
        ms = [m for m in runs.manifests.values() if arm_of(m) == arm]
        t = pd.DataFrame([m.get("timings") or {} for m in ms])
        mem = pd.DataFrame([m.get("peak_memory") or {} for m in ms])

        def mean(frame: pd.DataFrame, col: str, digits: int) -> str:
            if col not in frame or frame[col].isna().all():
                return "–"
            return f"{pd.to_numeric(frame[col], errors='coerce').mean():.{digits}f}"

        rows.append({"method": arm, "runs": len(ms),
                     "time/edit (s)": mean(t, "time_per_edit_s", 3),
                     "eval cases/s": mean(t, "eval_cases_per_s", 1),
                     "peak RSS (MiB)": mean(mem, "peak_rss_mib", 0),
                     "peak CUDA (MiB)": mean(mem, "peak_cuda_mib", 0)})
    return pd.DataFrame(rows)


def _table_block(t: tables.Table, paths: dict[str, Path], root: Path) -> list[str]:
    links = ", ".join(f"[{ext}]({p.relative_to(root).as_posix()})" for ext, p in paths.items())
    return [f"**{t.caption}** ({links})", "", tables.to_markdown(t.display, t.bold)]


def _paper_tables(groups: list[tuple[tuple[str, str], Runs]], n_resamples: int, seed: int,
                  alpha: float) -> list[tables.Table]:
    """One paper table (:mod:`reports.paper`) per model and preset, over its suites."""
    by_model: dict[tuple[str, str], dict[str, Runs]] = {}
    for (suite, model), g in groups:
        for preset, sub in g.presets():
            by_model.setdefault((model, preset), {})[suite] = sub
    n_presets: dict[str, int] = {}
    for model, _ in by_model:
        n_presets[model] = n_presets.get(model, 0) + 1
    out = []
    for (model, preset), parts in by_model.items():
        t = paper.paper_table(model, parts, n_resamples, seed, alpha,
                              preset if n_presets[model] > 1 else "")
        if t is not None:
            out.append(t)
    return out


def build_report(run_dirs: Iterable[str | Path], out_dir: str | Path,
                 baseline: str = "alphaedit", treatment: str = "metake", alpha: float = 0.05,
                 n_resamples: int = 2000, seed: int = 0) -> Path:
    """Write the report for ``run_dirs`` under ``out_dir``; return the path of index.md.

    Raises :class:`harness.errors.UserError` for incomplete runs or runs that cannot be
    compared (see the module notes).
    """
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    tdir, fdir = out / "tables", out / "figures"
    tdir.mkdir(parents=True, exist_ok=True)
    fdir.mkdir(parents=True, exist_ok=True)
    groups = runs.groups()
    for _, g in groups:  # fatal: a table must never mix designs
        check_comparable(g, same_model=False)

    settings = claims_mod.Settings(baseline=baseline, treatment=treatment, alpha=alpha,
                                   n_resamples=n_resamples, seed=seed)
    section_lines: list[str] = []
    claim_rows: list[dict[str, Any]] = []
    pair_rows: list[dict[str, Any]] = []
    figures: list[plots.Figure] = []
    results: list[tuple[str, list[tables.Table]]] = []
    for (suite, model), g in groups:
        section_lines += [f"### {suite} / {model}", ""]
        results.append((f"{suite} / {model}", []))
        main = tables.main_table(g, n_resamples, seed)
        for t in (main, tables.outcome_table(g, n_resamples, seed),
                  tables.generation_table(g, n_resamples, seed),
                  *tables.diagnostics_tables(g, n_resamples, seed),
                  tables.downstream_table(g)):
            if t is not None:
                section_lines += _table_block(t, tables.write_table(t, tdir), out)
                results[-1][1].append(t)
        if main is None:
            section_lines += [f"_No usual metric of {suite} recorded._", ""]
        presets = g.presets()
        for _, sub in presets:
            claim_rows += claims_mod.run_claims(sub, settings)
        pair_rows += tables.pairwise_rows(g, baseline, min(n_resamples, 1000), seed)
        for preset, sub in presets:
            figures += plots.figures_for(sub, main if len(presets) == 1 else None, fdir,
                                         treatment, baseline, n_resamples, seed,
                                         suffix="" if len(presets) == 1 else preset)

    paper_lines: list[str] = []
    paper_tabs: list[tables.Table] = []
    for t in _paper_tables(groups, n_resamples, seed, alpha):
        paper_lines += _table_block(t, tables.write_table(t, tdir), out)
        paper_tabs.append(t)

    pairwise = tables.pairwise_table(pair_rows, baseline, alpha)
    detail = claims_mod.finalise(claim_rows, alpha)
    summary = claims_mod.summarise(detail)
    csum, cdet = tables.claims_tables(detail, summary)
    pw_paths = tables.write_table(pairwise, tdir)
    cs_paths, cd_paths = tables.write_table(csum, tdir), tables.write_table(cdet, tdir)
    runs_tab = tables.Table("runs", "Runs compared.", _runs_table(runs), _runs_table(runs))
    runs_paths = tables.write_table(runs_tab, tdir)

    arms = list(dict.fromkeys(tables.arm_label(a, p) for a, p in
                              zip(runs.frame["arm"], runs.frame["preset"], strict=True)))
    failures = _failure_lines(runs)
    mixed = [f"- {x}" for x in revision_notes(runs)]
    lines = [
        "# Knowledge-editing report", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} by `keh report` from "
        f"{len(runs.manifests)} runs: methods {', '.join(arms)}; groups "
        + ", ".join(f"{s} / {m}" for (s, m), _ in groups)
        + f". Baseline for comparisons: `{baseline}`; treatment for the claims: `{treatment}`; "
        f"alpha {alpha}; {n_resamples} bootstrap resamples, seed {seed}.", "",
        *(["**Runs with failed edits** (intention to treat: failures in the success rates):",
           "", *failures, ""] if failures else []),
        *(["**Mixed code revisions**: results below compare code that differs:", "",
           *mixed, ""] if mixed else []),
        "## Runs", "", *_table_block(runs_tab, runs_paths, out),
        "## Data", "", *_data_lines(runs), "",
        "## Models", "", *_model_lines(runs), "",
        "## Hyperparameters", "", *_hparams_lines(runs), "",
        "## Software", "", tables.to_markdown(_versions_table(runs)),
        "## Cost", "", tables.to_markdown(_cost_table(runs)),
        "## Results", "", *section_lines,
        *(["## Paper table", "", *paper_lines] if paper_lines else []),
        "## Pairwise comparisons", "", *_table_block(pairwise, pw_paths, out),
        "## Claims of docs/METAKE.md", "", *_table_block(csum, cs_paths, out),
        *_table_block(cdet, cd_paths, out),
        "## Figures", "",
    ]
    n = 0
    skipped = []
    for f in figures:
        if f.path is None:
            skipped.append(f"- {f.name}: skipped ({f.note})")
            continue
        n += 1
        rel = f.path.relative_to(out).as_posix()
        lines += [f"![Figure {n}]({rel})", "", f"*Figure {n}: {f.caption}*", ""]
    if skipped:
        lines += ["Figures not drawn:", "", *skipped, ""]
    lines += ["## Methods", "", METHODS_TEXT]
    index = out / "index.md"
    index.write_text("\n".join(lines), encoding="utf-8")
    html_report.write_html(out, html_report.ReportContent(
        runs=runs, groups=groups, runs_table=runs_tab, failures=failures, mixed=mixed,
        settings={"baseline": baseline, "treatment": treatment, "alpha": alpha,
                  "n_resamples": n_resamples, "seed": seed},
        data_lines=_data_lines(runs), model_lines=_model_lines(runs),
        hparams_lines=_hparams_lines(runs), versions=_versions_table(runs),
        cost=_cost_table(runs), results=results, paper=paper_tabs, pairwise=pairwise,
        claims_summary=csum, claims_detail=cdet, figures=figures, methods_text=METHODS_TEXT))
    return index
