"""The paste-ready paper table (issue 17, item 4): AlphaEdit's Table-1 layout, mean with 95% CI,
bold only where the paired test shows the best row better than every other row."""

from __future__ import annotations

from reports import paper, tables
from reports.build import build_report
from reports.load import load_runs
from tests.test_reports_build import make_run


def test_bold_only_where_the_paired_test_says_so(tmp_path):
    dirs = [make_run(tmp_path, "alphaedit", s) for s in (0, 1)]
    dirs += [make_run(tmp_path, "metake", s, margin_gain=3.0) for s in (0, 1)]
    dirs += [make_run(tmp_path, "memit", s, margin_gain=-0.5) for s in (0, 1)]
    runs = load_runs(dirs)
    t = paper.paper_table("toy", {"counterfact": runs}, n_resamples=300)
    # the whole layout, '–' where nothing was recorded (no generation in these runs)
    assert list(t.display.columns) == ["method", "CF Eff", "CF Gen", "CF Spe", "CF Flu",
                                       "CF Consis"]
    assert set(t.display["CF Flu"]) == {"–"}
    arms = list(t.display["method"])
    # MetaKE's margin gain makes it write every fact: better than both others in Eff
    assert (arms.index("metake"), "CF Eff") in t.bold
    # Spe is the same random draw in every arm: no row is better than all the others
    assert not any(col == "CF Spe" for _, col in t.bold)
    cell = t.display.loc[arms.index("metake"), "CF Eff"]
    assert cell.startswith("100.0") and "[" in cell  # mean [lo, hi]
    md = tables.to_markdown(t.display, t.bold)
    tex = tables.to_latex(t.display, t.caption, t.name, t.bold)
    assert f"**{cell}**" in md and rf"\textbf{{{tables.tex_escape(cell)}}}" in tex
    assert r"\toprule" in tex


def test_two_equal_arms_give_no_bold(tmp_path):
    dirs = [make_run(tmp_path, arm, 0, run_id=f"{arm}_r") for arm in ("alphaedit", "metake")]
    t = paper.paper_table("toy", {"counterfact": load_runs(dirs)}, n_resamples=200)
    assert not t.bold


def test_report_has_the_paper_table(tmp_path):
    dirs = [make_run(tmp_path / "r", arm, 0) for arm in ("alphaedit", "metake")]
    index = build_report(dirs, tmp_path / "out", n_resamples=200)
    text = index.read_text()
    assert "## Paper table" in text
    assert (tmp_path / "out" / "tables" / "paper_toy.tex").exists()
