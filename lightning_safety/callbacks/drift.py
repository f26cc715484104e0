"""Safety drift monitor and controller: tighten the KL for every row while the model drifts from safety."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_safety.data.formatting import resolve_pad_token_id
from lightning_safety.distributed import is_sharded
from lightning_safety.errors import LightningSafetyError
from lightning_safety.evaluation.drift import CanarySet, build_canaries, calibrated_budget, canary_logprob, safety_drift
from lightning_safety.callbacks.tokenizer import resolve_tokenizer
from lightning_safety.risk.estimators import find_causal_lm

logger = logging.getLogger("lightning_safety.callbacks.drift")

__all__ = ["SafetyDriftController"]


FLOOR_ATTRIBUTES = ("beta_floor", "kl_scale_floor")


class SafetyDriftController(Callback):
    """Measure safety drift on canary requests every few steps; raise every row's beta floor while it is too high.

    A per-example risk estimator protects only the rows it recognises. This callback watches the
    *effect* instead (:mod:`lightning_safety.evaluation.drift`): at the start of fitting the model
    answers the defender's harmful canary requests (its refusals' openings) and, every
    ``every_n_steps`` optimizer steps, the mean log-probability drop of those answers is measured
    (one forward pass over the canaries, no generation) and logged as ``safety/drift`` (nats per
    token). With a ``budget``, it is a controller too: while drift exceeds the budget, the beta floor
    rises by ``step`` (up to ``max_floor``); once drift is back under ``recover * budget`` it falls by
    ``step`` (down to 0). The floor is logged as ``safety/beta_floor``. With
    ``floor_attribute="kl_scale_floor"`` the controller moves the floor of the KL term's scale instead
    (``kl_scale = max(kl_scale, kl_scale_floor)``, see :class:`~lightning_safety.module.SafeFineTuning`):
    a run trained with a small ``kl_scale`` for its task gets the paper's full KL back while, and only
    while, its canaries drift; logged as ``safety/kl_scale_floor``.

    Contract with the LightningModule (any, not only ours): it exposes its Hugging Face causal LM as
    ``policy`` or ``model`` (or ``model_attr``), its tokenizer as ``tokenizer`` (or pass
    ``tokenizer``), and a float attribute ``beta_floor`` (or the one named by ``floor_attribute``)
    that its loss applies as ``beta = max(beta, beta_floor)`` for every row
    (:class:`~lightning_safety.module.SafeFineTuning` does). The model as it is when fitting starts
    is the safe point drift is measured from; the canaries' answers and log-probs are kept in
    checkpoints, so a resumed run measures from the same point. Under DDP/FSDP every rank scores
    every canary and rank 0's drift is broadcast, so all ranks take the same decision.

    Args:
        canaries: harmful requests held by the defender (never trained on).
        every_n_steps: measure after every this many optimizer steps.
        budget: drift (nats per token) above which the floor rises; None: monitor only.
        step: how much the floor moves per measurement.
        max_floor: the highest floor.
        recover: the floor falls once drift is below ``recover * budget`` (hysteresis).
        max_tokens: answer tokens scored per canary.
        system_prompt: the canaries' system prompt (None: the chat template's default).
        tokenizer: a tokenizer or its name; default the module's or the datamodule's ``tokenizer``.
        model_attr: dotted attribute of the causal LM, if not ``policy``/``model``.
        batch_size: canaries per forward pass.
        floor_attribute: the module attribute the controller sets: ``beta_floor`` (every row's beta)
            or ``kl_scale_floor`` (the KL term's scale).

    Raises:
        LightningSafetyError: invalid arguments (at construction) or a module without the floor
            attribute while a budget is set (at fit start).

    Example::

        controller = SafetyDriftController(canaries=defender_harmful[:32], every_n_steps=5, budget=0.5)
        trainer = L.Trainer(callbacks=[controller])
        trainer.fit(SafeFineTuning("smollm2-135m-instruct", lora=LoraSettings()), datamodule=data)
    """

    def __init__(
        self,
        canaries: Sequence[str],
        every_n_steps: int = 5,
        budget: float | None = None,
        *,
        step: float = 0.2,
        max_floor: float = 0.9,
        recover: float = 0.5,
        max_tokens: int = 16,
        system_prompt: str | None = None,
        tokenizer: Any = None,
        model_attr: str | None = None,
        batch_size: int = 16,
        floor_attribute: str = "beta_floor",
    ) -> None:
        if isinstance(canaries, str) or not canaries or not all(isinstance(c, str) and c.strip() for c in canaries):
            raise LightningSafetyError("SafetyDriftController needs canaries: a non-empty list of harmful requests")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise LightningSafetyError(f"every_n_steps={every_n_steps!r} is invalid: use a positive integer, e.g. 5")
        if budget is not None and not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise LightningSafetyError(f"budget={budget!r} is invalid: use a positive drift in nats per token, or None")
        if not 0.0 < step <= 1.0 or not 0.0 <= max_floor <= 1.0 or not 0.0 <= recover < 1.0:
            raise LightningSafetyError(
                f"step={step}, max_floor={max_floor}, recover={recover}: need 0 < step <= 1, 0 <= max_floor <= 1, "
                "0 <= recover < 1")
        if max_tokens < 1 or batch_size < 1:
            raise LightningSafetyError(f"max_tokens={max_tokens}, batch_size={batch_size}: use positive integers")
        if floor_attribute not in FLOOR_ATTRIBUTES:
            raise LightningSafetyError(
                f"floor_attribute={floor_attribute!r} is invalid: use one of {', '.join(FLOOR_ATTRIBUTES)}")
        self.floor_attribute = floor_attribute
        self.requests = [c.strip() for c in canaries]
        self.every_n_steps = every_n_steps
        self.budget = None if budget is None else float(budget)
        self.step, self.max_floor, self.recover = float(step), float(max_floor), float(recover)
        self.max_tokens, self.system_prompt, self.batch_size = max_tokens, system_prompt, batch_size
        self.tokenizer_spec, self.model_attr = tokenizer, model_attr
        self.canaries: CanarySet | None = None
        self.floor = 0.0
        self.drift: float | None = None
        self.history: list[dict[str, float]] = []
        self._last_step = -1
        self._pad_id = 0

    @property
    def state_key(self) -> str:
        other = {} if self.floor_attribute == "beta_floor" else {"floor_attribute": self.floor_attribute}
        return self._generate_state_key(every_n_steps=self.every_n_steps, budget=self.budget,
                                        canaries=len(self.requests), **other)

    # ------------------------------------------------------------------ calibration
    @property
    def max_drift(self) -> float | None:
        """The largest drift measured so far in this run (nats per token); None before the first measurement."""
        return max((row["drift"] for row in self.history), default=None)

    def calibrated_budget(self, margin: float = 3.0, minimum: float = 0.01) -> float:
        """A budget for attacked runs from this monitor's clean run: ``max(margin * max_drift, minimum)``.

        Fit once on data you trust (e.g. your task's rows alone) with ``budget=None``, then give the
        result to the controller of the real run, with the same canaries, ``every_n_steps`` and
        training settings (:func:`lightning_safety.evaluation.drift.calibrated_budget`).

        Raises:
            DriftError: no drift measured yet (the run was shorter than ``every_n_steps``),
                ``margin`` <= 0 or ``minimum`` < 0 (:func:`~lightning_safety.evaluation.drift.calibrated_budget`).
        """
        return calibrated_budget([row["drift"] for row in self.history], margin=margin, minimum=minimum)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = self.floor_attribute
        if self.budget is not None and not hasattr(pl_module, name):
            applied = "beta = max(beta, beta_floor)" if name == "beta_floor" else "kl_scale = max(kl_scale, kl_scale_floor)"
            raise LightningSafetyError(
                f"{type(pl_module).__name__} has no {name}: the controller raises it; add a float attribute "
                f"`{name}` that the loss applies as {applied}, or set budget=None to monitor only")
        model = find_causal_lm(pl_module, self.model_attr)
        tokenizer = self._resolve_tokenizer(trainer, pl_module)
        self._pad_id = resolve_pad_token_id(tokenizer)
        if self.canaries is None:  # a resumed run keeps the canaries (and the safe point) of its checkpoint
            self.canaries = build_canaries(model, tokenizer, self.requests, max_tokens=self.max_tokens,
                                           system_prompt=self.system_prompt, batch_size=self.batch_size,
                                           synced=trainer.world_size > 1 and is_sharded(model))
        self._apply_floor(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps != 0 or self.canaries is None:
            return  # several micro-batches per optimizer step (gradient accumulation) measure once
        self._last_step = step
        model = find_causal_lm(pl_module, self.model_attr)
        current = canary_logprob(model, self.canaries.input_ids, self.canaries.labels, pad_id=self._pad_id,
                                 batch_size=self.batch_size)
        drift = torch.tensor([safety_drift(self.canaries.reference_logprob, current)], dtype=torch.float64,
                             device=pl_module.device)
        if trainer.world_size > 1:  # rank 0 decides: every rank applies the same floor
            drift = trainer.strategy.broadcast(drift, src=0)
        self.drift = float(drift.item())
        self._control()
        self.history.append({"step": float(step), "drift": self.drift, "floor": self.floor})
        self._apply_floor(pl_module)
        pl_module.log("safety/drift", self.drift, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=False)
        pl_module.log(f"safety/{self.floor_attribute}", self.floor, on_step=True, on_epoch=False, batch_size=1)

    def _control(self) -> None:
        if self.budget is None or self.drift is None:
            return
        before = self.floor
        if self.drift > self.budget:
            self.floor = min(self.max_floor, self.floor + self.step)
        elif self.drift < self.recover * self.budget:
            self.floor = max(0.0, self.floor - self.step)
        self.floor = round(self.floor, 10)
        if self.floor != before:
            logger.info("safety drift %.3f (budget %.3f): %s %.2f -> %.2f", self.drift, self.budget,
                        self.floor_attribute, before, self.floor)

    def _apply_floor(self, pl_module: L.LightningModule) -> None:
        if self.budget is not None:
            setattr(pl_module, self.floor_attribute, self.floor)

    def _resolve_tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        self.tokenizer_spec = resolve_tokenizer(self.tokenizer_spec, trainer, pl_module, type(self).__name__)
        return self.tokenizer_spec

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"floor": self.floor, "drift": self.drift, "history": list(self.history), "last_step": self._last_step,
                "canaries": None if self.canaries is None else self.canaries.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.floor = float(state_dict["floor"])
        self.drift = state_dict["drift"]
        self.history = list(state_dict["history"])
        self._last_step = int(state_dict["last_step"])
        canaries = state_dict.get("canaries")
        self.canaries = None if canaries is None else CanarySet.from_dict(canaries)
