"""Mean and 95 % confidence interval over a few seeds, with Student's t (small n).

    mean = sum(x) / n
    s    = sqrt(sum((x - mean)^2) / (n - 1))
    half = t_{0.975, n-1} * s / sqrt(n)          -> report "mean ± half"

The t quantile is computed here from the closed form of Student's t CDF for integer degrees of freedom
(Abramowitz & Stegun 26.7.3-26.7.4, with theta = atan(t / sqrt(nu))):

    A(t | nu) = P(|T| <= t)
              = (2/pi) (theta + sin(theta) sum_{k=0}^{(nu-3)/2} c_k cos^{2k+1}(theta))   nu odd,
                 c_0 = 1, c_k = c_{k-1} * 2k / (2k+1)                                 (nu = 1: 2 theta / pi)
              = sin(theta) sum_{k=0}^{(nu-2)/2} d_k cos^{2k}(theta)                     nu even,
                 d_0 = 1, d_k = d_{k-1} * (2k-1) / (2k)

and bisection on A(t) = confidence, so no statistics library is needed at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (integer) degrees of freedom."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    theta = math.atan(t / math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, cos
        for k in range((df - 1) // 2):
            if k > 0:
                term *= cos * cos * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + sin * total)
    total, term = 0.0, 1.0
    for k in range(df // 2):
        if k > 0:
            term *= cos * cos * (2 * k - 1) / (2 * k)
        total += term
    return sin * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = confidence (e.g. 0.95 gives t_{0.975, df})."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_two_sided_probability(high, df) < confidence:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_two_sided_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class MeanCI:
    mean: float
    half_width: float  # nan when n == 1: one seed gives no interval
    n: int

    def format(self, *, scale: float = 1.0, digits: int = 2) -> str:
        if self.n == 0:
            return "n/a"
        if math.isnan(self.half_width):
            return f"{self.mean * scale:.{digits}f} (n=1)"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> MeanCI:
    """Mean and the half-width of its Student-t confidence interval."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return MeanCI(math.nan, math.nan, 0)
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"values must be finite to average, got {bad[0]}; exclude diverged runs first")
    mean = sum(values) / n
    if n == 1:
        return MeanCI(mean, math.nan, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return MeanCI(mean, t_quantile(confidence, n - 1) * std / math.sqrt(n), n)


@dataclass(frozen=True)
class RatioCI:
    """A ratio of two means with a percentile-bootstrap interval (paired resampling of the seeds)."""

    value: float
    low: float
    high: float
    n: int

    def format(self, *, scale: float = 1.0, digits: int = 0) -> str:
        if self.n == 0 or not math.isfinite(self.value):
            return "n/a"
        if self.n == 1 or not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value * scale:.{digits}f} (n={self.n})"
        return f"{self.value * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def ratio_of_means_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> RatioCI:
    """mean(numerators) / mean(denominators) over paired values (one pair per seed), with the percentile interval
    of the same ratio over ``resamples`` bootstrap resamples of the pairs (a seeded generator: reproducible).

    Resamples whose denominator mean is 0 are left out. With few seeds (3 to 5) the interval is rough; it says
    how much the ratio moves with the seeds, not more.
    """
    import random

    pairs = [(float(a), float(b)) for a, b in zip(numerators, denominators)]
    if len(numerators) != len(denominators):
        raise ValueError(f"numerators and denominators must pair up, got {len(numerators)} and {len(denominators)}")
    n = len(pairs)
    if n == 0:
        return RatioCI(math.nan, math.nan, math.nan, 0)
    total_b = sum(b for _, b in pairs)
    value = sum(a for a, _ in pairs) / total_b if total_b != 0 else math.nan
    if n == 1:
        return RatioCI(value, math.nan, math.nan, 1)
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        sample = [pairs[rng.randrange(n)] for _ in range(n)]
        b = sum(p[1] for p in sample)
        if b != 0:
            ratios.append(sum(p[0] for p in sample) / b)
    if not ratios:
        return RatioCI(value, math.nan, math.nan, n)
    ratios.sort()
    tail = (1 - confidence) / 2
    low = ratios[min(len(ratios) - 1, int(math.floor(tail * len(ratios))))]
    high = ratios[min(len(ratios) - 1, int(math.ceil((1 - tail) * len(ratios))) - 1)]
    return RatioCI(value, low, high, n)
