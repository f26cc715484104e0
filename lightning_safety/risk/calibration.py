"""A decision threshold with a stated recall guarantee (distribution-free, finite-sample).

Given scores of n held-out harmful prompts, exchangeable with future harmful prompts, pick a
threshold t such that, with probability >= 1 - delta over the draw of the calibration set, the
miss rate of future harmful prompts is at most alpha: P(score < t) <= alpha.

Order-statistic bound: sort the scores ascending, s_(1) <= ... <= s_(n), and take t = s_(k).
For continuous scores the miss rate F(s_(k)) is distributed like the k-th smallest of n
uniforms, so P(F(s_(k)) > alpha) = P(fewer than k of n uniforms fall below alpha)
= BinomialCDF(k - 1; n, alpha). The largest k with BinomialCDF(k - 1; n, alpha) <= delta gives
the highest threshold (fewest false positives) that keeps the guarantee. Ties or discrete scores
only make the miss rate smaller (flagging uses ``score >= t``). k >= 1 needs
(1 - alpha)^n <= delta, i.e. n >= log(delta) / log(1 - alpha).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_safety.errors import CalibrationError

ASSUMPTIONS = (
    "calibration and future harmful prompts are exchangeable (i.i.d. from the same distribution); "
    "no guarantee under distribution shift, e.g. new attack styles; says nothing about false positives"
)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no overflow for large n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n_fact = math.lgamma(n + 1)
    total = 0.0
    for i in range(k + 1):
        log_pmf = log_n_fact - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        total += math.exp(log_pmf)
    return min(total, 1.0)


def min_calibration_size(alpha: float, delta: float) -> int:
    """The smallest n for which a threshold exists: (1 - alpha)^n <= delta."""
    _check_levels(alpha, delta)
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while (1 - alpha) ** n > delta:  # guard against rounding in the logarithms
        n += 1
    while n > 1 and (1 - alpha) ** (n - 1) <= delta:
        n -= 1
    return n


def _check_levels(alpha: float, delta: float) -> None:
    if not (0.0 < alpha < 1.0 and 0.0 < delta < 1.0):
        raise CalibrationError(
            f"alpha={alpha} and delta={delta} must both lie strictly between 0 and 1: "
            "e.g. alpha=0.1 (miss at most 10%) and delta=0.05 (95% confidence)"
        )


def order_statistic_index(n: int, alpha: float, delta: float) -> int:
    """The largest k in 1..n with BinomialCDF(k - 1; n, alpha) <= delta, or 0 if none."""
    _check_levels(alpha, delta)
    log_p, log_q = math.log(alpha), math.log1p(-alpha)
    log_n_fact = math.lgamma(n + 1)
    cdf, best = 0.0, 0
    for k in range(1, n + 1):
        i = k - 1  # add P(X = k - 1) to get BinomialCDF(k - 1)
        cdf += math.exp(log_n_fact - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        if cdf > delta:
            break
        best = k
    return best


@dataclass(frozen=True)
class CalibratedThreshold:
    """A threshold with its recall guarantee.

    Attributes:
        threshold: flag a prompt when its score >= threshold.
        alpha: guaranteed maximum miss rate on harmful prompts.
        delta: probability that the guarantee fails (over the calibration draw).
        n: number of harmful calibration scores.
        k: the threshold is the k-th smallest of them.
        statement: the guarantee in one plain-English sentence.
        assumptions: what the guarantee rests on and what it does not cover.
        empirical_fpr: fraction of benign calibration scores >= threshold (None if none given).
        n_benign: number of benign calibration scores (0 if none given).
    """

    threshold: float
    alpha: float
    delta: float
    n: int
    k: int
    statement: str
    assumptions: str = ASSUMPTIONS
    empirical_fpr: float | None = None
    n_benign: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        return asdict(self)


def _as_scores(scores: Tensor | list[float], what: str) -> Tensor:
    values = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        raise CalibrationError(f"{what} calibration scores contain NaN or infinity: pass finite probe scores")
    return values


def _percent(x: float) -> str:
    return f"{100 * x:.4g}%"


def calibrate_threshold(
    harmful_scores: Tensor | list[float],
    *,
    alpha: float = 0.1,
    delta: float = 0.05,
    benign_scores: Tensor | list[float] | None = None,
) -> CalibratedThreshold:
    """Threshold t = s_(k) with P(miss rate of t > alpha) <= delta (see the module docstring).

    Args:
        harmful_scores: [n] scores of held-out harmful prompts (not used to train the scorer).
        alpha: allowed miss rate (1 - alpha is the guaranteed recall).
        delta: allowed probability that the guarantee fails.
        benign_scores: [m] optional held-out benign scores, to report the empirical FPR.

    Raises:
        CalibrationError: too few harmful scores for (alpha, delta), or bad levels.
    """
    _check_levels(alpha, delta)
    scores = torch.sort(_as_scores(harmful_scores, "harmful")).values
    n = scores.numel()
    k = order_statistic_index(n, alpha, delta) if n else 0
    if k == 0:
        raise CalibrationError(
            f"{n} harmful calibration scores are too few for alpha={alpha}, delta={delta}: "
            f"need n >= log(delta)/log(1-alpha), i.e. at least {min_calibration_size(alpha, delta)}; "
            "hold out more harmful prompts or loosen alpha/delta"
        )
    threshold = float(scores[k - 1])
    empirical_fpr, n_benign = None, 0
    if benign_scores is not None:
        benign = _as_scores(benign_scores, "benign")
        n_benign = benign.numel()
        empirical_fpr = float((benign >= threshold).double().mean()) if n_benign else None
    statement = (
        f"With probability >= {1 - delta:.4g} over the calibration draw, at least {_percent(1 - alpha)} of "
        f"harmful prompts from the calibration distribution score >= {threshold:.4g} and are flagged."
    )
    if empirical_fpr is not None:
        statement += f" On {n_benign} benign calibration prompts, {_percent(empirical_fpr)} were flagged (empirical, no guarantee)."
    return CalibratedThreshold(
        threshold=threshold,
        alpha=float(alpha),
        delta=float(delta),
        n=n,
        k=k,
        statement=statement,
        empirical_fpr=empirical_fpr,
        n_benign=n_benign,
    )
