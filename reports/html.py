"""``index.html``: the report as one self-contained page (:func:`write_html`).

It shows what ``index.md`` shows, from the same objects (:class:`ReportContent`, filled by
:func:`reports.build.build_report`): nothing is computed again here, tables are the
:class:`reports.tables.Table` objects of the Markdown report (display strings, bold cells) and
claims are the rows :mod:`reports.claims` produced. Added for the browser:

* every table sortable by any column (numeric keys from the table's raw numbers where a raw
  column carries the displayed one, else parsed from the cell; missing values last);
* each claim sub-test with a one-line plain reading of its verdict, estimate, interval and MDE
  (:func:`claim_reading`);
* the figures as inline SVG (the ``.svg`` twin :mod:`reports.plots` writes beside each PNG;
  element ids prefixed per figure so several figures share one document);
* the per-case explorer (:mod:`reports.explorer`: data embedded gzip-compressed, rendered a page
  at a time by ``templates/report.js``).

No network: the style sheet, the script and the data are inline (Jinja2 template
``templates/report.html.j2``, with ``report.css`` and ``report.js`` included as text).
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from reports import explorer
from reports.claims import interval_label
from reports.load import Runs, revisions_of
from reports.plots import Figure
from reports.tables import Table, arm_label, fmt_p, runs_word

TEMPLATES = Path(__file__).with_name("templates")


@dataclass
class ReportContent:
    """What ``index.md`` shows, as objects (see :func:`reports.build.build_report`)."""

    runs: Runs
    groups: list[tuple[tuple[str, str], Runs]]
    settings: dict[str, Any]
    runs_table: Table
    failures: list[str]
    mixed: list[str]
    data_lines: list[str]
    model_lines: list[str]
    hparams_lines: list[str]
    versions: pd.DataFrame
    cost: pd.DataFrame
    results: list[tuple[str, list[Table]]]
    paper: list[Table]
    pairwise: Table
    claims_summary: Table
    claims_detail: Table
    figures: list[Figure]
    methods_text: str
    generated: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %z"))


# ---------------------------------------------------------------- text
_CODE = re.compile(r"`([^`]*)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def inline_md(text: str) -> str:
    """The report's inline Markdown (``code``, **bold**) as escaped HTML."""
    out = html.escape(str(text), quote=False)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", out)


def bullets(text: str) -> list[str]:
    """The items of a Markdown bullet list (``* `` or ``- `` items, continuation lines
    joined)."""
    items: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("* ", "- ")):
            items.append(stripped[2:])
        elif stripped and items:
            items[-1] += " " + stripped
    return items


# ---------------------------------------------------------------- tables
#: a leading number followed by nothing, a space, an interval, a parenthesis or a percent sign
#: (so hashes such as ``936500d7`` sort as text)
_NUMBER = re.compile(r"^\s*([<>≤≥]?)\s*(-?∞|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                     r"(?=$|\s|\[|\(|%)")


def sort_key(text: Any) -> float | None:
    """The number a cell sorts by: its leading number (``"85.0 [80.1, 90.2]"`` -> 85.0,
    ``"<1e-4"`` just below 1e-4, ``"∞"``), None for text and missing values."""
    m = _NUMBER.match(str(text))
    if not m:
        return None
    sign, num = m.groups()
    value = {"∞": math.inf, "-∞": -math.inf}.get(num)
    value = float(num) if value is None else value
    if sign in ("<", "≤") and math.isfinite(value):
        value -= abs(value) * 1e-3 or 1e-12
    return value


def _raw_number(raw: pd.DataFrame, i: int, column: str) -> float | None:
    if column not in raw.columns or i >= len(raw):
        return None
    v = raw[column].iloc[i]
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.number):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _js_number(x: float) -> str:
    """A number as JavaScript's ``Number()`` reads it (``Infinity``, not ``inf``)."""
    return ("Infinity" if x > 0 else "-Infinity") if math.isinf(x) else repr(float(x))


def table_view(t: Table, table_id: str | None = None,
               extra: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """A table for the template: id, caption, column names and rows of cells (text, numeric
    sort key or None, bold). ``extra``: further columns (name -> one text per row)."""
    disp = t.display.reset_index(drop=True)
    raw = t.raw.reset_index(drop=True) if len(t.raw) == len(disp) else pd.DataFrame()
    columns = [str(c) for c in disp.columns] + list(extra or {})
    rows = []
    for i in range(len(disp)):
        row = []
        for c in disp.columns:
            text = str(disp[c].iloc[i])
            key = _raw_number(raw, i, str(c)) if sort_key(text) is not None else None
            key = key if key is not None else sort_key(text)
            row.append({"text": text, "sort": None if key is None else _js_number(key),
                        "bold": (i, c) in t.bold})
        for values in (extra or {}).values():
            row.append({"text": str(values[i]), "sort": None, "bold": False})
        rows.append(row)
    ident = re.sub(r"[^A-Za-z0-9_-]", "-", table_id or t.name)
    return {"id": ident, "caption": t.caption, "columns": columns, "rows": rows}


def frame_table(name: str, caption: str, frame: pd.DataFrame) -> Table:
    """A display-only frame as a :class:`Table`."""
    return Table(name, caption, frame, frame.astype(str) if not frame.empty else frame)


def failures_by_arm(runs: Runs) -> Table:
    """Per arm and preset: runs, edits and failed edits (counts)."""
    f = runs.frame
    rows = []
    for (arm, preset), g in f.groupby(["arm", "preset"], sort=False):
        n = len(g)
        k = int(g["failed"].astype(bool).sum())
        rows.append({"method": arm_label(arm, preset), "runs": g["run_id"].nunique(),
                     "edits": n, "failed edits": k,
                     "failed (%)": f"{100 * k / n:.1f}" if n else "–"})
    return frame_table("failures_by_arm", "Failed edits per method (every seed's edit of a "
                       "case counts once); by intention to treat they count as failures in the "
                       "success rates.", pd.DataFrame(rows))


def revision_lines(runs: Runs) -> list[str]:
    """One line per code revision: the arms and the number of runs made with it."""
    seen: dict[str, dict[str, int]] = {}
    for rid in runs.manifests:
        label = arm_label(runs.arm_of(rid), runs.frame.loc[runs.frame["run_id"] == rid,
                                                           "preset"].iloc[0])
        for rev in dict.fromkeys(revisions_of(runs.manifests[rid])):
            seen.setdefault(rev, {}).setdefault(label, 0)
            seen[rev][label] += 1
    return [f"`{rev}`: " + ", ".join(f"{a} ({runs_word(n)})" for a, n in arms.items())
            for rev, arms in seen.items()]


def preset_lines(runs: Runs) -> list[str]:
    """One line per preset: its runs and methods (claims and comparisons stay within one)."""
    out = []
    for preset, sub in runs.presets():
        arms = ", ".join(dict.fromkeys(sub.frame["arm"]))
        out.append(f"`{preset}`: {runs_word(len(sub.manifests))} ({arms})")
    return out


# ---------------------------------------------------------------- claims
def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _g(v: float) -> str:
    if math.isnan(v):
        return "–"
    return ("∞" if v > 0 else "-∞") if math.isinf(v) else f"{v:.3g}"


def claim_reading(row: pd.Series, alpha: float) -> str:
    """One plain sentence on a claim sub-test: what its verdict rests on (the estimate with
    its interval, the Holm-adjusted p) and, where it is not supported, what the design could
    detect (MDE at 80% power), so that underpowered is not read as evidence against."""
    verdict = str(row.get("verdict", ""))
    if verdict.startswith("not testable"):
        return f"Not testable: {verdict.removeprefix('not testable: ')}."
    value, lo, hi = (_num(row.get(k)) for k in ("value", "ci_lo", "ci_hi"))
    mde, p = _num(row.get("mde")), _num(row.get("p_holm"))
    label = interval_label(str(row.get("claim", "")), str(row.get("test", "")))
    est = f"estimate {_g(value)}" + ("" if math.isnan(lo) or math.isnan(hi)
                                     else f" ({label} {_g(lo)} to {_g(hi)})")
    if verdict == "supported":
        return (f"Supported: {est}, Holm-adjusted p {fmt_p(p)} < {alpha}, in the claimed "
                f"direction.")
    if math.isinf(mde):
        return (f"Not supported, but this design cannot reach alpha {alpha} at all (MDE ∞): "
                f"{est}; no evidence either way.")
    if math.isnan(mde):
        return f"Not supported: {est}, Holm-adjusted p {fmt_p(p)}."
    return (f"Not supported: {est}, Holm-adjusted p {fmt_p(p)}; the design detects effects "
            f"of about {_g(mde)} (MDE, 80% power), so a smaller true effect would likely be "
            f"missed.")


# ---------------------------------------------------------------- figures
_SVG_REF = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def inline_svg(path: Path, prefix: str, label_id: str) -> str | None:
    """The ``<svg>`` element of a matplotlib SVG file, its ids prefixed with ``prefix`` and
    labelled by the element ``label_id`` (the figure caption); None if there is no file."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    svg = text[text.find("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    svg = _SVG_REF.sub(lambda m: m.group(1) + prefix + m.group(2) if m.group(2) in ids
                       else m.group(0), svg)
    return svg.replace("<svg ", f'<svg role="img" aria-labelledby="{label_id}" ', 1)


def figure_views(figures: Sequence[Figure]) -> tuple[list[dict[str, Any]], list[str]]:
    """(drawn figures: number, caption, inline SVG; notes of the figures not drawn)."""
    drawn, skipped = [], []
    for f in figures:
        if f.path is None:
            skipped.append(f"{f.name}: skipped ({f.note})")
            continue
        n = len(drawn) + 1
        svg = inline_svg(f.path.with_suffix(".svg"), f"f{n}-", f"figcap-{n}")
        drawn.append({"n": n, "name": f.name, "caption": f.caption, "svg": svg,
                      "png": f.path.name})
    return drawn, skipped


# ---------------------------------------------------------------- page
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md"] = lambda s: Markup(inline_md(s))
    return env


def render(content: ReportContent) -> str:
    """The page as text."""
    alpha = float(content.settings.get("alpha", 0.05))
    detail = content.claims_detail
    readings = ([claim_reading(r, alpha) for _, r in detail.raw.iterrows()]
                if not detail.raw.empty and "verdict" in detail.raw else [])
    figures, skipped = figure_views(content.figures)
    runs = content.runs
    arms = list(dict.fromkeys(arm_label(a, p) for a, p in
                              zip(runs.frame["arm"], runs.frame["preset"], strict=True)))
    data = explorer.case_data(content.groups)
    n_cases = sum(len(g["cases"]["id"]) for g in data["groups"])
    return _environment().get_template("report.html.j2").render(
        c=content, s=content.settings, arms=arms,
        group_names=[f"{s} / {m}" for (s, m), _ in content.groups],
        failures_table=table_view(failures_by_arm(runs)),
        runs_table=table_view(content.runs_table),
        revisions=revision_lines(runs), presets=preset_lines(runs),
        versions=table_view(frame_table("versions", "Library versions per set of runs.",
                                        content.versions)),
        cost=table_view(frame_table("cost", "Time and peak memory per method (means over "
                                    "runs).", content.cost)),
        results=[(title, [table_view(t) for t in tabs]) for title, tabs in content.results],
        paper=[table_view(t) for t in content.paper],
        pairwise=table_view(content.pairwise),
        claims_summary=table_view(content.claims_summary),
        claims_detail=table_view(detail, extra={"reading": readings} if readings else None),
        figures=figures, skipped=skipped, methods=bullets(content.methods_text),
        case_data=explorer.encode(data), n_cases=n_cases,
        css=(TEMPLATES / "report.css").read_text(encoding="utf-8"),
        js=(TEMPLATES / "report.js").read_text(encoding="utf-8"))


def write_html(out_dir: str | Path, content: ReportContent) -> Path:
    """Write ``index.html`` under ``out_dir``; return its path."""
    path = Path(out_dir) / "index.html"
    path.write_text(render(content), encoding="utf-8")
    return path
