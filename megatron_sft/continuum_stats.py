"""Mean and 95% t-interval over seeds, without scipy (the continuum's table and plot report them).

The interval is mean ± t_{0.975, n-1} · s / sqrt(n), with s the sample standard deviation (n - 1 in the
denominator): the usual interval for a mean from a handful of seeds, wider than ±1.96·s/sqrt(n) because s itself
is estimated from few values. One value gives no interval (s is undefined), reported as such rather than as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None: one value, no interval
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: int, intervals: int = 2000) -> float:
    """P(T <= x) for x >= 0 by Simpson's rule on [0, x] (the density is smooth and symmetric)."""
    h = x / intervals
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


@cache
def t_quantile(probability: float, df: int) -> float:
    """The Student-t quantile for probability in (0.5, 1), by bisection on the CDF: exact to ~1e-9, so the
    interval needs no scipy and no hard-coded table (the test checks it against the printed table)."""
    if df < 1 or not 0.5 < probability < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < probability < 1, got {df}, {probability}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < probability:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < probability else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean and the half-width of the two-sided t-interval over ``values`` (None for a single value)."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, 1)
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(0.5 + confidence / 2, n - 1) * s / math.sqrt(n), n)


def format_interval(interval: Interval, percent: bool = True) -> str:
    """"19.0% ± 2.1" (the half-width in points) or "0.692 ± 0.010"; "± n/a" for one value."""
    if percent:
        mean, half = f"{interval.mean:.1%}", "n/a" if interval.half_width is None else f"{100 * interval.half_width:.1f}"
    else:
        mean, half = f"{interval.mean:.3f}", "n/a" if interval.half_width is None else f"{interval.half_width:.3f}"
    return f"{mean} ± {half}"
