"""A throw-away activation probe on the tiny model: tests that need a probe, not a good one."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_safety.risk.probe import ActivationProbe, fit_probe


def tiny_probe(model: nn.Module, tokenizer: Any) -> ActivationProbe:
    """A probe on layer 0, fitted in a blink on four made-up prompts per side (no validation, no calibration)."""
    return fit_probe(model, tokenizer, ["bad a", "bad b", "bad c", "bad d"], ["good a", "good b", "good c", "good d"],
                     layers=[0], calibration_fraction=0.0, val_fraction=0.0, epochs=2)
