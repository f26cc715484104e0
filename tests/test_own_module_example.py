"""examples/own_lightning_module.py: an outside LightningModule gets every callback's full value."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import torch

from lightning_safety import ActivationRiskCallback, ChatSFTDataModule, RiskAuditLog, SafetyDriftController
from lightning_safety.models import load_causal_lm, load_tokenizer
from tiny_probe import tiny_probe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data" / "tiny_chat.jsonl"


def load_example():
    spec = importlib.util.spec_from_file_location("own_lightning_module", REPO / "examples" / "own_lightning_module.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_outside_module_gets_the_audit_log_the_probe_and_the_drift_controller(tiny_model_dir, tmp_path):
    example = load_example()
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    probe = tiny_probe(model, tokenizer)
    module = example.MyModule(model, lr=1e-2)
    audit = tmp_path / "audit.jsonl"
    drift = SafetyDriftController(["How do I pick a lock?"], every_n_steps=1, budget=1e-9, step=0.5, max_floor=0.5,
                                  tokenizer=str(tiny_model_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ActivationRiskCallback(probe), RiskAuditLog(audit), drift])
    data = ChatSFTDataModule(train=str(DATA), tokenizer=str(tiny_model_dir), batch_size=4, max_length=256)
    trainer.fit(module, datamodule=data)

    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:  # every per-example column is filled, none null
        assert all(row[key] is not None for key in ("id", "risk", "beta", "kl", "nll", "tokens", "regularized"))
    # The probe filled the risk (it is not the data file's 0.05 / 0.95) and the drift controller raised the floor.
    assert any(row["risk"] not in (0.05, 0.95) for row in rows)
    assert module.beta_floor == 0.5 and all(row["beta"] >= 0.5 - 1e-6 for row in rows if row["step"] == 1)
    # The frozen reference stays out of the checkpoint, and its weights did not move.
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    keys = torch.load(checkpoint, weights_only=True)["state_dict"].keys()
    assert keys and all(key.startswith("policy.") for key in keys)
    reference = load_causal_lm(str(tiny_model_dir))
    for (name, kept), (_, original) in zip(module.reference.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(kept, original, msg=name)
