"""Risk estimation: per-example risk scores in [0, 1] for training batches.

* :mod:`~lightning_safety.risk.probe`: activation probes on pre-generation activations.
* :mod:`~lightning_safety.risk.judges`: Safety Critic judges (rubric LLM, guard model,
  classifier, sentence-embedding, HTTP endpoint), failing closed.
* :mod:`~lightning_safety.risk.refusal`: the frozen reference's own probability of refusing.
* :mod:`~lightning_safety.risk.calibration`: thresholds with a stated recall guarantee.
* :mod:`~lightning_safety.risk.cache`: each example scored once per run.
* :mod:`~lightning_safety.risk.scoring`: :func:`score_prompts`, any estimator on a list of prompts.
"""

from lightning_safety.risk.base import RISK_FIELD, ConstantRisk, FieldRisk, RiskEstimator, check_risk
from lightning_safety.risk.cache import RiskCache
from lightning_safety.risk.calibration import CalibratedThreshold, calibrate_threshold
from lightning_safety.risk.compose import MaxRisk, MeanRisk
from lightning_safety.risk.estimators import JudgeRisk, ProbeRisk, find_causal_lm, split_conversation
from lightning_safety.risk.judges import (
    ClassifierJudge,
    EmbeddingJudge,
    GuardModelJudge,
    HTTPJudge,
    Judge,
    JudgeResult,
    RubricJudge,
)
from lightning_safety.risk.probe import ActivationProbe, fit_probe, sweep
from lightning_safety.risk.refusal import DEFAULT_REFUSAL_OPENERS, RefusalRisk
from lightning_safety.risk.scoring import score_prompts

__all__ = [
    "DEFAULT_REFUSAL_OPENERS",
    "RISK_FIELD",
    "ActivationProbe",
    "CalibratedThreshold",
    "ClassifierJudge",
    "ConstantRisk",
    "EmbeddingJudge",
    "FieldRisk",
    "GuardModelJudge",
    "HTTPJudge",
    "Judge",
    "JudgeResult",
    "JudgeRisk",
    "MaxRisk",
    "MeanRisk",
    "ProbeRisk",
    "RefusalRisk",
    "RiskCache",
    "RiskEstimator",
    "RubricJudge",
    "calibrate_threshold",
    "check_risk",
    "find_causal_lm",
    "fit_probe",
    "score_prompts",
    "split_conversation",
    "sweep",
]
