"""index.html (reports/html.py, reports/explorer.py) on synthetic runs: the page holds the
report's own tables cell by cell, the claims with a reading, the figures as inline SVG, and the
explorer's data; then the page in a real headless Chromium (skipped, with the reason, where no
browser or no playwright is installed)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import explorer, tables
from reports.build import build_report
from reports.html import claim_reading, inline_svg, sort_key
from reports.load import load_runs
from tests.test_reports_build import CASES, make_run

N_RESAMPLES = 100


def write_data(path: Path) -> str:
    """A KnowEdit-format CounterFact file for the synthetic cases; returns its sha256."""
    recs = [{"case_id": int(c), "subject": f"Subject {c}", "prompt": f"The home of Subject {c} is",
             "target_new": f"New{c}", "ground_truth": f"Old{c}",
             "rephrase_prompt": f"Subject {c} lives in", "locality_prompt": f"Other {c} lives in",
             "locality_ground_truth": f"Old{c}"} for c in CASES]
    path.write_text(json.dumps(recs))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def answer(method: str, seed: int, case: str, group: str) -> str:
    """The synthetic greedy answer of a method (every seed answers differently)."""
    return f"{group[:3]} {method} s{seed} c{case}"


def add_answers_and_data(run: Path, data: Path, sha: str) -> None:
    m = json.loads((run / "manifest.json").read_text())
    m["data"].update({"path": str(data), "sha256": sha})
    (run / "manifest.json").write_text(json.dumps(m))
    recs = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    for r in recs:
        r["answers"] = {g: [answer(m["method"], m["seed"], r["case_id"], g)]
                        for g in ("efficacy", "paraphrase", "neighborhood")}
        r["generations"] = [f"Subject {r['case_id']} lives in a <b>town</b> " + "x" * 400]
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("html_runs")
    data = root / "cf.json"
    sha = write_data(data)
    dirs = []
    for seed in (0, 1):
        dirs.append(make_run(root, "alphaedit", seed, data_sha=sha, curve=True))
        dirs.append(make_run(root, "metake", seed, data_sha=sha, rho_shift=0.2, margin_gain=1.0,
                             curve=True, hparams={"layers": [1], "solver": "alphaedit"}))
    dirs.append(make_run(root, "ft", 0, data_sha=sha, diagnostics=False))
    for d in dirs:
        add_answers_and_data(d, data, sha)
    return dirs


@pytest.fixture(scope="module")
def page(runs_dir: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html_report")
    build_report(runs_dir, out, n_resamples=N_RESAMPLES)
    return out / "index.html"


class Tables(HTMLParser):
    """Every <table id="t-..."> of a page: its cells' texts and which are bold, and every
    element id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, bool]]]] = {}
        self.ids: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._bold = False
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if tag == "table" and str(a.get("id", "")).startswith("t-"):
            self._table = str(a["id"])[2:]
            self.tables[self._table] = []
        elif self._table and tag == "tr":
            self.tables[self._table].append([])
        elif self._table and tag in ("td", "th"):
            self._cell, self._bold = [], False
        elif self._cell is not None and tag == "strong":
            self._bold = True
        elif self._cell is not None and (tag == "span" or tag == "button"):
            self._skip += a.get("class") in ("sr", "arrow")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif self._table and tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(("".join(self._cell).strip(), self._bold))
            self._cell = None
        elif tag == "span" and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._skip:
            self._cell.append(data)


def parse(page: Path) -> Tables:
    p = Tables()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def embedded(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/octet-stream" id="case-data">([^<]*)</script>',
                  text)
    assert m is not None
    return explorer.decode(m.group(1))


def test_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # nothing is fetched: no external script, style sheet, image or frame
    assert re.findall(r"<(?:script|img|iframe|link)\b[^>]*\b(?:src|href)=", text) == []
    assert "http://" not in text.replace("http://www.w3.org/", "")
    assert "https://" not in text


def test_page_shows_the_report_tables_cell_by_cell(page, runs_dir):
    """The main, outcome and paper tables are the Markdown report's Table objects: the same
    display strings in the same cells, bold where the report bolds, first column a row head."""
    from reports.paper import paper_table

    runs = load_runs(runs_dir)
    parsed = parse(page).tables
    expected = [tables.main_table(runs, N_RESAMPLES, 0), tables.outcome_table(runs, N_RESAMPLES, 0),
                paper_table("toy", {"counterfact": runs}, N_RESAMPLES, 0, 0.05)]
    assert any(t.bold for t in expected)  # the bold rule is exercised
    for t in expected:
        cells = parsed[t.name]
        assert [c for c, _ in cells[0]] == [str(c) for c in t.display.columns], t.name
        body = cells[1:]
        assert [[c for c, _ in row] for row in body] == t.display.astype(str).values.tolist()
        bold = {(i, str(t.display.columns[j])) for i, row in enumerate(body)
                for j, (_, b) in enumerate(row) if b}
        assert bold == set(t.bold), t.name
    text = page.read_text(encoding="utf-8")
    assert text.count('<th scope="col"') >= sum(len(t.display.columns) for t in expected)
    assert '<tr><th scope="row">alphaedit [legacy]</th>' in text


def test_claims_carry_a_plain_reading(page):
    detail = pd.read_csv(page.parent / "tables" / "claims.csv")
    rows = parse(page).tables["claims"]
    head = [c for c, _ in rows[0]]
    assert head[-1] == "reading" and len(rows) == len(detail) + 1
    readings = [row[-1][0] for row in rows[1:]]
    assert readings == [claim_reading(r, 0.05) for _, r in detail.iterrows()]


def test_claim_reading_sentences():
    def row(**kw):
        base = {"verdict": "not supported", "value": 0.2, "ci_lo": -0.1, "ci_hi": 0.5,
                "mde": 0.3, "p_holm": 0.2}
        return pd.Series({**base, **kw})

    assert claim_reading(row(verdict="supported", p_holm=0.001), 0.05) == (
        "Supported: estimate 0.2 (95% CI -0.1 to 0.5), Holm-adjusted p 0.0010 < 0.05, in the "
        "claimed direction.")
    assert claim_reading(row(), 0.05) == (
        "Not supported: estimate 0.2 (95% CI -0.1 to 0.5), Holm-adjusted p 0.2000; the design "
        "detects effects of about 0.3 (MDE, 80% power), so a smaller true effect would likely "
        "be missed.")
    assert claim_reading(row(mde=float("inf"), ci_lo=float("nan")), 0.05) == (
        "Not supported, but this design cannot reach alpha 0.05 at all (MDE ∞): estimate 0.2; "
        "no evidence either way.")
    assert claim_reading(row(verdict="not testable: missing runs rome"), 0.05) == (
        "Not testable: missing runs rome.")


def test_sort_keys_of_cells():
    assert sort_key("85.0 [80.1, 90.2]") == 85.0
    assert sort_key("-3.5") == -3.5 and sort_key("12%") == 12.0
    assert sort_key("∞ (cannot reach alpha)") == float("inf")
    assert 0 < sort_key("<1e-4") < 1e-4
    # text, hashes and missing cells sort as text
    for text in ("936500d7d7", "h123", "–", "", "alphaedit [legacy]", "1e5abc"):
        assert sort_key(text) is None, text


def test_figures_are_inline_svg_labelled_by_their_captions(page):
    text = page.read_text(encoding="utf-8")
    pngs = sorted((page.parent / "figures").glob("*.png"))
    assert len(pngs) == 6 and all(p.with_suffix(".svg").is_file() for p in pngs)
    svgs = re.findall(r'<svg role="img" aria-labelledby="([^"]+)"', text)
    assert svgs == [f"figcap-{n}" for n in range(1, len(pngs) + 1)]
    ids = parse(page).ids
    assert len(ids) == len(set(ids))  # one document, no id twice
    assert all(f'id="{label}"' in text for label in svgs)


def test_inline_svg_prefixes_ids_so_two_figures_never_share_one(tmp_path):
    svg = ('<?xml version="1.0"?>\n<svg xmlns:xlink="http://www.w3.org/1999/xlink">'
           '<metadata>date</metadata><defs><clipPath id="p1"><rect/></clipPath></defs>'
           '<g id="g1" clip-path="url(#p1)"><use xlink:href="#g1"/></g></svg>')
    (tmp_path / "a.svg").write_text(svg)
    one = inline_svg(tmp_path / "a.svg", "f1-", "cap1")
    two = inline_svg(tmp_path / "a.svg", "f2-", "cap2")
    assert one == ('<svg role="img" aria-labelledby="cap1" xmlns:xlink="http://www.w3.org/'
                   '1999/xlink"><defs><clipPath id="f1-p1"><rect/></clipPath></defs><g '
                   'id="f1-g1" clip-path="url(#f1-p1)"><use xlink:href="#f1-g1"/></g></svg>')
    assert set(re.findall(r'id="([^"]+)"', one)).isdisjoint(re.findall(r'id="([^"]+)"', two))
    assert inline_svg(tmp_path / "missing.svg", "f3-", "cap3") is None


def test_explorer_data_holds_each_case_exactly(page, runs_dir):
    doc = embedded(page)
    s = doc["strings"]
    (g,) = doc["groups"]
    assert g["title"] == "counterfact / toy" and g["note"].startswith("Prompts and targets from")
    assert [a["label"] for a in g["arms"]] == ["alphaedit [legacy]", "metake [legacy]",
                                               "ft [legacy]"]
    assert [s[i] for i in g["cases"]["id"]] == CASES
    k = CASES.index("105")
    assert s[g["cases"]["prompt"][k]] == "The home of Subject 105 is"
    assert (s[g["cases"]["new"][k]], s[g["cases"]["true"][k]]) == ("New105", "Old105")
    assert {grp: [[s[p], s[r]] for p, r in pairs]
            for grp, pairs in g["cases"]["items"][k].items()} == {
        "efficacy": [["The home of Subject 105 is", "New105"]],
        "paraphrase": [["Subject 105 lives in", "New105"]],
        "neighborhood": [["Other 105 lives in", "Old105"]]}
    labels = [m["label"] for m in g["metrics"]]
    assert labels == ["Eff", "Gen", "Spe", "Margin", "rho"]
    frame = load_runs(runs_dir).frame
    for a, arm in enumerate(("alphaedit", "metake", "ft")):
        rows = frame[frame["arm"] == arm].groupby("case_id")
        for m, col in enumerate(c for _, c in explorer.metric_spec("counterfact", frame)):
            want = rows[col].mean().reindex(CASES).to_numpy(float) * tables.scale_of(col)
            got = np.array([np.nan if v is None else v for v in g["values"][a][m]], float)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-12, equal_nan=True)
        # the first seed's answers, never another seed's
        ans = g["answers"][a]
        assert [s[i] for i in ans["paraphrase"][k]] == [answer(arm, 0, "105", "paraphrase")]
    assert g["failed"][2] == [int(c == CASES[3]) for c in CASES]  # ft's failed edit, case 103
    gen = s[g["generations"][0][k][0]]
    assert gen.startswith("Subject 105 lives in a <b>town</b>")
    assert len(gen) == explorer.GENERATION_CHARS


def test_explorer_says_why_prompts_are_missing(runs_dir, tmp_path):
    moved = tmp_path / "runs"
    shutil.copytree(runs_dir[0], moved / runs_dir[0].name)
    m = json.loads((moved / runs_dir[0].name / "manifest.json").read_text())
    m["data"]["path"] = str(tmp_path / "gone.json")
    (moved / runs_dir[0].name / "manifest.json").write_text(json.dumps(m))
    doc = explorer.case_data(load_runs([moved / runs_dir[0].name]).groups())
    (g,) = doc["groups"]
    assert g["note"] == (f"The data file {tmp_path / 'gone.json'} (sha256 "
                         f"{m['data']['sha256'][:12]}) is not on this machine, so prompts and "
                         f"targets are not shown.")
    assert set(g["cases"]) == {"id", "batch"}


def test_text_from_runs_is_escaped(tmp_path):
    d = make_run(tmp_path / "runs", "alphaedit", run_id="run<b>x</b>")
    build_report([d], tmp_path / "out", n_resamples=N_RESAMPLES)
    text = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "run&lt;b&gt;x&lt;/b&gt;" in text and "run<b>x</b>" not in text


# ---------------------------------------------------------------- in a real browser
@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium executable, or skip saying why (before any report is built)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    for name in (os.environ.get("KEH_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (.ci/run installs Debian's `chromium` where "
                "apt-get can; or set KEH_CHROMIUM to a Chrome/Chromium executable)")


def test_page_in_a_headless_browser(chromium, page, runs_dir, tmp_path):
    """Opens index.html from disk in headless Chromium: no console error or uncaught
    exception, the explorer lists the cases, the MetaKE-succeeded/AlphaEdit-failed filter and
    a text filter give the exact cases, a table sorts by a column (mouse, then keyboard), a
    case opens with its prompts and answers; saves a screenshot (KEH_ARTIFACTS, else the
    test's temporary directory)."""
    from playwright.sync_api import sync_playwright

    frame = load_runs(runs_dir).frame
    eff = frame.groupby(["arm", "case_id"])["efficacy_success"].mean()
    contrast = [c for c in CASES if eff["metake", c] == 1 and eff["alphaedit", c] == 0]
    assert 0 < len(contrast) < len(CASES)
    main = tables.main_table(load_runs(runs_dir), N_RESAMPLES, 0)
    artifacts = Path(os.environ.get("KEH_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                   if m.type in ("error", "assert") else None)
            tab.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
            tab.goto(page.as_uri())
            tab.wait_for_selector("#explorer[data-ready='1'], #explorer[data-failed='1']",
                                  timeout=60_000)
            assert problems == []
            assert tab.inner_text("#ex-status") == "Showing 1–24 of 24 matching cases (24 in all)."

            tab.click("#ex-contrast")
            n = len(contrast)
            assert tab.inner_text("#ex-status") == (
                f"Showing 1–{n} of {n} matching cases (24 in all).")
            shown = tab.eval_on_selector_all("#ex-table tbody tr[data-case]",
                                             "rows => rows.map(r => r.dataset.case)")
            assert shown == contrast

            tab.click("#ex-clear")
            tab.fill("#ex-text", "subject 117")
            tab.wait_for_function("document.getElementById('ex-status').textContent"
                                  ".startsWith('Showing 1–1 of 1 ')")
            tab.click("#ex-table button.show")
            detail = tab.inner_text("#ex-detail-17")
            for needle in ("Other 117 lives in", "Old117",
                           answer("alphaedit", 0, "117", "neighborhood"),
                           answer("metake", 0, "117", "paraphrase")):
                assert needle in detail, needle
            tab.fill("#ex-text", "")

            col = list(main.display.columns).index("Eff")
            button = f"#t-{main.name} thead th:nth-child({col + 1}) button"
            tab.click(button)
            order = tab.eval_on_selector_all(f"#t-{main.name} tbody th",
                                             "cells => cells.map(c => c.textContent)")
            raw = main.raw.sort_values("Eff", kind="stable")
            assert order == list(raw["method"])
            assert tab.get_attribute(f"#t-{main.name} thead th:nth-child({col + 1})",
                                     "aria-sort") == "ascending"
            tab.focus(button)
            tab.keyboard.press("Enter")
            order = tab.eval_on_selector_all(f"#t-{main.name} tbody th",
                                             "cells => cells.map(c => c.textContent)")
            assert order == list(main.raw.sort_values("Eff", ascending=False,
                                                      kind="stable")["method"])
            tab.screenshot(path=str(artifacts / "report_overview.png"))
            tab.locator("#explorer").scroll_into_view_if_needed()
            tab.screenshot(path=str(artifacts / "report_explorer.png"))
        finally:
            browser.close()
    assert problems == []
    assert (artifacts / "report_explorer.png").stat().st_size > 0
