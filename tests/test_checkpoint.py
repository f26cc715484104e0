"""Checkpoints: a mid-epoch resume ends with the uninterrupted run's weights; no frozen weights saved."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_safety.data import ChatSFTDataModule
from lightning_safety.schedules import LinearRiskSchedule
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


def test_export_writes_an_adapter_or_a_merged_model_that_reproduce_the_trained_policy(tiny_model_dir, tmp_path):
    from lightning_safety.commands import export
    from lightning_safety.errors import DataError, ModelLoadError
    from lightning_safety.models import LoraSettings, load_adapter, load_causal_lm

    trained = run(tiny_model_dir, tmp_path / "run", max_steps=3, checkpoint_every=3, lora=LoraSettings(r=4, dropout=0.0))
    checkpoint = tmp_path / "run" / "step=3.ckpt"
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    with torch.no_grad():
        expected = trained.policy(input_ids=ids).logits

    adapter = Path(export(str(checkpoint), str(tmp_path / "adapter")))
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    merged = Path(export(str(checkpoint), str(tmp_path / "merged"), merge=True))
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    with torch.no_grad():
        from_adapter = load_adapter(load_causal_lm(str(tiny_model_dir)), str(adapter))(input_ids=ids).logits
        from_merged = load_causal_lm(str(merged))(input_ids=ids).logits
    torch.testing.assert_close(from_adapter, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_merged, expected, rtol=0, atol=1e-4)
    assert (from_merged - load_causal_lm(str(tiny_model_dir))(input_ids=ids).logits).abs().max() > 1e-3

    # Bad input: one line, and nothing written.
    with pytest.raises(DataError, match="already exists: choose a new folder"):
        export(str(checkpoint), str(merged))
    with pytest.raises(ModelLoadError, match="not found: give a .ckpt file or a sharded checkpoint folder"):
        export(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_refuses_to_resume_on_another_model(tiny_model_dir, tmp_path, capsys):
    """Under LoRA a checkpoint holds the adapter alone: resumed on another base model (same shapes, other
    weights) it would train on top of that model and its reference, silently. The fingerprint refuses it."""
    from lightning_safety.cli import run_cli
    from lightning_safety.models import LoraSettings
    from lightning_safety.tiny_model import tiny_model_folder

    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    run(tiny_model_dir, tmp_path / "first", max_steps=2, checkpoint_every=2, lora=lora, reference="adapter_copy")
    checkpoint_file = tmp_path / "first" / "step=2.ckpt"
    extra = torch.load(checkpoint_file, weights_only=True)["lightning_safety"]
    assert extra["start_model"] == str(tiny_model_dir) and len(extra["start_fingerprint"]) == 64

    # The same model resumes; another one with the same shapes is refused before a step is taken.
    run(tiny_model_dir, tmp_path / "same", max_steps=3, ckpt_path=checkpoint_file, lora=lora, reference="adapter_copy")
    other = tiny_model_folder(tmp_path / "other", seed=1)
    with pytest.raises(Exception) as raised:
        run(other, tmp_path / "api", max_steps=3, ckpt_path=checkpoint_file, lora=lora, reference="adapter_copy")
    assert "was trained from model" in str(raised.value) and str(tiny_model_dir) in str(raised.value)
    assert not (tmp_path / "api").exists() or not any((tmp_path / "api").rglob("*.ckpt"))

    # The same from the command line, where the model's folder now holds other weights: one line, exit 2.
    moved = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model_dir, moved)
    run(moved, tmp_path / "cli_first", max_steps=2, checkpoint_every=2, lora=lora, reference="adapter_copy")
    shutil.rmtree(moved)
    shutil.copytree(other, moved)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(TINY_DATA.parents[1] / "tiny.yaml"), "--data.train", str(TINY_DATA),
                 "--trainer.default_root_dir", str(tmp_path / "cli"), "--ckpt_path",
                 str(tmp_path / "cli_first" / "step=2.ckpt")])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "was trained from model" in error[0]
    assert not (tmp_path / "cli").exists()
