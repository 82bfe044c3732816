"""evals.stats against published and hand-computed values."""

from __future__ import annotations

import math

import pytest

from evals.stats import (
    binom_cdf,
    bootstrap_ci,
    bootstrap_stat_ci,
    clopper_pearson,
    holm,
    mcnemar,
    mcnemar_exact,
    mean_spread,
    median,
    paired_bootstrap,
    two_proportions,
    wilson,
)

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat.
# Med. 17:857-872, Table I: the Wilson score interval (method 3) and the exact
# Clopper-Pearson interval (method 5), printed to 4 decimals.
NEWCOMBE = [
    # k, n, Wilson, Clopper-Pearson
    (81, 263, (0.2553, 0.3662), (0.2527, 0.3676)),
    (15, 148, (0.0624, 0.1605), (0.0578, 0.1617)),
    (0, 20, (0.0000, 0.1611), (0.0000, 0.1684)),
    (1, 29, (0.0061, 0.1718), (0.0009, 0.1776)),
    (29, 29, (0.8830, 1.0000), (0.8806, 1.0000)),
]
# the table's values are rounded to 4 decimals: half a unit of the last digit
PRINTED = 0.5e-4 + 1e-12


@pytest.mark.parametrize(("k", "n", "wil", "cp"), NEWCOMBE)
def test_intervals_match_newcombes_table(k, n, wil, cp):
    assert wilson(k, n) == pytest.approx(wil, abs=PRINTED)
    assert clopper_pearson(k, n) == pytest.approx(cp, abs=PRINTED)


def test_clopper_pearson_closed_forms_and_definition():
    # k = 0: upper = 1 - (alpha/2)^(1/n); k = n: lower = (alpha/2)^(1/n)
    assert clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12)
    assert clopper_pearson(7, 7)[0] == pytest.approx(0.025 ** (1 / 7), abs=1e-12)
    # the defining tail probabilities, summed here with exact integer binomials
    lo, hi = clopper_pearson(874, 1000)

    def tail(p, ks):
        return math.fsum(math.comb(1000, i) * p**i * (1 - p) ** (1000 - i) for i in ks)

    # bisection to ~1e-16 in p moves a tail of ~0.025 by far less than 1e-9
    assert tail(lo, range(874, 1001)) == pytest.approx(0.025, abs=1e-9)
    assert tail(hi, range(0, 875)) == pytest.approx(0.025, abs=1e-9)


def test_binom_cdf_by_hand():
    # Binomial(4, 1/2): P(X <= 1) = (1 + 4) / 16
    assert binom_cdf(1, 4, 0.5) == pytest.approx(5 / 16, abs=1e-15)
    assert binom_cdf(4, 4, 0.3) == 1.0
    assert binom_cdf(-1, 4, 0.3) == 0.0


def test_mcnemar_exact_by_hand():
    # 1 and 9 discordant pairs: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-15)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32, abs=1e-15)
    assert mcnemar_exact(5, 5) == 1.0  # the two-sided p is capped at 1
    assert mcnemar_exact(0, 0) == 1.0
    # the EMMET / MEMIT pair: 81 and 66 discordant records, p = 0.25
    assert mcnemar_exact(81, 66) == pytest.approx(0.248, abs=1e-3)


def test_mcnemar_counts_discordant_pairs():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    t = mcnemar(a, b)
    assert (t.b_only, t.c_only, t.n) == (2, 1, 5)
    assert t.p == pytest.approx(mcnemar_exact(2, 1), abs=0)
    assert (t.a, t.b) == (3 / 5, 2 / 5)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_median_is_the_true_median():
    assert median([4, 1, 3, 2]) == 2.5  # not the upper median, 3
    assert median([5, 1, 3]) == 3
    assert median([77.8]) == 77.8
    with pytest.raises(ValueError):
        median([])


def test_bootstrap_interval_is_seeded_and_near_the_normal_one():
    x = [1.0] * 500 + [0.0] * 500
    ci = bootstrap_ci(x, seed=3)
    assert ci == bootstrap_ci(x, seed=3)
    # the normal interval 0.5 ± 1.96 * sqrt(0.25 / 1000) = ± 0.0310; the bootstrap's
    # quantiles differ from it by the Monte Carlo error of 10,000 resamples and the
    # discreteness of means of 1000 zeros and ones (steps of 0.001): within 0.003
    half = 1.959964 * math.sqrt(0.25 / 1000)
    assert ci == pytest.approx((0.5 - half, 0.5 + half), abs=3e-3)
    assert bootstrap_ci([0.7] * 20) == pytest.approx((0.7, 0.7), abs=1e-12)


def test_paired_bootstrap_agrees_with_mcnemar_where_both_apply():
    # 81 items only a holds, 66 only b, 800 both, 53 neither (n = 1000)
    a = [1] * 81 + [0] * 66 + [1] * 800 + [0] * 53
    b = [0] * 81 + [1] * 66 + [1] * 800 + [0] * 53
    t = paired_bootstrap(a, b, seed=1)
    assert t.difference == pytest.approx(0.015, abs=1e-12)
    assert t.ci is not None and t.ci[0] < 0 < t.ci[1]
    # normal approximation of McNemar: z = 15 / sqrt(147) = 1.237, p = 0.216; the
    # bootstrap p carries a Monte Carlo error of sqrt(p(1-p)/10000) = 0.004 and the
    # difference between the two approximations: within 0.03
    assert t.p == pytest.approx(0.216, abs=0.03)
    assert not t.significant()


def test_paired_bootstrap_separates_a_clear_difference():
    a = [1] * 150 + [0] * 50
    b = [1] * 100 + [0] * 100
    t = paired_bootstrap(a, b, seed=0)
    assert t.significant() and t.p < 1e-3
    assert t.ci is not None and t.ci[0] > 0
    same = paired_bootstrap(a, a)
    assert same.p == 1.0 and same.ci == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_mean_spread():
    s = mean_spread([0.87, 0.89, 0.88])
    assert s.mean == pytest.approx(0.88, abs=1e-12)
    assert s.sd == pytest.approx(0.01, abs=1e-12)  # sample sd: sqrt((1e-4 + 1e-4) / 2)
    assert (s.lo, s.hi, s.n) == (0.87, 0.89, 3)
    assert s.text() == "0.880 ± 0.010 (n=3)"
    assert mean_spread([0.5]).sd == 0.0


def test_two_proportions_by_hand():
    # 136 / 200 against 124 / 200: pooled 0.65, se = sqrt(0.65 * 0.35 * 2 / 200) = 0.04770,
    # z = 0.06 / 0.04770 = 1.2579, two-sided p = erfc(z / sqrt 2) = 0.2084
    t = two_proportions(136, 200, 124, 200)
    assert t.p == pytest.approx(0.2084, abs=1e-4)  # the hand value, rounded to 4 decimals
    assert (t.a, t.b) == (0.68, 0.62)
    assert two_proportions(5, 10, 5, 10).p == pytest.approx(1.0, abs=1e-15)
    assert two_proportions(0, 10, 0, 10).p == 1.0


def test_bootstrap_of_a_statistic_of_column_means():
    rows = [[1.0, 0.0]] * 300 + [[0.0, 1.0]] * 700
    # the first column's mean through a statistic: the same interval as bootstrap_ci's
    # on that column, resample for resample (same seed, same indices)
    ci = bootstrap_stat_ci(rows, lambda m: m[:, 0], seed=5)
    assert ci == bootstrap_ci([r[0] for r in rows], seed=5)
    # the two columns' means always sum to 1: the interval of the sum is a point
    total = bootstrap_stat_ci(rows, lambda m: m.sum(axis=1))
    assert total == pytest.approx((1.0, 1.0), abs=1e-12)


def test_holm_by_hand():
    # m = 4: 0.01 * 4 = 0.04, 0.02 * 3 = 0.06, 0.03 * 2 = 0.06, 0.5 * 1 = 0.5
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06], abs=1e-15)
    # monotone: a later step never adjusts below an earlier one; capped at 1
    assert holm([0.04, 0.045]) == pytest.approx([0.08, 0.08], abs=1e-15)
    assert holm([0.9, 0.8]) == [1.0, 1.0]
