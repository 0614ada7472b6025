"""Figures (PNG, matplotlib's Agg canvas; no pyplot state), each with an SVG twin beside it
(text kept as text, point clouds rasterised) that ``index.html`` inlines. Each function returns
a :class:`Figure` with its caption, or with ``path=None`` and a note saying why it was skipped.

* ``metrics_*``: efficacy / generalisation / specificity per method, mean and 95% CI (forest plot).
* ``downstream_*``: downstream accuracy against the number of edits (curve.jsonl).
* ``probe_*``: probe-set metrics against the number of edits (curve.jsonl).
* ``diagnostics_*``: distributions of rho and z-error per method.
* ``gain_vs_rho_*``: per-edit gain of the treatment over the baseline against baseline rho.
* ``rho_by_batch_*``: rho against the batch index in sequential runs (T8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator
from scipy import stats as sps

from reports.claims import PRIMARY
from reports.load import Runs
from reports.paired import NotTestable, pair
from reports.tables import Table, main_table, pooled_accuracy, resampling_unit, runs_word, slug

DPI = 130
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]
#: probe-set metrics drawn (when a run records them), in this order
PROBE_KEYS = ["efficacy_success", "paraphrase_success", "neighborhood_success",
              "efficacy_margin", "efficacy_accuracy", "paraphrase_accuracy",
              "specificity_accuracy", "score", "neighborhood_kl"]


@dataclass
class Figure:
    name: str
    caption: str
    path: Path | None = None
    note: str = ""


def _new(width: float = 6.4, height: float = 4.0) -> MplFigure:
    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: MplFigure, directory: Path, name: str) -> Path:
    """``<name>.png`` and its twin ``<name>.svg`` (text as text, no date, fixed ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    fig.savefig(path, dpi=DPI)
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(path.with_suffix(".svg"), format="svg", dpi=DPI,
                    metadata={"Date": None})
    return path


def _tag(runs: Runs) -> tuple[str, str, str]:
    suite, model = str(runs.frame["suite"].iloc[0]), str(runs.frame["model"].iloc[0])
    suffix = runs.frame.attrs.get("figure_suffix", "")
    if suffix:
        return suite, f"{model} [{suffix}]", f"{slug(suite)}_{slug(model)}_{slug(suffix)}"
    return suite, model, f"{slug(suite)}_{slug(model)}"


def _colors(arms: list[str]) -> dict[str, tuple]:
    """One distinct colour per arm: tab10 up to 10 arms, tab20 (dark shades first) up to 20,
    beyond that evenly spaced samples of a perceptual map (the line style and marker, which
    cycle with other periods, keep neighbours apart)."""
    from matplotlib import colormaps

    n = len(arms)
    if n <= 10:
        return {a: colormaps["tab10"](i) for i, a in enumerate(arms)}
    if n <= 20:
        return {a: colormaps["tab20"]((2 * i) % 20 + i // 10) for i, a in enumerate(arms)}
    cmap = colormaps["turbo"]
    return {a: cmap(0.05 + 0.9 * i / (n - 1)) for i, a in enumerate(arms)}


def plot_metrics(runs: Runs, table: Table | None, directory: Path) -> Figure:
    """Forest plot: one panel per metric (Eff/Gen/Spe, x100), one row per method in the main
    table's order, the mean as a dot and the table's 95% CI as a bar; method names on the
    shared y axis, so any number of methods stays readable without a legend."""
    suite, model, tag = _tag(runs)
    name = f"metrics_{tag}"
    labels = [c for c in ("Eff", "Gen", "Spe") if table is not None and c in table.raw]
    if table is None or not labels:
        return Figure(name, "", note=f"{suite} / {model}: no efficacy/generalisation/"
                      f"specificity metric recorded")
    raw = table.raw.reset_index(drop=True)
    arms = list(raw["method"])
    colors = _colors(arms)
    y = np.arange(len(arms))[::-1]  # first row of the table at the top
    fig = _new(1.6 + 2.6 * len(labels), 0.9 + 0.26 * len(arms))
    axes = np.atleast_1d(fig.subplots(1, len(labels), sharey=True, squeeze=False)).ravel()
    titles = {"Eff": "Efficacy", "Gen": "Generalisation", "Spe": "Specificity"}
    noop_line = False
    for ax, c in zip(axes, labels, strict=True):
        for i, row in raw.iterrows():
            m, lo, hi = (float(row[k]) for k in (c, f"{c}_lo", f"{c}_hi"))
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [y[i], y[i]], color=colors[row["method"]], lw=1.6)
            ax.plot([m], [y[i]], "o", ms=4.5, color=colors[row["method"]])
        ref = raw.loc[raw["method"].astype(str).str.startswith("noop"), c]
        if len(ref) == 1 and np.isfinite(float(ref.iloc[0])):  # the unedited model
            ax.axvline(float(ref.iloc[0]), color="grey", lw=0.8, ls="--")
            noop_line = True
        ax.set_title(titles[c], fontsize=10)
        ax.set_xlim(-2, 102)
        ax.set_xlabel("success rate (%)")
        ax.grid(axis="x", alpha=0.3)
    ticks = [f"{row['method']} ({runs_word(int(row['runs']))})" for _, row in raw.iterrows()]
    axes[0].set_yticks(y, ticks, fontsize=8)
    axes[0].set_ylim(-0.7, len(arms) - 0.3)
    fig.suptitle(f"{suite} / {model}", fontsize=10)
    caption = (f"{suite} / {model}: efficacy, generalisation (paraphrases) and specificity "
               f"(neighbourhood/locality) per method, mean over cases and seeds in percent "
               f"(dots); bars are 95% wild cluster bootstrap-t CIs over "
               f"{resampling_unit(runs.frame)}"
               + ("; dashed: the unedited model (noop)." if noop_line else "."))
    return Figure(name, caption, _save(fig, directory, name))


def plot_curves(runs: Runs, kind: str, directory: Path) -> Figure:
    """Downstream accuracy (``kind="downstream"``), probe metrics (``"probe"``) or memory in MiB
    (``"memory"``: process RSS now and at peak, CUDA allocated) against
    the number of edits, one line per method, a subplot per task/metric."""
    suite, model, tag = _tag(runs)
    name = f"{kind}_{tag}"
    c = runs.curves
    if c.empty or not (c["kind"] == kind).any():
        return Figure(name, "", note=f"{suite} / {model}: no {kind} checkpoints (no run has a "
                      f"curve.jsonl with '{kind}' entries)")
    c = c[(c["kind"] == kind)].dropna(subset=["value", "n_edits"])
    names = list(dict.fromkeys(c["name"]))
    if kind == "probe" and any(k in names for k in PROBE_KEYS):
        names = [k for k in PROBE_KEYS if k in names]
    arms = list(dict.fromkeys(c["arm"]))
    all_arms = list(dict.fromkeys(runs.frame["arm"]))
    colors = _colors(all_arms)
    ncol = min(3, len(names))
    nrow = int(np.ceil(len(names) / ncol))
    fig = _new(4.2 * ncol + 1.2, 3.2 * nrow)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, task in zip(axes, names, strict=False):
        for arm in arms:
            g = c[(c["name"] == task) & (c["arm"] == arm)]
            if g.empty:
                continue
            xs, ys, lo, hi = [], [], [], []
            for n_edits, pts in g.groupby("n_edits"):
                if kind == "downstream":
                    acc, a, b, _ = pooled_accuracy(pts)
                    acc, a, b = 100 * acc, 100 * a, 100 * b
                else:
                    acc, a, b = float(pts["value"].mean()), np.nan, np.nan
                xs.append(n_edits)
                ys.append(acc)
                lo.append(a)
                hi.append(b)
            k = all_arms.index(arm) if arm in all_arms else 0
            # distinct line styles and markers keep coinciding curves visible
            ax.plot(xs, ys, marker=MARKERS[k % len(MARKERS)], ms=4,
                    ls=LINESTYLES[k % len(LINESTYLES)], color=colors.get(arm), label=arm)
            if np.isfinite(lo).any():
                ax.fill_between(xs, lo, hi, color=colors.get(arm), alpha=0.15, lw=0)
        ax.set_title(task, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of edits")
        ax.set_ylabel("accuracy (%)" if kind == "downstream" else task)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    if kind == "downstream":
        caption = (f"{suite} / {model}: downstream task accuracy against the number of edits "
                   f"applied so far (sequential runs), mean over seeds; bands are 95% "
                   f"Wilson intervals on one run's examples.")
    elif kind == "memory":
        caption = (f"{suite} / {model}: memory at each checkpoint against the number of edits "
                   f"applied so far (MiB: rss_mib = process RSS now, peak_rss_mib = its peak, "
                   f"cuda_mib / peak_cuda_mib = allocated GPU memory); flat lines mean nothing "
                   f"is kept per edit.")
    else:
        caption = (f"{suite} / {model}: probe-set metrics (the run's first cases, re-evaluated "
                   f"at each checkpoint; rates in percent) against the number of edits applied "
                   f"so far (sequential runs), mean over seeds.")
    return Figure(name, caption, _save(fig, directory, name))


def plot_diagnostics(runs: Runs, directory: Path) -> Figure:
    """Box plots (with the individual edits as points) of rho and z-error per method."""
    suite, model, tag = _tag(runs)
    name = f"diagnostics_{tag}"
    f = runs.frame
    diags = [d for d in ("diag_rho", "diag_z_error") if d in f.columns and f[d].notna().any()]
    if not diags:
        return Figure(name, "", note=f"{suite} / {model}: no method recorded rho or z_error")
    all_arms = list(dict.fromkeys(f["arm"]))
    colors = _colors(all_arms)
    fig = _new(1.6 + 3.6 * len(diags), 0.9 + 0.26 * len(all_arms))
    axes = np.atleast_1d(fig.subplots(1, len(diags), squeeze=False)).ravel()
    rng = np.random.default_rng(0)
    absent = {}
    ref_line = False
    for ax, d in zip(axes, diags, strict=True):
        arms = [a for a in all_arms if f.loc[f["arm"] == a, d].notna().any()]
        absent[d] = [a for a in all_arms if a not in arms]
        data = [f.loc[f["arm"] == a, d].dropna().to_numpy() for a in arms]
        pos = np.arange(len(arms))[::-1] + 1.0  # first arm at the top, a labelled row each
        ax.boxplot(data, positions=pos, tick_labels=arms, showfliers=False, widths=0.5,
                   orientation="horizontal")
        for y, a, v in zip(pos, arms, data, strict=True):
            ax.scatter(v, y + rng.uniform(-0.15, 0.15, v.size), s=6, alpha=0.5,
                       color=colors[a], rasterized=True)
        ax.set_title({"diag_rho": "realisation rho", "diag_z_error": "z-error e"}[d])
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        if d == "diag_rho" and max((v.max() for v in data if v.size), default=0) >= 0.5:
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")  # full realisation, if in range
            ref_line = True
    missing = "; ".join(f"no {k.removeprefix('diag_')} for {', '.join(v)}"
                        for k, v in absent.items() if v)
    caption = (f"{suite} / {model}: per-edit realisation rho (1 = the planned change fully "
               f"realised{', dashed' if ref_line else ''}) and z-error |z_post - v| / |v - z0| "
               f"(0 = target reached) per method; boxes: "
               f"quartiles and median, points: single edits (all seeds)."
               + (f" ({missing}.)" if missing else ""))
    return Figure(name, caption, _save(fig, directory, name))


def plot_gain_vs_rho(runs: Runs, treatment: str, baseline: str, directory: Path,
                     n_resamples: int = 2000, seed: int = 0) -> Figure:
    """Scatter of the per-case gain (treatment - baseline, primary outcome) against the
    baseline's rho, with Spearman's rho (T4)."""
    suite, model, tag = _tag(runs)
    name = f"gain_vs_rho_{tag}"
    out_col = PRIMARY.get(suite, "efficacy_margin")
    try:
        gain = pair(runs, treatment, baseline, out_col)
        rho = pair(runs, baseline, baseline, "diag_rho", out_col)
    except NotTestable as exc:
        return Figure(name, "", note=f"{suite} / {model}: gain vs rho needs {treatment} and "
                      f"{baseline} runs with rho: {exc}")
    x = rho.frame["x"].reindex(gain.frame.index).to_numpy(float)
    y = (gain.frame["x"] - gain.frame["y"]).to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    varied = ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0
    rho_s = float(sps.spearmanr(x[ok], y[ok]).statistic) if varied else float("nan")
    fig = _new(5.0, 3.8)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=10, alpha=0.6, rasterized=True)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"rho of {baseline}")
    ax.set_ylabel(f"gain in {out_col} ({treatment} - {baseline})")
    ax.set_title(f"Spearman {rho_s:+.2f}, n={int(ok.sum())}", fontsize=9)
    ax.grid(alpha=0.3)
    caption = (f"{suite} / {model}: per-case gain of {treatment} over {baseline} in {out_col} "
               f"against {baseline}'s realisation rho (mean over common seeds); descriptive "
               f"Spearman = {rho_s:+.2f}, n = {int(ok.sum())} (no interval: the cases of a "
               f"unit are not independent). A ceiling on {treatment}'s outcome alone makes "
               f"this negative; T4 therefore tests the relation at equal baseline outcome "
               f"(claims table).")
    return Figure(name, caption, _save(fig, directory, name))


def plot_rho_by_batch(runs: Runs, directory: Path) -> Figure:
    """Mean rho per batch index per method in sequential runs (T8), +- 1.96 SE bands."""
    suite, model, tag = _tag(runs)
    name = f"rho_by_batch_{tag}"
    f = runs.frame
    if "diag_rho" not in f.columns:
        return Figure(name, "", note=f"{suite} / {model}: no method recorded rho")
    f = f[f["sequential"] & f["diag_rho"].notna()]
    if f.empty or f["batch"].nunique() < 2:
        return Figure(name, "", note=f"{suite} / {model}: rho by batch needs sequential runs "
                      f"with rho and more than one batch")
    colors = _colors(list(dict.fromkeys(runs.frame["arm"])))
    fig = _new(7.0, 3.8)
    ax = fig.add_subplot()
    for arm, g in f.groupby("arm", sort=False):
        per = g.groupby("batch")["diag_rho"].agg(["mean", "sem"])
        b, m = per.index.to_numpy(float), per["mean"].to_numpy(float)
        half = 1.96 * per["sem"].fillna(0.0).to_numpy(float)
        k = list(colors).index(arm)
        dense = len(b) > 200  # rasterised in the SVG twin (thousands of batches: megabytes)
        ax.plot(b, m, marker=MARKERS[k % len(MARKERS)], ms=4 if len(b) <= 40 else 0,
                ls=LINESTYLES[k % len(LINESTYLES)], color=colors[arm], label=arm,
                rasterized=dense)
        ax.fill_between(b, m - half, m + half, color=colors[arm], alpha=0.15, lw=0,
                        rasterized=dense)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("batch index (edits applied in order)")
    ax.set_ylabel("mean realisation rho")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside, not over, lines
    ax.grid(alpha=0.3)
    caption = (f"{suite} / {model}: mean realisation rho of the edits of each batch against "
               f"the batch index in sequential runs (all seeds); bands: mean +- 1.96 standard "
               f"errors over the batch's edits. T8 predicts a decline that MetaKE flattens.")
    return Figure(name, caption, _save(fig, directory, name))


def figures_for(runs: Runs, main: Table | None, directory: Path, treatment: str,
                baseline: str, n_resamples: int = 2000, seed: int = 0,
                suffix: str = "") -> list[Figure]:
    """Every figure of one (suite, model) group of one preset (skipped ones carry a note);
    ``suffix`` (the preset, where a group has several) tags file names and titles."""
    runs.frame.attrs["figure_suffix"] = suffix
    if main is None:
        main = main_table(runs, min(n_resamples, 1000), seed)
    out = [plot_metrics(runs, main, directory),
           plot_curves(runs, "downstream", directory),
           plot_curves(runs, "probe", directory),
           plot_curves(runs, "memory", directory),
           plot_diagnostics(runs, directory),
           plot_gain_vs_rho(runs, treatment, baseline, directory, n_resamples, seed),
           plot_rho_by_batch(runs, directory)]
    return out
