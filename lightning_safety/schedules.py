"""Risk schedules: per-example risk ``s`` in [0, 1] -> the KL weight ``beta`` in [0, 1].

A :class:`RiskSchedule` is the step between the risk estimators (:mod:`lightning_safety.risk`)
and the loss (:func:`lightning_safety.losses.adaptive_kl_loss`): data -> risk -> **beta** -> loss.
Risk is validated here, once per step (:func:`validate_risk`); the loss checks only beta.

The classes are also importable from :mod:`lightning_safety.losses`, where earlier configs and
checkpoints name them.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import math
from typing import Any, Mapping

import torch
from torch import Tensor

from lightning_safety.errors import RiskError

__all__ = [
    "validate_risk",
    "RiskSchedule",
    "LinearRiskSchedule",
    "JudgeScoreSchedule",
    "ThresholdRiskSchedule",
    "ConstantBeta",
    "schedule_from_config",
]




def validate_risk(risk: Tensor) -> Tensor:
    """Check that ``risk`` is a non-empty 1-D float tensor of finite values in [0, 1].

    Args:
        risk: ``[B]`` per-example risk scores.

    Returns:
        ``risk`` as float32 ``[B]`` on its device.

    Raises:
        RiskError: wrong type, shape or dtype, or NaN / infinite / out-of-range values.
    """
    if not isinstance(risk, Tensor):
        raise RiskError(f"risk must be a 1-D float tensor; got {type(risk).__name__}")
    if risk.dim() != 1 or risk.shape[0] == 0 or not risk.is_floating_point():
        raise RiskError(
            f"risk must be a non-empty 1-D float tensor [B]; got {risk.dtype} "
            f"{tuple(risk.shape)}: pass one risk score in [0, 1] per example"
        )
    nan = torch.isnan(risk)
    outside = ~nan & ((risk < 0) | (risk > 1))  # infinities count as out of range
    n_nan, n_out = (int(c) for c in torch.stack([nan.sum(), outside.sum()]).tolist())
    if n_nan or n_out:
        raise RiskError(
            f"risk must be finite numbers in [0, 1]; got {n_nan} NaN and {n_out} out-of-range "
            "values: check the estimator or the dataset's risk field"
        )
    return risk.to(torch.float32)


def _check_unit(name: str, value: float) -> float:
    """Return ``value`` as a float after checking that it is a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RiskError(f"{name} must be a number in [0, 1]; got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RiskError(f"{name} must be a number in [0, 1]; got {value!r}")
    return float(value)


def _check_order(low_name: str, low: float, high_name: str, high: float) -> None:
    """Require ``low <= high``."""
    if low > high:
        raise RiskError(
            f"{low_name} ({low}) must not exceed {high_name} ({high}): swap them or fix the config"
        )


class RiskSchedule(abc.ABC):
    """Maps per-example risk ``s [B]`` in [0, 1] to the KL weight ``beta [B]`` in [0, 1].

    Calling a schedule validates the risk (:func:`validate_risk`) and returns float32 ``beta``
    on the risk's device. Stateful schedules (EMA) update their state only when called with
    ``update=True``; pass ``update=False`` from validation so it does not disturb training.
    """

    uses_risk: bool = True
    """False for schedules whose beta ignores risk (a batch then needs no risk score)."""

    def __call__(self, risk: Tensor, *, update: bool = True, validated: bool = False) -> Tensor:
        """Return ``beta [B]`` (float32) for ``risk [B]``.

        ``validated=True`` skips :func:`validate_risk` for a risk the caller has just validated
        (the module checks each step's risk once, where it is produced).
        """
        return self._beta(risk if validated else validate_risk(risk), update=update).to(torch.float32)

    @abc.abstractmethod
    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        """Compute ``beta [B]`` from validated float32 ``risk [B]``."""

    @property
    @abc.abstractmethod
    def min_beta(self) -> float:
        """The smallest beta this schedule can output (0 means the reference can be skipped)."""

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: primitives only, rebuilt by :func:`schedule_from_config`.

        Init arguments are stored as same-named attributes by every schedule.
        """
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(self, n) for n in names}}

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint resume (empty for stateless schedules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; unknown keys raise :class:`RiskError`."""
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise RiskError(
                f"{type(self).__name__} state has unknown keys {unknown}: "
                "the checkpoint was saved with a different risk schedule"
            )


class LinearRiskSchedule(RiskSchedule):
    """``beta = beta_min + (beta_max - beta_min) * s``, optionally on an EMA-smoothed risk.

    With ``ema = lam`` the risk is smoothed with the paper's recurrence
    ``s~_t = lam * s~_{t-1} + (1 - lam) * s_t`` (first step ``s~_0 = s_0``), extended to a batch
    of ``B`` examples so that rows keep their own risk:

    * ``prev`` = the stored state, or ``mean(s)`` on the first call;
    * ``s~_i = lam * prev + (1 - lam) * s_i`` for every row ``i``;
    * if ``update``: state <- ``lam * prev + (1 - lam) * mean(s)`` (= ``mean(s~)``).

    At batch size 1 this is exactly the paper's recurrence. The state is a Python float per
    process (data-parallel ranks smooth their own batches).

    Example:
        >>> LinearRiskSchedule(0.1, 0.9)(torch.tensor([0.0, 0.5, 1.0]))
        tensor([0.1000, 0.5000, 0.9000])
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 0.9, ema: float | None = None):
        self.beta_min = _check_unit("beta_min", beta_min)
        self.beta_max = _check_unit("beta_max", beta_max)
        _check_order("beta_min", self.beta_min, "beta_max", self.beta_max)
        if ema is not None:
            ema = _check_unit("ema", ema)
            if ema >= 1.0:
                raise RiskError(f"ema must be in [0, 1); got {ema}: 1 would never update the risk")
        self.ema = ema
        self._state: float | None = None

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        smoothed = self._smooth(risk, update=update) if self.ema is not None else risk
        return self.beta_min + (self.beta_max - self.beta_min) * smoothed

    def _smooth(self, risk: Tensor, *, update: bool) -> Tensor:
        """Apply the batched EMA described in the class docstring to ``risk [B]``."""
        lam = float(self.ema)  # type: ignore[arg-type]
        batch_mean = float(risk.mean())
        prev = batch_mean if self._state is None else self._state
        if update:
            self._state = lam * prev + (1.0 - lam) * batch_mean
        # Clamp guards float rounding; convex combinations of values in [0, 1] stay there.
        return (lam * prev + (1.0 - lam) * risk).clamp(0.0, 1.0)

    @property
    def min_beta(self) -> float:
        return self.beta_min

    def state_dict(self) -> dict[str, Any]:
        return {"ema_state": self._state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        value = state.get("ema_state")
        self._state = None if value is None else _check_unit("ema_state", value)

    def __repr__(self) -> str:
        return (
            f"LinearRiskSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, "
            f"ema={self.ema})"
        )


class JudgeScoreSchedule(RiskSchedule):
    """The authors' mapping of an LLM-judge harm score ``r`` in {1, ..., 5} to beta.

    ``beta = clamp((r - 2) / 3, low, high)`` where the risk is the judge score normalised as
    ``s = (r - 1) / 4``, i.e. ``r = 1 + 4 s``. Scores 1 and 2 give ``low``, 5 gives ``high``.

    Example:
        >>> JudgeScoreSchedule()(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
        tensor([0.1000, 0.1000, 0.3333, 0.6667, 0.9000])
    """

    def __init__(self, low: float = 0.1, high: float = 0.9):
        self.low = _check_unit("low", low)
        self.high = _check_unit("high", high)
        _check_order("low", self.low, "high", self.high)

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        score = 1.0 + 4.0 * risk
        return ((score - 2.0) / 3.0).clamp(self.low, self.high)

    @property
    def min_beta(self) -> float:
        return self.low

    def __repr__(self) -> str:
        return f"JudgeScoreSchedule(low={self.low}, high={self.high})"


class ThresholdRiskSchedule(RiskSchedule):
    """``beta = beta_high if s >= threshold else beta_low``: a hard risky / benign split.

    Example:
        >>> ThresholdRiskSchedule(0.5, 0.1, 0.9)(torch.tensor([0.2, 0.5]))
        tensor([0.1000, 0.9000])
    """

    def __init__(self, threshold: float = 0.5, beta_low: float = 0.1, beta_high: float = 0.9):
        self.threshold = _check_unit("threshold", threshold)
        self.beta_low = _check_unit("beta_low", beta_low)
        self.beta_high = _check_unit("beta_high", beta_high)
        _check_order("beta_low", self.beta_low, "beta_high", self.beta_high)

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        high = torch.full_like(risk, self.beta_high)
        return torch.where(risk >= self.threshold, high, torch.full_like(risk, self.beta_low))

    @property
    def min_beta(self) -> float:
        return self.beta_low

    def __repr__(self) -> str:
        return (
            f"ThresholdRiskSchedule(threshold={self.threshold}, beta_low={self.beta_low}, "
            f"beta_high={self.beta_high})"
        )


class ConstantBeta(RiskSchedule):
    """``beta = c`` for every example, whatever its risk.

    The paper's constant-KL baseline ("C-SFT"); ``beta = 0`` is plain SFT and never needs the
    reference model.

    Example:
        >>> ConstantBeta(0.5)(torch.tensor([0.0, 1.0]))
        tensor([0.5000, 0.5000])
    """

    uses_risk = False

    def __init__(self, beta: float = 0.5):
        self.beta = _check_unit("beta", beta)

    def _beta(self, risk: Tensor, *, update: bool) -> Tensor:
        return torch.full_like(risk, self.beta)

    @property
    def min_beta(self) -> float:
        return self.beta

    def __repr__(self) -> str:
        return f"ConstantBeta(beta={self.beta})"


def schedule_from_config(config: Mapping[str, Any]) -> RiskSchedule:
    """Rebuild a schedule from :meth:`RiskSchedule.config` (as stored in checkpoint hparams)."""
    module_name, _, class_name = str(config.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, RiskSchedule)):
        raise RiskError(f"unknown risk schedule {config.get('class_path')!r}: use a RiskSchedule subclass")
    return cls(**config.get("init_args", {}))
