"""reports.stats against scipy's own results and hand-computed cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from reports import stats

RNG = np.random.default_rng(12345)
X = RNG.normal(size=30)
Y = X + RNG.normal(0.4, 1.0, size=30)


def test_bootstrap_mean_matches_scipy_bootstrap():
    ours = stats.bootstrap_mean_ci(X, n_resamples=999, seed=3)
    ref = sps.bootstrap((X,), np.mean, n_resamples=999, rng=np.random.default_rng(3))
    assert ours.value == pytest.approx(X.mean())
    assert ours.method == "BCa"
    assert ours.lo == pytest.approx(ref.confidence_interval.low, rel=1e-9)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, rel=1e-9)


def test_bootstrap_is_seeded_and_ignores_nan():
    a = stats.bootstrap_mean_ci(np.r_[X, np.nan], seed=7, n_resamples=500)
    b = stats.bootstrap_mean_ci(X, seed=7, n_resamples=500)
    assert (a.lo, a.hi, a.n) == (b.lo, b.hi, 30)


def test_cluster_bootstrap_resamples_whole_groups():
    # 6 groups whose members are identical: the cluster CI must equal the CI of the 6
    # group means, and be wider than the (wrong) row bootstrap that treats 60 rows as free
    means = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 8.0])
    values = np.repeat(means, 10)
    groups = np.repeat([f"g{i}" for i in range(6)], 10)
    clustered = stats.bootstrap_mean_ci(values, groups, n_resamples=999, seed=0,
                                        method="percentile")
    ref = sps.bootstrap((means,), np.mean, n_resamples=999, method="percentile",
                        rng=np.random.default_rng(0))
    assert clustered.n_groups == 6 and clustered.n == 60
    assert clustered.lo == pytest.approx(ref.confidence_interval.low)
    assert clustered.hi == pytest.approx(ref.confidence_interval.high)
    rows = stats.bootstrap_mean_ci(values, n_resamples=999, seed=0, method="percentile")
    assert clustered.hi - clustered.lo > 2 * (rows.hi - rows.lo)


def test_cluster_bootstrap_of_unequal_groups_weights_by_size():
    values = np.array([1.0, 1.0, 1.0, 0.0])
    ci = stats.bootstrap_mean_ci(values, ["a", "a", "a", "b"], n_resamples=200, seed=0)
    assert ci.value == pytest.approx(0.75)  # the mean over rows, not over group means


def test_degenerate_sample_gives_a_point_interval():
    ci = stats.bootstrap_mean_ci([1.0, 1.0, 1.0])
    assert (ci.value, ci.lo, ci.hi, ci.method) == (1.0, 1.0, 1.0, "degenerate")
    assert np.isnan(stats.bootstrap_mean_ci([]).value)


def test_wilcoxon_matches_scipy():
    res = stats.wilcoxon_paired(Y, X, n_resamples=200)
    ref = sps.wilcoxon(Y, X)
    assert res.test == "wilcoxon" and res.n == 30
    assert res.statistic == ref.statistic
    assert res.p == pytest.approx(ref.pvalue)
    assert res.mean_diff == pytest.approx((Y - X).mean())
    assert res.effect == pytest.approx(stats.hodges_lehmann(Y - X))
    assert res.effect_lo < res.effect < res.effect_hi


def test_rank_biserial_by_hand():
    # |d| ranks 1,2,3,4; R+ = 1 + 3 + 4 = 8, R- = 2 -> (8 - 2) / 10
    assert stats.rank_biserial([1.0, -2.0, 3.0, 4.0]) == pytest.approx(0.6)
    assert stats.rank_biserial([0.0, 1.0, 2.0]) == pytest.approx(1.0)  # zeros dropped
    # Kerby's r equals (W+ - W-) / total rank sum as scipy computes W+ with alternative
    d = Y - X
    w_plus = sps.wilcoxon(d, alternative="greater").statistic
    total = len(d) * (len(d) + 1) / 2
    assert stats.rank_biserial(d) == pytest.approx((2 * w_plus - total) / total)


def test_hodges_lehmann_by_hand():
    # Walsh averages of (1, 2, 9): 1, 1.5, 5, 2, 5.5, 9 -> median (2 + 5) / 2
    assert sorted(stats.walsh_averages([1, 2, 9])) == [1, 1.5, 2, 5, 5.5, 9]
    assert stats.hodges_lehmann([1, 2, 9]) == 3.5
    assert stats.hodges_lehmann([3.0]) == 3.0


def test_hodges_lehmann_exact_interval():
    d = Y - X
    ci = stats.hodges_lehmann_ci(d, method="exact")
    boot = stats.hodges_lehmann_ci(d, method="bootstrap", n_resamples=500)
    assert ci.method == "exact" and ci.lo < ci.value < ci.hi
    assert ci.value == boot.value
    assert abs(ci.lo - boot.lo) < 0.3 and abs(ci.hi - boot.hi) < 0.3
    with pytest.raises(ValueError):
        stats.hodges_lehmann_ci(d, method="nope")


def test_mcnemar_on_a_hand_made_table():
    # 2x2: both 1: 5, x only: 8 (b), y only: 2 (c), neither: 5
    x = np.array([1] * 5 + [1] * 8 + [0] * 2 + [0] * 5, dtype=float)
    y = np.array([1] * 5 + [0] * 8 + [1] * 2 + [0] * 5, dtype=float)
    res = stats.mcnemar_exact(x, y, n_resamples=200)
    # exact two-sided: 2 P(B >= 8), B ~ Bin(10, 1/2) = 2 (45 + 10 + 1) / 1024
    assert (res.b, res.c, res.n) == (8, 2, 20)
    assert res.p == pytest.approx(112 / 1024)
    assert res.effect == pytest.approx((8 - 2) / 20)
    assert res.effect_size == pytest.approx(0.6)
    assert stats.paired_test(x, y).test == "mcnemar"
    assert stats.mcnemar_exact([1, 0], [1, 0]).p == 1.0  # no discordant pair
    with pytest.raises(ValueError):
        stats.mcnemar_exact([0.5, 1.0], [1.0, 0.0])


def test_holm_rejects_exactly_the_expected_hypotheses():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: .005*4 = .02, .01*3 = .03, .03*2 = .06, .04*1 = .04 -> max(.06, .04) = .06
    assert np.allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    assert list(stats.holm_reject(p, 0.05)) == [True, False, False, True]
    # NaN does not count in m and stays NaN
    adj = stats.holm([0.01, np.nan, 0.02])
    assert np.isnan(adj[1]) and np.allclose(adj[[0, 2]], [0.02, 0.02])
    assert np.all(stats.holm([0.5, 0.9]) <= 1.0)


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
        assert list(stats.holm_reject(p, 0.05)) == list(expected)


def test_auc_against_pairwise_counting_and_scipy():
    pos = np.array([0.9, 0.8, 0.4, 0.4, 0.7])
    neg = np.array([0.1, 0.4, 0.5, 0.2])
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0
                     for a, b in itertools.product(pos, neg)])
    res = stats.auc_test(pos, neg, n_resamples=500)
    assert res.auc == pytest.approx(brute) == stats.auc(pos, neg)
    assert res.p == pytest.approx(sps.mannwhitneyu(pos, neg).pvalue)
    assert res.lo <= res.auc <= res.hi
    assert np.isnan(stats.auc_test([], neg).auc)


def test_spearman_matches_scipy():
    res = stats.spearman(X, Y, alternative="greater", n_resamples=500)
    ref = sps.spearmanr(X, Y, alternative="greater")
    assert res.rho == pytest.approx(ref.statistic)
    assert res.p == pytest.approx(ref.pvalue)
    assert res.lo < res.rho < res.hi
    assert np.isnan(stats.spearman([1, 1, 1], [1, 2, 3]).rho)


def test_noninferiority():
    base = RNG.normal(50, 5, size=40)
    close = base + RNG.normal(-0.2, 0.5, size=40)  # 0.2 points worse: non-inferior at 1
    res = stats.noninferiority(close, base, margin=1.0, n_resamples=500)
    ref = sps.ttest_1samp(close - base, -1.0, alternative="greater")
    assert res.p == pytest.approx(ref.pvalue) and res.p < 0.05
    assert res.noninferior and res.lower > -1.0
    worse = base - 3.0 + RNG.normal(0, 0.5, size=40)
    bad = stats.noninferiority(worse, base, margin=1.0, n_resamples=500)
    assert not bad.noninferior and bad.p > 0.5
    same = stats.noninferiority(base, base, margin=1.0)  # zero variance
    assert same.p == 0.0 and same.noninferior


# ---------------------------------------------------------------- reports.inference
from reports import inference as inf  # noqa: E402


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
    assert res.statistic > 0.7 and res.p > 0.05  # a pooled AUC, but no within-batch signal


def test_matched_pairs_pair_neighbours_within_strata():
    strata = [0, 0, 0, 0, 1, 1]
    match = [1.0, 3.0, 2.0, 4.0, 0.0, 1.0]
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    y = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    signs, prods = inf.matched_pair_products(strata, match, x, y)
    # pairs: (case 0, case 2), (case 1, case 3), (case 4, case 5): x and y always discordant
    assert list(signs) == [-1.0, -1.0, -1.0] and np.all(prods < 0)


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
