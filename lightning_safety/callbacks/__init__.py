"""Callbacks that drop into any Lightning project whose batches are dicts."""

from lightning_safety.callbacks.risk import RiskCallback

__all__ = ["RiskCallback"]
