"""The claims study (reports/study.py) and T6's CounterFact+ rows, on runs whose answers are
known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from reports import claims, study
from reports.load import load_runs
from tests.test_reports_build import make_run


def _with(d: Path, fn) -> Path:
    recs = [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]
    for i, r in enumerate(recs):
        r.update(fn(i))
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_t6_tests_counterfact_plus_with_kl_lower_is_better(tmp_path):
    """NS+ equal in both arms: non-inferior (12 batches, every cluster at +1 from the
    boundary: p = 2^-12). NKL: MetaKE 0.5 nats above AlphaEdit everywhere, ten times the
    margin: not non-inferior, and the study calls it contradicted. A sign error in the KL's
    orientation would make MetaKE's NKL look better and the row supported."""
    runs = []
    for method, extra in (("alphaedit", 0.0), ("metake", 0.5)):
        d = make_run(tmp_path, method)
        runs.append(_with(d, lambda i, e=extra: {
            "neighborhood_plus_success": float(i % 3 == 0),
            "neighborhood_kl": 0.1 + 0.01 * (i % 4) + e,
            "neighborhood_plus_kl": 0.2 + 0.01 * (i % 5) + e}))
    rows = claims.finalise(claims.t6_locality(load_runs(runs),
                                              claims.Settings(n_resamples=200)))
    rows = rows.set_index(rows["test"].str.split(" ").str[0])
    assert list(rows.index) == ["Spe", "Flu", "NS+", "NKL", "NKL+"]
    assert rows.loc["NS+", "verdict"] == "supported"
    assert rows.loc["NS+", "p"] == pytest.approx(2.0**-12)
    assert rows.loc["NKL", "verdict"] == "not supported"
    assert rows.loc["NKL", "value"] == pytest.approx(-0.5)
    assert rows.loc["NKL+", "value"] == pytest.approx(-0.5)
    assert rows.loc["NKL", "ci_hi"] == pytest.approx(-0.5)
    assert "margin 0.05" in rows.loc["NKL", "statistic"]
    assert rows.loc["Flu", "verdict"].startswith("not testable")
    sub, _ = study.study({"single": claims.t6_locality(load_runs(runs),
                                                       claims.Settings(n_resamples=200))},
                         [t for t in study.DESIGN if t.claim == "T6" and t.part == "single"])
    got = dict(zip(sub["test"].str.split(" ").str[0], sub["verdict"], strict=True))
    assert got["NS+"] == "supported" and got["NKL"] == "contradicted"
    assert got["NKL+"] == "contradicted"


def _row(claim: str, test: str, value: float, lo: float, hi: float, p: float, mde: float,
         ok: bool, n_clusters: int = 40, statistic: str = "mean difference") -> dict:
    return claims._row(claim, test, statistic, value, (lo, hi), p, n_clusters, ok,
                       n_clusters=n_clusters, mde=mde)


T2 = [t for t in study.DESIGN if t.claim == "T2"][:1]  # rho vs alphaedit, up, delta 0.05
T39 = study.stats.t(39)  # 40 units: the MDE's and the power's reference distribution


def test_three_way_verdicts_on_rows_with_known_answers():
    se = 0.01
    mde = claims.inf.mde(se, 40)  # what location_test reports for this se and 40 units
    # one row: the family's level is alpha itself; bounds value +- t_{39, 0.95} se
    q = T39.ppf(0.95)
    cases = {
        # significant in the claimed direction
        "supported": _row("T2", "rho: metake vs alphaedit (up)", 0.2, 0.18, 0.22, 1e-6, mde,
                          True),
        # upper bound 0.01 + 1.68 se = 0.027 < 0.05, the smallest effect worth detecting
        "contradicted": _row("T2", "rho: metake vs alphaedit (up)", 0.01, -0.01, 0.03, 0.3,
                             mde, True),
        # upper bound 0.04 + 1.68 se = 0.057 reaches 0.05: the design cannot tell
        "inconclusive": _row("T2", "rho: metake vs alphaedit (up)", 0.04, 0.02, 0.06, 0.2,
                             mde, True),
    }
    assert 0.01 + q * se < 0.05 < 0.04 + q * se
    for expected, row in cases.items():
        sub, claim = study.study({"single": [row]}, T2)
        assert sub["verdict"].iloc[0] == expected
        assert claim["verdict"].iloc[0] == expected
    # power at delta 0.05 with se 0.01 and one row: F_39(5 - t_{39, 0.975})
    sub, _ = study.study({"single": [cases["supported"]]}, T2)
    assert sub["power"].iloc[0] == pytest.approx(T39.cdf(5 - T39.ppf(0.975)), abs=1e-6)
    # an MDE that cannot reach alpha has no power
    row = _row("T2", "rho: metake vs alphaedit (up)", 0.01, -1, 1, 0.5, math.inf, True)
    assert study.study({"single": [row]}, T2)[0]["power"].iloc[0] == 0.0


def test_tost_power_needs_both_one_sided_tests():
    """T7's control at a true gain of 0: power 2 F(m / se - q) - 1, not F(m / se - q)."""
    tost = [t for t in study.DESIGN if t.kind == "tost"]
    se = 0.1
    mde = claims.inf.mde(se, 40, alternative="greater")
    row = _row("T7", "gain(rome) ~ 0 (negative control, TOST)", 0.0, -0.1, 0.1, 0.5, mde,
               True, statistic="mean ROME gain, TOST margin +-0.25")
    sub, _ = study.study({"single": [row]}, tost)
    one = T39.cdf(0.25 / se - T39.ppf(0.95))
    assert sub["power"].iloc[0] == pytest.approx(2 * one - 1, abs=1e-6)


def test_holm_runs_over_the_study_and_power_falls_with_its_size():
    """Two rows, p 0.03 and 0.04: each alone is supported, together Holm makes them
    0.06 and 0.06 (not supported); the power at Holm's strictest level falls with m."""
    design = [t for t in study.DESIGN if t.claim == "T2"][:2]
    mde = claims.inf.mde(0.02, 40)
    a = _row("T2", "rho: metake vs alphaedit (up)", 0.05, 0.0, 0.1, 0.03, mde, True)
    b = _row("T2", "z_error: metake vs alphaedit (down)", -0.05, -0.1, 0.0, 0.04, mde, True)
    alone, _ = study.study({"single": [a]}, design[:1])
    both, claim = study.study({"single": [a, b]}, design)
    assert alone["verdict"].iloc[0] == "supported"
    assert list(both["p_holm"]) == pytest.approx([0.06, 0.06])
    assert list(both["verdict"]) == ["inconclusive", "inconclusive"]
    assert claim["verdict"].iloc[0] == "inconclusive"
    assert both["power"].iloc[0] < alone["power"].iloc[0]


def test_missing_part_is_not_testable_and_spearman_power():
    t8 = [t for t in study.DESIGN if t.claim == "T8"]
    sub, _ = study.study({"single": []}, t8)
    assert all(v.startswith("not testable") for v in sub["verdict"])
    # 40 batches, Spearman -0.9, p 1e-4, one of two rows: supported; power at |rho| 0.5 on
    # Fisher's z with variance 1.06 / 37
    row = _row("T8", "Spearman(batch, mean rho of alphaedit) < 0", -0.9, math.nan, math.nan,
               1e-4, claims.inf.mde_correlation(40), True, statistic="Spearman rho")
    sub, _ = study.study({"sequential": [row]}, t8[:1])
    expected = study.stats.norm.cdf(math.atanh(0.5) / math.sqrt(1.06 / 37) - 1.959964)
    assert sub["power"].iloc[0] == pytest.approx(expected, abs=1e-4)
    assert sub["verdict"].iloc[0] == "supported"
