"""Cluster-level inference for the report: randomisation tests and intervals that stay valid
with few clusters (the batches of a sequential run, whose cases share one edited model).

Every function takes per-observation values and a cluster label per observation; with
``clusters=None`` every observation is its own cluster. Randomisation is seeded.

* :func:`sign_flip_test`: Fisher's one-sample randomisation test at the cluster level
  (e.g. Cameron, Gelbach & Miller 2008; Canay, Romano & Shaikh 2017). With cluster sums
  S_g of x_i - mu0 and T = sum_g S_g, the null distribution flips the sign of every S_g
  (valid when each cluster's total is symmetric about 0 under H0; exact, by enumerating all
  2^G sign patterns, for G <= :data:`EXACT_MAX_CLUSTERS`, Monte Carlo otherwise). With G
  clusters the smallest two-sided p-value is 2 / 2^G: five clusters cannot reach 0.05, and
  the test says so instead of borrowing power from correlated cases.
* :func:`wild_cluster_ci`: wild cluster bootstrap-t interval of a mean (Cameron, Gelbach &
  Miller 2008) with Webb's (2014) six-point weights, recommended for few clusters; the
  standard error is the cluster-robust CR1 one, sqrt(G / (G - 1) sum_g e_g^2) / n with
  e_g = S_g - n_g mean. Below 3 clusters no interval is given.
* :func:`permutation_spearman`: Spearman's rho of one value per cluster against a covariate
  (e.g. the batch index), p-value by permuting the values over clusters (exact for
  G <= 8).
* :func:`stratified_auc_test`: AUC of a score separating positives from negatives, p-value
  by permuting the cases' scores within strata (batches), jointly over runs (seeds), so the
  null keeps both the batch structure and the correlation of a case's copies across seeds.
* :func:`paired_binary_margin_test`: paired 0/1 outcomes (candidate, baseline) per
  independent case, H0 on the difference of proportions D = p(1,0) - p(0,1) at a margin
  Delta0: Tango's (1998) score statistic Z = (b - c - n Delta0) / sqrt(n (2 q~ + Delta0
  - Delta0^2)) with q~ the restricted MLE of p(0,1) (root of a quadratic), and its exact
  unconditional p-value: the largest tail probability of Z over the nuisance p(0,1) on the
  H0 boundary (trinomial model; asymptotic normal above :data:`TANGO_EXACT_MAX_N` cases).
  Unlike a sign-flip test at a non-zero margin it stays valid when almost every pair is
  tied (no discordant case says little about a 2-point margin).
* :func:`seed_batch_t_test`: with several seeds, the seed (run) is a second, crossed cluster
  dimension: every case of a sequential run is scored on that run's one final model, so a
  model-level outcome (fluency, neighbourhood scores) moves with the run. On the balanced
  table D[s, g] of cell means (seed s, unit g) it is the two-way random-effects model
  D = mu + u_s + v_g + e_sg; the variance of the grand mean is
  sigma_u^2/S + sigma_v^2/G + sigma_e^2/(SG), estimated by ANOVA mean squares as
  (MS_seed + MS_unit - MS_e)/(SG) (the multiway cluster-robust form V_seed + V_unit - V_cell
  of Cameron, Gelbach & Miller 2011), with the seed increment (MS_seed - MS_e)/(SG) clamped
  at 0 so that it never falls below the one-way (units only) variance MS_unit/(SG), and a t
  reference on Satterthwaite's degrees of freedom.
* :func:`mde`: the minimum detectable effect at 80% power from the null spread of a test
  statistic: (q_{1-alpha/2} + q_{power}) * sd_0 with t quantiles on G - 1 degrees of freedom
  (normal for G >= 200); infinite where the randomisation test cannot reach alpha.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

#: enumerate all 2^G sign patterns up to this many clusters
EXACT_MAX_CLUSTERS = 12
#: Monte Carlo draws of a randomisation test above that
DEFAULT_DRAWS = 4999
POWER = 0.8
#: Webb (2014) six-point weights: +-sqrt(1/2), +-1, +-sqrt(3/2), each with probability 1/6
WEBB = np.array([-math.sqrt(1.5), -1.0, -math.sqrt(0.5), math.sqrt(0.5), 1.0,
                 math.sqrt(1.5)])


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def is_binary(*arrays: Any) -> bool:
    """Whether every finite value of ``arrays`` is 0 or 1 (and there is one)."""
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    return vals.size > 0 and bool(np.all((vals == 0) | (vals == 1)))


def holm(pvalues: Any) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries stay NaN and do not count in the
    family size m. With p sorted ascending, p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j)).
    (statsmodels' ``multipletests(method="holm")`` gives the same numbers, checked in
    tests/test_inference.py, but runs ``gc.collect()`` on every call: 0.4 s in a large
    process, where the gate's calibration calls it thousands of times.)"""
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size:
        order = ok[np.argsort(p[ok], kind="stable")]
        m = order.size
        steps = (m - np.arange(m)) * p[order]
        out[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return out


def _codes(clusters: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    if clusters is None:
        return np.arange(n)
    labels = np.array([str(c) for c in clusters], dtype=object)
    if labels.size != n:
        raise ValueError(f"clusters has {labels.size} entries for {n} values")
    return np.unique(labels, return_inverse=True)[1].ravel()


def cluster_sums(values: Any, clusters: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(sums, counts) per cluster of the finite values (clusters without one dropped)."""
    x = np.asarray(values, dtype=float).ravel()
    codes = _codes(clusters, x.size)
    ok = np.isfinite(x)
    x, codes = x[ok], codes[ok]
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    _, codes = np.unique(codes, return_inverse=True)
    sums = np.bincount(codes, weights=x)
    counts = np.bincount(codes).astype(float)
    return sums, counts


def _patterns(g: int, draws: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Sign patterns (k, g): all 2^g when g is small (exact), else random draws with the
    identity first."""
    if g <= EXACT_MAX_CLUSTERS:
        return np.array(list(itertools.product((1.0, -1.0), repeat=g))), True
    signs = rng.choice(np.array([1.0, -1.0]), size=(draws, g))
    return np.vstack([np.ones((1, g)), signs]), False


def _p_from(null: np.ndarray, observed: float, alternative: str) -> float:
    tol = 1e-9 * max(1.0, abs(observed))
    if alternative == "two-sided":
        return float(np.mean(np.abs(null) >= abs(observed) - tol))
    if alternative == "greater":
        return float(np.mean(null >= observed - tol))
    if alternative == "less":
        return float(np.mean(null <= observed + tol))
    raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")


@dataclass
class FlipResult:
    """A cluster sign-flip test of mean(x) = mu0."""

    mean: float
    p: float
    n: int
    n_clusters: int
    null_sd: float  # sd of the mean under the sign-flip null (sums centred at mu0)
    method: str  # "exact" | "monte carlo" | "none"
    se: float = math.nan  # sign-flip sd of the mean with sums centred at the estimate (MDE)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sign_flip_test(values: Any, clusters: Any = None, mu0: float = 0.0,
                   alternative: str = "two-sided", n_draws: int = DEFAULT_DRAWS,
                   seed: int | np.random.Generator | None = 0) -> FlipResult:
    """Cluster sign-flip randomisation test of H0: mean(x) = ``mu0`` (see the module notes).

    The statistic is the overall mean (cluster totals weigh by size); ``alternative``
    ``"greater"`` tests H1: mean > mu0.
    """
    sums, counts = cluster_sums(values, clusters)
    n, g = int(counts.sum()), sums.size
    if g == 0:
        return FlipResult(math.nan, math.nan, 0, 0, math.nan, "none")
    centred = sums - counts * mu0
    mean = float(sums.sum() / n)
    null_sd = float(math.sqrt(np.sum(centred**2)) / n)
    se = float(math.sqrt(np.sum((sums - counts * mean) ** 2)) / n)
    if null_sd == 0:  # every cluster total equals mu0 * n_g
        return FlipResult(mean, 1.0, n, g, 0.0, "degenerate", se)
    signs, exact = _patterns(g, n_draws, _rng(seed))
    null = signs @ centred
    p = _p_from(null, float(centred.sum()), alternative)
    return FlipResult(mean, p, n, g, null_sd, "exact" if exact else "monte carlo", se)


def min_p(n_clusters: int, alternative: str = "two-sided") -> float:
    """Smallest p-value an exact sign-flip test over ``n_clusters`` can give."""
    if n_clusters > EXACT_MAX_CLUSTERS:
        return 1.0 / (DEFAULT_DRAWS + 1)
    return (2.0 if alternative == "two-sided" else 1.0) / 2.0**n_clusters


@dataclass
class ClusterCI:
    value: float
    lo: float
    hi: float
    n: int
    n_clusters: int
    se: float  # cluster-robust (CR1) standard error
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cr1_se(sums: np.ndarray, counts: np.ndarray) -> float:
    """Cluster-robust CR1 standard error of the overall mean."""
    g, n = sums.size, counts.sum()
    if g < 2:
        return math.nan
    mean = sums.sum() / n
    e = sums - counts * mean
    return float(math.sqrt(g / (g - 1) * np.sum(e**2)) / n)


def _bootstrap_t(sums: np.ndarray, counts: np.ndarray, centre: float) -> np.ndarray:
    """The finite t* = (mean* - centre) / se*_CR1 of bootstrap cluster sums (B, G) with
    counts (B, G) or (G,)."""
    g = sums.shape[1]
    n = np.broadcast_to(counts, sums.shape).sum(axis=1)
    m = sums.sum(axis=1) / n
    e = sums - counts * m[:, None]
    se = np.sqrt(g / (g - 1) * np.sum(e**2, axis=1)) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (m - centre) / se
    return t[np.isfinite(t)]


def wild_cluster_ci(values: Any, clusters: Any = None, confidence: float = 0.95,
                    n_draws: int = 1999, seed: int | np.random.Generator | None = 0,
                    alternative: str = "two-sided") -> ClusterCI:
    """Wild cluster bootstrap-t interval of the mean (Webb weights; module notes).

    ``alternative="greater"`` gives a one-sided lower bound (``hi`` = inf)."""
    sums, counts = cluster_sums(values, clusters)
    g = sums.size
    n = int(counts.sum())
    if g == 0:
        return ClusterCI(math.nan, math.nan, math.nan, 0, 0, math.nan, "none")
    mean = float(sums.sum() / n)
    if g < 3:
        return ClusterCI(mean, math.nan, math.nan, n, g, math.nan,
                         f"none ({g} clusters; an interval needs 3 or more)")
    se = cr1_se(sums, counts)
    if se == 0:
        return ClusterCI(mean, mean, mean, n, g, 0.0, "degenerate")
    e = sums - counts * mean
    w = _rng(seed).choice(WEBB, size=(n_draws, g))
    t_star = _bootstrap_t(counts * mean + w * e, counts, mean)  # sums (B, G)
    a = 1.0 - confidence
    if alternative == "greater":
        return ClusterCI(mean, mean - float(np.quantile(t_star, 1 - a)) * se, math.inf, n, g,
                         se, "wild cluster bootstrap-t (Webb), one-sided")
    lo = mean - float(np.quantile(t_star, 1 - a / 2)) * se
    hi = mean - float(np.quantile(t_star, a / 2)) * se
    return ClusterCI(mean, lo, hi, n, g, se, "wild cluster bootstrap-t (Webb)")


def cluster_bootstrap_t_test(values: Any, clusters: Any = None, mu0: float = 0.0,
                             alternative: str = "greater", n_draws: int = 1999,
                             seed: int | np.random.Generator | None = 0) -> PermResult:
    """One-sided cluster (pairs) bootstrap-t test of H0: mean = ``mu0``.

    t = (mean - mu0) / se with the CR1 standard error; its null distribution is that of
    t* = (mean* - mean) / se* over B resamples of whole clusters with replacement. Unlike a
    sign-flip or wild bootstrap (symmetric by construction) it follows a skewed distribution
    of the cluster totals, with a one-sided error of order 1/G instead of 1/sqrt(G)
    (Hall 1992). ``statistic`` is t; ``alternative`` "greater" (H1 mean > mu0) or "less"."""
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be greater or less, not {alternative!r}")
    sums, counts = cluster_sums(values, clusters)
    g = sums.size
    if g < 3:
        return PermResult(math.nan, math.nan, int(counts.sum()), math.nan, "none")
    n = counts.sum()
    mean = sums.sum() / n
    se = cr1_se(sums, counts)
    sign = 1.0 if alternative == "greater" else -1.0
    if se == 0:  # every cluster mean equal: the data leave no doubt about the sign
        t = sign * math.inf if mean != mu0 else 0.0
        return PermResult(t, 0.0 if sign * (mean - mu0) > 0 else 1.0, int(n), 0.0,
                          "degenerate")
    t_obs = (mean - mu0) / se
    idx = _rng(seed).integers(0, g, size=(n_draws, g))
    t_b = _bootstrap_t(sums[idx], counts[idx], mean)
    exceed = np.sum(sign * t_b >= sign * t_obs)
    p = float((exceed + 1) / (t_b.size + 1))
    return PermResult(float(t_obs), p, int(n), float(np.std(t_b)),
                      "cluster bootstrap-t")


@dataclass
class TwoWayResult:
    """A t test of mean(D) = mu0 on a seed x unit table of cell means (module notes)."""

    mean: float
    se: float
    df: float
    p: float
    lo: float
    hi: float
    n_seeds: int
    n_units: int
    seed_share: float  # share of the variance that the seed dimension adds (0: none)
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_batch_t_test(cells: Any, mu0: float = 0.0, alternative: str = "two-sided",
                      confidence: float = 0.95) -> TwoWayResult:
    """Two-way (seed x unit) t test and interval of the grand mean of ``cells`` (S, G).

    Units (columns) with a missing cell are dropped so the table is balanced; fewer than 2
    seeds or 3 units give no test (p nan). ``alternative`` "greater" gives a one-sided lower
    bound (``hi`` = inf), "less" an upper one (``lo`` = -inf). Formulas in the module notes."""
    d = np.asarray(cells, dtype=float)
    if d.ndim != 2:
        raise ValueError(f"cells must be a 2-D (seeds, units) table, not shape {d.shape}")
    d = d[:, np.all(np.isfinite(d), axis=0)]
    n_s, n_g = d.shape
    if n_s < 2 or n_g < 3:
        mean = float(d.mean()) if d.size else math.nan
        return TwoWayResult(mean, math.nan, math.nan, math.nan, math.nan, math.nan, n_s, n_g,
                            math.nan, f"none ({n_s} seeds x {n_g} units)")
    grand = float(d.mean())
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_s = n_g * float(np.sum((rows - grand) ** 2)) / (n_s - 1)
    ms_g = n_s * float(np.sum((cols - grand) ** 2)) / (n_g - 1)
    resid = d - rows[:, None] - cols[None, :] + grand
    df_e = (n_s - 1) * (n_g - 1)
    ms_e = float(np.sum(resid**2)) / df_e
    extra = max(0.0, ms_s - ms_e)
    var = (ms_g + extra) / (n_s * n_g)
    if extra > 0:
        df = (ms_s + ms_g - ms_e) ** 2 / (ms_s**2 / (n_s - 1) + ms_g**2 / (n_g - 1)
                                          + ms_e**2 / df_e)
        # Satterthwaite's df of a combination with a negative coefficient (- MS_e) can fall
        # far below either dimension's; bounded by the seeds' df (or the units')
        df = max(df, float(min(n_s - 1, n_g - 1)))
    else:
        df = float(n_g - 1)
    share = extra / (ms_g + extra) if ms_g + extra > 0 else 0.0
    method = f"two-way (seed x unit) t, {df:.1f} df"
    se = math.sqrt(var)
    a = 1.0 - confidence
    if se == 0:  # every cell equal: the data leave no doubt
        p = {"two-sided": float(grand == mu0), "greater": float(grand <= mu0),
             "less": float(grand >= mu0)}[alternative]
        lo = -math.inf if alternative == "less" else grand
        hi = math.inf if alternative == "greater" else grand
        return TwoWayResult(grand, 0.0, df, p, lo, hi, n_s, n_g, share, method)
    t = (grand - mu0) / se
    dist = stats.t(df)
    if alternative == "two-sided":
        p = float(2 * dist.sf(abs(t)))
        q = float(dist.ppf(1 - a / 2))
        return TwoWayResult(grand, se, df, p, grand - q * se, grand + q * se, n_s, n_g,
                            share, method)
    if alternative == "greater":
        return TwoWayResult(grand, se, df, float(dist.sf(t)),
                            grand - float(dist.ppf(1 - a)) * se, math.inf, n_s, n_g, share,
                            method)
    if alternative == "less":
        return TwoWayResult(grand, se, df, float(dist.cdf(t)), -math.inf,
                            grand + float(dist.ppf(1 - a)) * se, n_s, n_g, share, method)
    raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")


#: exact unconditional p-values up to this many cases (asymptotic normal above)
TANGO_EXACT_MAX_N = 400
#: points of the nuisance grid of the exact unconditional p-value
TANGO_GRID = 200


def tango_z(b: Any, c: Any, n: int, delta0: float) -> np.ndarray:
    """Tango's score statistic for H0: p(1,0) - p(0,1) = ``delta0`` from ``b`` = #(1,0) and
    ``c`` = #(0,1) discordant pairs of ``n`` (arrays broadcast)."""
    b, c = np.asarray(b, dtype=float), np.asarray(c, dtype=float)
    a_ = 2.0 * n
    b_ = -(b + c) + (2.0 * n - b + c) * delta0
    c_ = -c * delta0 * (1.0 - delta0)
    q = (-b_ + np.sqrt(np.maximum(b_**2 - 4 * a_ * c_, 0.0))) / (2 * a_)
    var = n * (2 * q + delta0 - delta0**2)
    num = b - c - n * delta0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = num / np.sqrt(var)
        edge = np.where(num == 0, 0.0, np.sign(num) * np.inf)
    return np.where(var > 0, z, edge)


def paired_binary_margin_test(x: Any, y: Any, delta0: float,
                              alternative: str = "greater") -> PermResult:
    """Test H0: p(x=1) - p(y=1) = ``delta0`` for paired 0/1 outcomes, one pair per independent
    case (module notes). ``alternative="greater"``: H1 difference > delta0 (e.g. non-inferior
    at delta0 = -margin); ``"less"``: H1 difference < delta0. ``statistic`` is Tango's Z."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = x.size
    if n == 0:
        return PermResult(math.nan, math.nan, 0, math.nan, "none")
    if not abs(delta0) < 1:
        raise ValueError(f"delta0 must be in (-1, 1), not {delta0}")
    b = int(np.sum((x == 1) & (y == 0)))
    c = int(np.sum((x == 0) & (y == 1)))
    z_obs = float(tango_z(b, c, n, delta0))
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be greater or less, not {alternative!r}")
    sign = 1.0 if alternative == "greater" else -1.0
    if n > TANGO_EXACT_MAX_N:
        p = float(stats.norm.sf(sign * z_obs))
        return PermResult(z_obs, p, n, 1.0, "Tango score test (asymptotic)")
    z_sorted, p_max = _tango_tail_table(n, float(delta0), sign)
    k = int(np.searchsorted(-z_sorted, -(sign * z_obs - 1e-9 * max(1.0, abs(z_obs))),
                            side="right"))  # outcomes at least as extreme as observed
    if k == 0:
        return PermResult(z_obs, 0.0, n, 1.0, "Tango score test (exact unconditional)")
    p = float(p_max[k - 1])
    return PermResult(z_obs, min(1.0, p), n, 1.0, "Tango score test (exact unconditional)")


@functools.lru_cache(maxsize=16)
def _tango_tail_table(n: int, delta0: float, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """For every outcome (b, c) with b + c <= n, sorted by ``sign`` * Z descending: the
    sorted ``sign`` * Z and, per position k, the exact unconditional p-value of a result
    whose tail holds the first k + 1 outcomes: max over the nuisance q on the H0 boundary
    (p(1,0) = q + delta0, p(0,1) = q, a grid of :data:`TANGO_GRID` values) of the trinomial
    probability of those outcomes. Cached: a simulation calls it with the same n and margin
    thousands of times."""
    bb, cc = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = bb + cc <= n
    bb, cc = bb[keep].astype(float), cc[keep].astype(float)
    z = sign * tango_z(bb, cc, n, delta0)
    order = np.argsort(-z, kind="stable")
    bb, cc, z = bb[order], cc[order], z[order]
    log_coef = (math.lgamma(n + 1) - _lgamma(bb + 1) - _lgamma(cc + 1)
                - _lgamma(n - bb - cc + 1))
    lo, hi = max(0.0, -delta0), (1.0 - delta0) / 2.0
    q = np.linspace(lo, hi, TANGO_GRID)
    probs = np.column_stack([q + delta0, q, 1.0 - 2 * q - delta0])  # (grid, 3)
    with np.errstate(divide="ignore"):
        # log 0 as a large negative number: 0 * it is 0 (a cell never seen), k * it is -inf
        logs = np.where(probs > 1e-300, np.log(np.maximum(probs, 1e-300)), -1e5)
    counts = np.column_stack([bb, cc, n - bb - cc])  # (outcomes, 3)
    cum = np.cumsum(np.exp(log_coef[None, :] + logs @ counts.T), axis=1)  # (grid, outcomes)
    return z, np.minimum(1.0, cum.max(axis=0))


def _lgamma(a: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(a)


def mde(null_sd: float, n_clusters: int, alpha: float = 0.05, power: float = POWER,
        alternative: str = "two-sided", exact_min_p: float | None = None) -> float:
    """Minimum detectable effect (module notes); inf when the test cannot reach ``alpha``."""
    if not np.isfinite(null_sd) or n_clusters < 2:
        return math.inf
    if exact_min_p is not None and exact_min_p > alpha:
        return math.inf
    a = alpha / 2 if alternative == "two-sided" else alpha
    dist = stats.norm if n_clusters >= 200 else stats.t(n_clusters - 1)
    return float((dist.ppf(1 - a) + dist.ppf(power)) * null_sd)


def mde_t(se: float, df: float, alpha: float = 0.05, power: float = POWER,
          alternative: str = "two-sided") -> float:
    """Minimum detectable effect of a t test with standard error ``se`` on ``df`` degrees
    of freedom: (t_{df, 1-alpha/2} + t_{df, power}) * se; inf without a finite se."""
    if not (np.isfinite(se) and np.isfinite(df) and df > 0):
        return math.inf
    a = alpha / 2 if alternative == "two-sided" else alpha
    dist = stats.t(df)
    return float((dist.ppf(1 - a) + dist.ppf(power)) * se)


def mde_correlation(n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Smallest |correlation| detected with ``power`` at two-sided ``alpha`` from ``n``
    points (Fisher's z: tanh((z_{1-alpha/2} + z_power) / sqrt(n - 3))); inf for n <= 3."""
    if n <= 3:
        return math.inf
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(math.tanh(z / math.sqrt(n - 3)))


@dataclass
class PermResult:
    statistic: float
    p: float
    n: int
    null_sd: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row of ``a`` (k, n) with ``b`` (n,)."""
    ra = stats.rankdata(a, axis=-1)
    rb = stats.rankdata(b)
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra @ rb) / np.sqrt((ra**2).sum(axis=-1) * (rb**2).sum())


def permutation_spearman(values: Any, covariate: Any, n_draws: int = DEFAULT_DRAWS,
                         seed: int | np.random.Generator | None = 0,
                         alternative: str = "two-sided") -> PermResult:
    """Spearman's rho of ``values`` (one per cluster) with ``covariate``; permutation p-value
    (all G! orders for G <= 8)."""
    y = np.asarray(values, dtype=float).ravel()
    x = np.asarray(covariate, dtype=float).ravel()
    ok = np.isfinite(y) & np.isfinite(x)
    y, x = y[ok], x[ok]
    g = y.size
    if g < 3 or np.ptp(y) == 0 or np.ptp(x) == 0:
        return PermResult(math.nan, math.nan, g, math.nan, "none")
    rho = float(_spearman_rows(y[None, :], x)[0])
    if g <= 8:
        perms = np.array(list(itertools.permutations(range(g))))
        method = "exact permutation"
    else:
        rng = _rng(seed)
        perms = np.vstack([np.arange(g)[None, :],
                           np.argsort(rng.random((n_draws, g)), axis=1)])
        method = "permutation (Monte Carlo)"
    null = _spearman_rows(y[perms], x)
    return PermResult(rho, _p_from(null, rho, alternative), g, float(np.std(null)), method)


def stratified_auc_test(scores: np.ndarray, positive: np.ndarray, strata: Sequence[Any],
                        n_draws: int = 1999, seed: int | np.random.Generator | None = 0
                        ) -> PermResult:
    """Within-stratum AUC: P(score of a positive > score of a negative) + ties/2 over the
    (positive, negative) pairs of one run and one stratum,

        AUC_w = sum_{r, s} U_{r,s} / sum_{r, s} n1_{r,s} n0_{r,s},

    with U_{r,s} the Mann-Whitney count of run r's cases in stratum s; ``scores`` and
    ``positive`` are (runs, cases) arrays, ``strata`` one label per case. (One stratum:
    the ordinary AUC per run, pooled over runs by pair counts.)

    Two-sided p-value of AUC_w = 0.5 by permuting the cases' score columns within strata,
    the same permutation for every run: the statistic and its null use the same pairs, so
    differences between strata (e.g. later batches of a sequential run) never enter."""
    scores = np.asarray(scores, dtype=float)
    pos = np.asarray(positive, dtype=float)
    keep = np.all(np.isfinite(scores), axis=0) & np.all(np.isfinite(pos), axis=0)
    scores, pos = scores[:, keep], pos[:, keep].astype(bool)
    codes = _codes(np.asarray(strata, dtype=object)[keep], int(keep.sum()))
    groups = [np.flatnonzero(codes == c) for c in np.unique(codes)]
    n1 = np.array([pos[:, g].sum(axis=1) for g in groups])  # (strata, runs)
    n0 = np.array([g.size for g in groups])[:, None] - n1
    denom = float(np.sum(n1 * n0))
    if denom == 0:
        return PermResult(math.nan, math.nan, int(pos.size), math.nan, "none")

    def auc_of(mat: np.ndarray) -> np.ndarray:  # mat (k, runs, cases) -> (k,)
        u = np.zeros(mat.shape[0])
        for g, a in zip(groups, n1, strict=True):
            r = stats.rankdata(mat[..., g], axis=-1)
            u += ((r * pos[:, g]).sum(axis=-1) - a * (a + 1) / 2).sum(axis=-1)
        return u / denom

    value = float(auc_of(scores[None])[0])
    rng = _rng(seed)
    perms = np.tile(np.arange(codes.size), (n_draws, 1))
    for g in groups:
        if g.size > 1:
            perms[:, g] = g[np.argsort(rng.random((n_draws, g.size)), axis=1)]
    null = auc_of(np.moveaxis(scores[:, perms], 0, 1))  # (k, runs, cases)
    null = np.concatenate([[value], null])
    p = float(np.mean(np.abs(null - 0.5) >= abs(value - 0.5) - 1e-12))
    return PermResult(value, p, int(pos.size), float(np.std(null)),
                      "within-stratum permutation (Monte Carlo)")


def matched_pair_products(strata: Sequence[Any], match: Any, x: Any, y: Any
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Within each stratum, sort cases by ``match`` and pair neighbours (1st with 2nd, 3rd
    with 4th, ...; an odd one out is dropped). Returns, per pair, the sign product
    sign(dx) sign(dy), the product of rank differences dx * dy (ranks over all cases) and
    the pair's stratum, so that H0 "x carries no information about y at equal ``match``"
    makes each product symmetric about 0."""
    m = np.asarray(match, dtype=float)
    rx = stats.rankdata(np.asarray(x, dtype=float))
    ry = stats.rankdata(np.asarray(y, dtype=float))
    labels = np.asarray(strata, dtype=object)
    codes = _codes(labels, m.size)
    signs, prods, where = [], [], []
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        idx = idx[np.argsort(m[idx], kind="stable")]
        for a, b in zip(idx[0::2], idx[1::2], strict=False):
            dx, dy = rx[a] - rx[b], ry[a] - ry[b]
            signs.append(np.sign(dx) * np.sign(dy))
            prods.append(dx * dy)
            where.append(labels[a])
    return (np.asarray(signs, dtype=float), np.asarray(prods, dtype=float),
            np.asarray(where, dtype=object))


#: fewest clusters for a cluster (pairs) bootstrap interval of a non-linear statistic: with
#: fewer its intervals are far too narrow (Cameron, Gelbach & Miller 2008), so none is given
MIN_CLUSTERS = 10


def cluster_bootstrap_ci(columns: Any, statistic: Any, clusters: Any = None,
                         confidence: float = 0.95, n_draws: int = 1999,
                         seed: int | np.random.Generator | None = 0) -> ClusterCI:
    """Percentile cluster (pairs) bootstrap interval of ``statistic(column means)``.

    ``columns`` (n, k), NaN allowed (counted in neither sum nor count); ``statistic`` maps
    the (k, B) column means of B resamples to (B,). Whole clusters are resampled with
    replacement and the means recomputed from per-cluster sums; below
    :data:`MIN_CLUSTERS` clusters only the point estimate is given."""
    cols = np.asarray(columns, dtype=float)
    cols = cols[:, None] if cols.ndim == 1 else cols
    n, k = cols.shape
    codes = _codes(clusters, n)
    _, codes = np.unique(codes, return_inverse=True)
    g = int(codes.max()) + 1 if n else 0
    ok = np.isfinite(cols)
    sums = np.zeros((g, k))
    counts = np.zeros((g, k))
    np.add.at(sums, codes, np.where(ok, cols, 0.0))
    np.add.at(counts, codes, ok.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(np.asarray(statistic((sums.sum(0) / counts.sum(0))[:, None]))[0])
    if g < MIN_CLUSTERS or not np.isfinite(value):
        return ClusterCI(value, math.nan, math.nan, n, g, math.nan,
                         f"none ({g} clusters; a bootstrap needs {MIN_CLUSTERS} or more)")
    idx = _rng(seed).integers(0, g, size=(n_draws, g))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.asarray(statistic((sums[idx].sum(1) / counts[idx].sum(1)).T), dtype=float)
    boot = boot[np.isfinite(boot)]
    a = 1.0 - confidence
    lo, hi = (float(np.quantile(boot, q)) for q in (a / 2, 1 - a / 2))
    return ClusterCI(value, lo, hi, n, g, float(np.std(boot)), "cluster bootstrap (percentile)")
