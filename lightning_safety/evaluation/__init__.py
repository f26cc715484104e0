"""Safety evaluation: batched generation, refusal and harm verdicts, utility tasks, reports."""

from lightning_safety.evaluation.generation import GenerationSettings, generate_responses
from lightning_safety.evaluation.refusal import (
    GCG_REFUSAL_STRINGS,
    MODERN_REFUSAL_STRINGS,
    JudgeHarm,
    KeywordASR,
    KeywordRefusal,
)
from lightning_safety.evaluation.runner import EvaluationResult, PromptSet, SafetyEvaluator, format_rate
from lightning_safety.evaluation.utility import UtilityTask, label_log_likelihoods, parse_label

__all__ = [
    "GCG_REFUSAL_STRINGS",
    "MODERN_REFUSAL_STRINGS",
    "EvaluationResult",
    "GenerationSettings",
    "JudgeHarm",
    "KeywordASR",
    "KeywordRefusal",
    "PromptSet",
    "SafetyEvaluator",
    "UtilityTask",
    "format_rate",
    "generate_responses",
    "label_log_likelihoods",
    "parse_label",
]
