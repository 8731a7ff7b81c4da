"""Uncertainty of corpus error rates: bootstrap confidence intervals and paired significance tests.

Both resample or permute whole utterances, the unit that was sampled, so that the correlation between the
words of one utterance is respected. Rates are ratios of sums (corpus WER), recomputed on each resample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from whisper_ptq.results.metrics import error_rate


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float = 0.95


def bootstrap_rate_ci(
    errors: np.ndarray, totals: np.ndarray, *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of sum(errors)/sum(totals) in percent, resampling utterances."""
    errors, totals = np.asarray(errors, float), np.asarray(totals, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(errors), size=(resamples, len(errors)))
    sampled_totals = totals[idx].sum(axis=1)
    rates = 100.0 * errors[idx].sum(axis=1) / np.where(sampled_totals > 0, sampled_totals, np.nan)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(rates, [alpha, 1.0 - alpha])
    return Interval(error_rate(errors, totals), float(low), float(high), level)


@dataclass(frozen=True)
class PairedTest:
    difference: float  # rate(b) - rate(a), percentage points
    p_value: float
    low: float  # bootstrap interval of the difference
    high: float
    n: int
    changed: int  # utterances whose error count differs between a and b
    se: float = math.nan  # delta-method standard error of `difference` (points); NaN with one utterance

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    def utterances_needed(self, margin: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
        """Utterances like these (same spread of per-utterance differences) that a two-sided test at `alpha`
        needs to tell a true difference of `margin` points apart from zero with probability `power`: the
        standard sample-size formula n = n_now * ((z_{1-alpha/2} + z_power) * se / margin)^2. None when it
        cannot be estimated (no spread measured, or a zero margin)."""
        if not (math.isfinite(self.se) and self.se > 0 and margin):
            return None
        z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
        return max(self.n + 1, math.ceil(self.n * (z * self.se / abs(margin)) ** 2))


def paired_test(
    errors_a: np.ndarray,
    errors_b: np.ndarray,
    totals: np.ndarray,
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedTest:
    """Two-sided paired test of corpus error rate b vs a on the same utterances.

    The statistic is the difference of corpus rates; its null distribution comes from randomly swapping
    the two systems' error counts within each utterance (a paired permutation / sign-flip test: under the
    null both systems are exchangeable on every utterance). The p-value counts the observed statistic
    itself, so it is never zero; with few differing utterances every swap pattern is enumerated (exact
    test). A paired bootstrap interval of the difference comes with it.
    """
    a, b, totals = (np.asarray(x, float) for x in (errors_a, errors_b, totals))
    total = totals.sum()
    diff = b - a
    observed = 100.0 * diff.sum() / total
    rng = np.random.default_rng(seed)
    changed = diff[diff != 0]  # utterances with equal errors contribute nothing under any swap
    if 2 ** len(changed) <= resamples:
        # Few differing utterances: enumerate every swap pattern, an exact p-value.
        signs = 1.0 - 2.0 * ((np.arange(2 ** len(changed))[:, None] >> np.arange(len(changed))) & 1)
        null = 100.0 * (signs * changed).sum(axis=1) / total
        p_value = np.count_nonzero(np.abs(null) >= abs(observed) - 1e-9) / len(null)
    else:
        signs = rng.choice((-1.0, 1.0), size=(resamples, len(changed)))
        null = 100.0 * (signs * changed).sum(axis=1) / total
        p_value = (np.count_nonzero(np.abs(null) >= abs(observed) - 1e-9) + 1) / (resamples + 1)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    sampled_totals = totals[idx].sum(axis=1)
    # A resample of only empty references has no rate; drop it rather than divide by zero (as bootstrap_rate_ci).
    boot = 100.0 * diff[idx].sum(axis=1) / np.where(sampled_totals > 0, sampled_totals, np.nan)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(boot, [alpha, 1.0 - alpha])
    return PairedTest(
        float(observed), float(p_value), float(low), float(high), len(diff), len(changed), _ratio_se(diff, totals)
    )


def _ratio_se(diff: np.ndarray, totals: np.ndarray) -> float:
    """Standard error (points) of sum(diff) / sum(totals), a ratio of sums over sampled utterances, by the
    delta method: the spread of the residuals diff_i - R * totals_i around the ratio R."""
    n = len(diff)
    if n < 2 or totals.sum() <= 0:
        return math.nan
    residuals = diff - diff.sum() / totals.sum() * totals
    return float(100.0 * math.sqrt(n * residuals.var(ddof=1)) / totals.sum())


def paired_rows_test(reference: Iterable[Any], other: Iterable[Any]) -> PairedTest | None:
    """`paired_test` of `other` against `reference` over the utterances both scored, matched by id (rows with
    `id`, `word_errors`, `ref_words`, as `UtteranceResult`); None when they share none."""
    by_id = {row.id: row for row in reference}
    pairs = [(by_id[row.id], row) for row in other if row.id in by_id]
    if not pairs:
        return None
    return paired_test(
        [a.word_errors for a, _ in pairs], [b.word_errors for _, b in pairs], [a.ref_words for a, _ in pairs]
    )
