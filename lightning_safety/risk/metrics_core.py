"""Ranking metrics for binary risk scores (torch only, no scikit-learn).

Convention: ``labels`` are 1 for harmful (positive) and 0 for benign; higher scores mean
more harmful.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_safety.errors import ProbeError


def _scores_and_labels(scores: Tensor, labels: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Validate and flatten to float64 scores [N] and bool labels [N] with both classes present."""
    scores = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().reshape(-1).to("cpu")
    if scores.shape != labels.shape:
        raise ProbeError(f"{what}: {scores.numel()} scores but {labels.numel()} labels: pass one label per score")
    if not torch.isfinite(scores).all():
        raise ProbeError(f"{what}: scores contain NaN or infinity: score every example with a finite number")
    positive = labels.bool() if labels.dtype == torch.bool else labels != 0
    if positive.all() or not positive.any():
        raise ProbeError(f"{what} needs both harmful (1) and benign (0) examples: add examples of the missing class")
    return scores, positive


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks [N] of ``values`` [N] in ascending order; tied values share their average rank."""
    sorted_values, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # rank of the last member of each tie group
    group_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: P(harmful score > benign score) + 0.5 P(tie).

    Args:
        scores: [N] higher = more harmful.
        labels: [N] 1 = harmful, 0 = benign (bool or numbers).

    Computed from ranks (Mann-Whitney U), with ties at average ranks.
    """
    scores, positive = _scores_and_labels(scores, labels, "auroc")
    ranks = average_ranks(scores)
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def threshold_at_fpr(scores: Tensor, labels: Tensor, fpr: float) -> float:
    """The smallest observed score t such that the fraction of benign scores >= t is <= ``fpr``.

    Returns ``inf`` when no observed score qualifies (nothing can be flagged at that FPR).
    """
    if not 0.0 <= fpr <= 1.0:
        raise ProbeError(f"fpr {fpr} is outside [0, 1]: pass a false-positive rate such as 0.01")
    scores, positive = _scores_and_labels(scores, labels, "threshold_at_fpr")
    benign = torch.sort(scores[~positive]).values
    candidates = torch.unique(scores)  # ascending
    # benign scores >= t: those not strictly below t.
    at_or_above = benign.numel() - torch.searchsorted(benign, candidates, side="left")
    allowed = at_or_above.to(torch.float64) / benign.numel() <= fpr + 1e-12
    if not allowed.any():
        return float("inf")
    return float(candidates[allowed.nonzero()[0, 0]])


def recall_at_fpr(scores: Tensor, labels: Tensor, fpr: float) -> float:
    """Fraction of harmful examples flagged (score >= t) at the threshold of :func:`threshold_at_fpr`."""
    threshold = threshold_at_fpr(scores, labels, fpr)
    scores, positive = _scores_and_labels(scores, labels, "recall_at_fpr")
    return float((scores[positive] >= threshold).double().mean())


def accuracy(probabilities: Tensor, labels: Tensor, threshold: float = 0.5) -> float:
    """Fraction of examples whose ``probability >= threshold`` matches ``labels != 0``."""
    probabilities = torch.as_tensor(probabilities).detach().reshape(-1).cpu()
    labels = torch.as_tensor(labels).detach().reshape(-1).cpu() != 0
    return float(((probabilities >= threshold) == labels).double().mean())
