"""``keh compare``: calibration of its margin tests by simulation, its exit codes and messages on
synthetic run directories, and end to end on runs of a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from reports import inference as inf
from reports.paired import margin_tests
from tests.test_reports_build import CASES, make_run

ALPHA = 0.05


def _upper(rate: float, reps: int) -> float:
    """Largest Monte Carlo rejection rate consistent with a true size ``rate`` (one-sided 99%)."""
    return rate + 2.33 * math.sqrt(rate * (1 - rate) / reps)


def _binary(rng, n, batch, p_worse, p_better, corr):
    """Paired 0/1 outcomes with E[cand - base] = p_better - p_worse; within a batch the
    discordance draws share a shock with probability ``corr``."""
    g = np.arange(n) // batch
    shock = rng.random(g.max() + 1)[g]
    u = np.where(rng.random(n) < corr, shock, rng.random(n))
    d = np.where(u < p_better, 1, np.where(u < p_better + p_worse, -1, 0))
    base = np.where(d == -1, 1, np.where(d == 1, 0, rng.random(n) < 0.8)).astype(float)
    cand = np.where(d == 1, 1, np.where(d == -1, 0, base)).astype(float)
    return cand - base, g, (cand, base)


def _continuous(rng, n, batch, mean):
    """Batch effects plus skewed (centred gamma) case noise around ``mean``."""
    g = np.arange(n) // batch
    return mean + rng.normal(0, 0.3, g.max() + 1)[g] + 0.5 * (rng.gamma(1.0, 1.0, n) - 1), \
        g, None


SCENARIOS = {
    # (generator, margin): every one has true mean difference exactly -margin (the boundary)
    "0/1, cases, rare discordance": (lambda r: _binary(r, 30, 1, 0.02, 0.0, 0.0), 0.02),
    "0/1, cases, frequent discordance": (lambda r: _binary(r, 30, 1, 0.2, 0.18, 0.0), 0.02),
    "0/1, batches of 10, rare, correlated": (lambda r: _binary(r, 60, 10, 0.02, 0.0, 0.8),
                                             0.02),
    "0/1, batches of 10, frequent, correlated": (lambda r: _binary(r, 60, 10, 0.2, 0.18, 0.8),
                                                 0.02),
    "continuous, batches of 10": (lambda r: _continuous(r, 100, 10, -0.25), 0.25),
    "continuous, cases": (lambda r: _continuous(r, 30, 1, -0.25), 0.25),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_margin_tests_hold_their_level_at_the_margin(name):
    """At the boundary (true difference = -margin) neither one-sided test rejects more often
    than alpha: not 'worse' (exit 1) and not 'non-inferior'. The 'rare discordance' cases are
    where a sign-flip test at a non-zero margin alone fails (it rejected 25% of true nulls)."""
    gen, margin = SCENARIOS[name]
    rng = np.random.default_rng(7)
    reps = 300
    worse = noninf = 0
    for r in range(reps):
        d, units, pairs = gen(rng)
        t = margin_tests(d, units, margin, ALPHA, n_draws=499, seed=r, binary_pairs=pairs)
        worse += t.p_worse < ALPHA
        noninf += t.p_noninferior < ALPHA
    assert worse / reps <= _upper(ALPHA, reps), (name, worse / reps)
    assert noninf / reps <= _upper(ALPHA, reps), (name, noninf / reps)


def _runs_shifted(rng, mean, seeds=3, n=100, batch=10, run_sd=0.4):
    """Paired differences per seed and case: each seed's run pair shifted as a whole
    (``run_sd``, about 4 standard errors of a 100-case mean), batch effects, case noise;
    returns the seed-averaged case differences, units and the (seeds, units) cell table."""
    g = np.arange(n) // batch
    d = (mean + rng.normal(0, run_sd, (seeds, 1)) + rng.normal(0, 0.1, g.max() + 1)[g]
         + rng.normal(0, 1.0, (seeds, n)))
    cells = np.stack([np.bincount(g, weights=row) / np.bincount(g) for row in d])
    return d.mean(axis=0), g, cells


def test_run_effects_across_seeds_keep_the_level():
    """Three seeds whose runs move as a whole, at the boundary: with the seed x batch
    cells the gate holds its level; the seed-averaged batch test alone does not."""
    rng = np.random.default_rng(11)
    reps, margin = 300, 0.25
    joined = alone = 0
    for r in range(reps):
        d, units, cells = _runs_shifted(rng, -margin)
        joined += margin_tests(d, units, margin, ALPHA, n_draws=199, seed=r,
                               cells=cells).p_noninferior < ALPHA
        alone += margin_tests(d, units, margin, ALPHA, n_draws=199,
                              seed=r).p_noninferior < ALPHA
    assert joined / reps <= _upper(ALPHA, reps), joined / reps
    assert alone / reps > 0.15, alone / reps


def test_margin_tests_detect_a_real_regression():
    rng = np.random.default_rng(3)
    hits = 0
    for r in range(100):  # candidate 15 points worse on a 0/1 outcome, 100 single edits
        d, units, pairs = _binary(rng, 100, 1, 0.2, 0.05, 0.0)
        hits += margin_tests(d, units, 0.02, ALPHA, seed=r, binary_pairs=pairs).p_worse < ALPHA
    assert hits >= 65  # measured: 77 of 100
    d, units, _ = _continuous(rng, 100, 10, -1.5)
    assert margin_tests(d, units, 0.25, ALPHA).p_worse < ALPHA


def test_tango_exact_matches_the_binomial_bound_when_every_pair_ties():
    """All n pairs tied: non-inferiority at margin m is shown exactly when (1 - m)^n < alpha,
    i.e. from 149 cases at m = 0.02 (no discordant pair in 149 has probability 0.0497 if the
    candidate loses 2% of cases)."""
    ones = np.ones(149)
    assert inf.paired_binary_margin_test(ones, ones, -0.02, "greater").p < ALPHA
    ones = np.ones(140)
    assert inf.paired_binary_margin_test(ones, ones, -0.02, "greater").p > ALPHA
    assert inf.paired_binary_margin_test(ones, ones, -0.02, "less").p == pytest.approx(1.0)


# ---------------------------------------------------------------- the command
@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    return {
        "base": make_run(tmp_path, "alphaedit", 0),
        "seed1": make_run(tmp_path, "alphaedit", 1),
        "worse": make_run(tmp_path, "memit", 0, margin_gain=-4.0),
        "cases": make_run(tmp_path, "memit", 2, case_ids=[c + "x" for c in CASES],
                          run_id="other_cases"),
        "model": make_run(tmp_path, "memit", 3, model_sha="z" * 64, run_id="other_model"),
    }


def _compare(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["compare", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_worse_candidate_exits_1_and_json_has_the_table(runs, tmp_path, capsys):
    path = tmp_path / "cmp.json"
    status, out, _ = _compare(capsys, "--baseline", str(runs["base"]), "--candidate",
                              str(runs["worse"]), "--json", str(path))
    assert status == 1
    assert "worse" in out and "efficacy_margin" in out
    doc = json.loads(path.read_text())
    assert doc["exit_status"] == 1
    verdicts = {r["metric"]: r["verdict"] for r in doc["results"]}
    assert verdicts["efficacy_margin"] == "worse"
    assert set(verdicts) == {"efficacy_success", "paraphrase_success", "neighborhood_success",
                             "efficacy_margin"}
    assert doc["unit"] == "batch (12 clusters; sequential runs)"


def test_a_second_seed_is_not_worse_and_noninferiority_can_be_required(runs, capsys):
    args = ["--baseline", str(runs["base"]), "--candidate", str(runs["seed1"])]
    status, out, _ = _compare(capsys, *args)
    assert status == 0, out
    assert "worse" not in out.split("\n", 1)[1].replace("p worse", "")
    # 12 units cannot show a 2-point margin on 0/1 outcomes: a warning, and exit 1 if required
    assert "warning:" in out
    status, _, _ = _compare(capsys, *args, "--require-noninferiority")
    assert status == 1
    # a generous margin on the margin metric alone is shown
    status, out, _ = _compare(capsys, *args, "--metrics", "efficacy_margin", "--margin",
                              "efficacy_margin=1.0", "--require-noninferiority")
    assert status == 0 and "non-inferior" in out


@pytest.mark.parametrize("which,needle", [("cases", "case ids"),
                                          ("model", "model sha256")])
def test_runs_that_cannot_be_paired_exit_2_naming_the_difference(runs, capsys, which, needle):
    status, _, err = _compare(capsys, "--baseline", str(runs["base"]), "--candidate",
                              str(runs[which]))
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keh: error:") and needle in lines[0]


@pytest.mark.parametrize("extra,needle", [
    (["--metrics", "nope"], "metric 'nope' is not in the baseline"),
    (["--margin", "paraphrase_success=x"], "is not a number"),
    (["--metrics", "efficacy_margin", "--margin", "efficacy_success=0.1"],
     "--margin names metric(s) not compared"),
    (["--metrics", "diag_rho"], "has no default margin"),
    (["--alpha", "0.7"], "--alpha must be in (0, 0.5)"),
])
def test_bad_options_exit_2_with_one_line(runs, capsys, extra, needle):
    status, _, err = _compare(capsys, "--baseline", str(runs["base"]), "--candidate",
                              str(runs["seed1"]), *extra)
    assert status == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_a_side_must_be_one_method(runs, capsys):
    status, _, err = _compare(capsys, "--baseline", str(runs["base"]), str(runs["worse"]),
                              "--candidate", str(runs["seed1"]))
    assert status == 2 and "one method with one setting" in err


def test_a_run_from_before_a_new_hparams_field_is_the_same_setting(runs, tmp_path, capsys):
    """A run whose manifest lacks a field added later (here kl_factor) is the same setting as
    one that records the field at its default; a different value is still refused."""
    same = make_run(tmp_path, "alphaedit", 1, hparams={"layers": [1], "kl_factor": 0.0625},
                    run_id="later_revision")
    status, out, _ = _compare(capsys, "--baseline", str(runs["base"]), str(same),
                              "--candidate", str(runs["worse"]))
    assert status == 1 and "worse" in out
    other = make_run(tmp_path, "alphaedit", 2, hparams={"layers": [1], "kl_factor": 0.5},
                     run_id="other_setting")
    status, _, err = _compare(capsys, "--baseline", str(runs["base"]), str(other),
                              "--candidate", str(runs["worse"]))
    assert status == 2 and "one method with one setting" in err


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(tmp_path, capsys, shared_data):
    """FT (baseline, unconstrained so that it writes the facts into a random model) against no
    edit at all (candidate) on 12 single edits of a random Llama: the candidate is far worse,
    exit 1; a run on other weights cannot be paired."""
    common = ["--model", "random:llama-tiny", "--suite", "counterfact", "--n-edits", "12",
              "--batch-size", "1", "--out", str(tmp_path), "--data-dir", str(shared_data)]
    assert main(["run", "--method", "ft", "--run-id", "ft", "--set", "norm_constraint=10",
                 "--set", "lr=0.05", *common]) == 0
    assert main(["run", "--method", "noop", "--run-id", "noop", *common]) == 0
    assert main(["run", "--method", "noop", "--run-id", "noop_s1", "--seed", "1", *common]) == 0
    capsys.readouterr()
    status, out, _ = _compare(capsys, "--baseline", str(tmp_path / "ft"), "--candidate",
                              str(tmp_path / "noop"))
    assert status == 1, out
    status, _, err = _compare(capsys, "--baseline", str(tmp_path / "noop"), "--candidate",
                              str(tmp_path / "noop_s1"))
    assert status == 2 and "model sha256" in err


@pytest.mark.slow
def test_regress_exit_codes_on_a_tiny_model(tmp_path, capsys, shared_data, monkeypatch):
    """``nox -s regress`` on 12 single edits of a random Llama: a design of 3 units is refused
    before anything runs (exit 2); no edit against FT that writes the facts (unconstrained) is
    worse (exit 1), and a second call reuses both runs with the same exit; a candidate that
    does what the baseline does is not worse (exit 0); one equal to the baseline is
    refused."""
    from harness import regress

    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    strong = ["norm_constraint=10", "lr=0.05"]
    ft = ["--against", "ft", *(x for kv in strong for x in ("--against-set", kv))]
    common = ["--model", "random:llama-tiny", "--n-edits", "12", "--batch-size", "1",
              "--out", str(tmp_path)]
    assert regress.main(["--method", "noop", *ft, "--model", "random:llama-tiny",
                         "--n-edits", "6", "--batch-size", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "3 units give a smallest p of" in err and "at least 7 units" in err
    assert not list(tmp_path.iterdir())  # refused before anything ran
    assert regress.main(["--method", "noop", *ft, *common]) == 1
    out = capsys.readouterr().out
    assert "smallest p after Holm" in out and "worse" in out.split("verdict", 1)[1]
    assert regress.main(["--method", "noop", *ft, *common]) == 1
    assert capsys.readouterr().out.count("skip (complete)") == 2
    same = [x for kv in strong for x in ("--set", kv)]
    assert regress.main(["--method", "ft", *same, *ft, *common]) == 2  # the same run
    assert "same run" in capsys.readouterr().err
    # FT with its own default number of steps set explicitly: another run, the same edits
    assert regress.main(["--method", "ft", *same, "--set", "steps=25", *ft, *common]) == 0
    out = capsys.readouterr().out
    assert "non-inferior" in out and " worse" not in out.split("verdict", 1)[1]


# ---------------------------------------------------------------- power and intention to treat
def _with_failures(run: Path, cases: set[int], margin: float | None) -> Path:
    """Mark ``cases`` of a synthetic run as failed edits, with the outcomes keh measures on
    the model a failure leaves (``margin``), or, with None, none (older records)."""
    recs = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    for r in recs:
        if r["case_index"] in cases:
            r.update({"failed": True, "error": "NumericalError: boom", "diagnostics": {}})
            if margin is None:
                for k in [k for k in r if k.endswith(("_success", "_margin", "_magnitude"))]:
                    del r[k]
            else:
                r.update({"efficacy_margin": margin, "efficacy_success": 1.0,
                          "paraphrase_success": 1.0})
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def test_failed_edits_count_against_the_candidate_by_intention_to_treat(tmp_path, capsys):
    """A candidate equal to the baseline except that a third of its edits failed (8 of 24
    cases, in 8 of 12 batches), with the outcomes measured on the model they left (margin -4,
    the records' edit rates 1.0 ignored: a failed edit is a failure): worse in margin and
    efficacy. Every other case is identical, so dropping the failed cases (the old rule for
    the margin) would have shown no difference at all."""
    base = make_run(tmp_path, "alphaedit", 0, run_id="base")
    cand = make_run(tmp_path, "alphaedit", 0, run_id="cand", hparams={"layers": [2]})
    failed = {0, 3, 4, 7, 8, 11, 12, 15}
    _with_failures(cand, failed, margin=-4.0)
    status, out, _ = _compare(capsys, "--baseline", str(base), "--candidate", str(cand),
                              "--metrics", "efficacy_margin,efficacy_success", "--json",
                              str(tmp_path / "c.json"))
    doc = json.loads((tmp_path / "c.json").read_text())
    res = {r["metric"]: r for r in doc["results"]}
    assert status == 1 and res["efficacy_margin"]["verdict"] == "worse"
    assert res["efficacy_margin"]["n_cases"] == 24  # no case dropped
    assert res["efficacy_margin"]["n_failed_candidate"] == 8
    # the edit rate: the failed edits score 0 even though the record says 1.0
    assert res["efficacy_success"]["candidate"] == pytest.approx(
        res["efficacy_success"]["baseline"] - np.mean(
            [json.loads(x)["efficacy_margin"] > 0 for x in
             (base / "records.jsonl").read_text().splitlines()
             if json.loads(x)["case_index"] in failed]) * 8 / 24)
    assert "8/" not in out.split("\n")[0] and " 0/8 " in out  # failures shown in the table


def test_failed_edits_without_measured_outcomes_are_refused(tmp_path, capsys):
    base = make_run(tmp_path, "alphaedit", 0, run_id="base")
    cand = _with_failures(make_run(tmp_path, "alphaedit", 0, run_id="cand",
                                   hparams={"layers": [2]}), {3, 4}, margin=None)
    status, _, err = _compare(capsys, "--baseline", str(base), "--candidate", str(cand))
    assert status == 2 and "2 failed edits have no measured outcome" in err
    assert len(err.strip().splitlines()) == 1


def test_a_design_that_cannot_reach_alpha_is_refused_unless_allowed(tmp_path, capsys):
    """Five batches: the smallest one-sided sign-flip p is 1/32, times 4 metrics by Holm
    0.125: refused (exit 2) with the units needed; with --allow-underpowered it runs and
    says so, and even a far worse candidate cannot exit 1."""
    ids = CASES[:10]
    base = make_run(tmp_path, "alphaedit", 0, case_ids=ids, run_id="b")
    worse = make_run(tmp_path, "memit", 0, case_ids=ids, margin_gain=-20.0, run_id="w")
    status, _, err = _compare(capsys, "--baseline", str(base), "--candidate", str(worse))
    assert status == 2 and "smallest p of 0.125" in err and "at least 7 units" in err
    status, out, _ = _compare(capsys, "--baseline", str(base), "--candidate", str(worse),
                              "--allow-underpowered")
    assert status == 0 and "warning: underpowered" in out


def test_the_table_shows_the_mde_beside_each_difference(runs, tmp_path, capsys):
    path = tmp_path / "c.json"
    _, out, _ = _compare(capsys, "--baseline", str(runs["base"]), "--candidate",
                         str(runs["seed1"]), "--json", str(path))
    doc = json.loads(path.read_text())
    assert "MDE (drop)" in out
    for r in doc["results"]:
        assert np.isfinite(r["mde"]) and r["mde"] >= r["margin"]
    assert doc["results"][3]["mde"] > doc["results"][3]["margin"]  # the margin varies


def test_report_and_gate_agree_on_the_same_runs(tmp_path):
    """One inference core: on the same two runs (the candidate with failed edits) the
    report's pairwise table and keh compare give the same intention-to-treat differences,
    case counts and units."""
    from reports.compare import compare_runs
    from reports.load import load_runs
    from reports.tables import pairwise_rows, scale_of

    base = make_run(tmp_path, "alphaedit", 0, run_id="base")
    cand = _with_failures(make_run(tmp_path, "memit", 0, run_id="cand", margin_gain=0.5),
                          {0, 5, 9}, margin=-3.0)
    c = compare_runs(load_runs([base]), load_runs([cand]), n_draws=999)
    report = {r["metric"]: r for r in pairwise_rows(load_runs([base, cand]), "alphaedit", 200)}
    labels = {"efficacy_success": "Eff", "paraphrase_success": "Gen",
              "neighborhood_success": "Spe", "efficacy_margin": "Margin"}
    for r in c.results:
        row = report[labels[r.metric]]
        assert row["effect"] == pytest.approx(scale_of(r.metric) * r.diff)
        assert row["n"] == r.n_cases == 24
        assert row["unit"] == c.unit == "batch (12 clusters; sequential runs)"
        assert "3 cases with a failed edit" in row["note"]
    assert {r.metric: r.n_failed_candidate for r in c.results} == dict.fromkeys(labels, 3)
