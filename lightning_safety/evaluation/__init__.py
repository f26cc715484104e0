"""Safety evaluation: batched generation, refusal and harm verdicts, utility tasks, reports.

Names are imported on first use (:mod:`lightning_safety._lazy`): a utility task's definition does
not import the metrics (torchmetrics) through the evaluator.
"""

from lightning_safety._lazy import export_names, lazy_exports

_EXPORTS = {
    "lightning_safety.evaluation.generation": ("GenerationSettings", "generate_responses"),
    "lightning_safety.evaluation.refusal": (
        "GCG_REFUSAL_STRINGS", "MODERN_REFUSAL_STRINGS", "JudgeHarm", "KeywordASR", "KeywordRefusal",
    ),
    "lightning_safety.evaluation.runner": ("EvaluationResult", "PromptSet", "SafetyEvaluator", "format_rate"),
    "lightning_safety.evaluation.utility": ("UtilityTask", "label_log_likelihoods", "parse_label"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = export_names(_EXPORTS)
