"""Means over seeds with 95% confidence intervals (Student's t), for the reports' summary tables.

``mean_ci(values)``: the mean of n values and the two-sided 95% t interval
``mean -+ t(0.975, n - 1) * s / sqrt(n)``, ``s`` the sample standard deviation
(n - 1 in the denominator).

``ratio_ci(values)``: for ratios (SFPO / GRPO per seed, and the like), the same
on the log scale: the geometric mean ``exp(mean(log r))`` and the t interval of
the ``log r`` exponentiated. Its bounds are never negative, and the interval of
GRPO / SFPO is the reciprocal of that of SFPO / GRPO.

Fewer than :data:`MIN_SEEDS` values give no interval (NaN bounds; the text says
"too few seeds"): with 2 values t(0.975, 1) = 12.706 makes the interval 12.7 times
the distance between them, wide enough to take in negative step times, so it says
nothing. The t quantiles for 1..30 degrees of freedom are the standard table
values; above 30 the Cornish-Fisher expansion of the t quantile around the normal
one (error < 1e-4 there). Seeds are few (3-10), so the t interval, not a
bootstrap: a bootstrap of 5 values has only 126 distinct resamples and
understates the spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# t(0.975, df) for df = 1..30
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
Z975 = 1.959964
MIN_SEEDS = 3  # the fewest values an interval is given for (see the module docstring)
TOO_FEW = "[too few seeds]"  # in place of the interval below MIN_SEEDS
INTERVAL = (
    "95% t interval over seeds, mean -+ t(0.975, n-1) s/sqrt(n); ratios: geometric mean, the interval taken "
    f"on the log scale (never negative); none with fewer than {MIN_SEEDS} seeds (too few seeds: with 2, the "
    "interval would be 12.7 times the distance between the two values)"
)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _t_interval(xs: list[float]) -> tuple[float, float, float, int]:
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = math.fsum(xs) / n
    if n < MIN_SEEDS:
        return mean, math.nan, math.nan, n
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * s / math.sqrt(n)
    return mean, mean - half, mean + half, n


def mean_ci(values: Iterable[float]) -> tuple[float, float, float, int]:
    """``(mean, ci_low, ci_high, n)`` over the finite ``values``; NaN mean with none, NaN bounds with fewer than
    :data:`MIN_SEEDS`."""
    return _t_interval(_finite(values))


def ratio_ci(values: Iterable[float]) -> tuple[float, float, float, int]:
    """``(geometric mean, ci_low, ci_high, n)`` of the finite ratios ``values``, the interval on the log scale.

    NaN bounds with fewer than :data:`MIN_SEEDS`; all NaN (``n`` still counted) when a ratio is 0 or
    negative, which has no logarithm (a ratio of accuracies where one arm scored 0).
    """
    xs = _finite(values)
    if any(x <= 0 for x in xs):
        return math.nan, math.nan, math.nan, len(xs)
    mean, low, high, n = _t_interval([math.log(x) for x in xs])
    return math.exp(mean) if n else math.nan, math.exp(low), math.exp(high), n


def format_spread(mean: float, low: float, high: float, n: int, fmt: str = "{:.2f}") -> str:
    """``mean [low, high]`` in ``fmt``; ``n/a`` with no value, ``mean [too few seeds]`` below :data:`MIN_SEEDS`."""
    if n == 0 or math.isnan(mean):
        return "n/a"
    shown = fmt.format(mean)
    if n < MIN_SEEDS:
        return f"{shown} {TOO_FEW}"
    return shown if math.isnan(low) else f"{shown} [{fmt.format(low)}, {fmt.format(high)}]"
