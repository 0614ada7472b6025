"""Statistics for the report: bootstrap CIs, paired tests, effect sizes, Holm, AUC, Spearman,
non-inferiority. Thin, tested wrappers over :mod:`scipy.stats`; every random step is seeded.

Methods and references
* Bootstrap CIs: :func:`scipy.stats.bootstrap` (Efron 1987 BCa; percentile where BCa is not
  defined). A *cluster* bootstrap (Davison & Hinkley 1997, sec. 3.8) resamples whole groups
  (the batches of a sequential run, whose cases share one edited model) by bootstrapping the
  group indices with scipy and recomputing the statistic from per-group sums. It needs enough
  groups (:data:`MIN_CLUSTERS`; Cameron, Gelbach & Miller 2008): with fewer, the report gives
  no such interval (never one over cases, which would be narrower). Means and paired
  differences use the few-cluster methods of :mod:`reports.inference` instead.
* Wilcoxon signed-rank test for paired continuous outcomes (Wilcoxon 1945),
  :func:`scipy.stats.wilcoxon` (zero differences dropped, Wilcoxon's convention).
* Matched-pairs rank-biserial correlation, the simple difference formula (Kerby 2014):
  r = (R+ - R-) / (R+ + R-) over the ranks of the non-zero |differences|.
* Hodges-Lehmann shift (Hodges & Lehmann 1963): the median of the Walsh averages
  (d_i + d_j) / 2, i <= j, of the paired differences; CI by bootstrap over pairs (or groups),
  or for large samples the distribution-free interval from order statistics of the Walsh
  averages (Hollander, Wolfe & Chicken 2014, sec. 3.3; normal approximation of the signed-rank
  critical value).
* McNemar's test for paired binary outcomes (McNemar 1947), exact form: a two-sided binomial
  test of the discordant pairs, :func:`scipy.stats.binomtest`.
* Holm's step-down correction (Holm 1979), adjusted p-values
  (:func:`statsmodels.stats.multitest.multipletests`).
* AUC = U / (n1 n2) from the Mann-Whitney U statistic (Mann & Whitney 1947;
  Hanley & McNeil 1982), :func:`scipy.stats.mannwhitneyu`; CI by a stratified bootstrap.
* Spearman's rank correlation (Spearman 1904), :func:`scipy.stats.spearmanr`, CI by a paired
  bootstrap; Theil-Sen slopes (Sen 1968), :func:`scipy.stats.theilslopes`.
* Non-inferiority (e.g. Walker & Nowacki 2011): H0 mean(d) <= -margin against
  H1 mean(d) > -margin, a one-sided one-sample t-test of the paired differences
  (:func:`scipy.stats.ttest_1samp`), with a one-sided 95% bootstrap lower bound.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "AUCResult",
    "CorrelationResult",
    "MeanCI",
    "NonInferiorityResult",
    "PairedResult",
    "auc",
    "auc_test",
    "bootstrap_mean_ci",
    "bootstrap_statistic",
    "cluster_bootstrap",
    "hodges_lehmann",
    "hodges_lehmann_ci",
    "holm",
    "holm_reject",
    "is_binary",
    "mcnemar_exact",
    "noninferiority",
    "paired_test",
    "rank_biserial",
    "spearman",
    "walsh_averages",
    "wilcoxon_paired",
]

DEFAULT_RESAMPLES = 2000
CONFIDENCE = 0.95
#: fewest groups for a cluster (pairs) bootstrap: with fewer, its intervals are far too
#: narrow (Cameron, Gelbach & Miller 2008); callers then give no interval
MIN_CLUSTERS = 10


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _as_float(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=float).ravel()


@dataclass
class MeanCI:
    """A point estimate with a confidence interval (``lo``/``hi`` NaN when undefined)."""

    value: float
    lo: float
    hi: float
    n: int
    n_groups: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _labels(groups: Sequence[Any] | np.ndarray | None) -> np.ndarray | None:
    """Group labels as a 1-D array of strings (tuples allowed as labels)."""
    return None if groups is None else np.array([str(g) for g in groups], dtype=object)


def _group_codes(groups: Sequence[Any] | np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    labels = _labels(groups)
    if labels is None:
        return np.arange(n), n
    if len(labels) != n:
        raise ValueError(f"groups has {len(labels)} entries for {n} values")
    _, codes = np.unique(labels, return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1 if n else 0


def cluster_bootstrap(columns: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
                      groups: Sequence[Any] | np.ndarray | None = None,
                      confidence: float = CONFIDENCE, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int | np.random.Generator | None = 0, method: str = "BCa",
                      alternative: str = "two-sided") -> MeanCI:
    """Bootstrap CI of ``statistic(column means)`` resampling rows or whole groups.

    ``columns`` ``(n, k)`` may hold NaN (a missing value counts in neither sum nor count).
    ``statistic`` receives the ``(k, ...)`` array of column means of a resample (vectorised
    over trailing axes) and returns ``(...)``. With ``groups`` (one label per row) the resampled
    units are the groups (cluster bootstrap): the group indices are bootstrapped with
    :func:`scipy.stats.bootstrap` and the means recomputed as ratios of per-group sums.
    """
    cols = np.asarray(columns, dtype=float)
    if cols.ndim == 1:
        cols = cols[:, None]
    n, k = cols.shape
    codes, n_groups = _group_codes(groups, n)
    ok = np.isfinite(cols)
    sums = np.zeros((n_groups, k))
    counts = np.zeros((n_groups, k))
    np.add.at(sums, codes, np.where(ok, cols, 0.0))
    np.add.at(counts, codes, ok.astype(float))
    total = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = float(statistic(sums.sum(axis=0) / np.where(total > 0, total, np.nan)))
    n_obs = int(ok.any(axis=1).sum())
    if not np.isfinite(point) or n_groups < 2:
        return MeanCI(point, math.nan, math.nan, n_obs, n_groups, "none")

    def stat(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(idx, dtype=int)
        s = np.moveaxis(sums[idx], -1, 0).sum(axis=-1)  # (k, ...)
        c = np.moveaxis(counts[idx], -1, 0).sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return statistic(s / c)

    # all groups identical: no sampling variability
    with np.errstate(invalid="ignore", divide="ignore"):
        per_group = statistic((sums / counts).T) if k else np.array([])
    if np.all(np.isfinite(per_group)) and np.ptp(per_group) == 0:
        return MeanCI(point, point, point, n_obs, n_groups, "degenerate")
    return _run_bootstrap((np.arange(n_groups),), stat, point, n_obs, n_groups, confidence,
                          n_resamples, seed, method, alternative, vectorized=True)


def _run_bootstrap(data: tuple[np.ndarray, ...], stat: Callable[..., Any], point: float,
                   n_obs: int, n_groups: int, confidence: float, n_resamples: int,
                   seed: int | np.random.Generator | None, method: str, alternative: str,
                   vectorized: bool, paired: bool = False) -> MeanCI:
    rng = _rng(seed)
    for m in dict.fromkeys([method, "percentile"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate-data / NaN warnings: handled below
            res = stats.bootstrap(data, stat, n_resamples=n_resamples, vectorized=vectorized,
                                  paired=paired, confidence_level=confidence, method=m,
                                  alternative=alternative, rng=rng)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(lo) or math.isnan(hi)):
            return MeanCI(point, lo, hi, n_obs, n_groups, m)
    return MeanCI(point, math.nan, math.nan, n_obs, n_groups, "failed")


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray,
                      groups: Sequence[Any] | np.ndarray | None = None,
                      confidence: float = CONFIDENCE, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int | np.random.Generator | None = 0, method: str = "BCa",
                      alternative: str = "two-sided") -> MeanCI:
    """Mean of ``values`` (NaN ignored) with a bootstrap CI; ``groups`` resamples whole
    groups (cluster bootstrap, e.g. the batches of a sequential run)."""
    values = _as_float(values)
    groups = _labels(groups)
    if groups is not None:
        groups = groups[np.isfinite(values)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0, 0, "none")
    return cluster_bootstrap(values, lambda m: m[0], groups, confidence, n_resamples, seed,
                             method, alternative)


def bootstrap_statistic(values: Sequence[float] | np.ndarray,
                        statistic: Callable[[np.ndarray], float],
                        groups: Sequence[Any] | np.ndarray | None = None,
                        confidence: float = CONFIDENCE, n_resamples: int = DEFAULT_RESAMPLES,
                        seed: int | np.random.Generator | None = 0,
                        method: str = "percentile") -> MeanCI:
    """Bootstrap CI of any ``statistic(values)``; rows, or whole ``groups``, are resampled.

    Not vectorised (one call per resample), so keep ``statistic`` cheap.
    """
    values = _as_float(values)
    codes, n_groups = _group_codes(groups, values.size)
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    point = float(statistic(values)) if values.size else math.nan
    if values.size == 0 or n_groups < 2 or not np.isfinite(point):
        return MeanCI(point, math.nan, math.nan, values.size, n_groups, "none")
    if np.ptp(values) == 0:
        return MeanCI(point, point, point, values.size, n_groups, "degenerate")

    def stat(idx: np.ndarray) -> float:
        rows = np.concatenate([members[i] for i in np.asarray(idx, dtype=int)])
        return float(statistic(values[rows]))

    return _run_bootstrap((np.arange(n_groups),), stat, point, values.size, n_groups,
                          confidence, n_resamples, seed, method, "two-sided", vectorized=False)


# ---------------------------------------------------------------- paired comparisons
def is_binary(*arrays: Sequence[float] | np.ndarray) -> bool:
    """True when every finite value of every array is 0 or 1."""
    vals = np.concatenate([_as_float(a) for a in arrays])
    vals = vals[np.isfinite(vals)]
    return vals.size > 0 and bool(np.all((vals == 0) | (vals == 1)))


def walsh_averages(d: Sequence[float] | np.ndarray) -> np.ndarray:
    """All (d_i + d_j) / 2 for i <= j."""
    d = _as_float(d)
    i, j = np.triu_indices(d.size)
    return (d[i] + d[j]) / 2.0


def hodges_lehmann(d: Sequence[float] | np.ndarray) -> float:
    """Hodges-Lehmann (1963) one-sample shift: median of the Walsh averages of ``d``."""
    d = _as_float(d)
    return float(np.median(walsh_averages(d))) if d.size else math.nan


def hodges_lehmann_ci(d: Sequence[float] | np.ndarray,
                      groups: Sequence[Any] | np.ndarray | None = None,
                      confidence: float = CONFIDENCE, n_resamples: int = 1000,
                      seed: int | np.random.Generator | None = 0,
                      method: str = "auto", max_bootstrap_n: int = 800) -> MeanCI:
    """Hodges-Lehmann shift with a CI.

    ``method``: ``"bootstrap"`` (percentile, resampling pairs or ``groups``), ``"exact"``
    (distribution-free Walsh-average order statistics; Hollander, Wolfe & Chicken 2014,
    normal approximation of the signed-rank critical value), or ``"auto"``: bootstrap up to
    ``max_bootstrap_n`` pairs (each resample costs O(n^2)), exact above.
    """
    d = _as_float(d)
    d = d[np.isfinite(d)]
    if method == "auto":
        method = "bootstrap" if d.size <= max_bootstrap_n else "exact"
    if method == "bootstrap":
        return bootstrap_statistic(d, hodges_lehmann, groups, confidence, n_resamples, seed)
    if method != "exact":
        raise ValueError(f"unknown method {method!r}")
    n = d.size
    point = hodges_lehmann(d)
    if n < 2:
        return MeanCI(point, math.nan, math.nan, n, n, "none")
    w = np.sort(walsh_averages(d))
    z = stats.norm.ppf(0.5 + confidence / 2)
    k = n * (n + 1) / 4 - z * math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    k = max(math.floor(k), 0)
    return MeanCI(point, float(w[k]), float(w[w.size - 1 - k]), n, n, "exact")


def rank_biserial(d: Sequence[float] | np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (Kerby 2014): (R+ - R-) / (R+ + R-), ranks of
    the non-zero |d| (average ranks for ties). In [-1, 1]; positive when d tends positive."""
    d = _as_float(d)
    d = d[np.isfinite(d) & (d != 0)]
    if d.size == 0:
        return math.nan
    r = stats.rankdata(np.abs(d))
    pos, neg = r[d > 0].sum(), r[d < 0].sum()
    return float((pos - neg) / (pos + neg))


@dataclass
class PairedResult:
    """A paired comparison x vs y (differences d = x - y)."""

    test: str  # "wilcoxon" | "mcnemar"
    n: int  # pairs with both values
    statistic: float  # W (Wilcoxon) or discordant count b (McNemar)
    p: float
    mean_x: float
    mean_y: float
    mean_diff: float
    effect: float  # Hodges-Lehmann shift (Wilcoxon) or difference of proportions (McNemar)
    effect_lo: float
    effect_hi: float
    effect_size: float  # rank-biserial r (Wilcoxon) or (b - c) / (b + c) (McNemar)
    effect_name: str
    ci_method: str
    b: int | None = None  # McNemar: x=1, y=0
    c: int | None = None  # McNemar: x=0, y=1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pairs(x: Any, y: Any, groups: Any = None) -> tuple[np.ndarray, np.ndarray, Any]:
    x, y = _as_float(x), _as_float(y)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    labels = _labels(groups)
    g = None if labels is None else labels[ok]
    return x[ok], y[ok], g


def wilcoxon_paired(x: Any, y: Any, groups: Any = None, alternative: str = "two-sided",
                    confidence: float = CONFIDENCE, n_resamples: int = 1000,
                    seed: int | np.random.Generator | None = 0) -> PairedResult:
    """Wilcoxon (1945) signed-rank test of x - y (scipy), rank-biserial r (Kerby 2014) and
    the Hodges-Lehmann (1963) shift with its CI (pairs, or ``groups``, resampled)."""
    x, y, g = _pairs(x, y, groups)
    d = x - y
    n = d.size
    if n == 0:
        return PairedResult("wilcoxon", 0, math.nan, math.nan, math.nan, math.nan, math.nan,
                            math.nan, math.nan, math.nan, math.nan, "rank-biserial r", "none")
    if np.all(d == 0):
        w, p = 0.0, 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample / ties notes
            res = stats.wilcoxon(x, y, alternative=alternative)
        w, p = float(res.statistic), float(res.pvalue)
    hl = hodges_lehmann_ci(d, g, confidence, n_resamples, seed)
    return PairedResult("wilcoxon", n, w, p, float(x.mean()), float(y.mean()), float(d.mean()),
                        hl.value, hl.lo, hl.hi, rank_biserial(d), "rank-biserial r",
                        f"HL {hl.method}")


def mcnemar_exact(x: Any, y: Any, groups: Any = None, confidence: float = CONFIDENCE,
                  n_resamples: int = DEFAULT_RESAMPLES,
                  seed: int | np.random.Generator | None = 0) -> PairedResult:
    """Exact McNemar (1947) test for paired 0/1 outcomes: two-sided binomial test of
    b (x=1, y=0) among the b + c discordant pairs (scipy ``binomtest``). Effect: difference of
    proportions with a bootstrap CI (pairs, or ``groups``, resampled); effect size
    (b - c) / (b + c)."""
    x, y, g = _pairs(x, y, groups)
    if not is_binary(x, y) and x.size:
        raise ValueError("McNemar's test needs 0/1 outcomes")
    b = int(np.sum((x == 1) & (y == 0)))
    c = int(np.sum((x == 0) & (y == 1)))
    n = x.size
    p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    diff = bootstrap_mean_ci(x - y, g, confidence, n_resamples, seed)
    return PairedResult("mcnemar", n, float(b), p, float(x.mean()) if n else math.nan,
                        float(y.mean()) if n else math.nan, diff.value, diff.value, diff.lo,
                        diff.hi, (b - c) / (b + c) if b + c else 0.0, "(b-c)/(b+c)",
                        diff.method, b, c)


def paired_test(x: Any, y: Any, groups: Any = None, binary: bool | None = None,
                **kwargs: Any) -> PairedResult:
    """McNemar for 0/1 outcomes, Wilcoxon signed-rank otherwise (``binary=None``: decide
    from the data)."""
    if binary is None:
        binary = is_binary(x, y)
    return (mcnemar_exact if binary else wilcoxon_paired)(x, y, groups, **kwargs)


# ---------------------------------------------------------------- multiplicity
def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries stay NaN and do not count in m.

    With p sorted ascending, p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j)); reject H(i)
    at level alpha iff p_adj(i) <= alpha (equivalently, step down until the first
    p(i) > alpha / (m - i + 1)).
    """
    from statsmodels.stats.multitest import multipletests

    p = _as_float(pvalues)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.sum() == 1:  # a family of one: p itself (statsmodels' Holm runs gc.collect())
        out[ok] = np.minimum(p[ok], 1.0)
    elif ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def holm_reject(pvalues: Sequence[float] | np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Boolean rejections of Holm's procedure at family-wise level ``alpha``."""
    adj = holm(pvalues)
    return np.isfinite(adj) & (adj <= alpha)


# ---------------------------------------------------------------- AUC, correlation, NI
def auc(positive: Any, negative: Any) -> float:
    """P(score of a positive > score of a negative) + ties/2 = U / (n1 n2) (Mann-Whitney)."""
    pos, neg = _as_float(positive), _as_float(negative)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    return float(u / (pos.size * neg.size))


@dataclass
class AUCResult:
    auc: float
    lo: float
    hi: float
    p: float  # two-sided Mann-Whitney U test of AUC = 0.5
    n_pos: int
    n_neg: int
    ci_method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def auc_test(positive: Any, negative: Any, confidence: float = CONFIDENCE,
             n_resamples: int = DEFAULT_RESAMPLES,
             seed: int | np.random.Generator | None = 0) -> AUCResult:
    """AUC of scores separating ``positive`` from ``negative`` (U / (n1 n2)), a stratified
    bootstrap CI (each class resampled on its own, scipy ``bootstrap`` with two samples) and
    the two-sided Mann-Whitney p-value."""
    pos, neg = _as_float(positive), _as_float(negative)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if pos.size == 0 or neg.size == 0:
        return AUCResult(math.nan, math.nan, math.nan, math.nan, pos.size, neg.size, "none")
    res = stats.mannwhitneyu(pos, neg, alternative="two-sided")
    value = float(res.statistic / (pos.size * neg.size))

    def stat(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        # U of the first sample from its rank sum (Mann & Whitney 1947), vectorised
        n1, n2 = a.shape[axis], b.shape[axis]
        ranks = stats.rankdata(np.concatenate([a, b], axis=axis), axis=axis)
        u = np.take(ranks, np.arange(n1), axis=axis).sum(axis=axis) - n1 * (n1 + 1) / 2
        return u / (n1 * n2)

    if pos.size < 2 or neg.size < 2 or np.ptp(np.concatenate([pos, neg])) == 0:
        return AUCResult(value, math.nan, math.nan, float(res.pvalue), pos.size, neg.size,
                         "none")
    ci = _run_bootstrap((pos, neg), stat, value, pos.size + neg.size, pos.size + neg.size,
                        confidence, n_resamples, seed, "percentile", "two-sided",
                        vectorized=True)
    return AUCResult(value, ci.lo, ci.hi, float(res.pvalue), pos.size, neg.size, ci.method)


@dataclass
class CorrelationResult:
    rho: float
    p: float
    lo: float
    hi: float
    n: int
    alternative: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spearman(x: Any, y: Any, alternative: str = "two-sided", confidence: float = CONFIDENCE,
             n_resamples: int = DEFAULT_RESAMPLES,
             seed: int | np.random.Generator | None = 0) -> CorrelationResult:
    """Spearman's rho (scipy ``spearmanr``) with ``alternative``'s p-value and a paired
    percentile bootstrap CI."""
    x, y, _ = _pairs(x, y)
    n = x.size
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return CorrelationResult(math.nan, math.nan, math.nan, math.nan, n, alternative)
    res = stats.spearmanr(x, y, alternative=alternative)
    rho, p = float(res.statistic), float(res.pvalue)

    def stat(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        # Spearman's rho = Pearson's r of the (average) ranks, vectorised over resamples
        ra = stats.rankdata(a, axis=axis)
        rb = stats.rankdata(b, axis=axis)
        ra = ra - ra.mean(axis=axis, keepdims=True)
        rb = rb - rb.mean(axis=axis, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (ra * rb).sum(axis) / np.sqrt((ra**2).sum(axis) * (rb**2).sum(axis))

    ci = _run_bootstrap((x, y), stat, rho, n, n, confidence, n_resamples, seed, "percentile",
                        "two-sided", vectorized=True, paired=True)
    return CorrelationResult(rho, p, ci.lo, ci.hi, n, alternative)


@dataclass
class NonInferiorityResult:
    mean_diff: float
    lower: float  # one-sided lower confidence bound of the mean difference
    margin: float
    statistic: float
    p: float  # one-sided: H0 mean(d) <= -margin
    n: int
    noninferior: bool  # lower > -margin

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def noninferiority(x: Any, y: Any, margin: float, groups: Any = None,
                   confidence: float = CONFIDENCE, n_resamples: int = DEFAULT_RESAMPLES,
                   seed: int | np.random.Generator | None = 0) -> NonInferiorityResult:
    """Is x non-inferior to y within ``margin`` (higher is better, same units)?

    One-sided one-sample t-test of d = x - y against -margin (scipy ``ttest_1samp``,
    ``alternative="greater"``) and a one-sided bootstrap lower bound of mean(d) (rows, or
    ``groups``, resampled). With zero variance the p-value is 0 or 1 by the sign of
    mean(d) + margin.
    """
    x, y, g = _pairs(x, y, groups)
    d = x - y
    n = d.size
    if n == 0:
        return NonInferiorityResult(math.nan, math.nan, margin, math.nan, math.nan, 0, False)
    mean = float(d.mean())
    if n < 2 or np.ptp(d) == 0:
        t, p = math.nan, (0.0 if mean > -margin else 1.0) if n >= 2 else math.nan
    else:
        res = stats.ttest_1samp(d, -margin, alternative="greater")
        t, p = float(res.statistic), float(res.pvalue)
    ci = bootstrap_mean_ci(d, g, confidence, n_resamples, seed, alternative="greater")
    lower = ci.lo if np.isfinite(ci.lo) else (mean if ci.method == "degenerate" else math.nan)
    return NonInferiorityResult(mean, lower, margin, t, p, n,
                                bool(np.isfinite(lower) and lower > -margin))
