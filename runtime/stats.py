"""Statistics for ablation tables: Student-t intervals, Welch's test, seeds needed.

Everything here is pure Python on lists of floats (no scipy): the Student-t distribution comes
from the regularized incomplete beta function,

    P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2),

evaluated by its continued fraction (modified Lentz), and its quantiles by bisection on that
CDF. With one value the standard deviation and interval are undefined and come back as
``None``; callers print "undefined (1 seed)" rather than a zero spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

__all__ = ["t_cdf", "t_ppf", "Summary", "summarize", "Welch", "welch", "seeds_needed"]


# ---------------------------------------------------------------------------- the t distribution
def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),           # even term
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd term
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b  # the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"a quantile needs 0 < q < 1, got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- one sample
@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and the t-based ``level`` interval of the mean; ``std``
    and the interval are None with fewer than two values."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None
    level: float = 0.95

    def describe(self, digits: int = 4) -> str:
        """``3.1234 ± 0.0123 (95% CI 3.10-3.15)``, or ``3.1234 (1 seed: std and CI undefined)``."""
        if self.n == 0:
            return "no runs"
        if self.std is None:
            return f"{self.mean:.{digits}f} (1 seed: std and CI undefined)"
        return (f"{self.mean:.{digits}f} ± {self.std:.{digits}f} "
                f"({self.level:.0%} CI {self.ci_low:.{digits}f} to {self.ci_high:.{digits}f})")


def summarize(values: Sequence[float], *, level: float = 0.95) -> Summary:
    """The mean of ``values`` with its sample std and mean ± t_{(1+level)/2, n-1} · std / sqrt(n)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, None, None, None, level)
    mean = math.fsum(xs) / n
    if n < 2:
        return Summary(n, mean, None, None, None, level)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_ppf((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, level)


# ---------------------------------------------------------------------------- two samples
@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of mean(b) - mean(a): the difference, t, the
    Welch-Satterthwaite degrees of freedom and the two-sided p-value (None when undefined)."""

    diff: float
    t: float | None
    df: float | None
    p_value: float | None


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Welch's t-test: t = (mean_b - mean_a) / sqrt(s_a^2/n_a + s_b^2/n_b); two-sided p.
    Undefined (None) with fewer than two values on a side; with zero spread on both sides the
    p-value is 1 for equal means and 0 otherwise."""
    sa, sb = summarize(a), summarize(b)
    diff = sb.mean - sa.mean
    if sa.std is None or sb.std is None:
        return Welch(diff, None, None, None)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0.0:
        return Welch(diff, None, None, 1.0 if diff == 0 else 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    return Welch(diff, t, df, 2.0 * (1.0 - t_cdf(abs(t), df)))


def seeds_needed(diff: float, std_a: float, std_b: float, *, alpha: float = 0.05, power: float = 0.8,
                 limit: int = 100_000) -> int | None:
    """Seeds per variant for a two-sided Welch test at ``alpha`` to detect ``diff`` with
    probability ``power``, if the spreads are ``std_a`` and ``std_b``: the smallest n with

        |diff| / sqrt((s_a^2 + s_b^2) / n) >= t_{1 - alpha/2, df(n)} + t_{power, df(n)}

    (df(n) the Welch-Satterthwaite degrees of freedom at n seeds each). None when the
    difference is zero or ``limit`` seeds would not be enough."""
    var = std_a ** 2 + std_b ** 2
    if diff == 0.0:
        return None
    if var == 0.0:
        return 2
    z = NormalDist().inv_cdf
    start = max(2, math.ceil(var * (z(1 - alpha / 2) + z(power)) ** 2 / diff ** 2))  # t quantiles exceed z ones
    for n in range(start, limit + 1):
        df = var ** 2 / ((std_a ** 4 + std_b ** 4) / (n - 1)) if std_a ** 4 + std_b ** 4 > 0 else n - 1
        if abs(diff) / math.sqrt(var / n) >= t_ppf(1 - alpha / 2, df) + t_ppf(power, df):
            return n
    return None
