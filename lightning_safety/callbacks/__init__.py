"""Callbacks that drop into any Lightning project whose batches are dicts."""

from lightning_safety.callbacks.risk import ActivationRiskCallback, JudgeRiskCallback, RiskCallback

__all__ = ["ActivationRiskCallback", "JudgeRiskCallback", "RiskCallback"]
