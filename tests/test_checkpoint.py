"""Checkpoints: a mid-epoch resume ends with the uninterrupted run's weights; no frozen weights saved."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_safety.data import ChatSFTDataModule
from lightning_safety.losses import LinearRiskSchedule
from lightning_safety.module import SafeFineTuning

TINY_DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def run(model_dir: Path, root: Path, max_steps: int, ckpt_path=None, checkpoint_every: int | None = None, **module_kwargs):
    L.seed_everything(0)
    module = SafeFineTuning(str(model_dir), optimizer=adamw, schedule=LinearRiskSchedule(ema=0.5), **module_kwargs)
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(model_dir), batch_size=4, max_length=256, seed=0)
    callbacks = []
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=checkpoint_every, save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def trainable_state(module: SafeFineTuning) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def check_resume(model_dir: Path, tmp_path: Path, **module_kwargs) -> dict:
    # 24 rows / batch 4 = 6 steps per epoch: step 3 is mid-epoch, step 8 is in the second epoch.
    full = run(model_dir, tmp_path / "full", max_steps=8, checkpoint_every=3, **module_kwargs)
    checkpoint_file = tmp_path / "full" / "step=3.ckpt"
    assert checkpoint_file.exists()
    resumed = run(model_dir, tmp_path / "resumed", max_steps=8, ckpt_path=checkpoint_file, **module_kwargs)
    expected, got = trainable_state(full), trainable_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    assert full.schedule.state_dict() == resumed.schedule.state_dict()
    return torch.load(checkpoint_file, weights_only=False)


def test_mid_epoch_resume_full_finetuning_matches_and_saves_no_reference(tiny_model_dir, tmp_path):
    checkpoint = check_resume(tiny_model_dir, tmp_path, reference="model_copy")
    keys = checkpoint["state_dict"].keys()
    assert keys and not any(key.startswith("reference.") for key in keys)
    assert checkpoint["lightning_safety"]["frozen_keys_omitted"] > 0


def test_mid_epoch_resume_lora_saves_only_the_adapter(tiny_model_dir, tmp_path):
    from lightning_safety.models import LoraSettings

    checkpoint = check_resume(tiny_model_dir, tmp_path, lora=LoraSettings(r=4, dropout=0.0))
    keys = list(checkpoint["state_dict"].keys())
    assert keys and all("lora_" in key for key in keys), keys[:5]
