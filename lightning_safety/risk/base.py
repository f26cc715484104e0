"""The risk contract shared by the LightningModule, callbacks and estimators.

A risk score s in [0, 1] is a property of one training example: 0 = benign, 1 = certainly
harmful. The loss turns it into beta (how strongly the example is held to the reference).

The contract is the batch itself: ``batch["risk"]`` is a float tensor [B]. It gets there from
the dataset (a precomputed ``risk`` column), from a callback that fills it in
``on_train_batch_start`` (probe or judge), or from a :class:`RiskEstimator` the module calls.
A user's own LightningModule reads the same field.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_safety.errors import RiskError
from lightning_safety.schedules import validate_risk

RISK_FIELD = "risk"


def check_risk(risk: Tensor, batch_size: int, source: str) -> Tensor:
    """Validate a risk tensor from ``source``: shape [B], finite, in [0, 1]; returns float32.

    Fails closed: a bad score is an error, never silently treated as "no risk".
    """
    if not isinstance(risk, Tensor):
        risk = torch.as_tensor(risk, dtype=torch.float32)
    if risk.shape != (batch_size,):
        raise RiskError(
            f"{source} gave risk of shape {tuple(risk.shape)} for a batch of {batch_size}: "
            "return one score per example, a tensor of shape [B]"
        )
    return validate_risk(risk.detach().float())


class RiskEstimator(ABC):
    """Per-example risk in [0, 1] for a batch.

    Implementations receive the collated batch (``input_ids`` [B, T], ``attention_mask`` [B, T],
    ``labels`` [B, T], ``prompt_length`` [B], ``id`` list[str], ``messages`` ...) and the policy
    model, and return a float tensor [B].

    Attributes:
        cacheable: True when the risk depends only on the example and frozen models (a probe on
            the reference, a judge): :class:`~lightning_safety.callbacks.RiskCallback` then
            computes it once per example and caches it.
        failures: number of examples whose scoring failed and were given risk 1 (fail closed).
    """

    cacheable: bool = False
    failures: int = 0
    reads_model: str | None = None
    """What the estimator reads of the model it is set up on, for the error when there is none (e.g.
    "a model's activations: pass model= (...)"); None: it reads no model (judges, constants)."""

    @property
    def is_set_up(self) -> bool:
        """True between :meth:`setup` and :meth:`teardown` when :meth:`setup` resolved something."""
        return False

    @property
    def collective(self) -> bool:
        """True when a call runs a forward of a sharded model (FSDP): every rank must then call
        the estimator together, even a rank whose rows are all cached (see :mod:`lightning_safety.distributed`)."""
        return False

    @property
    def namespace(self) -> str:
        """Identity of the estimator for caches (a cache of one estimator is refused by another).

        Default: the class name and a digest of the class's source and of its constructor settings
        (the ``__init__`` arguments stored under their own names as numbers, strings, booleans or
        tuples of them), so that an estimator whose code or settings changed does not reuse the scores
        of the old one. Override it when the risk depends on more (weights, files: see ``ProbeRisk``).
        """
        return f"{type(self).__name__}:{_settings_digest(self)}"

    @property
    def checkpoint_namespace(self) -> str:
        """The part of :attr:`namespace` known before :meth:`setup`, which a callback files its
        checkpointed state under: a resumed run reads that state before the estimator is set up.

        Default: :attr:`namespace`. An estimator whose namespace grows at setup (``RefusalRisk`` adds
        the reference's fingerprint) returns what it knows at construction; the whole namespace is
        still checked when the restored state is applied, so a changed reference is refused.
        """
        return self.namespace

    def setup(self, pl_module: nn.Module) -> None:
        """Resolve models and register hooks (called by callbacks in ``on_fit_start`` etc.)."""

    def teardown(self) -> None:
        """Remove hooks and release what :meth:`setup` took."""

    @abstractmethod
    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        """Risk scores [B] in [0, 1]."""


class FieldRisk(RiskEstimator):
    """Reads a precomputed risk column from the batch (default ``batch["risk"]``)."""

    def __init__(self, field: str = RISK_FIELD) -> None:
        self.field = field

    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        if self.field not in batch:
            raise RiskError(
                f"the batch has no '{self.field}' field: give the dataset a {self.field} column, add a "
                "risk callback, or set model.risk to a constant or an estimator"
            )
        return batch[self.field]


class ConstantRisk(RiskEstimator):
    """The same risk for every example (e.g. 1.0 to treat all data as untrusted)."""

    def __init__(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise RiskError(f"constant risk {value} is outside [0, 1]: choose a value between 0 and 1")
        self.value = float(value)

    def __call__(self, batch: Mapping[str, Any], model: nn.Module | None = None) -> Tensor:
        input_ids = batch["input_ids"]
        return torch.full((input_ids.shape[0],), self.value, device=input_ids.device)


_PLAIN = (int, float, str, bool, type(None))


def _settings_digest(estimator: object) -> str:
    """12 hex characters over the class's source and the plain values of its ``__init__`` arguments."""
    cls = type(estimator)
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # defined interactively: the qualified name stands in
        source = f"{cls.__module__}.{cls.__qualname__}"
    settings = {}
    for name in inspect.signature(cls.__init__).parameters:
        value = getattr(estimator, name, None)
        if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
            settings[name] = value
    payload = source + json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
