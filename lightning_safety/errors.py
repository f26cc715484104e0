"""Errors raised for bad input.

Every error a user can cause by configuration or data derives from :class:`LightningSafetyError`
and carries a one-line message that says what is wrong and how to fix it. The CLI prints such
errors as a single line (no traceback) and exits with status 2.
"""

from __future__ import annotations


class LightningSafetyError(ValueError):
    """Base class for user-facing configuration and data errors (one-line messages)."""

    def __init__(self, message: str) -> None:
        # Keep the promise of one line even when a wrapped library message spans several.
        message = " ".join(str(message).split())
        super().__init__(message)


class ModelLoadError(LightningSafetyError):
    """A model or tokenizer could not be resolved or loaded."""


class IncompatibleReferenceError(LightningSafetyError):
    """Policy and reference cannot be compared token by token (vocabulary or tokenizer differ)."""


class DataError(LightningSafetyError):
    """A data record or source is unusable (missing response, truncated away, bad field)."""


class RiskError(LightningSafetyError):
    """A risk score is not a finite number in [0, 1], or a schedule is misconfigured."""


class ProbeError(LightningSafetyError):
    """An activation probe is misconfigured (layers, pooling, data) or its artifact is unusable."""


class ProbeMismatchError(ProbeError):
    """A saved activation probe was trained on a different model than the one it is used with."""


class CalibrationError(LightningSafetyError):
    """A calibrated decision threshold cannot be computed (too few samples, bad alpha or delta)."""


class JudgeError(LightningSafetyError):
    """A risk judge is misconfigured (model, tokenizer, labels, endpoint) or used before it is ready."""


class ShardingError(LightningSafetyError):
    """Sharded training cannot be set up as asked (no decoder-layer class, unsupported mesh or option)."""
