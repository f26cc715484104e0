"""RiskCallback: each example scored once per run, cache kept in checkpoints and files, fail-closed inputs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from id_hash_risk import IdHashRisk, id_risk
from lightning_safety.callbacks import RiskCallback
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.errors import RiskError
from lightning_safety.module import SafeFineTuning
from lightning_safety.risk.compose import MaxRisk, MeanRisk

TINY_DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"


class SeenRisk(L.Callback):
    """Records the risk each training batch carried into the step."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.extend(zip(batch["id"], batch["risk"].tolist()))


def fit(model_dir, root, callbacks, *, max_epochs=3, max_steps=-1, ckpt_path=None, checkpoint=None):
    L.seed_everything(0)
    module = SafeFineTuning(str(model_dir), reference="model_copy")
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(model_dir), batch_size=4, val_fraction=0.25)
    extra = [checkpoint] if checkpoint else []
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(extra), callbacks=[*callbacks, *extra],
        default_root_dir=root, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, data


def test_each_example_is_scored_once_over_three_epochs(tiny_model_dir, tmp_path):
    estimator = IdHashRisk()
    seen = SeenRisk()
    trainer, data = fit(tiny_model_dir, tmp_path, [RiskCallback(estimator), seen])
    unique = set(data.train_ids) | set(data.val_ids)
    assert sorted(estimator.scored_ids) == sorted(unique), "every example scored exactly once"
    assert len(seen.rows) == 3 * len(data.train_ids)  # three epochs went through the callback
    assert all(abs(risk - id_risk(i)) < 1e-6 for i, risk in seen.rows)  # the estimator's risk, not the dataset's
    assert estimator.setups == 1 and estimator.teardowns == 1


def test_cache_survives_a_resume_through_the_checkpoint(tiny_model_dir, tmp_path):
    first = IdHashRisk()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    fit(tiny_model_dir, tmp_path, [RiskCallback(first)], max_epochs=-1, max_steps=6, checkpoint=checkpoint)
    assert len(first.scored_ids) > 0
    resumed = IdHashRisk()
    _, data = fit(tiny_model_dir, tmp_path, [RiskCallback(resumed)], max_epochs=2, ckpt_path=tmp_path / "step=6.ckpt")
    assert set(resumed.scored_ids).isdisjoint(first.scored_ids), "examples cached before the stop are not scored again"
    assert sorted(first.scored_ids + resumed.scored_ids) == sorted(set(data.train_ids) | set(data.val_ids))


def test_cache_file_is_reused_and_refused_by_another_estimator(tiny_model_dir, tmp_path):
    path = tmp_path / "risk.json"
    fit(tiny_model_dir, tmp_path / "a", [RiskCallback(IdHashRisk(), cache_path=path)], max_epochs=1)
    stored = json.loads(path.read_text())
    assert stored["namespace"] == "id-hash" and len(stored["scores"]) == 24
    again = IdHashRisk()
    fit(tiny_model_dir, tmp_path / "b", [RiskCallback(again, cache_path=path)], max_epochs=1)
    assert again.scored_ids == []
    with pytest.raises(RiskError, match="written by estimator 'id-hash'"):
        RiskCallback(IdHashRisk(name="another"), cache_path=path).fill(
            {"id": ["x"], "input_ids": torch.zeros(1, 2, dtype=torch.long)}, SafeFineTuning()
        )


def test_without_cache_the_estimator_runs_every_step(tiny_model_dir, tmp_path):
    estimator = IdHashRisk()
    _, data = fit(tiny_model_dir, tmp_path, [RiskCallback(estimator, cache=False)], max_epochs=2)
    assert len(estimator.scored_ids) == 2 * len(data.train_ids) + 2 * len(data.val_ids)


class BrokenRisk(IdHashRisk):
    def __call__(self, batch, model=None):
        return torch.full((len(batch["id"]),), float("nan"))


def test_an_estimator_returning_nan_stops_the_run(tiny_model_dir, tmp_path):
    with pytest.raises(RiskError, match="NaN"):
        fit(tiny_model_dir, tmp_path, [RiskCallback(BrokenRisk())], max_epochs=1)


def test_max_and_mean_combine_estimators():
    batch = {"id": ["a", "b", "c"], "input_ids": torch.zeros(3, 2, dtype=torch.long)}
    low = IdHashRisk("low")

    class Shifted(IdHashRisk):
        def __call__(self, batch, model=None):
            return (super().__call__(batch, model) + 0.5).clamp(max=1.0)

    shifted = Shifted("shifted")
    expected_low = torch.tensor([id_risk(i) for i in batch["id"]])
    torch.testing.assert_close(MaxRisk(low, shifted)(batch), (expected_low + 0.5).clamp(max=1.0))
    torch.testing.assert_close(MeanRisk(low, shifted)(batch), (expected_low + (expected_low + 0.5).clamp(max=1.0)) / 2)
    assert MaxRisk(low, shifted).cacheable and MaxRisk(low, shifted).namespace == "max(low,shifted)"


def test_a_crashed_fit_removes_the_probe_hooks_and_keeps_the_scores(tiny_model_dir, tmp_path):
    import lightning as L

    from lightning_safety.callbacks import ActivationRiskCallback
    from lightning_safety.data import ChatSFTDataModule
    from lightning_safety.models import load_causal_lm, load_tokenizer
    from lightning_safety.module import SafeFineTuning
    from tiny_probe import tiny_probe

    class CrashAtStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("injected crash")

    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    probe = tiny_probe(model, tokenizer)
    module = SafeFineTuning(str(tiny_model_dir), reference="model_copy")
    cache = tmp_path / "risk.json"
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ActivationRiskCallback(probe, cache_path=cache), CrashAtStep()])
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=4, max_length=256)
    with pytest.raises(RuntimeError, match="injected crash"):
        trainer.fit(module, datamodule=data)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    assert hooks == 0  # the probe's taps are gone: the model is usable as it is
    assert len(json.loads(cache.read_text())["scores"]) == 8  # the two completed batches' scores were kept
