"""Callbacks that drop into any Lightning project whose batches are dicts."""

from lightning_safety.callbacks.audit import RiskAuditLog
from lightning_safety.callbacks.drift import SafetyDriftController
from lightning_safety.callbacks.evaluation import SafetyEvaluationCallback
from lightning_safety.callbacks.gate import SafetyGate
from lightning_safety.callbacks.risk import ActivationRiskCallback, JudgeRiskCallback, RiskCallback

__all__ = [
    "ActivationRiskCallback",
    "JudgeRiskCallback",
    "RiskAuditLog",
    "RiskCallback",
    "SafetyDriftController",
    "SafetyEvaluationCallback",
    "SafetyGate",
]
