"""reports.inference: the randomisation tests, intervals, Holm and power helpers against
hand-computed cases and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from reports import inference as inf


def test_holm_rejects_exactly_the_expected_hypotheses():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: .005*4 = .02, .01*3 = .03, .03*2 = .06, .04*1 = .04 -> max(.06, .04) = .06
    assert np.allclose(inf.holm(p), [0.03, 0.06, 0.06, 0.02])
    # NaN does not count in m and stays NaN
    adj = inf.holm([0.01, np.nan, 0.02])
    assert np.isnan(adj[1]) and np.allclose(adj[[0, 2]], [0.02, 0.02])
    assert np.all(inf.holm([0.5, 0.9]) <= 1.0)


def test_holm_agrees_with_the_step_down_definition():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.1, size=6)
        order = np.argsort(p)
        expected = np.zeros(6, bool)
        for i, j in enumerate(order):  # step down: stop at the first non-rejection
            if p[j] > 0.05 / (6 - i):
                break
            expected[j] = True
        assert list(inf.holm(p) <= 0.05) == list(expected)


def test_cluster_bootstrap_resamples_whole_clusters():
    # 12 clusters whose members are identical: the interval is that of the 12 cluster means
    # (a percentile bootstrap of them), far wider than a bootstrap of 120 free rows
    means = np.arange(12.0)
    values = np.repeat(means, 10)
    clusters = np.repeat(np.arange(12), 10)
    ci = inf.cluster_bootstrap_ci(values, lambda m: m[0], clusters, n_draws=4000, seed=0)
    rng = np.random.default_rng(0)
    ref = np.quantile(rng.choice(means, size=(4000, 12)).mean(axis=1), [0.025, 0.975])
    assert ci.n_clusters == 12 and ci.value == pytest.approx(5.5)
    assert ci.lo == pytest.approx(ref[0], abs=0.3) and ci.hi == pytest.approx(ref[1], abs=0.3)
    rows = inf.cluster_bootstrap_ci(values, lambda m: m[0], np.arange(120), n_draws=4000)
    assert ci.hi - ci.lo > 2.5 * (rows.hi - rows.lo)


def test_cluster_bootstrap_needs_ten_clusters_and_weights_rows():
    ci = inf.cluster_bootstrap_ci(np.array([1.0, 1.0, 1.0, 0.0]), lambda m: m[0],
                                  ["a", "a", "a", "b"])
    assert ci.value == pytest.approx(0.75) and np.isnan(ci.lo)  # rows, not cluster means
    assert "needs 10" in ci.method


def test_sign_flip_exact_p_by_enumeration():
    # 3 clusters with totals 1, 2, 3: of the 8 sign patterns, |T| >= 6 for (+++) and (---)
    values = [0.5, 0.5, 2.0, 1.0, 2.0]
    clusters = ["a", "a", "b", "c", "c"]
    res = inf.sign_flip_test(values, clusters)
    assert res.method == "exact" and res.n_clusters == 3 and res.n == 5
    assert res.p == pytest.approx(2 / 8) and res.mean == pytest.approx(6 / 5)
    assert inf.sign_flip_test(values, clusters, alternative="greater").p == pytest.approx(1 / 8)
    assert inf.min_p(3) == pytest.approx(2 / 8) and inf.min_p(4, "greater") == 1 / 16


def test_sign_flip_on_binary_differences_is_the_exact_mcnemar_binomial():
    d = np.array([1.0] * 9 + [-1.0] * 2 + [0.0] * 5)  # b = 9, c = 2, one case per cluster
    ref = sps.binomtest(9, 11, 0.5).pvalue
    res = inf.sign_flip_test(d, np.arange(d.size))  # 16 clusters: Monte Carlo
    assert res.p == pytest.approx(ref, abs=0.01)


def test_few_clusters_cannot_reach_alpha_and_mde_says_so():
    rng = np.random.default_rng(1)
    d = rng.normal(5.0, 1.0, 40)  # a large effect in 4 clusters
    clusters = np.arange(40) // 10
    res = inf.sign_flip_test(d, clusters)
    assert res.p == pytest.approx(2 / 16)
    assert inf.mde(res.se, 4, exact_min_p=inf.min_p(4)) == np.inf


def test_wild_cluster_interval_widens_as_clusters_get_fewer():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 120) + np.repeat(rng.normal(0, 1, 12), 10)  # strong batch effects
    twelve = inf.wild_cluster_ci(x, np.arange(120) // 10, seed=0)
    cases = inf.wild_cluster_ci(x, None, seed=0)
    assert twelve.hi - twelve.lo > 1.5 * (cases.hi - cases.lo)  # clustering is not ignored
    assert twelve.lo < x.mean() < twelve.hi and twelve.n_clusters == 12
    few = inf.wild_cluster_ci(x[:20], np.arange(20) // 10)
    assert np.isnan(few.lo) and "needs 3" in few.method


def test_permutation_spearman_exact_for_few_points():
    y = [5.0, 4.0, 3.0, 2.0, 1.0]
    res = inf.permutation_spearman(y, np.arange(5))
    assert res.statistic == pytest.approx(-1.0) and res.method == "exact permutation"
    assert res.p == pytest.approx(2 / 120)


def test_stratified_auc_keeps_between_stratum_association_in_the_null():
    # scores and outcomes both shifted by stratum, unrelated within strata
    rng = np.random.default_rng(4)
    strata = np.repeat(np.arange(10), 10)
    effect = rng.normal(0, 2, 10)[strata]
    scores = (effect + rng.normal(0, 0.3, 100))[None, :]
    positive = ((effect + rng.normal(0, 0.3, 100)) > 0)[None, :]
    res = inf.stratified_auc_test(scores, positive, strata, n_draws=499, seed=0)
    # the statistic uses pairs within a stratum only, like its null: no signal, no support
    assert abs(res.statistic - 0.5) < 0.15 and res.p > 0.05
    pooled = inf.stratified_auc_test(scores, positive, np.zeros(100), n_draws=499, seed=0)
    assert pooled.statistic > 0.8  # what a pooled AUC would have printed


def test_stratified_auc_by_hand():
    # one run, two strata: (pos 0.9, neg 0.1) and (pos 0.2, neg 0.5, neg 0.3); the 0.2 vs
    # 0.1 pair crosses strata and does not count: U = 1 + 0 = 1 of 1 + 2 pairs
    scores = np.array([[0.9, 0.1, 0.2, 0.5, 0.3]])
    positive = np.array([[1, 0, 1, 0, 0]])
    res = inf.stratified_auc_test(scores, positive, ["a", "a", "b", "b", "b"], n_draws=99)
    assert res.statistic == pytest.approx(1 / 3)


def test_matched_pairs_pair_neighbours_within_strata():
    strata = [0, 0, 0, 0, 1, 1]
    match = [1.0, 3.0, 2.0, 4.0, 0.0, 1.0]
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    y = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    signs, prods, where = inf.matched_pair_products(strata, match, x, y)
    # pairs: (case 0, case 2), (case 1, case 3), (case 4, case 5): x and y always discordant
    assert list(signs) == [-1.0, -1.0, -1.0] and np.all(prods < 0)
    assert list(where) == [0, 0, 1]


def test_seed_batch_t_without_seed_variation_is_the_t_test_of_unit_means():
    """Identical seed rows: no seed component, so the two-way test is the one-sample t test
    of the unit means on G - 1 df (scipy)."""
    rng = np.random.default_rng(0)
    row = rng.normal(0.3, 1.0, 12)
    res = inf.seed_batch_t_test(np.vstack([row, row, row]))
    ref = sps.ttest_1samp(row, 0.0)
    assert np.isclose(res.df, 11) and res.seed_share < 1e-12
    assert np.isclose(res.p, ref.pvalue) and np.isclose(res.mean, row.mean())
    lo, hi = ref.confidence_interval(0.95)
    assert np.isclose(res.lo, lo) and np.isclose(res.hi, hi)


def test_seed_batch_t_variance_is_the_anova_random_effects_form():
    """Var(grand mean) = (MS_seed + MS_unit - MS_e) / (S G) when the seeds add variance,
    and the seed effect dominates the df (towards S - 1) when it is large."""
    rng = np.random.default_rng(1)
    d = rng.normal(0, 2.0, (3, 1)) + rng.normal(0, 0.2, (1, 20)) + rng.normal(0, 0.2, (3, 20))
    s, g = d.shape
    m, r, c = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_s = g * np.sum((r - m) ** 2) / (s - 1)
    ms_g = s * np.sum((c - m) ** 2) / (g - 1)
    ms_e = np.sum((d - r[:, None] - c[None, :] + m) ** 2) / ((s - 1) * (g - 1))
    res = inf.seed_batch_t_test(d)
    assert np.isclose(res.se ** 2, (ms_s + ms_g - ms_e) / (s * g))
    assert 2.0 <= res.df < 2.5 and res.seed_share > 0.9
    # one-sided bounds agree with the two-sided interval's construction
    up = inf.seed_batch_t_test(d, alternative="less")
    lo = inf.seed_batch_t_test(d, alternative="greater")
    assert np.isclose(up.p + lo.p, 1.0) and lo.hi == np.inf and up.lo == -np.inf


def test_seed_batch_t_holds_its_level_with_whole_seed_shifts():
    """3 seeds x 10 units, seed shifts as large as the cell noise: rejection of a true null at
    most 0.08 at alpha 0.05 (the seed-averaged t test of unit means: about 0.27)."""
    rng = np.random.default_rng(2)
    reps, two_way, one_way = 2000, 0, 0
    for _ in range(reps):
        d = rng.normal(0, 0.3, (3, 1)) + rng.normal(0, 0.3, (1, 10)) + rng.normal(0, 0.3,
                                                                                 (3, 10))
        two_way += inf.seed_batch_t_test(d).p < 0.05
        one_way += sps.ttest_1samp(d.mean(axis=0), 0.0).pvalue < 0.05
    assert two_way / reps <= 0.08 and one_way / reps > 0.15, (two_way / reps, one_way / reps)


def test_seed_batch_t_needs_two_seeds_and_three_units():
    assert np.isnan(inf.seed_batch_t_test(np.ones((1, 5))).p)
    assert np.isnan(inf.seed_batch_t_test(np.ones((3, 2))).p)
    d = np.array([[1.0, 2.0, np.nan, 4.0], [1.5, 2.5, 3.0, 4.5]])
    assert inf.seed_batch_t_test(d).n_units == 3  # the unit with a missing cell is dropped


def test_tost_power_says_when_no_true_gain_is_enough():
    from reports.claims import _tost_power

    assert "cannot be shown with 80% power" in _tost_power(0.25, 2.03)
    assert "cannot be shown" in _tost_power(0.25, float("inf"))
    assert _tost_power(0.25, 0.1).endswith("|true gain| <= 0.15")


def test_intervals_are_cut_to_a_rates_range_only():
    from reports.tables import clip_to_range

    assert clip_to_range("efficacy_success", -3.0, 100.9) == (0.0, 100.0)
    assert clip_to_range("gen_efficacy_f1", 5.0, 104.0) == (5.0, 100.0)
    assert clip_to_range("neighborhood_plus_magnitude", -25.0, -12.0) == (-25.0, -12.0)
    assert clip_to_range("ngram_entropy", 590.0, 612.0) == (590.0, 612.0)


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 9):
        p = rng.uniform(0, 0.2, m) ** 2
        assert np.allclose(inf.holm(p), multipletests(p, method="holm")[1])


def test_tango_exact_p_by_enumeration_on_a_small_case():
    """n = 4 pairs, b = 3 (candidate better), c = 0: the exact unconditional p is the
    largest over the nuisance q of the trinomial probability of the outcomes whose Z is at
    least the observed one, enumerated here by hand from the same Z."""
    from itertools import product
    from math import comb

    x, y, n, d0 = np.array([1, 1, 1, 0]), np.array([0, 0, 0, 0]), 4, -0.1
    res = inf.paired_binary_margin_test(x, y, d0, "greater")
    z_obs = float(inf.tango_z(3, 0, n, d0))
    best = 0.0
    for q in np.linspace(max(0.0, -d0), (1 - d0) / 2, inf.TANGO_GRID):
        p10, p01 = q + d0, q
        tot = sum(comb(n, b) * comb(n - b, c) * p10**b * p01**c * (1 - p10 - p01) ** (n - b - c)
                  for b, c in product(range(n + 1), repeat=2)
                  if b + c <= n and inf.tango_z(b, c, n, d0) >= z_obs - 1e-9)
        best = max(best, tot)
    assert res.p == pytest.approx(best, rel=1e-9)
