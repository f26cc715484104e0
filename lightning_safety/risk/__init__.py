"""Risk estimation: per-example risk scores in [0, 1] for training batches."""

from lightning_safety.risk.base import RISK_FIELD, ConstantRisk, FieldRisk, RiskEstimator, check_risk

__all__ = ["RISK_FIELD", "ConstantRisk", "FieldRisk", "RiskEstimator", "check_risk"]
