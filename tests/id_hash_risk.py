"""A deterministic, cacheable risk estimator for testing the risk plumbing (callbacks, caches).

Its risk is a fixed function of the example id, so every run, rank and epoch agrees on it, and it
counts the examples it was asked to score.
"""

from __future__ import annotations

import torch

from lightning_safety.risk.base import RiskEstimator


def id_risk(example_id: str) -> float:
    return (int(str(example_id).encode().hex()[-8:], 16) % 101) / 100.0


class IdHashRisk(RiskEstimator):
    cacheable = True

    def __init__(self, name: str = "id-hash") -> None:
        self.name = name
        self.scored_ids: list[str] = []
        self.setups = 0
        self.teardowns = 0

    @property
    def namespace(self) -> str:
        return self.name

    def setup(self, pl_module) -> None:
        self.setups += 1

    def teardown(self) -> None:
        self.teardowns += 1

    def __call__(self, batch, model=None) -> torch.Tensor:
        self.scored_ids.extend(batch["id"])
        return torch.tensor([id_risk(i) for i in batch["id"]], dtype=torch.float32)
