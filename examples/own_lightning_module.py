"""Adaptive KL in your own LightningModule, with every callback of the library at full value.

What the callbacks need from a module they do not know:

* ``RiskAuditLog`` reads per-example values from what ``training_step`` returns: return a dict with
  ``loss`` and the ``[B]`` tensors ``beta``, ``kl``, ``nll``, ``tokens`` (``id`` and ``risk`` come from
  the batch); a module that returns only the loss gets null beta/KL in the log.
* ``ActivationRiskCallback(source="reference")`` reads the frozen reference through a ``reference``
  attribute, and the model through ``policy`` (or ``model``).
* Checkpoints should not carry the frozen reference: keep it out of the module's registered children
  (``object.__setattr__``), so ``state_dict`` holds the policy alone, and move it to the device yourself.
* ``SafetyDriftController`` (with a budget) needs a float ``beta_floor`` applied as
  ``beta = max(beta, beta_floor)``.

Run it: ``python examples/own_lightning_module.py`` (the tiny random model, a few seconds on a CPU).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_safety.losses import adaptive_kl_loss
from lightning_safety.schedules import LinearRiskSchedule


class MyModule(L.LightningModule):
    def __init__(self, policy: nn.Module, lr: float = 2e-4) -> None:
        super().__init__()
        self.policy = policy
        # A frozen copy of the starting model, outside the registered children: not in state_dict,
        # not in checkpoints, not in the optimizer.
        object.__setattr__(self, "reference", copy.deepcopy(policy).eval().requires_grad_(False))
        self.schedule = LinearRiskSchedule(beta_min=0.1, beta_max=0.9)
        self.beta_floor = 0.0  # raised by SafetyDriftController while the model drifts from safety
        self.lr = lr

    def on_fit_start(self) -> None:
        self.reference.to(self.device)  # not a registered child: Lightning does not move it

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        beta = self.schedule(batch["risk"]).clamp(min=self.beta_floor)  # [B] from risk in [0, 1]
        with torch.no_grad():
            ref_logits = self.reference(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = self.policy(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = adaptive_kl_loss(logits, ref_logits, batch["labels"], beta, normalization="example")
        self.log_dict({"train/loss": out.loss, "train/kl": out.kl}, batch_size=len(beta))
        # Per-example values for RiskAuditLog (and anything else that reads the step's outputs).
        return {"loss": out.loss, "beta": out.beta, "kl": out.kl_per_example, "nll": out.nll_per_example,
                "tokens": out.tokens_per_example}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=self.lr)


def main() -> None:
    from pathlib import Path

    from lightning_safety import ChatSFTDataModule, RiskAuditLog
    from lightning_safety.models import load_causal_lm

    data_file = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"
    module = MyModule(load_causal_lm("tiny-random-llama"))
    data = ChatSFTDataModule(train=str(data_file), tokenizer="tiny-random-llama", batch_size=4, max_length=256)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir="runs/own_module",
                        callbacks=[RiskAuditLog("runs/own_module/audit.jsonl", overwrite=True)])
    trainer.fit(module, datamodule=data)
    print("audit log: runs/own_module/audit.jsonl")


if __name__ == "__main__":
    main()
