"""What a paired margin design can detect, before it runs and after: the smallest p-value its
tests can reach after Holm's correction, and the minimum detectable effect (MDE) per metric.

The gate (:mod:`reports.compare`) tests, per metric, H0: D >= -delta (D the mean paired
difference candidate - baseline, higher is better, delta the metric's margin) with the
larger p of a cluster sign-flip test and a second test (Tango's exact score test for 0/1
outcomes, a cluster bootstrap-t otherwise), then Holm across the m metrics.

* Floor (:func:`floor_p`): a sign-flip test over G units cannot give a one-sided p below
  1/2^G (exact enumeration, G <= 12) or 1/(draws + 1) (Monte Carlo); the bootstrap-t not
  below 1/(B + 1). Holm multiplies the smallest p by m, so the gate can say "worse" at all
  only if m * floor < alpha (:func:`holm_floor`).
* MDE after the run (:func:`mde_worse`): with the standard error se of D on df degrees of
  freedom, the true drop detected with power 1 - beta at Holm's first step (level alpha/m,
  the conservative bound for every metric) is delta + (t_{df,1-alpha/m} + t_{df,1-beta}) se.
* MDE before the run (:func:`planned_mde`): se from planning values. For a 0/1 outcome whose
  two arms disagree on a case with probability q in each direction when they are equal
  (``background``), a candidate worse by Delta disagrees with probability Delta + 2q, so the
  per-case variance of d is Delta + 2q - Delta^2; for a continuous outcome ``background`` is
  the per-case sd of d. Cases of one unit are taken as independent (se = sd / sqrt(n)); a
  design with intra-unit correlation does worse, which the MDE after the run shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import optimize, stats

from reports.inference import EXACT_MAX_CLUSTERS

ALPHA = 0.05
POWER = 0.8
#: Monte Carlo draws of the gate's sign-flip tests and resamples of its bootstrap-t test
SIGN_FLIP_DRAWS = 9999
BOOTSTRAP_DRAWS = 1999


def floor_p(n_units: int, binary_single: bool = False, n_cases: int | None = None,
            draws: int = SIGN_FLIP_DRAWS, boot: int = BOOTSTRAP_DRAWS) -> float:
    """Smallest one-sided p one margin test of the gate can give over ``n_units`` units.

    ``binary_single``: a 0/1 outcome with one case (and seed) per unit, tested by Tango's
    exact test alone, whose floor with ``n_cases`` pairs is far below any alpha used (every
    pair discordant against the candidate has probability below 2^-n); other designs take
    the larger p of the sign-flip test and the bootstrap-t or Tango test."""
    if n_units < 1:
        return 1.0
    if binary_single:
        return 0.5 ** (n_cases or n_units)
    flip = 0.5**n_units if n_units <= EXACT_MAX_CLUSTERS else 1.0 / (draws + 1)
    return max(flip, 1.0 / (boot + 1))


def holm_floor(floor: float, n_metrics: int) -> float:
    """The smallest Holm-adjusted p over ``n_metrics`` tests whose raw floor is ``floor``."""
    return min(1.0, n_metrics * floor)


def units_for_floor(n_metrics: int, alpha: float = ALPHA) -> int:
    """Fewest units for which a sign-flip gate over ``n_metrics`` metrics can reach
    ``alpha`` after Holm (m / 2^G < alpha)."""
    g = 1
    while holm_floor(floor_p(g), n_metrics) >= alpha:
        g += 1
    return g


def _quantiles(df: float, alpha: float, n_metrics: int, power: float) -> float:
    dist = stats.norm if not math.isfinite(df) or df >= 200 else stats.t(max(df, 1.0))
    return float(dist.ppf(1 - alpha / n_metrics) + dist.ppf(power))


def mde_worse(se: float, df: float, margin: float, alpha: float = ALPHA, n_metrics: int = 1,
              power: float = POWER) -> float:
    """The true drop (positive, in the metric's units) the worse test detects with
    ``power`` at level alpha / ``n_metrics``: margin + (t_{1-a} + t_{power}) se; inf without
    a finite se."""
    if not (math.isfinite(se) and se >= 0 and df > 0):
        return math.inf
    return margin + _quantiles(df, alpha, n_metrics, power) * se


@dataclass(frozen=True)
class Planning:
    """Planning value of one metric (module notes): ``background`` is the discordance rate
    per direction (0/1 outcomes) or the per-case sd of d (continuous); ``source`` says where
    it was measured."""

    binary: bool
    background: float
    source: str = ""


def planned_mde(plan: Planning, n_cases: int, n_units: int, margin: float,
                alpha: float = ALPHA, n_metrics: int = 1, power: float = POWER) -> float:
    """The drop (positive) detected with ``power`` by a design of ``n_cases`` cases in
    ``n_units`` units (module notes); inf when the design's floor cannot reach alpha."""
    binary_single = plan.binary and n_units == n_cases
    if holm_floor(floor_p(n_units, binary_single, n_cases), n_metrics) >= alpha:
        return math.inf
    df = n_units - 1 if n_units > 1 else math.nan
    k = _quantiles(df, alpha, n_metrics, power)
    if not plan.binary:
        return margin + k * plan.background / math.sqrt(n_cases)
    q = plan.background

    def gap(delta: float) -> float:
        sd = math.sqrt(max(delta + 2 * q - delta**2, 1e-12))
        return delta - margin - k * sd / math.sqrt(n_cases)

    if gap(1.0) < 0:
        return math.inf
    return float(optimize.brentq(gap, margin, 1.0))
