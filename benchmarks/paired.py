"""Paired statistics for the study: arm minus baseline over the same seeds, with a 95% Student-t interval.

For seeds s = 1..n run under both arms, d_s = metric(arm, s) - metric(baseline, s). The report gives

    mean(d) +- t_{0.975, n-1} * std(d, ddof=1) / sqrt(n)

and reads it as "no detectable effect" when the interval covers 0. Pairing removes what the seed does to both arms
alike (data order, augmentation), so the interval is usually much tighter than one from two independent means.
Only pure-Python arithmetic: the Student-t quantile comes from its CDF (regularised incomplete beta, Lentz's
continued fraction) inverted by bisection, exact to ~1e-10.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Mapping, Optional


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Numerical Recipes' betacf, modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (p in (0, 1)), by bisection on :func:`t_cdf`."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass
class PairedDifference:
    """arm - baseline over the seeds both finished: n pairs, mean, sample std, 95% interval and its reading."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    seeds: list[str]
    lower_is_better: bool = False     # a loss: a negative difference is the better one

    @property
    def verdict(self) -> str:
        if self.n < 2 or math.isnan(self.low):
            return "too few pairs"
        if self.low <= 0.0 <= self.high:
            return "no detectable effect"
        return "better" if (self.low > 0) != self.lower_is_better else "worse"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def paired_difference(arm: Mapping[str, float], baseline: Mapping[str, float],
                      confidence: float = 0.95, lower_is_better: bool = False) -> Optional[PairedDifference]:
    """The paired difference over the seeds present in both mappings (seed -> metric); None if there are none.

    ``verdict`` says "better"/"worse" only when the whole interval lies on one side of 0, in the metric's direction
    (``lower_is_better`` for a loss: an interval below 0 is "better").
    """
    seeds = sorted(set(arm) & set(baseline), key=lambda s: (len(s), s))
    if not seeds:
        return None
    d = [arm[s] - baseline[s] for s in seeds]
    n, mean = len(d), statistics.fmean(d)
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan, math.nan, seeds, lower_is_better)
    std = statistics.stdev(d)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return PairedDifference(n, mean, std, mean - half, mean + half, seeds, lower_is_better)
