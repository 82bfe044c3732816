"""Small, dependency-free statistics for comparing replay runs.

- :func:`clopper_pearson` and :func:`wilson`: a 95 % interval for a rate k / n
  (the exact binomial one is the default everywhere a count is shown).
- :func:`bootstrap_ci`: a seeded percentile bootstrap over records, for means of
  per-record scores that are not 0 / 1 (PS, NS).
- :func:`mcnemar_exact`: the exact McNemar test, a two-sided binomial test on the
  discordant pairs of two runs scored on the same records.
- :func:`paired_bootstrap`: the difference of two means on the same examples,
  resampled in pairs, with its interval and a two-sided p-value.
- :func:`median`: the median (the mean of the two middle values for an even n).
- :func:`mean_spread`: a group of replicates as its mean and spread.

Every function is deterministic: a bootstrap takes its ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: the level every interval and test uses unless told otherwise
ALPHA = 0.05
#: bootstrap resamples (Monte Carlo error of a 2.5 % quantile ~ 0.2 % of the spread)
N_BOOT = 10_000


def _binom_logpmf(i: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if i == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if i == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, math.fsum(math.exp(_binom_logpmf(i, n, p)) for i in range(k + 1)))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_cdf(k - 1, n, p) if k > 0 else 1.0


def _bisect(f: Callable[[float], float], lo: float, hi: float) -> float:
    """The root of an increasing ``f`` on [lo, hi] to double precision (80 halvings)."""
    for _ in range(80):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for k successes in n trials: the p where
    P(X >= k; p) = alpha / 2 and P(X <= k; p) = alpha / 2."""
    _check_count(k, n)
    if n == 0:
        return (0.0, 1.0)
    a = alpha / 2
    lo = 0.0 if k == 0 else _bisect(lambda p: binom_sf(k, n, p) - a, 0.0, 1.0)
    hi = 1.0 if k == n else _bisect(lambda p: a - binom_cdf(k, n, p), 0.0, 1.0)
    return (lo, hi)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's score interval for k / n (z = 1.96: 95 %)."""
    _check_count(k, n)
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def _check_count(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def median(values: Sequence[float]) -> float:
    """The median: the middle value, or the mean of the two middle values."""
    xs = sorted(values)
    if not xs:
        raise ValueError("the median of no values")
    mid = len(xs) // 2
    return float(xs[mid]) if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples of ``x`` with replacement (in chunks, to bound memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, 1000):
        m = min(1000, n_boot - start)
        out[start : start + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float], alpha: float = ALPHA, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (records resampled with
    replacement, ``n_boot`` times, from ``seed``)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("a bootstrap of no values")
    means = _boot_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def bootstrap_stat_ci(
    rows: Sequence[Sequence[float]],
    stat: Callable[[np.ndarray], np.ndarray],
    alpha: float = ALPHA,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` of the column means of ``rows`` (one row
    per record; ``stat`` maps an (n_boot, columns) array of resampled means to n_boot
    values, e.g. the harmonic mean of ES, PS and NS)."""
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty table of records, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, x.shape[1]))
    for start in range(0, n_boot, 1000):
        m = min(1000, n_boot - start)
        means[start : start + m] = x[rng.integers(0, x.shape[0], size=(m, x.shape[0]))].mean(1)
    lo, hi = np.quantile(stat(means), [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class PairedTest:
    """Two runs on the same n items: a (first) against b (second)."""

    test: str  # "McNemar (exact)" or "paired bootstrap"
    n: int
    a: float  # the first run's rate / mean
    b: float
    p: float
    b_only: int = 0  # discordant pairs: a right, b wrong (McNemar only)
    c_only: int = 0  # a wrong, b right
    ci: tuple[float, float] | None = None  # interval of a - b (bootstrap only)

    @property
    def difference(self) -> float:
        return self.a - self.b

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p < alpha


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the b + c discordant pairs as Binomial(b + c, ½),
    p = min(1, 2 P(X <= min(b, c)))."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(b, c), n, 0.5))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> PairedTest:
    """Exact McNemar between two runs' outcomes on the same items, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = len(a)
    return PairedTest(
        "McNemar (exact)",
        n,
        sum(map(bool, a)) / n if n else 0.0,
        sum(map(bool, b)) / n if n else 0.0,
        mcnemar_exact(only_a, only_b),
        b_only=only_a,
        c_only=only_b,
    )


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    alpha: float = ALPHA,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> PairedTest:
    """The difference of the means of a and b on the same items, items resampled in
    pairs: its percentile interval and a two-sided p-value (twice the smaller share of
    resampled differences on either side of zero, with the +1 correction)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired values must be two equal, non-empty lists: {x.shape}, {y.shape}")
    d = x - y
    diffs = _boot_means(d, n_boot, seed)
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    if not d.any():
        p = 1.0
    else:
        below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
        p = min(1.0, 2 * (min(below, above) + 1) / (n_boot + 1))
    return PairedTest(
        "paired bootstrap",
        int(d.size),
        float(x.mean()),
        float(y.mean()),
        p,
        ci=(float(lo), float(hi)),
    )


def two_proportions(k1: int, n1: int, k2: int, n2: int) -> PairedTest:
    """The unpaired two-proportion z-test (pooled), two-sided: for two rates on the same
    examples where the per-example outcomes were not stored. With positively correlated
    outcomes (the same examples) it is conservative: its p is too large, not too small."""
    _check_count(k1, n1)
    _check_count(k2, n2)
    if n1 == 0 or n2 == 0:
        raise ValueError("two proportions need n1, n2 > 0")
    p1, p2, pool = k1 / n1, k2 / n2, (k1 + k2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    p = 1.0 if se == 0 else math.erfc(abs(p1 - p2) / se / math.sqrt(2))
    return PairedTest("two-proportion z (unpaired)", min(n1, n2), p1, p2, min(1.0, p))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (in the order given): the
    i-th smallest times (m - i), made monotone, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class Spread:
    """A group of replicates (e.g. one setting run in several orders)."""

    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1); 0 for one replicate
    lo: float  # the smallest replicate
    hi: float  # the largest

    def text(self, digits: int = 3) -> str:
        """``0.874 ± 0.012 (n=3)``: the mean ± the sample standard deviation."""
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} (n={self.n})"


def mean_spread(values: Sequence[float]) -> Spread:
    """The mean of replicate values with their sample standard deviation and range."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("the spread of no replicates")
    m = math.fsum(xs) / len(xs)
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return Spread(len(xs), m, sd, min(xs), max(xs))


__all__ = [
    "ALPHA",
    "N_BOOT",
    "PairedTest",
    "Spread",
    "binom_cdf",
    "binom_sf",
    "bootstrap_ci",
    "bootstrap_stat_ci",
    "clopper_pearson",
    "holm",
    "mcnemar",
    "mcnemar_exact",
    "mean_spread",
    "median",
    "paired_bootstrap",
    "two_proportions",
    "wilson",
]
