"""reports.load / claims / build on synthetic run directories (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.errors import UserError
from reports import claims
from reports.build import build_report
from reports.load import check_comparable, load_runs

# 12 batches: the batch is the inference unit of sequential runs, and a cluster sign-flip test
# over 4 batches (the old grid) cannot reach alpha 0.05 (smallest p 2/2^4)
N_CASES, BATCH = 24, 2
CASES = [str(100 + i) for i in range(N_CASES)]
DATA_SHA = "d" * 64
MODEL_SHA = "m" * 64


def make_run(root: Path, method: str, seed: int = 0, *, case_ids: list[str] | None = None,
             data_sha: str = DATA_SHA, model_sha: str = MODEL_SHA, status: str = "complete",
             suite: str = "counterfact", sequential: bool = True, hparams: dict | None = None,
             rho_shift: float = 0.0, margin_gain: float = 0.0, diagnostics: bool = True,
             curve: bool = False, run_id: str | None = None, preset: str | None = None,
             generation: bool = False) -> Path:
    """A run directory as harness.runner writes it, with reproducible synthetic values."""
    case_ids = case_ids or CASES
    rid = run_id or f"{suite}_{method}_s{seed}"
    d = root / rid
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base_rho = np.linspace(0.1, 0.9, len(case_ids))  # also declines with the batch index
    base_rho = base_rho[::-1].copy()
    records = []
    for i, cid in enumerate(case_ids):
        rho = float(np.clip(base_rho[i] + rho_shift + rng.normal(0, 0.02), 0, 1))
        margin = float(2 * base_rho[i] - 0.8 + margin_gain * (1 - base_rho[i])
                       + rng.normal(0, 0.05))
        rec = {"method": method, "suite": suite, "model": "toy", "seed": seed,
               "case_index": i, "case_id": cid, "batch": i // BATCH,
               "efficacy_success": float(margin > 0),
               "paraphrase_success": float(margin > 0.2),
               "neighborhood_success": float(rng.uniform() < 0.8),
               "efficacy_margin": margin, "efficacy_magnitude": margin / 10,
               "logprobs": {"rewrite": {"new": [[-1.0]], "true": [[-2.0]]}},
               "diagnostics": ({"rho": rho, "phi": rho + 0.05, "z_error": 1 - rho,
                                "update_norm": 1.0} if diagnostics else {})}
        if generation:  # no reference texts: reference_score None (missing, never 0)
            rec.update({"ngram_entropy": 5.5 + 0.01 * (i % 3), "reference_score": None})
        if i == 3 and method == "ft":
            rec = {k: v for k, v in rec.items() if not k.endswith(("_success", "_margin"))}
            rec.update({"failed": True, "error": "boom"})
        records.append(rec)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = {
        "run_id": rid, "status": status, "method": method, "seed": seed,
        "config": {"model": "toy", "method": method, "suite": suite, "n_edits": len(case_ids),
                   "batch_size": BATCH, "sequential": sequential, "seed": seed, "start": 0},
        "config_hash": f"h{abs(hash((method, seed))) % 10**8:08d}",
        "hparams": hparams or {"layers": [1]},
        "data": {"path": "/data/cf.json", "sha256": data_sha, "n_cases": len(case_ids),
                 "case_ids": case_ids},
        "model": {"name": "toy", "sha256": model_sha},
        "versions": {"python": "3.11", "torch": "2.13.0"}, "git": {"commit": "abc", "dirty": False},
        "device": {"device": "cpu"}, "timings": {"time_per_edit_s": 0.5, "eval_cases_per_s": 9},
        "peak_memory": {"peak_rss_mib": 100.0}, "summary": {},
    }
    if preset is not None:
        manifest["config"]["preset"] = preset
    (d / "manifest.json").write_text(json.dumps(manifest))
    if curve:
        lines = [{"n_edits_so_far": k * BATCH, "batch": k,
                  "downstream": {"sst2": {"acc": 0.8 - 0.02 * k * (method != "metake"), "n": 100}},
                  "probe": {"efficacy_success": 90.0 - k}} for k in range(N_CASES // BATCH + 1)]
        (d / "curve.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for seed in (0, 1):
        dirs.append(make_run(root, "alphaedit", seed, curve=True))
        dirs.append(make_run(root, "memit", seed, rho_shift=-0.05))
        dirs.append(make_run(root, "metake", seed, rho_shift=0.2, margin_gain=1.0, curve=True,
                             hparams={"layers": [1], "solver": "alphaedit"}))
    dirs.append(make_run(root, "ft", 0, diagnostics=False))
    return dirs


def test_load_runs_gives_a_tidy_frame(grid):
    runs = load_runs(grid)
    f = runs.frame
    assert len(f) == 7 * N_CASES and len(runs.manifests) == 7
    for col in ("run_id", "arm", "method", "suite", "model", "seed", "case_id", "batch",
                "efficacy_success", "efficacy_margin", "diag_rho", "diag_z_error"):
        assert col in f.columns, col
    assert "logprobs" not in f.columns
    assert f["diag_rho"].dtype == float
    ft = f[f["arm"] == "ft"]
    # intention to treat: the failed edit counts as a failure in its success rates; this
    # record (written as keh did before it measured failed cases) has no other outcome, so
    # they stay missing, never imputed (reports.paired counts such cases as unmeasured)
    failed = ft[ft["failed"]]
    assert len(failed) == 1 and failed["efficacy_success"].iloc[0] == 0.0
    assert failed["paraphrase_success"].iloc[0] == 0.0
    assert np.isnan(failed["efficacy_margin"].iloc[0])
    assert np.isnan(failed["neighborhood_success"].iloc[0])  # the edit never happened
    assert set(f["preset"]) == {"legacy"}  # manifests without config.preset
    assert ft["diag_rho"].isna().all()
    assert list(f.loc[f["run_id"] == "counterfact_metake_s0", "case_id"]) == CASES
    assert not runs.curves.empty and set(runs.curves["kind"]) == {"downstream", "probe"}
    # a folder of run directories stands for its runs
    assert len(load_runs([grid[0].parent]).manifests) == 7


def test_inference_unit_is_the_batch_in_every_mode_and_the_case_alone_when_single(grid):
    from reports.paired import unit_labels, units_of

    frame = load_runs(grid[:1]).frame
    labels = unit_labels(frame)
    assert labels[0] == labels[1] == CASES[0] and len(set(labels)) == N_CASES // BATCH
    few = frame.assign(batch=np.arange(len(frame)) // 8)  # 3 batches: still batches
    assert units_of(few).nunique() == 3
    # batch mode: a batch's cases still share one weight update, so the batch is the unit
    batch_mode = frame.assign(sequential=False)
    assert units_of(batch_mode).nunique() == N_CASES // BATCH
    single = frame.assign(sequential=False, batch=np.arange(len(frame)))
    assert units_of(single).nunique() == N_CASES
    # two runs batched differently: cases connected through either run's batches join
    other = frame.assign(run_id="other", batch=(np.arange(len(frame)) + 1) // 2)
    assert units_of(pd.concat([frame, other])).nunique() == 1


def test_metake_solver_hparam_names_the_arm(tmp_path):
    d = make_run(tmp_path, "metake", hparams={"solver": "memit"})
    assert set(load_runs([d]).frame["arm"]) == {"metake-memit"}


def test_incomplete_run_is_refused(tmp_path):
    d = make_run(tmp_path, "alphaedit", status="running")
    with pytest.raises(UserError, match=r"incomplete \(status 'running'\)"):
        load_runs([d])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        load_runs([empty])
    with pytest.raises(UserError, match="no such directory"):
        load_runs([tmp_path / "nowhere"])


def test_mismatched_runs_give_a_clear_message(tmp_path):
    a = make_run(tmp_path, "alphaedit")
    b = make_run(tmp_path, "metake", case_ids=CASES[::-1])
    c = make_run(tmp_path, "memit", data_sha="e" * 64)
    e = make_run(tmp_path, "rome", model_sha="f" * 64)
    runs = load_runs([a, b, c, e])
    with pytest.raises(UserError) as info:
        check_comparable(runs.subset([a.name, b.name]))
    msg = str(info.value)
    assert a.name in msg and b.name in msg and "same cases in a different order" in msg
    with pytest.raises(UserError, match="data sha256: 'dddddddddddd' vs 'eeeeeeeeeeee'"):
        check_comparable([runs.manifests[a.name], runs.manifests[c.name]])
    with pytest.raises(UserError, match="model sha256"):
        check_comparable(runs.subset([a.name, e.name]))
    check_comparable(runs.subset([a.name, e.name]), same_model=False)  # design only: fine
    with pytest.raises(UserError, match="not comparable"):
        build_report([a, c], tmp_path / "report")


def test_claims_on_synthetic_runs(grid):
    runs = load_runs(grid)
    rows = claims.run_claims(runs, claims.Settings(n_resamples=200))
    detail = claims.finalise(rows)
    summary = claims.summarise(detail).set_index("claim")
    assert list(summary.index) == [f"T{i}" for i in range(1, 9)]  # nothing dropped
    assert summary.loc["T2", "verdict"] == "supported"  # rho +0.2 vs both, z_error down
    # T4 at equal baseline outcome: here the gain, 1 - rho, is a function of the baseline's
    # outcome alone (as under a ceiling), so T4 must not be supported (issue 14)
    assert summary.loc["T4", "verdict"] == "not supported"
    assert detail.loc[detail["claim"] == "T4", "value"].iloc[0] > 0
    assert summary.loc["T5", "verdict"].startswith("not testable: missing runs metake-noproxy")
    assert "missing runs metake-memit" in summary.loc["T7", "verdict"]
    # failures have low rho, mostly between batches (rho falls with the batch index); T1's
    # statistic and its permutation both use pairs within a batch, where only one batch of
    # two holds a success and a failure: whatever the order, nothing is shown
    t1 = detail[detail["claim"] == "T1"]
    assert (t1["p"] == 1.0).all() and "within batches (12)" in t1["unit"].iloc[0]
    t8 = detail[detail["claim"] == "T8"]
    assert t8["value"].iloc[0] < 0  # rho declines with the batch index
    p = detail["p"].to_numpy(float)
    ok = np.isfinite(p)
    assert np.all(detail["p_holm"].to_numpy(float)[ok] >= p[ok] - 1e-12)
    assert set(detail["verdict"]) <= {"supported", "not supported"} | {
        v for v in detail["verdict"] if v.startswith("not testable: ")}


@pytest.fixture(scope="module")
def report(grid: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(grid, tmp_path_factory.mktemp("report"), n_resamples=200)


def test_build_report_writes_everything(report):
    out = report.parent
    text = report.read_text()
    assert report.name == "index.md"
    for needle in ("## Runs", "## Data", DATA_SHA, "## Software", "## Claims", "T8",
                   "## Figures", "![Figure 1]", "Holm", "alphaedit", "metake"):
        assert needle in text, needle
    for stem in ("main_counterfact_toy", "outcomes_counterfact_toy",
                 "downstream_counterfact_toy", "pairwise", "claims", "claims_summary", "runs"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{stem}.{ext}").stat().st_size > 0, (stem, ext)
    tex = (out / "tables" / "main_counterfact_toy.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and "Score" in tex
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == sorted(f"{k}_counterfact_toy.png" for k in (
        "metrics", "downstream", "probe", "diagnostics", "gain_vs_rho", "rho_by_batch"))
    for p in (out / "figures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{p.name}" in text


def test_missing_data_skips_figures_with_a_note(tmp_path):
    d = make_run(tmp_path / "runs", "ft", diagnostics=False)
    index = build_report([d], tmp_path / "report", n_resamples=100)
    text = index.read_text()
    assert "Figures not drawn" in text and "no method recorded rho" in text
    assert "not testable: missing runs" in text
    assert (tmp_path / "report" / "figures" / "metrics_counterfact_toy.png").exists()


def test_cli_report(grid, tmp_path, capsys):
    out = tmp_path / "cli_report"
    assert main(["report", str(grid[0]), "--out", str(out), "--n-resamples", "100"]) == 0
    assert (out / "index.md").exists()
    bad = make_run(tmp_path / "more", "rome", status="running")
    capsys.readouterr()
    assert main(["report", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keh: error: run ") and "incomplete" in err[0]


def test_t7_ordering_with_solver_variants(tmp_path):
    gains = {"alphaedit": 1.0, "memit": 0.5, "rome": 0.0}
    dirs = []
    for solver, gain in gains.items():
        hp = ({"layers": [1], "denominator_key": "plain", "key_averaging": "uniform",
               "mom2_adjustment": False, "value_site": "mlp"} if solver == "rome" else None)
        dirs.append(make_run(tmp_path, solver, hparams=hp))
        dirs.append(make_run(tmp_path, "metake", margin_gain=gain, run_id=f"metake_{solver}",
                             hparams={"solver": solver}))
    runs = load_runs(dirs)
    assert set(runs.frame["arm"]) == {"alphaedit", "memit", "rome", "metake", "metake-memit",
                                      "metake-rome"}
    detail = claims.finalise(claims.t7_ordering(runs, claims.Settings(n_resamples=200)))
    assert list(detail["verdict"]) == ["supported"] * 3
    # the negative control is an equivalence test (TOST) with a p-value in the Holm family
    assert np.isfinite(detail["p"].iloc[2]) and "TOST" in detail["test"].iloc[2]
    # the report says which ROME the control used, and which ROME MetaKE's lower level is
    assert ("ROME arm: denominator_key=plain, key_averaging=uniform, mom2_adjustment=False, "
            "value_site=mlp" in detail["detail"].iloc[2])
    assert "metake-rome's lower level: C0-whitened" in detail["detail"].iloc[2]


def test_runs_without_a_common_seed_or_weights_are_not_paired(tmp_path):
    a = make_run(tmp_path, "alphaedit", 0, model_sha="a" * 64)
    b = make_run(tmp_path, "metake", 1, model_sha="b" * 64, rho_shift=0.2)
    rows = claims.t2_realisation(load_runs([a, b]), claims.Settings(n_resamples=100))
    verdict = rows[0]["verdict"]
    assert verdict.startswith("not testable: metake and alphaedit have no seed in common")
    assert "model sha256" in verdict and a.name in verdict and b.name in verdict
    # the same weights (a real model) pair across seeds: case means
    c = make_run(tmp_path / "same", "alphaedit", 0)
    d = make_run(tmp_path / "same", "metake", 1, rho_shift=0.2)
    rows = claims.finalise(claims.t2_realisation(load_runs([c, d]),
                                                 claims.Settings(n_resamples=100)))
    assert rows["verdict"].iloc[0] == "supported"


def test_zsre_columns_and_locality(tmp_path):
    from reports.tables import main_table

    dirs = []
    for method, shift in (("alphaedit", 0.0), ("metake", 0.001)):
        d = make_run(tmp_path, method, suite="zsre")
        recs = [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]
        for i, r in enumerate(recs):
            for k in [k for k in r if k.endswith(("_success", "_margin", "_magnitude"))]:
                del r[k]
            r.update({"efficacy_accuracy": 0.5 + 0.02 * (i % 5), "paraphrase_accuracy": 0.4,
                      "specificity_accuracy": 0.3 + 0.01 * (i % 3) + shift})
        (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        dirs.append(d)
    runs = load_runs(dirs)
    table = main_table(runs, n_resamples=100)
    assert list(table.display.columns[-3:]) == ["Eff", "Gen", "Spe"]
    expected = 100 * np.mean([0.5 + 0.02 * (i % 5) for i in range(N_CASES)])
    assert table.raw.loc[0, "Eff"] == pytest.approx(expected)
    t6 = claims.finalise(claims.t6_locality(runs, claims.Settings(n_resamples=100)))
    assert list(t6["test"]) == ["Spe (specificity_accuracy): metake non-inferior to alphaedit"]
    assert t6["verdict"].iloc[0] == "supported" and t6["value"].iloc[0] == pytest.approx(0.1)


def test_t7_tests_the_pairs_whose_arms_exist(grid, tmp_path):
    """With MetaKE-over-MEMIT runs but none over ROME, the AlphaEdit-vs-MEMIT sub-test is run
    and only the ROME sub-tests are 'not testable'."""
    extra = [make_run(tmp_path, "metake", seed, rho_shift=0.1, margin_gain=3.0,
                      hparams={"layers": [1], "solver": "memit"},
                      run_id=f"counterfact_metake-memit_s{seed}") for seed in (0, 1)]
    detail = claims.finalise(claims.run_claims(load_runs(grid + extra),
                                               claims.Settings(n_resamples=200)))
    t7 = detail[detail["claim"] == "T7"].set_index("test")
    first = t7.loc["gain(alphaedit) > gain(memit)"]
    assert first["verdict"] == "not supported"  # MEMIT's gain (3.0) is the larger here
    assert first["value"] < 0 and np.isfinite(first["p"])
    for test in ("gain(memit) > gain(rome)", "gain(rome) ~ 0 (negative control, TOST)"):
        assert t7.loc[test, "verdict"] == "not testable: missing runs rome, metake-rome"


def test_t3_degenerate_kernel_energy_is_not_supported(tmp_path):
    """Kernel energy 0 for MetaKE and its open-loop target alike (ker S trivial) contradicts
    'kernel energy down': the sub-test is 'not supported' (issue 14: contradicting data is not
    'not testable'), with the reason in its detail."""
    d = make_run(tmp_path, "metake", hparams={"layers": [1], "solver": "alphaedit"})
    recs = [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]
    for i, r in enumerate(recs):
        r["diagnostics"].update({"kernel_energy": 0.0, "kernel_energy_open_loop": 0.0,
                                 "alignment": 0.9 + 0.001 * i, "alignment_open_loop": 0.9})
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = claims.t3_alignment(load_runs([d]), claims.Settings(n_resamples=200))
    by_test = {r["test"]: r for r in rows}
    ke = by_test["kernel_energy: metake vs open-loop target"]
    assert ke["p"] == 1.0 and "ker S is trivial" in ke["detail"]
    assert claims.finalise([ke])["verdict"].iloc[0] == "not supported"
    al = by_test["alignment: metake vs open-loop target"]
    assert al["verdict"] is None and al["direction_ok"] is True  # finalise() decides


def test_presets_are_labelled_and_never_mixed(tmp_path):
    from reports.tables import main_table, pairwise_rows

    dirs = [make_run(tmp_path, "alphaedit"),  # no config.preset: legacy
            make_run(tmp_path, "alphaedit", preset="tuned", run_id="ae_tuned"),
            make_run(tmp_path, "metake", preset="tuned", rho_shift=0.2, run_id="mk_tuned")]
    runs = load_runs(dirs)
    assert sorted(runs.frame["preset"].unique()) == ["legacy", "tuned"]
    table = main_table(runs, n_resamples=100)
    assert list(table.display["method"]) == ["alphaedit [legacy]", "alphaedit [tuned]",
                                             "metake [tuned]"]
    assert "n_failed" in table.display.columns
    rows = pairwise_rows(runs, "alphaedit", n_resamples=100)
    # metake [tuned] is compared with alphaedit [tuned] only; legacy has no other arm
    assert {(r["preset"], r["method"], r["vs"]) for r in rows} == {
        ("tuned", "metake", "alphaedit")}
    index = build_report(dirs, tmp_path / "report", n_resamples=100)
    summary = (tmp_path / "report" / "tables" / "claims_summary.csv").read_text()
    assert "tuned" in summary and "legacy" in summary
    assert "[tuned]" in index.read_text()


def test_failures_count_and_are_flagged(tmp_path):
    from reports.tables import main_table

    d = make_run(tmp_path / "runs", "ft", diagnostics=False)
    runs = load_runs([d])
    raw = main_table(runs, n_resamples=100).raw
    assert raw.loc[0, "n_failed"] == 1
    ok = runs.frame[~runs.frame["failed"]]
    # intention to treat: the failed edit is a 0 in Eff over all 24 cases
    assert raw.loc[0, "Eff"] == pytest.approx(100 * ok["efficacy_success"].sum() / N_CASES)
    text = build_report([d], tmp_path / "report", n_resamples=100).read_text()
    assert "Runs with failed edits" in text and "1 of 24 edits failed (boom)" in text


def test_fluency_reaches_the_table_and_t6_consistency_missing_not_zero(tmp_path):
    from reports.tables import main_table

    dirs = [make_run(tmp_path, m, generation=True) for m in ("alphaedit", "metake")]
    runs = load_runs(dirs)
    table = main_table(runs, n_resamples=100)
    assert {"Flu", "Consis"} <= set(table.display.columns)
    assert table.raw.loc[0, "Flu"] == pytest.approx(100 * np.mean(
        [5.5 + 0.01 * (i % 3) for i in range(N_CASES)]))
    assert np.isnan(table.raw.loc[0, "Consis"]) and set(table.display["Consis"]) == {"–"}
    t6 = claims.finalise(claims.t6_locality(runs, claims.Settings(n_resamples=100)))
    flu = t6[t6["test"].str.startswith("Flu")].iloc[0]
    assert flu["verdict"] == "supported" and flu["value"] == pytest.approx(0.0)


def test_downstream_labels_edits_in_model_and_does_not_pool_seeds(tmp_path):
    from reports.tables import downstream_table

    dirs = [make_run(tmp_path, "alphaedit", seed, sequential=False, curve=True)
            for seed in (0, 1)]
    for d in dirs:  # batch mode: checkpoints before the first and after the last batch
        lines = [{"n_edits_so_far": 0, "batch": 0, "downstream": {"sst2": {"acc": 0.8, "n": 100}}},
                 {"n_edits_so_far": N_CASES, "batch": N_CASES // BATCH,
                  "downstream": {"sst2": {"acc": 0.7, "n": 100}}}]
        (d / "curve.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = downstream_table(load_runs(dirs))
    raw = table.raw.set_index("n_edits")
    assert raw.loc[0, "n"] == 100 and raw.loc[0, "acc"] == pytest.approx(0.8)  # not 200
    assert raw.loc[N_CASES, "edits_in_model"] == BATCH  # the model holds one batch
    assert "edits in model" in table.display.columns


def test_diagnostics_tables_by_family_with_only_the_arms_that_record_them(tmp_path):
    """Issue 14's readable report: per-edit diagnostics come in one table per family (target
    step, write, MetaKE's upper level, BLUE's first boundary layer, solver-specific), none
    wider than MAX_DIAG_COLUMNS diagnostics, each listing only the methods that record one of
    its columns; a None diagnostic (undefined, e.g. 0/0) is missing, not zero."""
    from reports.tables import MAX_DIAG_COLUMNS, diagnostics_tables

    plain = make_run(tmp_path, "alphaedit")
    blue = make_run(tmp_path, "metake", hparams={"layers": [1, 3], "write_plan": "blue"})
    recs = [json.loads(line) for line in (blue / "records.jsonl").read_text().splitlines()]
    for i, r in enumerate(recs):
        r["diagnostics"].update({"target_steps": 3.0, "shift_cos": 0.5,
                                 "rho_pred_open_loop": None if i % 2 else 0.7,
                                 **{f"layer1_extra{k}": float(k) for k in range(10)}})
    (blue / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tables = {t.name.removeprefix("diagnostics_counterfact_toy_"): t
              for t in diagnostics_tables(load_runs([plain, blue]), n_resamples=50)}
    assert list(tables) == ["target", "write", "upper", "boundary_1", "boundary_2"]
    for t in tables.values():
        assert len([c for c in t.display.columns if c not in ("method", "runs", "n_failed")]) \
            <= MAX_DIAG_COLUMNS
    def arms(t):
        return [m.split(" [")[0] for m in t.display["method"]]

    assert arms(tables["write"]) == ["alphaedit", "metake-blue"]
    for fam in ("target", "upper", "boundary_1", "boundary_2"):
        assert arms(tables[fam]) == ["metake-blue"], fam
    upper = tables["upper"].raw
    assert upper["rho_pred_open_loop"].iloc[0] == pytest.approx(0.7)


def test_hparams_lines_show_what_differs_within_an_arm():
    from types import SimpleNamespace

    from reports.build import _hparams_lines

    def manifest(**hp):
        return {"config": {"method": "memit"}, "method": "memit", "hparams": hp}

    runs = SimpleNamespace(manifests={
        "a": manifest(layers=[4, 5], v_lr=0.1), "b": manifest(layers=[4, 5], v_lr=0.1),
        "c": manifest(layers=[4, 5], v_lr=0.1, write_plan="spread"),
        "d": {"config": {"method": "noop"}, "method": "noop", "hparams": {}}})
    lines = _hparams_lines(runs)
    assert lines[0] == '- memit (2 runs): `{"layers": [4, 5], "v_lr": 0.1}`'
    assert lines[1] == '  - memit, 1 run more, differing only in: `{"write_plan": "spread"}`'
    assert lines[2] == "- noop (1 run): `{}`"


def _set_git(run: Path, commit: str, resumed: list[str] = ()) -> Path:
    m = json.loads((run / "manifest.json").read_text())
    m["git"] = {"commit": commit, "dirty": False}
    m["resumed"] = [{"at": "t", "git": {"commit": c, "dirty": False}} for c in resumed]
    (run / "manifest.json").write_text(json.dumps(m))
    return run


def test_mixed_code_revisions_are_flagged(tmp_path):
    """Runs of one arm from two revisions, a run resumed under another revision, and arms
    from different revisions: each is said at the top of the report; one revision throughout
    says nothing."""
    from reports.load import revision_notes

    a0 = _set_git(make_run(tmp_path, "alphaedit", 0), "aaaaaaaa11")
    a1 = _set_git(make_run(tmp_path, "alphaedit", 1), "bbbbbbbb22")
    m0 = _set_git(make_run(tmp_path, "metake", 0), "aaaaaaaa11", resumed=["cccccccc33"])
    notes = revision_notes(load_runs([a0, a1, m0]))
    assert notes == [
        "run counterfact_metake_s0 (metake [legacy]) was resumed across code revisions "
        "aaaaaaaa -> cccccccc",
        "the runs of alphaedit [legacy] come from 2 code revisions: aaaaaaaa "
        "(counterfact_alphaedit_s0); bbbbbbbb (counterfact_alphaedit_s1)",
        "the runs of metake [legacy] come from 2 code revisions: aaaaaaaa "
        "(counterfact_metake_s0); cccccccc (counterfact_metake_s0)",
        "arms compared here come from different code revisions: alphaedit [legacy]: "
        "aaaaaaaa, bbbbbbbb; metake [legacy]: aaaaaaaa, cccccccc"]
    same = [_set_git(make_run(tmp_path / "s", arm, 0), "aaaaaaaa11")
            for arm in ("alphaedit", "metake")]
    assert revision_notes(load_runs(same)) == []
    text = build_report([a0, a1, m0], tmp_path / "out", n_resamples=100).read_text()
    assert "**Mixed code revisions**" in text and "aaaaaaaa -> cccccccc" in text


def test_failed_edits_are_counted_in_every_table_that_reports_the_arm(tmp_path):
    """FT's run has one failed edit (case 3): every table with an FT row says 1 (main,
    outcomes, diagnostics, downstream, paper), the pairwise rows name it, and the report
    flags the run."""
    from reports import paper, tables

    dirs = [make_run(tmp_path, arm, 0, generation=True, curve=True)
            for arm in ("alphaedit", "ft")]
    runs = load_runs(dirs)
    built = [tables.main_table(runs, 100), tables.outcome_table(runs, 100),
             tables.downstream_table(runs), *tables.diagnostics_tables(runs, 100),
             paper.paper_table("toy", {"counterfact": runs}, n_resamples=100)]
    assert all(t is not None for t in built)
    for t in built:
        rows = t.display[t.display["method"].astype(str).str.startswith("ft")]
        assert len(rows) >= 1 and set(rows["n_failed"]) == {1}, t.name
        other = t.display[t.display["method"].astype(str).str.startswith("alphaedit")]
        assert set(other["n_failed"]) == {0}, t.name
    pw = tables.pairwise_rows(runs, "alphaedit", 100)
    assert pw and all("1 cases with a failed edit, counted by intention to treat" in r["note"]
                      for r in pw if "note" in r and r.get("n"))
    text = build_report(dirs, tmp_path / "out", n_resamples=100).read_text()
    assert "**counterfact_ft_s0** (ft): 1 of 24 edits failed (boom)" in text
