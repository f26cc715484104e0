"""lightning_safety: fine-tune instruction-tuned LLMs with Lightning without losing safety alignment.

The names a user needs are importable from the package root::

    from lightning_safety import SafeFineTuning, ChatSFTDataModule, LinearRiskSchedule, ActivationRiskCallback

They are imported on first use (PEP 562, :mod:`lightning_safety._lazy`): ``import lightning_safety``
stays instant, and Lightning, transformers or torchmetrics load only when a name that needs them
is used. ``__all__`` lists them; the README's "Python API" section says what each is.
"""

from lightning_safety._lazy import export_names, lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # the LightningModule, the loss and its risk -> beta schedules
    "lightning_safety.module": ("SafeFineTuning",),
    "lightning_safety.losses": ("adaptive_kl_loss",),
    "lightning_safety.schedules": ("ConstantBeta", "JudgeScoreSchedule", "LinearRiskSchedule", "ThresholdRiskSchedule"),
    # data
    "lightning_safety.data.datamodule": ("ChatSFTDataModule",),
    "lightning_safety.data.prompts": ("PromptSource",),
    "lightning_safety.anchors": ("refusal_anchors",),
    # callbacks for any LightningModule
    "lightning_safety.callbacks.risk": ("ActivationRiskCallback", "JudgeRiskCallback", "RiskCallback"),
    "lightning_safety.callbacks.evaluation": ("SafetyEvaluationCallback",),
    "lightning_safety.callbacks.gate": ("SafetyGate",),
    "lightning_safety.callbacks.drift": ("SafetyDriftController",),
    "lightning_safety.callbacks.audit": ("RiskAuditLog", "read_audit_log"),
    "lightning_safety.checkpointing": ("AtomicCheckpoints",),
    # risk estimators and scoring
    "lightning_safety.risk.probe": ("ActivationProbe", "fit_probe"),
    "lightning_safety.risk.estimators": ("JudgeRisk", "ProbeRisk"),
    "lightning_safety.risk.refusal": ("RefusalRisk",),
    "lightning_safety.risk.compose": ("MaxRisk", "MeanRisk"),
    "lightning_safety.risk.judges.embedding": ("EmbeddingJudge",),
    "lightning_safety.risk.judges.remote": ("HTTPJudge",),
    "lightning_safety.risk.judges.causal": ("RubricJudge",),
    "lightning_safety.risk.scoring": ("score_prompts",),
    # evaluation metrics (torchmetrics)
    "lightning_safety.metrics": (
        "AttackSuccessRate", "ExactMatch", "OverRefusalRate", "RefusalRate", "RiskAUROC", "UtilityAccuracy",
    ),
    # errors
    "lightning_safety.errors": ("LightningSafetyError",),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = export_names(_EXPORTS)
