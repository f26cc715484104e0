"""Combining risk estimators: the maximum (defence in depth) and the mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.errors import RiskError
from lightning_safety.risk.base import RiskEstimator, check_risk


class _Combined(RiskEstimator):
    reduce_name = ""

    def __init__(self, *estimators: RiskEstimator) -> None:
        if not estimators:
            raise RiskError(f"{type(self).__name__} needs at least one estimator")
        self.estimators = list(estimators)
        self.cacheable = all(e.cacheable for e in self.estimators)

    @property
    def namespace(self) -> str:
        return f"{self.reduce_name}(" + ",".join(e.namespace for e in self.estimators) + ")"

    @property
    def checkpoint_namespace(self) -> str:
        return f"{self.reduce_name}(" + ",".join(e.checkpoint_namespace for e in self.estimators) + ")"

    @property
    def failures(self) -> int:  # type: ignore[override]
        return sum(e.failures for e in self.estimators)

    @property
    def collective(self) -> bool:  # type: ignore[override]
        return any(e.collective for e in self.estimators)

    def setup(self, pl_module: nn.Module) -> None:
        for estimator in self.estimators:
            estimator.setup(pl_module)

    def teardown(self) -> None:
        for estimator in self.estimators:
            estimator.teardown()

    def _scores(self, batch: Mapping[str, Any], model: nn.Module | None) -> Tensor:
        size = batch["input_ids"].shape[0]
        return torch.stack([check_risk(e(batch, model), size, type(e).__name__) for e in self.estimators])


class MaxRisk(_Combined):
    """The highest risk any estimator gives (defence in depth: one flag is enough).

    Example::

        risk = MaxRisk(ProbeRisk(probe), JudgeRisk(EmbeddingJudge.load("judge/")))
    """

    reduce_name = "max"

    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        return self._scores(batch, model).max(dim=0).values


class MeanRisk(_Combined):
    """The mean of the estimators' risks."""

    reduce_name = "mean"

    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        return self._scores(batch, model).mean(dim=0)
