"""Safety and utility metrics: functional core, Metric classes, reports and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from lightning_safety.errors import LightningSafetyError
from lightning_safety.metrics import (
    AttackSuccessRate,
    ExactMatch,
    MetricError,
    OverRefusalRate,
    RateReport,
    RefusalRate,
    RiskAUROC,
    UtilityAccuracy,
    accuracy_counts,
    attack_success_rate,
    auroc_from_histograms,
    binary_rate_counts,
    binned_auroc,
    exact_match_counts,
    extract_final_answer,
    refusal_rate,
    risk_histograms,
    wilson_interval,
)


def pairwise_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Brute-force tie-aware AUROC: mean over (positive, negative) pairs of 1 / 0.5 / 0."""
    pos, neg = scores[positive].tolist(), scores[~positive].tolist()
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------------------------
# Wilson interval and reports
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    [
        (5, 10, 0.236593, 0.763407),
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (1, 20, 0.008881, 0.236131),
    ],
)
def test_wilson_interval_known_values(successes, total, low, high):
    got_low, got_high = wilson_interval(successes, total)
    assert got_low == pytest.approx(low, abs=1e-5)
    assert got_high == pytest.approx(high, abs=1e-5)


def test_wilson_interval_matches_closed_form_and_edge_cases():
    # Closed form, written out independently of the implementation.
    k, n, z = 81, 263, 1.959963984540054
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((center - half, center + half), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(torch.tensor(5), torch.tensor(10.0)) == pytest.approx(wilson_interval(5, 10))
    # A larger z gives a wider interval; more data a narrower one.
    low95, high95 = wilson_interval(5, 10)
    low99, high99 = wilson_interval(5, 10, z=2.576)
    assert low99 < low95 and high99 > high95
    low, high = wilson_interval(50, 100)
    assert high - low < high95 - low95


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((11, 10), "must not exceed total"),
        ((-1, 10), "successes must be a finite number >= 0"),
        ((1, float("nan")), "total must be a finite number >= 0"),
        ((torch.tensor([1, 2]), 10), "single number"),
        (("3", 10), "successes must be a number"),
    ],
)
def test_wilson_interval_rejects_bad_input(args, message):
    with pytest.raises(MetricError, match=message):
        wilson_interval(*args)
    with pytest.raises(MetricError, match="z must be"):
        wilson_interval(1, 2, z=0.0)


def test_rate_report_from_counts():
    report = RateReport.from_counts(5, 10)
    assert report.rate == 0.5 and report.count == 5 and report.total == 10
    assert (report.low, report.high) == pytest.approx((0.236593, 0.763407), abs=1e-5)
    assert report.as_dict() == {"rate": 0.5, "low": report.low, "high": report.high, "count": 5, "total": 10}
    empty = RateReport.from_counts(0, 0)
    assert math.isnan(empty.rate) and (empty.low, empty.high) == (0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Binary rates
# --------------------------------------------------------------------------------------------


def test_binary_rate_counts_and_rates():
    count, total = binary_rate_counts(torch.tensor([True, False, True, True]))
    assert (int(count), int(total)) == (3, 4) and count.dtype == torch.long
    assert binary_rate_counts(torch.tensor([1.0, 0.0, 0.0]))[0].item() == 1
    assert attack_success_rate(torch.tensor([1, 0, 0, 0])).item() == pytest.approx(0.25)
    assert refusal_rate(torch.tensor([True, True, False])).item() == pytest.approx(2 / 3)
    # Empty input: the rate of nothing is NaN (not 0, which would read as "perfectly safe").
    assert math.isnan(attack_success_rate(torch.zeros(0, dtype=torch.bool)).item())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (torch.tensor([[True, False]]), r"must be a 1-D bool tensor \[N\]; got shape \(1, 2\)"),
        (torch.tensor([0.0, 0.5, 1.0]), "only 0/1 .* 1 other values such as 0.5"),
        (torch.tensor([0.0, float("nan")]), "only 0/1 .* 1 other values such as nan"),
        (torch.tensor([0, 2, 3]), "2 other values"),
        ([True, False], "got list"),
    ],
)
def test_binary_flags_reject_bad_input(flags, message):
    with pytest.raises(MetricError, match=message):
        binary_rate_counts(flags)


def test_rate_metrics_accumulate_report_and_reset():
    chunks = [torch.tensor([True, False, False]), torch.tensor([1, 1]), torch.tensor([False])]
    metric = AttackSuccessRate()
    for chunk in chunks:
        metric.update(chunk)
    whole = AttackSuccessRate()
    whole.update(torch.cat([c.bool() for c in chunks]))
    assert metric.compute().item() == pytest.approx(0.5) == whole.compute().item()
    report = metric.report()
    assert (report.count, report.total) == (3, 6)
    assert report == whole.report() == RateReport.from_counts(3, 6)
    # compute() twice and report() leave the state intact ...
    assert metric.compute().item() == pytest.approx(0.5) and metric.report().total == 6
    # ... and reset() clears it.
    metric.reset()
    assert metric.counts.tolist() == [0, 0]
    metric.update(torch.tensor([True]))
    assert metric.compute().item() == 1.0 and metric.report().total == 1


def test_rate_metric_empty_is_nan_and_flags():
    metric = RefusalRate()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    report = metric.report()
    assert (report.count, report.total, report.low, report.high) == (0, 0, 0.0, 1.0)
    assert AttackSuccessRate.higher_is_better is False
    assert RefusalRate.higher_is_better is True
    assert OverRefusalRate.higher_is_better is False
    assert UtilityAccuracy.higher_is_better is True and ExactMatch.higher_is_better is True
    assert RiskAUROC.higher_is_better is True
    for cls in (AttackSuccessRate, RefusalRate, OverRefusalRate, UtilityAccuracy, ExactMatch, RiskAUROC):
        assert cls.full_state_update is False and cls.is_differentiable is False


def test_over_refusal_rate_and_forward_batch_value():
    metric = OverRefusalRate()
    batch_value = metric(torch.tensor([True, False, False, False]))  # forward: this batch only
    assert batch_value.item() == pytest.approx(0.25)
    metric(torch.tensor([True, True, False, False]))
    assert metric.compute().item() == pytest.approx(3 / 8)
    assert metric.report().total == 8


def test_rate_metric_survives_dtype_cast():
    metric = AttackSuccessRate().double()
    metric.update(torch.tensor([True, False, True]))
    assert metric.counts.dtype == torch.long and metric.report().count == 2


# --------------------------------------------------------------------------------------------
# Exact match (GSM8K style)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,000.00", "1000"),
        ("So the loss is -3.50 dollars.", "-3.5"),
        ("The total is $1,234.", "1234"),
        ("She has 5 apples, then 7. The answer is 12.", "12"),
        ("It costs -$5 now", "-5"),
        ("10 - 3 leaves 7 marbles, i.e. 10 - 3", "3"),  # a spaced minus is subtraction, not a sign
        ("Values 3,4,5", "5"),  # not thousands separators
        ("0.00", "0"),
        ("It is 2.0", "2"),
        ("#### The answer is 18 dollars", "18"),
        ("I cannot help with that.", None),
        ("The steps: 3 + 4.\n####", None),  # a #### with nothing after it is no answer
        ("", None),
    ],
)
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


def test_exact_match_counts_gsm8k_strings():
    targets = [
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18",
        "#### 1,000",
        "42",
        "#### -3.5",
        "#### 7",
    ]
    preds = [
        "She makes 9 * 2 = $18 every day.",  # last number, dollar sign
        "The answer is $1,000.00.",  # commas, decimals, trailing period
        "#### 42",
        "The loss is -3.50",
        "I'm sorry, I can't help with that.",  # no number: wrong
    ]
    correct, total = exact_match_counts(preds, targets)
    assert (int(correct), int(total)) == (4, 5)
    metric = ExactMatch()
    metric.update(preds[:2], targets[:2])
    metric.update(preds[2:], targets[2:])
    assert metric.compute().item() == pytest.approx(0.8)
    assert (metric.report().count, metric.report().total) == (4, 5)


@pytest.mark.parametrize(
    ("preds", "targets", "message"),
    [
        (["1", "2"], ["1"], "same length; got 2 and 1"),
        ("42", ["42"], "preds must be a list of strings; got str"),
        (["42"], [42], r"targets\[0\] must be a str; got int"),
        (["1"], ["no answer here"], r"targets\[0\] has no numeric answer"),
    ],
)
def test_exact_match_rejects_bad_input(preds, targets, message):
    with pytest.raises(MetricError, match=message):
        exact_match_counts(preds, targets)


# --------------------------------------------------------------------------------------------
# Utility accuracy
# --------------------------------------------------------------------------------------------


def test_accuracy_counts_indices_and_logits():
    target = torch.tensor([0, 1, 2, 1])
    correct, total = accuracy_counts(torch.tensor([0, -1, 2, 0]), target)  # -1: no valid prediction
    assert (int(correct), int(total)) == (2, 4)
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, -1.0], [0.0, 5.0, 4.0], [-float("inf"), 1.0, 0.0]])
    assert int(accuracy_counts(logits, target)[0]) == 3
    metric = UtilityAccuracy()
    metric.update(logits[:1], target[:1])
    metric.update(torch.tensor([-1, 2, 1]), target[1:])
    assert metric.compute().item() == pytest.approx(0.75)
    assert (metric.report().count, metric.report().total) == (3, 4)


@pytest.mark.parametrize(
    ("preds", "target", "message"),
    [
        (torch.tensor([0, 1]), torch.tensor([0]), "one row per target"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer class indices"),
        (torch.tensor([0, -2]), torch.tensor([0, 1]), "or -1 for no valid prediction; got -2"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), "target holds class 3 but preds scores have only 3"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([1]), "NaN"),
        (torch.tensor([0]), torch.tensor([0.0]), "target must be a 1-D integer tensor"),
        (torch.tensor([0]), torch.tensor([-1]), "target must hold class indices >= 0"),
    ],
)
def test_accuracy_rejects_bad_input(preds, target, message):
    with pytest.raises(MetricError, match=message):
        accuracy_counts(preds, target)


# --------------------------------------------------------------------------------------------
# Risk AUROC
# --------------------------------------------------------------------------------------------


def test_risk_histograms_bins():
    positive, negative = risk_histograms(
        torch.tensor([0.0, 0.25, 0.26, 0.999, 1.0, 0.5]), torch.tensor([1, 0, 1, 1, 0, 0]), bins=4
    )
    assert positive.tolist() == [1, 1, 0, 1]  # 1.0 goes to the last bin, not past it
    assert negative.tolist() == [0, 1, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_risk_auroc_equals_brute_force_and_torchmetrics(seed):
    generator = torch.Generator().manual_seed(seed)
    harmful = torch.rand(300, generator=generator) < 0.4
    # Informative but overlapping scores; float64 values are distinct with probability one.
    scores = (torch.rand(300, generator=generator, dtype=torch.float64) * 0.7 + 0.3 * harmful).clamp(0, 1)
    exact = pairwise_auroc(scores, harmful)
    assert 0.6 < exact < 0.99  # the test is meaningful: neither chance nor perfect
    # Distinct scores in distinct bins (checked), so the binned value is exact.
    bins = 1_000_000
    assert torch.unique((scores * bins).floor()).numel() == scores.numel()
    assert binned_auroc(scores, harmful, bins=bins).item() == pytest.approx(exact, abs=1e-6)
    assert binned_auroc(scores, harmful, bins=bins).item() == pytest.approx(
        binary_auroc(scores, harmful.long(), thresholds=None).item(), abs=1e-6
    )
    # The default 10000 bins may merge a few close scores into ties: the value moves only slightly.
    assert binned_auroc(scores, harmful).item() == pytest.approx(exact, abs=1e-3)


def test_risk_auroc_with_ties_matches_tie_aware_brute_force():
    generator = torch.Generator().manual_seed(3)
    harmful = torch.rand(200, generator=generator) < 0.5
    # Scores on a grid of 11 values (bin edges of bins=10), shifted a little for the harmful ones.
    grid = torch.randint(0, 11, (200,), generator=generator) + 2 * harmful
    scores = (grid.clamp(max=10) / 10).to(torch.float32)
    exact = pairwise_auroc(scores, harmful)
    # Bins of width 1/20 put each grid value in its own bin: ties stay ties, nothing else merges.
    assert binned_auroc(scores, harmful, bins=20).item() == pytest.approx(exact, abs=1e-6)
    metric = RiskAUROC(bins=20)
    for start in range(0, 200, 64):  # several updates equal one update on the concatenation
        metric.update(scores[start : start + 64], harmful[start : start + 64])
    assert metric.compute().item() == pytest.approx(exact, abs=1e-6)
    assert int(metric.positive.sum()) == int(harmful.sum()) and int(metric.negative.sum()) == 200 - int(harmful.sum())
    # torchmetrics agrees too: its exact mode also counts ties as 1/2.
    assert metric.compute().item() == pytest.approx(binary_auroc(scores, harmful.long()).item(), abs=1e-6)


def test_auroc_from_histograms_by_hand_and_single_class():
    # Positives in bins 1 and 2, negatives in bins 0 and 1: 3 wins + 1 tie of 4 pairs -> 3.5 / 4.
    value = auroc_from_histograms(torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0]))
    assert value.item() == pytest.approx(0.875)
    assert auroc_from_histograms(torch.tensor([0, 0, 2]), torch.tensor([3, 0, 0])).item() == 1.0
    assert auroc_from_histograms(torch.tensor([2, 0, 0]), torch.tensor([0, 0, 3])).item() == 0.0
    assert math.isnan(auroc_from_histograms(torch.tensor([0, 2]), torch.tensor([0, 0])).item())
    metric = RiskAUROC(bins=10)
    metric.update(torch.tensor([0.1, 0.9]), torch.tensor([False, False]))
    assert math.isnan(metric.compute().item())
    metric.reset()
    assert int(metric.positive.sum() + metric.negative.sum()) == 0
    metric.update(torch.tensor([0.9, 0.1]), torch.tensor([True, False]))
    assert metric.compute().item() == 1.0


@pytest.mark.parametrize(
    ("risk", "harmful", "message"),
    [
        (torch.tensor([0.5, 1.5]), torch.tensor([1, 0]), "1 NaN or out-of-range values such as 1.5"),
        (torch.tensor([float("nan"), 0.5]), torch.tensor([1, 0]), "in \\[0, 1\\]; got 1 NaN"),
        (torch.tensor([-0.1]), torch.tensor([1]), "out-of-range"),
        (torch.tensor([[0.5]]), torch.tensor([1]), "risk must be a 1-D real tensor"),
        (torch.tensor([0.5, 0.5]), torch.tensor([1]), "is_harmful must match risk"),
        (torch.tensor([0.5]), torch.tensor([0.3]), "is_harmful must hold only 0/1"),
    ],
)
def test_risk_auroc_rejects_bad_input(risk, harmful, message):
    with pytest.raises(MetricError, match=message):
        RiskAUROC(bins=10).update(risk, harmful)


@pytest.mark.parametrize("bins", [1, 0, 2.5, True, "10"])
def test_risk_auroc_rejects_bad_bins(bins):
    with pytest.raises(MetricError, match="bins must be an int >= 2"):
        RiskAUROC(bins=bins)


def test_histogram_validation():
    with pytest.raises(MetricError, match="same length"):
        auroc_from_histograms(torch.zeros(3), torch.zeros(4))
    with pytest.raises(MetricError, match=">= 0"):
        auroc_from_histograms(torch.tensor([1, -1]), torch.tensor([1, 1]))


def test_errors_are_one_line_library_errors():
    with pytest.raises(LightningSafetyError) as info:
        accuracy_counts(torch.zeros(2, 3), torch.tensor([0, 5]))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
