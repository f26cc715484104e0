"""Calibrated probe threshold: order-statistic / binomial recall guarantee."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_safety.errors import CalibrationError
from lightning_safety.risk.calibration import (
    ASSUMPTIONS,
    binomial_cdf,
    calibrate_threshold,
    min_calibration_size,
    order_statistic_index,
)


def _exact_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("n,p", [(10, 0.3), (60, 0.1), (100, 0.1), (7, 0.9)])
def test_binomial_cdf_matches_the_exact_sum(n, p):
    for k in range(-1, n + 1):
        expected = 0.0 if k < 0 else _exact_cdf(k, n, p)
        assert binomial_cdf(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_known_case_n100_alpha10_delta5_takes_the_fifth_smallest_score():
    # By hand: BinomialCDF(4; 100, 0.1) = 0.0237 <= 0.05 < BinomialCDF(5; 100, 0.1) = 0.0576, so k = 5.
    assert _exact_cdf(4, 100, 0.1) <= 0.05 < _exact_cdf(5, 100, 0.1)
    scores = torch.arange(100, 0, -1, dtype=torch.float64) / 100  # 1.00, 0.99, ..., 0.01 (unsorted order)
    result = calibrate_threshold(scores, alpha=0.1, delta=0.05)
    assert (result.n, result.k) == (100, 5)
    assert result.threshold == pytest.approx(0.05)
    assert result.statement == (
        "With probability >= 0.95 over the calibration draw, at least 90% of harmful prompts from the "
        "calibration distribution score >= 0.05 and are flagged."
    )
    assert result.assumptions == ASSUMPTIONS
    assert "exchangeable" in result.assumptions and "distribution shift" in result.assumptions
    assert "false positives" in result.assumptions
    assert result.empirical_fpr is None
    assert set(result.to_dict()) >= {"threshold", "alpha", "delta", "n", "k", "statement", "assumptions"}


def test_largest_qualifying_k_is_chosen():
    for n, alpha, delta in [(29, 0.1, 0.05), (60, 0.1, 0.1), (500, 0.05, 0.01), (1000, 0.2, 0.05)]:
        k = order_statistic_index(n, alpha, delta)
        assert k >= 1
        assert binomial_cdf(k - 1, n, alpha) <= delta
        assert k == n or binomial_cdf(k, n, alpha) > delta


def test_too_few_scores_raise_a_one_line_error_with_the_minimum_n():
    assert min_calibration_size(0.1, 0.05) == 29  # log(0.05)/log(0.9) = 28.4
    assert order_statistic_index(29, 0.1, 0.05) == 1
    calibrate_threshold(torch.rand(29), alpha=0.1, delta=0.05)  # enough
    with pytest.raises(CalibrationError) as error:
        calibrate_threshold(torch.rand(28), alpha=0.1, delta=0.05)
    message = str(error.value)
    assert "\n" not in message and "at least 29" in message and "28 harmful" in message
    with pytest.raises(CalibrationError, match="at least 29"):
        calibrate_threshold([], alpha=0.1, delta=0.05)


@pytest.mark.parametrize("alpha,delta", [(0.0, 0.05), (0.1, 1.0), (-0.1, 0.05), (0.1, 0.0)])
def test_bad_levels_are_rejected(alpha, delta):
    with pytest.raises(CalibrationError, match="strictly between 0 and 1"):
        calibrate_threshold(torch.rand(100), alpha=alpha, delta=delta)


def test_non_finite_scores_are_rejected():
    with pytest.raises(CalibrationError, match="NaN or infinity"):
        calibrate_threshold(torch.tensor([0.5] * 40 + [float("nan")]), alpha=0.1, delta=0.05)


def test_empirical_fpr_on_benign_scores_is_reported():
    harmful = torch.linspace(0.5, 1.0, 100)
    benign = torch.tensor([0.0, 0.1, 0.2, 0.9])
    result = calibrate_threshold(harmful, alpha=0.1, delta=0.05, benign_scores=benign)
    assert result.threshold == pytest.approx(float(harmful[4]))
    assert result.empirical_fpr == pytest.approx(0.25) and result.n_benign == 4
    assert "4 benign calibration prompts, 25% were flagged" in result.statement


def test_simulated_guarantee_holds():
    """Uniform harmful scores: the true miss rate of t is t itself; it may exceed alpha in <= delta of draws."""
    n, alpha, delta, trials = 60, 0.1, 0.1, 400
    generator = torch.Generator().manual_seed(1234)
    draws = torch.rand(trials, n, generator=generator, dtype=torch.float64)
    violations = 0
    for scores in draws:
        result = calibrate_threshold(scores, alpha=alpha, delta=delta)
        violations += result.threshold > alpha  # P(score < t) = t for Uniform(0, 1)
    rate = violations / trials
    assert rate <= delta + 0.05
    # Not vacuous either: the rate sits near the exact failure probability BinomialCDF(k - 1; n, alpha).
    k = order_statistic_index(n, alpha, delta)
    assert abs(rate - binomial_cdf(k - 1, n, alpha)) < 0.05
