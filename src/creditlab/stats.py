"""Statistics for comparisons over seeds: mean, sample standard deviation, median, Student's t
distribution (CDF and quantile, no scipy) and paired confidence intervals.

Every algorithm of a comparison sees the same initial weights and the same batches for a given
seed, so two algorithms are compared *paired*: the per-seed differences ``d_s = a_s - b_s`` are
the sample, and the interval is ``mean(d) +/- t_{(1+level)/2, n-1} * std(d) / sqrt(n)``
(:func:`paired`). With one seed there is no interval.

The t quantile inverts the CDF, which is written with the regularized incomplete beta function
``I_x(a, b)`` (continued fraction, Lentz's method): for ``t >= 0``,
``F(t; v) = 1 - I_{v/(v+t^2)}(v/2, 1/2) / 2``. Known values: ``t_{0.975}`` is 12.706 for 1
degree of freedom, 4.303 for 2, 2.776 for 4, 2.228 for 10, tending to the normal 1.960.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


def _finite(xs: Iterable[float | None]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def mean(xs: Iterable[float | None]) -> float | None:
    """Mean of the finite values (None and NaN skipped); None when there are none."""
    v = _finite(xs)
    return sum(v) / len(v) if v else None


def std(xs: Iterable[float | None]) -> float | None:
    """Sample standard deviation (n - 1) of the finite values; None for fewer than two."""
    v = _finite(xs)
    if len(v) < 2:
        return None
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def median(xs: Iterable[float | None]) -> float | None:
    """Median of the finite values; None when there are none."""
    v = sorted(_finite(xs))
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc: a={a} and b={b} must be > 0")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} must be in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df={df} must be > 0")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def normal_quantile(p: float) -> float:
    """The standard normal quantile (Acklam's rational approximation, one Newton step)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_quantile: p={p} must be in (0, 1)")
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    lo = 0.02425
    if p < lo:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    elif p > 1 - lo:
        q = math.sqrt(-2 * math.log1p(-p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    else:
        q = p - 0.5
        r = q * q
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
            (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    e = 0.5 * math.erfc(-x / math.sqrt(2)) - p  # Newton (Halley) refinement
    u = e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)
    return x - u / (1 + x * u / 2)


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: the t with
    ``t_cdf(t, df) = p`` (found by bisection on the CDF to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must be in (0, 1)")
    if df <= 0:
        raise ValueError(f"t_quantile: df={df} must be > 0")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    hi = max(1.0, 2.0 * abs(normal_quantile(p)))
    while t_cdf(hi, df) < p:
        hi *= 2.0
        if hi > 1e300:
            return math.inf
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """Paired differences ``a - b`` over the seeds both have, their mean, sample standard
    deviation, and the two-sided confidence interval (None with fewer than two seeds)."""

    seeds: tuple
    diffs: tuple
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def excludes_zero(self) -> bool | None:
        """True when the interval lies entirely above or below 0; None without an interval."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


def confidence_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """``mean +/- t_{(1+level)/2, n-1} * s / sqrt(n)``; None for fewer than two values."""
    v = _finite(xs)
    if len(v) < 2:
        return None
    m, s = sum(v) / len(v), std(v) or 0.0
    half = t_quantile((1.0 + level) / 2.0, len(v) - 1) * s / math.sqrt(len(v))
    return m - half, m + half


def paired(a: Mapping, b: Mapping, level: float = 0.95) -> Paired:
    """``a`` and ``b`` map seed -> value; the differences ``a[s] - b[s]`` over the seeds with a
    finite value in both (in sorted seed order) and their interval at ``level``."""
    seeds = tuple(sorted(s for s in a if s in b and _finite([a[s]]) and _finite([b[s]])))
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    ci = confidence_interval(diffs, level)
    return Paired(seeds, diffs, mean(diffs), std(diffs), ci[0] if ci else None, ci[1] if ci else None, level)
