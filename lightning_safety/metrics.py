"""Safety and utility metrics: attack success, (over-)refusal, task accuracy and risk AUROC.

Follows torchmetrics' layout: a functional core of plain functions on tensors, and thin
:class:`torchmetrics.Metric` classes that accumulate fixed-shape ``"sum"`` states. Fixed shapes
matter under DDP: list/``cat`` states are gathered with one collective per list element, so ranks
that called ``update`` a different number of times deadlock; a sum of counts does not care.

Rates come with Wilson 95% intervals and their sample sizes (:class:`RateReport`), because a
safety claim such as "ASR 0/20" means little without them.

Shapes used below: ``N`` examples, ``C`` classes, ``K`` histogram bins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_safety.errors import LightningSafetyError

__all__ = [
    "Z_95",
    "AttackSuccessRate",
    "ExactMatch",
    "MetricError",
    "OverRefusalRate",
    "RateReport",
    "RefusalRate",
    "RiskAUROC",
    "UtilityAccuracy",
    "accuracy_counts",
    "attack_success_rate",
    "auroc_from_histograms",
    "binary_rate_counts",
    "binned_auroc",
    "exact_match_counts",
    "extract_final_answer",
    "refusal_rate",
    "risk_histograms",
    "wilson_interval",
]

Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile


class MetricError(LightningSafetyError):
    """A metric got unusable input (wrong shape, dtype or values) or bad constructor arguments."""


# --------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------


def _as_number(name: str, value: float | Tensor) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise MetricError(f"{name} must be a single number; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetricError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise MetricError(f"{name} must be a finite number >= 0; got {value}")
    return value


def wilson_interval(successes: float | Tensor, total: float | Tensor, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / total``.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not degenerate at 0 or
    ``total`` successes, which is exactly where safety rates (ASR 0/50) tend to sit.

    Args:
        successes: number of successes, ``0 <= successes <= total`` (int, float or 1-element tensor).
        total: number of trials; ``0`` gives the uninformative ``(0.0, 1.0)``.
        z: standard normal quantile; the default gives a two-sided 95% interval.

    Returns:
        ``(low, high)`` clamped to [0, 1].

    Example:
        >>> tuple(round(v, 4) for v in wilson_interval(5, 10))
        (0.2366, 0.7634)
    """
    k = _as_number("successes", successes)
    n = _as_number("total", total)
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0:
        raise MetricError(f"z must be a finite number > 0 (1.96 for 95%); got {z!r}")
    if k > n:
        raise MetricError(f"successes ({k:g}) must not exceed total ({n:g}): pass counts of the same examples")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denominator
    half = (z / denominator) * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    # The bounds are exactly 0 at k = 0 and 1 at k = n; rounding would leave them a hair off.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class RateReport:
    """A rate with its Wilson 95% interval and sample size.

    Args:
        rate: ``count / total`` (NaN when ``total == 0``).
        low: lower bound of the Wilson 95% interval.
        high: upper bound of the Wilson 95% interval.
        count: number of positive examples (attacks that succeeded, refusals, correct answers).
        total: number of examples.

    Example:
        >>> RateReport.from_counts(5, 10).as_dict()["total"]
        10
    """

    rate: float
    low: float
    high: float
    count: int
    total: int

    @classmethod
    def from_counts(cls, count: int, total: int) -> RateReport:
        """Build the report of ``count`` positives out of ``total`` examples."""
        low, high = wilson_interval(count, total)
        return cls(rate=count / total if total else math.nan, low=low, high=high, count=count, total=total)

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict (for JSON or loggers)."""
        return asdict(self)


def binary_rate_counts(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Count the true entries of a 1-D flag tensor.

    Args:
        flags: ``[N]`` bool tensor, or numbers that are all 0 or 1.

    Returns:
        ``(count, total)``: 0-dim int64 tensors on ``flags.device``.
    """
    return _flag_counts("flags", flags)


def _validate_flags(name: str, flags: Tensor) -> Tensor:
    """``flags`` as a 1-D bool tensor, or a MetricError saying what is wrong with it."""
    if not isinstance(flags, Tensor):
        raise MetricError(f"{name} must be a 1-D bool tensor [N]; got {type(flags).__name__}")
    if flags.dim() != 1:
        raise MetricError(f"{name} must be a 1-D bool tensor [N]; got shape {tuple(flags.shape)}: flatten it first")
    if flags.dtype == torch.bool:
        return flags
    if flags.is_complex():
        raise MetricError(f"{name} must be bool or 0/1 numbers; got dtype {flags.dtype}")
    bad = ~((flags == 0) | (flags == 1))  # NaN compares unequal to both, so it is caught here
    n_bad = int(bad.sum())
    if n_bad:
        first = flags[bad][0].item()
        raise MetricError(f"{name} must hold only 0/1 (or True/False); got {n_bad} other values such as {first}")
    return flags != 0


def _flag_counts(name: str, flags: Tensor) -> tuple[Tensor, Tensor]:
    flags = _validate_flags(name, flags)
    return flags.sum(dtype=torch.long), torch.tensor(flags.numel(), dtype=torch.long, device=flags.device)


def _rate(count: Tensor, total: Tensor) -> Tensor:
    """``count / total`` as a float tensor; NaN when ``total == 0`` (a rate of nothing is undefined)."""
    # Divide in float64: int64 counts beyond 2**24 would lose precision in float32 first. torch.where
    # instead of an `if` avoids a device-to-host sync on GPU.
    count, total = count.to(torch.float64), total.to(torch.float64)
    rate = torch.where(total > 0, count / total.clamp(min=1), torch.full_like(total, math.nan))
    return rate.to(torch.get_default_dtype())


def attack_success_rate(attack_succeeded: Tensor) -> Tensor:
    """Fraction of attacks (harmful prompts, jailbreaks) that got a harmful answer.

    Args:
        attack_succeeded: ``[N]`` bool (or 0/1), True where the attack succeeded.

    Returns:
        0-dim float tensor; NaN for an empty input (the rate of zero attacks is undefined).
    """
    return _rate(*_flag_counts("attack_succeeded", attack_succeeded))


def refusal_rate(refused: Tensor) -> Tensor:
    """Fraction of prompts the model refused (on safe prompts this is the over-refusal rate).

    Args:
        refused: ``[N]`` bool (or 0/1), True where the model refused.

    Returns:
        0-dim float tensor; NaN for an empty input.
    """
    return _rate(*_flag_counts("refused", refused))


# A number: optional sign and dollar sign (either order), digits with proper thousands commas or
# plain digits, optional decimals. Thousands groups must be exact so that "3,4,5" stays three numbers.
# The sign must touch the number and not follow a word or digit, so "5-3" and "10 - 3" give 3, not -3.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-?)(?:\$\s?)?(?P<sign2>-?)"
    r"(?P<digits>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)


def _normalise_number(match: re.Match[str]) -> str:
    negative = bool(match["sign"]) or bool(match["sign2"])
    try:
        value = Decimal(match["digits"].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only matches valid decimals
        return match["digits"]
    if negative:
        value = -value
    if value == 0:
        return "0"  # also maps "-0" and "0.00" to one form
    # normalize() drops trailing zeros ("3.50" -> "3.5", "1000.00" -> "1E+3"); "f" undoes the exponent.
    return format(value.normalize(), "f")


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution, normalised for exact match.

    If ``text`` contains ``####``, the answer is the first number after the last ``####`` (the
    GSM8K convention; ``None`` if none follows it). Otherwise it is the last number in the text.
    Numbers are normalised: ``$``, thousands commas and trailing zeros go, so ``"$1,000.00"`` ->
    ``"1000"``, ``"-3.50"`` -> ``"-3.5"``, ``"42."`` -> ``"42"``.

    Args:
        text: a model's answer or a dataset target.

    Returns:
        The normalised number as a string, or ``None`` if the text has no number.

    Example:
        >>> extract_final_answer("She pays 3 * 4 = $12.\\n#### 1,200")
        '1200'
    """
    if not isinstance(text, str):
        raise MetricError(f"text must be a str; got {type(text).__name__}")
    marker = text.rfind("####")
    if marker >= 0:
        match = _NUMBER.search(text, marker + 4)
        return _normalise_number(match) if match else None
    matches = list(_NUMBER.finditer(text))
    return _normalise_number(matches[-1]) if matches else None


def _validate_strings(name: str, values: Sequence[str]) -> list[str]:
    # A lone str is a Sequence[str] too; iterating it would compare single characters.
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise MetricError(
            f"{name} must be a list of strings; got {type(values).__name__}: wrap a single text in a list"
        )
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise MetricError(f"{name}[{i}] must be a str; got {type(value).__name__}")
    return list(values)


def exact_match_counts(preds: Sequence[str], targets: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Count predictions whose final answer equals the target's (see :func:`extract_final_answer`).

    Args:
        preds: ``N`` model outputs; one with no number is counted wrong.
        targets: ``N`` references: a raw GSM8K answer (ending in ``#### 42``) or just ``"42"``.

    Returns:
        ``(correct, total)``: 0-dim int64 tensors.
    """
    preds = _validate_strings("preds", preds)
    targets = _validate_strings("targets", targets)
    if len(preds) != len(targets):
        raise MetricError(f"preds and targets must have the same length; got {len(preds)} and {len(targets)}")
    correct = 0
    for i, (pred, target) in enumerate(zip(preds, targets)):
        expected = extract_final_answer(target)
        if expected is None:
            # A target without a number can never match; counting it wrong would hide a data bug.
            raise MetricError(f"targets[{i}] has no numeric answer ({target[-60:]!r}): pass GSM8K answers or numbers")
        correct += extract_final_answer(pred) == expected
    return torch.tensor(correct, dtype=torch.long), torch.tensor(len(preds), dtype=torch.long)


def accuracy_counts(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Count correct class predictions.

    Args:
        preds: ``[N]`` integer class indices, ``-1`` meaning "no valid prediction" (counted wrong),
            or ``[N, C]`` float scores / logits whose argmax is the prediction.
        target: ``[N]`` integer class indices ``>= 0`` (and ``< C`` for scores).

    Returns:
        ``(correct, total)``: 0-dim int64 tensors on ``target.device``.
    """
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise MetricError(f"preds and target must be tensors; got {type(preds).__name__} and {type(target).__name__}")
    if target.dim() != 1 or target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise MetricError(f"target must be a 1-D integer tensor [N]; got {target.dtype} {tuple(target.shape)}")
    if preds.shape[:1] != target.shape:
        raise MetricError(
            f"preds must have one row per target; got preds {tuple(preds.shape)} and target {tuple(target.shape)}"
        )
    if target.numel() and int(target.min()) < 0:
        raise MetricError(f"target must hold class indices >= 0; got {int(target.min())}")
    if preds.dim() == 2 and preds.is_floating_point():
        if preds.shape[1] == 0:
            raise MetricError("preds scores [N, C] need at least one class; got C = 0")
        if target.numel() and int(target.max()) >= preds.shape[1]:
            raise MetricError(f"target holds class {int(target.max())} but preds scores have only {preds.shape[1]}")
        if bool(torch.isnan(preds).any()):
            raise MetricError("preds scores contain NaN: check the model outputs (use -inf to mask a class)")
        predicted = preds.argmax(dim=1)
    elif preds.dim() == 1 and not preds.is_floating_point() and not preds.is_complex() and preds.dtype != torch.bool:
        if preds.numel() and int(preds.min()) < -1:
            raise MetricError(
                f"preds class indices must be >= 0, or -1 for no valid prediction; got {int(preds.min())}"
            )
        predicted = preds
    else:
        raise MetricError(
            f"preds must be integer class indices [N] or float scores [N, C]; got {preds.dtype} {tuple(preds.shape)}"
        )
    # -1 never equals a target (targets are >= 0), so invalid predictions count as wrong for free.
    correct = (predicted.to(target.device) == target).sum(dtype=torch.long)
    return correct, torch.tensor(target.numel(), dtype=torch.long, device=target.device)


def _validate_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise MetricError(f"bins must be an int >= 2; got {bins!r}")
    return bins


def risk_histograms(risk: Tensor, is_harmful: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Histograms of risk scores for harmful and benign examples on ``bins`` equal bins of [0, 1].

    The bin of a score ``r`` is ``min(floor(r * bins), bins - 1)``; the map is monotone, so binning
    can merge nearby scores into ties but never reorders them.

    Args:
        risk: ``[N]`` risk scores in [0, 1].
        is_harmful: ``[N]`` bool (or 0/1), True for harmful examples (the positive class).
        bins: number of bins ``K >= 2``.

    Returns:
        ``(positive, negative)``: ``[K]`` int64 counts of harmful and benign examples per bin.
    """
    bins = _validate_bins(bins)
    if not isinstance(risk, Tensor) or risk.dim() != 1 or risk.is_complex():
        shape = tuple(risk.shape) if isinstance(risk, Tensor) else type(risk).__name__
        raise MetricError(f"risk must be a 1-D real tensor [N] of scores in [0, 1]; got {shape}")
    harmful = _validate_flags("is_harmful", is_harmful)
    if harmful.shape != risk.shape:
        raise MetricError(f"is_harmful must match risk; got {tuple(harmful.shape)} and {tuple(risk.shape)}")
    # float64: a float32 score times K rounds less, and the cast from float32 is exact.
    scores = risk.to(torch.float64)
    bad = torch.isnan(scores) | (scores < 0) | (scores > 1)
    n_bad = int(bad.sum())
    if n_bad:
        example = scores[bad][0].item()
        raise MetricError(f"risk must be numbers in [0, 1]; got {n_bad} NaN or out-of-range values such as {example}")
    index = torch.clamp((scores * bins).floor().to(torch.long), max=bins - 1)
    harmful = harmful.to(index.device)
    positive = torch.bincount(index[harmful], minlength=bins)
    negative = torch.bincount(index[~harmful], minlength=bins)
    return positive, negative


def auroc_from_histograms(positive: Tensor, negative: Tensor) -> Tensor:
    """Mann-Whitney AUROC of two score histograms, counting scores in the same bin as ties (1/2).

    ``AUROC = P(score_pos > score_neg) + P(score_pos == score_neg) / 2`` over all (positive, negative)
    pairs, with bins ordered by increasing score.

    Args:
        positive: ``[K]`` counts of positive (harmful) examples per bin.
        negative: ``[K]`` counts of negative (benign) examples per bin.

    Returns:
        0-dim float tensor; NaN if either class has no examples.
    """
    if not isinstance(positive, Tensor) or not isinstance(negative, Tensor):
        raise MetricError("positive and negative must be tensors of per-bin counts")
    if positive.dim() != 1 or positive.shape != negative.shape:
        raise MetricError(
            f"positive and negative must be 1-D tensors of the same length; "
            f"got {tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    # float64 keeps integer counts exact up to 2**53 and the pair products accurate.
    pos = positive.to(torch.float64)
    neg = negative.to(torch.float64)
    if bool((torch.isnan(pos) | torch.isnan(neg) | (pos < 0) | (neg < 0)).any()):
        raise MetricError("positive and negative counts must be >= 0 and not NaN")
    pairs = pos.sum() * neg.sum()
    below = torch.cumsum(neg, dim=0) - neg  # negatives in strictly lower bins
    wins = (pos * (below + 0.5 * neg)).sum()
    auroc = torch.where(pairs > 0, wins / pairs.clamp(min=1), torch.full_like(pairs, math.nan))
    return auroc.to(torch.get_default_dtype())


def binned_auroc(risk: Tensor, is_harmful: Tensor, bins: int = 10000) -> Tensor:
    """AUROC of ``risk`` for separating harmful from benign examples, via :func:`risk_histograms`.

    Args:
        risk: ``[N]`` risk scores in [0, 1].
        is_harmful: ``[N]`` bool (or 0/1), True for harmful examples.
        bins: number of bins; scores that differ by more than ``1 / bins`` are never tied.

    Returns:
        0-dim float tensor; NaN if either class is absent.
    """
    return auroc_from_histograms(*risk_histograms(risk, is_harmful, bins))


# --------------------------------------------------------------------------------------------
# Metric classes
# --------------------------------------------------------------------------------------------


class _RateMetric(Metric):
    """A rate ``count / total`` kept as one fixed-shape ``"sum"`` state ``counts = [count, total]``.

    One state (not two) means one collective per sync and a ``report()`` that can never mix a
    synced count with a local total.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = None
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    counts: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # int64: counts stay exact, and dtype casts of the metric (.half(), .double()) leave them alone.
        self.add_state("counts", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, count: Tensor, total: Tensor) -> None:
        self.counts += torch.stack([count, total]).to(self.counts.device)

    def compute(self) -> Tensor:
        """The rate over all updates (and all ranks under DDP); NaN when nothing was counted."""
        return _rate(self.counts[0], self.counts[1])

    def report(self) -> RateReport:
        """The rate with its Wilson 95% interval and counts, over all ranks under DDP.

        Like ``compute()`` this is a collective under DDP: call it on every rank.
        """
        # compute() syncs and then restores the local state, so reading self.counts after it would
        # give this rank's counts only; sync explicitly instead (unless the caller already did).
        already_synced = self._is_synced
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not already_synced,
            should_unsync=self._should_unsync and not already_synced,
        ):
            count, total = (int(v) for v in self.counts.tolist())
        return RateReport.from_counts(count, total)


class AttackSuccessRate(_RateMetric):
    """Attack success rate (ASR): the fraction of harmful or jailbreak prompts answered harmfully.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> asr = AttackSuccessRate()
        >>> asr.update(torch.tensor([True, False, False, False]))
        >>> asr.compute()
        tensor(0.2500)
        >>> asr.report().total
        4
    """

    higher_is_better = False

    def update(self, attack_succeeded: Tensor) -> None:
        """Count attacks; ``attack_succeeded`` is ``[N]`` bool (or 0/1), True where the answer was harmful."""
        self._accumulate(*_flag_counts("attack_succeeded", attack_succeeded))


class RefusalRate(_RateMetric):
    """Refusal rate: the fraction of prompts the model refused.

    Meant for harmful prompts, where refusing is the safe outcome, hence ``higher_is_better = True``.
    For refusals of safe prompts use :class:`OverRefusalRate`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> refusals = RefusalRate()
        >>> refusals.update(torch.tensor([1, 1, 0, 1]))
        >>> refusals.compute()
        tensor(0.7500)
    """

    higher_is_better = True

    def update(self, refused: Tensor) -> None:
        """Count prompts; ``refused`` is ``[N]`` bool (or 0/1), True where the model refused."""
        self._accumulate(*_flag_counts("refused", refused))


class OverRefusalRate(RefusalRate):
    """Over-refusal rate: the fraction of safe prompts (e.g. the XSTest safe set) the model refused.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> over = OverRefusalRate()
        >>> over.update(torch.tensor([False, False, True, False]))
        >>> over.compute()
        tensor(0.2500)
    """

    higher_is_better = False


class UtilityAccuracy(_RateMetric):
    """Classification accuracy on a utility benchmark (e.g. multiple choice), see :func:`accuracy_counts`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> accuracy = UtilityAccuracy()
        >>> accuracy.update(torch.tensor([2, -1, 0]), torch.tensor([2, 1, 1]))  # -1: unparsable answer
        >>> accuracy.report().count
        1
    """

    higher_is_better = True

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count examples; ``preds`` is ``[N]`` class indices (-1: no valid answer) or ``[N, C]`` scores,
        ``target`` is ``[N]`` class indices."""
        self._accumulate(*accuracy_counts(preds, target))


class ExactMatch(_RateMetric):
    """Exact match of final numeric answers (GSM8K style), see :func:`exact_match_counts`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> em = ExactMatch()
        >>> em.update(["The total is $1,000.", "I cannot help."], ["... #### 1000", "#### 7"])
        >>> em.compute()
        tensor(0.5000)
    """

    higher_is_better = True

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        """Count examples; ``preds`` are ``N`` model outputs, ``targets`` the ``N`` reference answers."""
        self._accumulate(*exact_match_counts(preds, targets))


class RiskAUROC(Metric):
    """AUROC of a risk score for telling harmful (positive) from benign examples.

    Keeps two ``[bins]`` histograms instead of all scores, so the state has a fixed shape (safe
    under DDP with uneven updates) and memory does not grow with the data. The result equals the
    exact tie-aware AUROC whenever distinct scores fall in distinct bins (scores that differ by more
    than ``1 / bins`` always do); scores sharing a bin count as ties (1/2).

    Args:
        bins: number of equal-width bins on [0, 1], ``>= 2``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> auroc = RiskAUROC(bins=100)
        >>> auroc.update(torch.tensor([0.9, 0.2, 0.4, 0.1]), torch.tensor([True, True, False, False]))
        >>> auroc.compute()
        tensor(0.7500)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    positive: Tensor
    negative: Tensor

    def __init__(self, bins: int = 10000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bins = _validate_bins(bins)
        self.add_state("positive", default=torch.zeros(bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negative", default=torch.zeros(bins, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, risk: Tensor, is_harmful: Tensor) -> None:
        """Add examples; ``risk`` is ``[N]`` scores in [0, 1], ``is_harmful`` is ``[N]`` bool (or 0/1)."""
        positive, negative = risk_histograms(risk, is_harmful, self.bins)
        self.positive += positive.to(self.positive.device)
        self.negative += negative.to(self.negative.device)

    def compute(self) -> Tensor:
        """AUROC over all updates (and all ranks under DDP); NaN if a class has no examples."""
        return auroc_from_histograms(self.positive, self.negative)
