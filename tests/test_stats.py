"""Bootstrap intervals and paired tests against cases small enough to work out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from whisper_ptq.results.stats import bootstrap_rate_ci, paired_test


def test_constant_rate_has_a_zero_width_interval() -> None:
    ci = bootstrap_rate_ci([1, 1], [2, 2])
    assert (ci.estimate, ci.low, ci.high, ci.level) == (50.0, 50.0, 50.0, 0.95)


def test_two_opposite_utterances_span_zero_to_hundred() -> None:
    # Resamples: {0,0} -> 0%, {0,2} or {2,0} -> 50%, {2,2} -> 100%, each end with probability 1/4 > 2.5%.
    ci = bootstrap_rate_ci([0, 2], [2, 2])
    assert (ci.estimate, ci.low, ci.high) == (50.0, 0.0, 100.0)


def test_rate_is_a_ratio_of_sums_not_a_mean_of_rates() -> None:
    assert bootstrap_rate_ci([1, 0], [1, 9]).estimate == pytest.approx(10.0)  # not mean(100%, 0%) = 50%


def test_three_utterances_one_error_worse_each_give_exact_p_of_two_eighths() -> None:
    # 2^3 sign patterns; only all-plus and all-minus reach |difference| >= 3 errors: p = 2/8.
    test = paired_test([0, 1, 2], [1, 2, 3], [10, 10, 10])
    assert test.p_value == 0.25
    assert test.difference == pytest.approx(10.0)  # 3 errors over 30 words
    assert (test.low, test.high) == pytest.approx((10.0, 10.0))  # every utterance differs by the same amount
    assert (test.n, test.changed) == (3, 3)
    assert not test.significant()


def test_exact_p_with_unequal_differences() -> None:
    # Differences +2, +1: patterns give 3, 1, -1, -3 errors; |x| >= 3 in 2 of 4.
    assert paired_test([0, 0], [2, 1], [10, 10]).p_value == 0.5


def test_identical_systems() -> None:
    test = paired_test([3, 0, 5, 1], [3, 0, 5, 1], [10, 8, 12, 6])
    assert (test.difference, test.p_value, test.low, test.high, test.changed) == (0.0, 1.0, 0.0, 0.0, 0)


def test_differences_that_cancel_are_not_significant() -> None:
    test = paired_test([1] * 10, [2] * 5 + [0] * 5, [10] * 10)
    assert test.difference == 0.0 and test.p_value == 1.0  # 10 changed: 1024 patterns, enumerated


def test_consistent_difference_on_many_utterances_is_significant() -> None:
    # 40 utterances all one error worse: 2^40 patterns, so the Monte Carlo branch; the observed extreme is
    # practically never reached by random signs, so p is its floor 1 / (resamples + 1).
    test = paired_test([0] * 40, [1] * 40, [20] * 40, resamples=2000)
    assert test.p_value == pytest.approx(1 / 2001)
    assert test.significant() and test.difference == pytest.approx(5.0)
    better = paired_test([1] * 40, [0] * 40, [20] * 40, resamples=2000)
    assert better.significant() and better.difference == pytest.approx(-5.0)


def test_empty_references_do_not_break_the_paired_bootstrap() -> None:
    # An utterance with no reference words (insertions only) fills a resample on its own 1/4 of the time.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = paired_test([1, 0], [2, 1], [0, 10])
    assert test.difference == pytest.approx(20.0) and test.low <= test.high


def test_bootstrap_matches_the_binomial_normal_interval() -> None:
    # 2000 utterances of 10 words, each word wrong with probability 0.1, independently: the corpus rate is a
    # binomial proportion over 20,000 words, whose normal interval is p +- 1.96 sqrt(p (1 - p) / n).
    rng = np.random.default_rng(1)
    totals = np.full(2000, 10)
    errors = rng.binomial(totals, 0.1)
    ci = bootstrap_rate_ci(errors, totals)
    p = errors.sum() / totals.sum()
    half = 100 * 1.96 * math.sqrt(p * (1 - p) / totals.sum())
    assert ci.estimate == pytest.approx(100 * p)
    assert ci.low == pytest.approx(100 * p - half, abs=0.1 * half)
    assert ci.high == pytest.approx(100 * p + half, abs=0.1 * half)


def test_seed_makes_intervals_reproducible() -> None:
    errors, totals = [0, 3, 1, 4, 2], [10, 12, 9, 15, 11]
    assert bootstrap_rate_ci(errors, totals, seed=7) == bootstrap_rate_ci(errors, totals, seed=7)
    assert paired_test(errors, totals, totals, seed=7) == paired_test(errors, totals, totals, seed=7)


def test_standard_error_and_utterances_needed_for_a_paired_difference() -> None:
    # Five of ten utterances gain one error in ten words: +5 points. Residuals around the ratio are +-0.5 words,
    # so the delta-method SE is 100 * sqrt(10 * var) / 100 words = sqrt(10 * 0.25 * 10 / 9) = 5/3 points.
    test = paired_test([0] * 10, [1] * 5 + [0] * 5, [10] * 10)
    assert test.difference == pytest.approx(5.0) and test.se == pytest.approx(5 / 3)
    # n = 10 * ((z_0.975 + z_0.8) * se / margin)^2 = 10 * (2.8016 * 1.6667 / 1)^2 = 218.02 -> 219.
    assert test.utterances_needed(1.0) == 219
    assert test.utterances_needed(-1.0) == 219  # the sign of the margin does not matter
    assert test.utterances_needed(0.0) is None  # no difference to detect
    assert paired_test([1, 2], [1, 2], [5, 5]).utterances_needed(1.0) is None  # no spread measured
    assert math.isnan(paired_test([1], [2], [5]).se)  # one utterance: no spread to estimate
