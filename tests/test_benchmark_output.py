"""What ``nox -s benchmark`` prints (no model): the grid it picks without ``--grid``, the
overall progress line, the final table, the headline contrasts and the reproduction verdicts.
Runs are synthetic run directories (``tests/test_reports_build.make_run``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from harness import benchmark, console, headline, progress, reproduce
from harness.checkpoint import CHECKPOINT_DIR, PROGRESS
from harness.config import RunConfig
from tests.test_reports_build import make_run


@pytest.fixture
def batch_runs(tmp_path) -> list[Path]:
    """noop, MEMIT, AlphaEdit and MetaKE in batch mode with batches of one edit (the case is
    the unit), 24 cases."""
    gains = {"noop": -1.5, "memit": 0.5, "alphaedit": 1.0, "metake": 2.5}
    dirs = [make_run(tmp_path, m, sequential=False, margin_gain=g) for m, g in gains.items()]
    for i, d in enumerate(dirs):  # phase timings: 3, 4, 5, 6 minutes in all
        recs = [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]
        (d / "records.jsonl").write_text("".join(
            json.dumps({**r, "batch": r["case_index"]}) + "\n" for r in recs))
        m = json.loads((d / "manifest.json").read_text())
        m["config"]["batch_size"] = 1
        m["timings"].update({"load_model_s": 90.0, "edit_s": 60.0 * (i + 1),
                             "evaluate_s": 30.0})
        (d / "manifest.json").write_text(json.dumps(m))
    return dirs


def column(d: Path, name: str) -> np.ndarray:
    lines = (d / "records.jsonl").read_text().splitlines()
    return np.array([json.loads(line)[name] for line in lines], dtype=float)


def test_headline_contrasts_are_the_paired_tests_at_the_case(batch_runs):
    rows = headline.headline_rows(batch_runs)
    assert [(r["contrast"], r["metric"]) for r in rows] == [
        (c, m) for c in ("metake - noop", "alphaedit - noop", "memit - noop",
                         "metake - alphaedit") for m in ("Eff", "Gen")]
    by_name = {d.name.split("_")[1]: d for d in batch_runs}
    p_raw = []
    for r in rows:
        a, b = (by_name[x] for x in r["contrast"].split(" - "))
        col = {"Eff": "efficacy_success", "Gen": "paraphrase_success"}[r["metric"]]
        x, y = column(a, col), column(b, col)
        assert r["effect"] == pytest.approx(100 * (x.mean() - y.mean()), abs=1e-9)
        n10, n01 = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
        p = mcnemar([[0, n10], [n01, 0]], exact=True).pvalue if n10 + n01 else 1.0
        assert (r["test"], r["p"]) == ("mcnemar", pytest.approx(p))
        assert r["unit"] == "case (24; one edit per unit)"
        assert r["lo"] <= r["effect"] <= r["hi"] and r["mde"] >= 0
        p_raw.append(p)
    holm = multipletests(p_raw, method="holm")[1]
    assert [r["p_holm"] for r in rows] == pytest.approx(list(holm))
    assert [r["verdict"] for r in rows] == ["shown" if p < 0.05 else "not shown" for p in holm]
    table = [cells(x) for x in headline.headline_markdown(rows).splitlines() if x.startswith("| ")]
    assert table[0][:5] == ["suite / model", "contrast", "metric", "difference [95% CI]", "MDE"]
    assert table[1][:3] == ["counterfact / toy [legacy]", "metake - noop", "Eff"]
    assert table[1][3] == f"{rows[0]['effect']:+.1f} [{rows[0]['lo']:+.1f}, {rows[0]['hi']:+.1f}]"
    assert table[-1][2:6] == ["Gen", "+0.0 [+0.0, +0.0]", "0.0", "1.0000"]  # as text, no parsing


def _single_edits(d: Path) -> Path:
    """The run ``d`` as batch mode with batches of one edit (each case its own unit)."""
    recs = [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]
    (d / "records.jsonl").write_text("".join(
        json.dumps({**r, "batch": r["case_index"]}) + "\n" for r in recs))
    m = json.loads((d / "manifest.json").read_text())
    m["config"]["batch_size"] = 1
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_headline_intervals_stay_within_the_range_of_a_difference_of_rates(tmp_path):
    cases = ["1", "2", "3", "4"]  # four units: a wild bootstrap interval far wider than +-100
    dirs = [_single_edits(make_run(tmp_path, m, sequential=False, margin_gain=g,
                                   case_ids=cases))
            for m, g in (("noop", -1.5), ("metake", 2.5))]
    rows = headline.headline_rows(dirs)
    assert [r["contrast"] for r in rows] == ["metake - noop"] * 2
    assert all(-100.0 <= r["lo"] <= r["effect"] <= r["hi"] <= 100.0 for r in rows)
    assert any(r["lo"] == -100.0 or r["hi"] == 100.0 for r in rows)


def test_headline_says_when_there_is_no_interval_or_no_test(tmp_path):
    """Two units (batches of two cases): no interval and no MDE, shown as a dash, never as
    the full range; a contrast whose runs cannot be paired is a row that says why."""
    dirs = [make_run(tmp_path, m, sequential=False, margin_gain=g, case_ids=["1", "2", "3"])
            for m, g in (("noop", -1.5), ("metake", 2.5))]
    dirs.append(make_run(tmp_path, "alphaedit", sequential=False, case_ids=["7", "8", "9"]))
    rows = headline.headline_rows(dirs)
    by = {(r["contrast"], r["metric"]): r for r in rows}
    first = by[("metake - noop", "Eff")]
    assert math.isnan(first["lo"]) and math.isnan(first["hi"]) and math.isinf(first["mde"])
    assert by[("alphaedit - noop", "Eff")]["verdict"].startswith("not testable: ")
    table = [cells(x) for x in headline.headline_markdown(rows).splitlines()
             if x.startswith("| ")]
    row = next(t for t in table if t[1] == "metake - noop" and t[2] == "Eff")
    assert row[3].endswith("[\u2013, \u2013]") and row[4] == "\u2013"


def test_final_table_names_the_report_columns_and_each_run_time(batch_runs, tmp_path):
    zsre = make_run(tmp_path / "z", "alphaedit", suite="zsre", sequential=False)
    recs = [json.loads(x) for x in (zsre / "records.jsonl").read_text().splitlines()]
    for r in recs:  # zsRE records also hold efficacy_success (0 by construction): not shown
        r.update({"efficacy_accuracy": 0.75, "paraphrase_accuracy": 0.5,
                  "specificity_accuracy": 0.25, "efficacy_success": 0.0})
    (zsre / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = console.summary([*batch_runs, zsre])
    lines = text.splitlines()
    assert lines[0] == ("counterfact / toy: mean over cases and seeds, x100, with 95% "
                        "interval; unit: cases (24; one edit per unit)")
    assert cells(lines[2]) == ["method", "seeds", "cases", "Eff", "Gen", "Spe", "Score",
                               "time per run"]
    z = lines.index("zsre / toy: mean over cases and seeds, x100, with 95% interval; unit: "
                    "batches (12; batch mode, edited together)")
    rows = {cells(line)[0]: cells(line) for line in lines[:z] if line.startswith("| ")}
    eff = 100 * column(batch_runs[0], "efficacy_success").mean()
    assert rows["noop [legacy]"][3].startswith(f"{eff:.1f} [")
    assert [rows[f"{m} [legacy]"][-1] for m in ("noop", "memit", "alphaedit", "metake")] == [
        "3 min", "4 min", "5 min", "6 min"]
    assert cells(lines[z + 2]) == ["method", "seeds", "cases", "Eff", "Gen", "Spe",
                                   "time per run"]
    assert cells(lines[z + 4])[3:6] == ["75.0 [75.0, 75.0]", "50.0 [50.0, 50.0]",
                                        "25.0 [25.0, 25.0]"]
    assert "efficacy_success" not in text and "nan" not in text


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_progress_line_counts_runs_and_edits_and_scales_the_eta(tmp_path):
    cfgs = [RunConfig(method=m, n_edits=10, batch_size=2, out_dir=str(tmp_path))
            for m in ("rome", "alphaedit", "metake", "noop")]

    def complete(cfg: RunConfig) -> None:
        progress.run_dir(cfg).mkdir()
        (progress.run_dir(cfg) / "manifest.json").write_text(json.dumps({"status": "complete"}))

    complete(cfgs[0])  # complete before the grid started: counted as done, not as work done
    now = [100.0]
    bar = progress.GridProgress(cfgs, jobs=2, clock=lambda: now[0])
    w = [progress.weight(c) for c in cfgs]
    assert bar.line() == (f"grid: 1/4 runs, 10/40 edits, 0 s spent, about "
                          f"{progress.minutes(sum(w[1:]) / 2)} left (CPU estimate from the "
                          f"measured seconds per edit)")
    now[0] += 60.0  # filling the caches: spent, but not the runs' time
    bar.runs_begin()
    first = progress.run_dir(cfgs[3]) / CHECKPOINT_DIR
    first.mkdir(parents=True)
    (first / PROGRESS).write_text(json.dumps({"batches_done": 1}))  # noop: 2 cases
    now[0] += 60.0  # too little done to extrapolate from: still the table's estimate
    noop = progress.FIXED_RUN_SECONDS + 2 * progress.per_edit(cfgs[3])
    assert bar.line() == (f"grid: 1/4 runs, 12/40 edits, 2 min spent, about "
                          f"{progress.minutes((sum(w[1:]) - noop) / 2)} left (CPU estimate "
                          f"from the measured seconds per edit)")
    complete(cfgs[1])
    half = progress.run_dir(cfgs[2]) / CHECKPOINT_DIR
    half.mkdir(parents=True)
    (half / PROGRESS).write_text(json.dumps({"batches_done": 2}))
    now[0] += 540.0
    metake = progress.FIXED_RUN_SECONDS + 4 * progress.per_edit(cfgs[2])
    done, rest = w[1] + metake + noop, (w[2] - metake) + (w[3] - noop)
    assert bar.line() == (f"grid: 2/4 runs, 26/40 edits, 11 min spent, about "
                          f"{progress.minutes(600.0 * rest / done)} left")
    assert progress.weight(cfgs[3]) == progress.FIXED_RUN_SECONDS + 10 * 0.9  # noop: eval only


def test_without_a_grid_a_gpu_picks_smollm2_100_and_says_so(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert benchmark.main(["--methods", "nosuch", "--no-report"]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == ("grid: smollm2-100 (no --grid given and a GPU is present: "
                                   "the 100-case comparison of every method, 3 seeds for "
                                   "the paired arms)")
    assert "--methods: ['nosuch'] not in grid smollm2-100" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark.choose_grid(None)[0] == "default"
    assert benchmark.choose_grid("smoke") == ("smoke", None)


def test_reproduction_verdicts(tmp_path):
    runs = []
    # at the intervals' edges: 84 <= 84.16, 72 > 71.82, 55 >= 54.24; 62 < 62.51, 60 <= 60.58
    # summaries in percent, as harness.runner writes them
    for method, summary in (("alphaedit", (84.0, 72.0, 55.0)), ("rome", (62.0, 56.0, 60.0)),
                            ("memit", (50.0, 50.0, 50.0))):
        d = tmp_path / method
        d.mkdir()
        config = {**reproduce.DESIGN, "method": method}
        if method == "memit":  # another design: no verdict
            config["n_edits"] = 2
        (d / "manifest.json").write_text(json.dumps({"config": config, "summary": {
            "efficacy_success": summary[0], "paraphrase_success": summary[1],
            "neighborhood_success": summary[2]}}))
        runs.append(d)
    lines = reproduce.verdict_lines(runs)
    assert lines[-3:] == [
        "| alphaedit | 84 / 77 [67.8, 84.2] inside | 72 / 63 [53.2, 71.8] OUTSIDE | "
        "55 / 64 [54.2, 72.7] inside | 1 of 3 outside the original's interval |",
        "| rome | 62 / 72 [62.5, 79.9] OUTSIDE | 56 / 65 [55.3, 73.6] inside | "
        "60 / 51 [41.3, 60.6] inside | 1 of 3 outside the original's interval |",
        "| memit | \u2013 | \u2013 | \u2013 | no verdict: not the reproduction's design "
        "(n_edits 2, not 100) |"]


def test_workers_share_the_work_by_expected_cost():
    cfgs = [RunConfig(method=m, n_edits=40) for m in ("noop", "memit", "alphaedit", "metake")]
    shards = [progress.balanced_shard(cfgs, i, 2) for i in range(2)]
    assert [[c.method for c in s] for s in shards] == [["noop", "metake"],
                                                      ["memit", "alphaedit"]]
    three = [progress.balanced_shard(cfgs, i, 3) for i in range(3)]
    assert sorted(c.method for s in three for c in s) == sorted(c.method for c in cfgs)


def test_each_report_dir_gets_its_own_report_and_the_study_spans_them(batch_runs, tmp_path,
                                                                      capsys):
    """A grid of two designs (batch mode with single edits; sequential): one report per
    entry's report_dir, since one report over both is refused (a table never mixes designs),
    and the claims study over both parts beside them."""
    seq = [make_run(tmp_path / "seq", m, sequential=True, run_id=f"counterfact_{m}_seq")
           for m in ("alphaedit", "metake")]
    with pytest.raises(Exception, match="design"):
        benchmark.finish(batch_runs + seq, "claims-smollm2", tmp_path / "one")
    capsys.readouterr()
    where = {d: tmp_path / "out" / "single" for d in batch_runs} | {
        d: tmp_path / "out" / "sequential" for d in seq}
    parts = {d: "single" for d in batch_runs} | {d: "sequential" for d in seq}
    benchmark.finish(batch_runs + seq, "claims-smollm2", where, parts)
    out = capsys.readouterr().out
    for part in ("single", "sequential"):
        assert (tmp_path / "out" / part / "index.md").is_file()
        assert f"runs of {tmp_path / 'out' / part}:" in out
    study = (tmp_path / "out" / "study.md").read_text()
    assert "claims study (single: 4 runs, sequential: 2 runs)" in out
    rows = [line for line in study.splitlines() if line.startswith("| T8 | sequential |")]
    assert len(rows) == 2 and not any("not testable" in r for r in rows)


def test_report_folders_follow_the_entries_after_n_edits_and_report_dir():
    """Each run's report folder is its grid entry's report_dir, also after --n-edits
    (other run ids); --report-dir puts each entry's report in a folder of its name under it;
    the study's parts come with them."""
    import argparse

    grids = benchmark.load_grid("claims-smollm2")
    configs, entry_of = [], {}
    for g in grids:
        for c in g.configs():
            if c not in configs:
                configs.append(c)
                entry_of[id(c)] = g
    args = argparse.Namespace(methods=None, seeds=None, n_edits=2, grid="claims-smollm2")
    configs = benchmark.select(configs, args)
    entries = [(c, entry_of[id(c)]) for c in configs]
    report_of, part_of = benchmark.report_folders(entries)
    run_dirs = [Path(c.out_dir) / c.default_run_id() for c in configs]
    assert set(report_of) == set(run_dirs) and all("_n2_" in d.name for d in run_dirs)
    assert {str(v) for v in report_of.values()} == {
        f"reports_out/claims-smollm2/{p}" for p in ("single", "pairs", "sequential")}
    assert sorted(set(part_of.values())) == ["pairs", "sequential", "single"]
    over, _ = benchmark.report_folders(entries, Path("elsewhere"))
    assert {str(v) for v in over.values()} == {f"elsewhere/{p}" for p in
                                                ("single", "pairs", "sequential")}
    one = [(c, g) for c, g in entries if g.study == "single"]
    assert set(benchmark.report_folders(one, Path("elsewhere"))[0].values()) == {
        Path("elsewhere")}
