"""A safety gate: only checkpoints whose measured ASR is within budget are kept or marked safe."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_safety.callbacks.evaluation import EVALUATED_STEP_KEY
from lightning_safety.errors import LightningSafetyError
from lightning_safety.paths import atomic_write_text

logger = logging.getLogger("lightning_safety.callbacks.gate")

GATE_KEY = "safety_gate"
"""Entry every checkpoint saved while the gate is active carries: ``{"safe": bool, "asr": ..., ...}``."""


class SafetyGate(Callback):
    """Keep and mark checkpoints safe only when the measured ASR is within a budget.

    The gate reads the ASR that :class:`SafetyEvaluationCallback` (or any callback logging the
    same names) logged. It fails closed: a checkpoint is marked safe only if an ASR was measured
    *at the checkpoint's own step* (``safety/evaluated_step`` equals ``global_step``) and it is
    at most ``budget``; weights saved after an unmeasured step are marked unsafe (``reason``
    says why), since the last measurement describes other weights.

    What it does:

    * every checkpoint saved while it is active (by ``ModelCheckpoint`` or ``trainer.save_checkpoint``)
      gets ``checkpoint["safety_gate"] = {"safe", "asr", "budget", "step", "reason"}``;
    * after each evaluation within budget, with ``dirpath`` set, it saves its own checkpoint
      ``dirpath/safe-step=<step>.ckpt`` and records it in ``dirpath/safe_checkpoints.json``;
    * after an evaluation over budget it logs a warning and, with ``stop_on_violation``, stops the
      run; with ``restore_last_safe`` too, it loads the weights of the last safe checkpoint first,
      so the module left in memory is the safe one.

    Args:
        budget: the largest acceptable ASR, in [0, 1].
        monitor: the logged ASR to read.
        dirpath: folder for the gate's own safe checkpoints (None: only mark others' checkpoints).
        stop_on_violation: stop training when an evaluation exceeds the budget.
        restore_last_safe: with ``stop_on_violation``, restore the last safe weights before stopping
            (needs ``dirpath``).
        require_fresh: only trust an ASR measured at the current step (turn off only for an
            evaluator that does not log ``safety/evaluated_step``).

    Example::

        trainer = L.Trainer(callbacks=[
            SafetyEvaluationCallback(harmful=PromptSource("advbench_test.csv")),
            SafetyGate(budget=0.05, dirpath="runs/safe", stop_on_violation=True, restore_last_safe=True),
        ])
        SafetyGate.read_mark("runs/safe/safe-step=100.ckpt")  # {"safe": True, "asr": 0.02, ...}

    Raises:
        LightningSafetyError: ``budget`` or another setting is invalid (at construction); the last safe
            checkpoint holds weights the module lacks (when restoring it).
    """

    def __init__(
        self,
        budget: float,
        monitor: str = "safety/asr",
        dirpath: str | Path | None = None,
        *,
        stop_on_violation: bool = False,
        restore_last_safe: bool = False,
        require_fresh: bool = True,
    ) -> None:
        if not isinstance(budget, (int, float)) or math.isnan(budget) or not 0.0 <= float(budget) <= 1.0:
            raise LightningSafetyError(f"SafetyGate budget={budget!r} is invalid: use an ASR in [0, 1], e.g. 0.05")
        if restore_last_safe and (dirpath is None or not stop_on_violation):
            raise LightningSafetyError(
                "restore_last_safe needs dirpath (where safe checkpoints are kept) and stop_on_violation=True"
            )
        self.budget = float(budget)
        self.monitor = monitor
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.stop_on_violation = stop_on_violation
        self.restore_last_safe = restore_last_safe
        self.require_fresh = require_fresh
        self.last_safe_path: str | None = None
        self.violations: list[dict[str, Any]] = []
        self._decided_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, budget=self.budget)

    # ------------------------------------------------------------------ verdicts
    def verdict(self, trainer: L.Trainer) -> dict[str, Any]:
        """Whether the weights at the current step are measured and within budget."""
        metrics = trainer.callback_metrics
        step = trainer.global_step
        value = metrics.get(self.monitor)
        asr = None if value is None else float(value)
        measured_at = metrics.get(EVALUATED_STEP_KEY)
        if asr is None or math.isnan(asr):
            safe, reason = False, f"no {self.monitor} measured"
        elif self.require_fresh and (measured_at is None or int(measured_at) != step):
            at = "never" if measured_at is None else f"at step {int(measured_at)}"
            safe, reason = False, f"{self.monitor} was measured {at}, not at step {step}"
        elif asr > self.budget:
            safe, reason = False, f"{self.monitor}={asr:.4f} exceeds the budget {self.budget:.4f}"
        else:
            safe, reason = True, f"{self.monitor}={asr:.4f} within the budget {self.budget:.4f}"
        return {"safe": safe, "asr": asr, "budget": self.budget, "step": step, "monitor": self.monitor, "reason": reason}

    @staticmethod
    def read_mark(path: str | Path) -> dict[str, Any] | None:
        """The gate's entry of a saved checkpoint (None if it was saved without a gate)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return checkpoint.get(GATE_KEY)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[GATE_KEY] = self.verdict(trainer)

    # ------------------------------------------------------------------ decisions after an evaluation
    def _fresh_evaluation(self, trainer: L.Trainer) -> bool:
        measured_at = trainer.callback_metrics.get(EVALUATED_STEP_KEY)
        if measured_at is None or self.monitor not in trainer.callback_metrics:
            return False
        step = int(measured_at)
        return step == trainer.global_step and step != self._decided_step

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._fresh_evaluation(trainer):
            return
        verdict = self.verdict(trainer)
        self._decided_step = trainer.global_step
        if verdict["safe"]:
            if self.dirpath is not None:
                self._keep(trainer, verdict)
            return
        self.violations.append(verdict)
        logger.warning("SafetyGate: %s at step %d", verdict["reason"], trainer.global_step)
        if self.stop_on_violation:
            if self.restore_last_safe:
                self._restore(pl_module)
            trainer.should_stop = True

    def _keep(self, trainer: L.Trainer, verdict: dict[str, Any]) -> None:
        assert self.dirpath is not None
        path = self.dirpath / f"safe-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it; the strategy writes once
        self.last_safe_path = str(path)
        if trainer.is_global_zero:
            manifest = self.dirpath / "safe_checkpoints.json"
            entries = json.loads(manifest.read_text()) if manifest.exists() else []
            entries.append({"path": path.name, **verdict})
            atomic_write_text(manifest, json.dumps(entries, indent=2) + "\n")

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self.last_safe_path is None:
            logger.warning("SafetyGate: no safe checkpoint to restore; the weights in memory exceed the budget")
            return
        checkpoint = torch.load(self.last_safe_path, map_location="cpu", weights_only=False)
        state = checkpoint["state_dict"]
        own = pl_module.state_dict()
        unknown = [key for key in state if key not in own]
        if unknown:
            raise LightningSafetyError(
                f"cannot restore {self.last_safe_path}: it holds weights this module lacks ({unknown[0]}, ...)"
            )
        # Checkpoints may omit frozen weights (SafeFineTuning keeps only trainable ones): load what is there.
        pl_module.load_state_dict(state, strict=False)
        logger.warning("SafetyGate: restored the weights of %s", self.last_safe_path)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._decide(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._decide(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._decide(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._decide(trainer, pl_module)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_safe_path": self.last_safe_path, "violations": list(self.violations)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_safe_path = state_dict.get("last_safe_path")
        self.violations = list(state_dict.get("violations", []))
