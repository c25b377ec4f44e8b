"""Intervals and verdicts for ``dataflex-cli compare``: pure Python, no torch.

A *sample* is a list of ``(numerator, denominator)`` pairs whose estimate is ``sum(num) / sum(den)``:
seeds carry ``(value, 1)`` (a plain mean), questions of one run carry e.g. ``(summed token loss,
supervised tokens)`` (the per-token loss) or ``(correct, 1)`` (an accuracy). Intervals use Student's
t with ``n - 1`` degrees of freedom and the ratio estimator's standard error (which is the ordinary
``sd / sqrt(n)`` when every denominator is 1). Differences are paired: seed k of a method against
seed k of the baseline, or question i against question i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Pairs = Sequence[tuple[float, float]]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
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
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on the CDF; 1e-12 relative accuracy)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; ``lo``/``hi`` are None when there is no spread to measure (n < 2)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def half(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2.0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def interval(sample: Pairs, level: float = 0.95) -> Interval:
    """Ratio estimate ``sum(num) / sum(den)`` with a Student-t interval (``n - 1`` degrees of freedom)."""
    n = len(sample)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    num = sum(x for x, _ in sample)
    den = sum(w for _, w in sample)
    if den == 0:
        raise ValueError("the denominators of a sample sum to 0")
    est = num / den
    if n < 2:
        return Interval(est, None, None, n)
    mean_den = den / n
    resid = [x - est * w for x, w in sample]
    se = math.sqrt(sum(r * r for r in resid) / (n * (n - 1))) / mean_den
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return Interval(est, est - half, est + half, n)


def paired_difference(method: Pairs, baseline: Pairs, level: float = 0.95) -> Interval:
    """``estimate(method) - estimate(baseline)`` with the interval of the paired difference.

    Pairs are matched by position (seed k with seed k, question i with question i); with ratio
    estimates the residual of each pair is the difference of the two linearised residuals.
    """
    if len(method) != len(baseline):
        raise ValueError(f"paired samples differ in size: {len(method)} and {len(baseline)}")
    n = len(method)
    if n == 0:
        raise ValueError("a difference needs at least one pair")
    num_m, den_m = sum(x for x, _ in method), sum(w for _, w in method)
    num_b, den_b = sum(x for x, _ in baseline), sum(w for _, w in baseline)
    est_m, est_b = num_m / den_m, num_b / den_b
    diff = est_m - est_b
    if n < 2:
        return Interval(diff, None, None, n)
    resid = [(xm - est_m * wm) / (den_m / n) - (xb - est_b * wb) / (den_b / n)
             for (xm, wm), (xb, wb) in zip(method, baseline)]
    mean_r = sum(resid) / n  # 0 up to rounding
    se = math.sqrt(sum((r - mean_r) ** 2 for r in resid) / (n * (n - 1)))
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return Interval(diff, diff - half, diff + half, n)


VERDICTS = ("better", "tie", "worse")


def verdict(diff: Interval, higher_is_better: bool) -> str | None:
    """``better`` / ``worse`` when the interval of the difference excludes 0 on that side, else ``tie``;
    None when the difference has no interval (a single pair)."""
    if diff.lo is None:
        return None
    if diff.lo > 0:
        return "better" if higher_is_better else "worse"
    if diff.hi < 0:
        return "worse" if higher_is_better else "better"
    return "tie"


def seeds_needed(diff: float, sd: float, level: float = 0.95, power: float = 0.8, most: int = 1000) -> int | None:
    """Seeds a paired comparison needs so that a true difference ``diff`` (with per-seed paired standard
    deviation ``sd``) gives an interval excluding 0 with probability ``power`` (t-based, iterated)."""
    if diff == 0 or sd <= 0:
        return None
    z_power = _normal_quantile(power)
    for n in range(2, most + 1):
        need = (t_quantile(0.5 + level / 2.0, n - 1) + z_power) * sd / abs(diff)
        if n >= need * need:
            return n
    return None


def _normal_quantile(p: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0
