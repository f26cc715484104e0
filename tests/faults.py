"""Callbacks that inject faults, named by class path in CLI tests (``--trainer.callbacks+=faults.FailOnFitStart``)."""

from __future__ import annotations

import lightning as L

from lightning_safety.errors import LightningSafetyError


class FailOnFitStart(L.Callback):
    """Refuse the run the way a setup check does (one-line error), after the trainer is set up."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise LightningSafetyError("injected refusal at fit start")
