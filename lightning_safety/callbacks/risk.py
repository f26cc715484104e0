"""Callbacks that put a per-example risk score into every batch before the step runs.

The contract with the LightningModule is the batch: these callbacks set ``batch["risk"]`` (a float
tensor [B] in [0, 1]) in ``on_*_batch_start``; :class:`~lightning_safety.module.SafeFineTuning`
reads it, and so can any LightningModule whose batches are dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_safety.distributed import any_rank
from lightning_safety.errors import DataError
from lightning_safety.risk.base import RISK_FIELD, RiskEstimator, check_risk
from lightning_safety.risk.cache import RiskCache
from lightning_safety.risk.estimators import JudgeRisk, ProbeRisk
from lightning_safety.risk.judges import Judge
from lightning_safety.risk.probe import ActivationProbe


def select_rows(batch: Mapping[str, Any], rows: list[int]) -> dict[str, Any]:
    """The sub-batch of ``rows``: tensors and lists with one entry per example are indexed."""
    size = batch["input_ids"].shape[0]
    index = torch.tensor(rows, dtype=torch.long)
    subset: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            subset[key] = value[index.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            subset[key] = [value[i] for i in rows]
        else:
            subset[key] = value
    return subset


class RiskCallback(L.Callback):
    """Fill ``batch["risk"]`` from a :class:`~lightning_safety.risk.RiskEstimator` before each step.

    When the estimator is cacheable (its risk depends only on the example and frozen models), each
    example is scored once per run: scores are cached by ``batch["id"]``, merged across
    data-parallel ranks at the end of every training epoch, kept in checkpoints (so a resumed
    run does not score again) and, with ``cache_path``, saved to a JSON file that later runs reuse.
    A failed score is risk 1 (the estimator fails closed); failures are counted and logged.

    Args:
        estimator: the risk source (a probe, a judge, or a combination such as ``MaxRisk``).
        cache: cache cacheable estimators' scores (turn off to score every time).
        cache_path: JSON file for the cache, loaded if it exists and written at the end of every
            training epoch and at teardown (rank 0 only).
        log_stats: log, for this rank (no extra collective per step), ``risk/mean``,
            ``risk/scored`` (examples scored this step; 0 when all came from the cache) and
            ``risk/failures`` (failed scores so far, each given risk 1) during training.

    Example::

        trainer = L.Trainer(callbacks=[ActivationRiskCallback("probe/", cache_path="runs/risk.json")])

    Raises:
        DataError: ``estimator`` is not a RiskEstimator (at construction); a batch lacks the ``id``
            field its rows' cached scores are found by (during training).
        RiskError: the estimator returned scores that are not finite numbers in [0, 1] (fail closed).
    """

    def __init__(
        self,
        estimator: RiskEstimator,
        *,
        cache: bool = True,
        cache_path: str | Path | None = None,
        log_stats: bool = True,
    ) -> None:
        if not isinstance(estimator, RiskEstimator):
            raise DataError(f"estimator must be a RiskEstimator, got {type(estimator).__name__}")
        self.estimator = estimator
        self.use_cache = cache and estimator.cacheable
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.log_stats = log_stats
        self.cache: RiskCache | None = None
        self.scored = 0  # examples scored (not served from the cache) in this process
        self._pending_state: dict[str, Any] | None = None
        self._active = False

    @property
    def state_key(self) -> str:
        # Read before setup on resume: only what the estimator knows at construction.
        return f"{type(self).__name__}[{self.estimator.checkpoint_namespace}]"

    # ------------------------------------------------------------------ lifecycle
    def _activate(self, pl_module: L.LightningModule) -> None:
        if self._active:
            return
        self.estimator.setup(pl_module)
        self._active = True
        if self.use_cache and self.cache is None:
            self.cache = RiskCache(self.estimator.namespace, self.cache_path)
            if self._pending_state is not None:
                self.cache.load_state_dict(self._pending_state)
                self._pending_state = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._activate(pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._activate(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._activate(pl_module)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._activate(pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._active:
            self.estimator.teardown()
            self._active = False
        self._save(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A crashed run still removes the estimator's hooks (Lightning skips ``teardown`` then) and keeps the
        scores computed so far in ``cache_path``."""
        self.teardown(trainer, pl_module, "exception")

    def _save(self, trainer: L.Trainer) -> None:
        if self.cache is not None and self.cache_path is not None and trainer.is_global_zero:
            self.cache.save(self.cache_path)

    # ------------------------------------------------------------------ the work
    def fill(self, batch: dict[str, Any], pl_module: L.LightningModule) -> Tensor:
        """Set ``batch["risk"]`` [B] (cached scores where known, the estimator for the rest)."""
        self._activate(pl_module)
        if "id" not in batch:
            if self.cache is not None:
                raise DataError(
                    "the batch has no 'id' field, and the risk cache keys scores by example id: give each example "
                    "a stable 'id' in the batch (ChatSFTDataModule does), or pass cache=False"
                )
            ids = [str(i) for i in range(len(batch["input_ids"]))]  # no cache: the ids are never looked up
        else:
            ids = [str(i) for i in batch["id"]]
        if self.cache is not None:
            risk, missing = self.cache.lookup(ids)
        else:
            risk, missing = torch.full((len(ids),), float("nan")), list(range(len(ids)))
        if self.estimator.collective and any_rank(bool(missing), batch["input_ids"].device) and not missing:
            # The estimator's model is sharded and another rank is scoring: run the same forward
            # on one row (its score is dropped) so that the ranks' collectives stay matched.
            self.estimator(select_rows(batch, [0]), None)
        if missing:
            subset = batch if len(missing) == len(ids) else select_rows(batch, missing)
            scores = check_risk(self.estimator(subset, None), len(missing), type(self.estimator).__name__).cpu()
            risk[missing] = scores
            if self.cache is not None:
                self.cache.update([ids[i] for i in missing], scores)
            self.scored += len(missing)
        batch[RISK_FIELD] = risk.to(batch["input_ids"].device)
        self._last_scored = len(missing)
        return batch[RISK_FIELD]

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        risk = self.fill(batch, pl_module)
        if self.log_stats:  # this rank's counts: no extra collective per step
            size = int(risk.numel())
            pl_module.log("risk/mean", risk.mean(), batch_size=size)
            pl_module.log("risk/scored", float(self._last_scored), batch_size=size)
            pl_module.log("risk/failures", float(self.estimator.failures), batch_size=size)

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.fill(batch, pl_module)

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.fill(batch, pl_module)

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.fill(batch, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is not None:
            self.cache.sync()  # every rank calls it: the epoch ends on every rank
            self._save(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.cache is not None:
            return {"cache": self.cache.state_dict()}
        return {"cache": self._pending_state} if self._pending_state is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("cache")
        if state is None or not self.use_cache:
            return
        if self.cache is not None:
            self.cache.load_state_dict(state)
        else:
            self._pending_state = state  # applied when the cache is created in _activate


class ActivationRiskCallback(RiskCallback):
    """Risk from an activation probe on the prompt's pre-generation activations (see :class:`ProbeRisk`).

    Hooks go on the probe's layers in ``on_fit_start`` / ``on_validation_start`` (resolved by
    module identity, after any wrapping) and are removed in ``teardown``. With
    ``source="reference"`` the risk is cached: one prompt-only reference forward per example.

    Args:
        probe: an ``ActivationProbe`` or the folder of a saved one (``lightning-safety probe fit``).
        source: ``"reference"`` (frozen, cached) or ``"policy"`` (the model as it trains).
        model_attr: attribute of the LightningModule that holds the causal LM.
        cache, cache_path, log_stats: as in :class:`RiskCallback`.

    Example::

        trainer = L.Trainer(callbacks=[ActivationRiskCallback("runs/probe", cache_path="runs/probe_risk.json")])
    """

    def __init__(
        self,
        probe: ActivationProbe | str | Path,
        source: Literal["reference", "policy"] = "reference",
        model_attr: str | None = None,
        *,
        cache: bool = True,
        cache_path: str | Path | None = None,
        log_stats: bool = True,
    ) -> None:
        super().__init__(ProbeRisk(probe, source, model_attr), cache=cache, cache_path=cache_path, log_stats=log_stats)


class JudgeRiskCallback(RiskCallback):
    """Risk from a Safety Critic judge scoring each example's (request, response), once per example.

    Args:
        judge: any ``Judge`` (``RubricJudge``, ``GuardModelJudge``, ``ClassifierJudge``,
            ``EmbeddingJudge``, ``HTTPJudge``). A failed call is risk 1, counted in ``risk/failures``.
        include_response: judge the request with the dataset's answer (default) or alone.
        cache, cache_path, log_stats: as in :class:`RiskCallback`.
    """

    def __init__(
        self,
        judge: Judge,
        include_response: bool = True,
        *,
        cache: bool = True,
        cache_path: str | Path | None = None,
        log_stats: bool = True,
    ) -> None:
        super().__init__(JudgeRisk(judge, include_response), cache=cache, cache_path=cache_path, log_stats=log_stats)
