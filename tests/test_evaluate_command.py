"""`lightning-safety evaluate`: models by folder or training checkpoint, report files, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_safety.cli import run_cli
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.evaluation.loading import load_model_for_evaluation
from lightning_safety.models import LoraSettings
from lightning_safety.module import SafeFineTuning

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"


def evaluate_args(model: str, output: Path) -> list[str]:
    utility = json.dumps([{"path": str(DATA / "eval_sentiment.jsonl"), "task": "sst2", "name": "sentiment"}])
    return [
        "evaluate", "--model", model, "--output", str(output),
        "--harmful.path", str(DATA / "eval_harmful.jsonl"), "--harmful.category_field", "category",
        "--safe.path", str(DATA / "eval_safe.jsonl"), "--utility", utility,
        "--max_new_tokens", "4", "--batch_size", "8", "--progress", "false",
    ]


def test_evaluate_writes_the_report(tiny_model_dir, tmp_path, capsys):
    values = run_cli(evaluate_args(str(tiny_model_dir), tmp_path / "report"))
    printed = capsys.readouterr().out
    assert "safety/asr " in printed and "report written to" in printed
    for name in ("metrics.json", "summary.md", "samples.jsonl", "asr.png", "asr_by_category.png",
                 "over_refusal.png", "utility.png"):
        assert (tmp_path / "report" / name).is_file(), name
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    label = Path(str(tiny_model_dir)).name
    asr = metrics["results"][label]["metrics"]["safety/asr"]
    assert asr["total"] == 8 and asr["rate"] == pytest.approx(values["safety/asr"])
    assert len((tmp_path / "report" / "samples.jsonl").read_text().splitlines()) == 8 + 6 + 8


def test_an_existing_report_folder_is_refused_with_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_args(str(tiny_model_dir), tmp_path / "report"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: report folder") and "--overwrite" in error[-1]
    assert (tmp_path / "report" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_training_checkpoint_evaluates_the_trained_weights(tiny_model_dir, tmp_path, lora):
    L.seed_everything(0)
    module = SafeFineTuning(str(tiny_model_dir), reference="model_copy" if not lora else "auto",
                            lora=LoraSettings(r=4, dropout=0.0) if lora else None,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    data = ChatSFTDataModule(train=str(DATA / "tiny_chat.jsonl"), tokenizer=str(tiny_model_dir), batch_size=6)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[checkpoint]).fit(module, datamodule=data)
    loaded, tokenizer = load_model_for_evaluation(str(tmp_path / "last.ckpt"))
    trained = module.policy.merge_and_unload() if lora else module.policy
    if lora:
        loaded = loaded.merge_and_unload()
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    values = run_cli(evaluate_args(str(tmp_path / "last.ckpt"), tmp_path / "report"))
    assert 0.0 <= values["safety/asr"] <= 1.0
