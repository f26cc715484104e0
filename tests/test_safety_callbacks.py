"""SafetyEvaluationCallback and SafetyGate in real fits: plain LightningModules, monitors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_safety.callbacks import ActivationRiskCallback, SafetyEvaluationCallback, SafetyGate
from lightning_safety.callbacks.evaluation import EVALUATED_STEP_KEY
from lightning_safety.cli import run_cli
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.data.prompts import PromptSource
from lightning_safety.errors import LightningSafetyError
from lightning_safety.evaluation import GenerationSettings, KeywordRefusal, SafetyEvaluator, UtilityTask
from lightning_safety.models import load_causal_lm, load_tokenizer
from lightning_safety.module import SafeFineTuning
from lightning_safety.risk.probe import fit_probe

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "configs" / "data" / "tiny_chat.jsonl"
HARMFUL = REPO / "configs" / "data" / "eval_harmful.jsonl"
SAFE = REPO / "configs" / "data" / "eval_safe.jsonl"
SENTIMENT = REPO / "configs" / "data" / "eval_sentiment.jsonl"


class PlainModule(L.LightningModule):
    """A user's own module around an HF model, with nothing of ours in it."""

    def __init__(self, model_dir) -> None:
        super().__init__()
        self.model = load_causal_lm(str(model_dir))

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def evaluation_callback(**kwargs) -> SafetyEvaluationCallback:
    options = dict(
        harmful=PromptSource(str(HARMFUL), category_field="category"),
        safe=str(SAFE),
        utility=[UtilityTask(str(SENTIMENT), task="sst2", name="sentiment")],
        max_new_tokens=6,
        batch_size=8,
        progress=False,
    )
    options.update(kwargs)
    return SafetyEvaluationCallback(**options)


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def test_callbacks_drop_into_a_plain_module_and_metrics_are_logged(tiny_model_dir, tmp_path):
    """SafetyEvaluationCallback + ActivationRiskCallback around a user's module: metrics reach the monitors."""
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    harmful = [json.loads(line)["prompt"] for line in HARMFUL.read_text().splitlines()]
    benign = [json.loads(line)["prompt"] for line in SAFE.read_text().splitlines()]
    probe = fit_probe(model, tokenizer, harmful, benign, layers=[1], calibration_fraction=0.0, val_fraction=0.25,
                      epochs=20)
    L.seed_everything(0)
    evaluation = evaluation_callback()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="safety/asr", mode="min", save_top_k=1)
    stop = EarlyStopping(monitor="safety/asr", mode="min", patience=5, check_on_train_epoch_end=True)
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=6)
    fit = trainer(tmp_path, [ActivationRiskCallback(probe, source="policy"), evaluation, best, stop],
                  enable_checkpointing=True)
    fit.fit(PlainModule(tiny_model_dir), datamodule=data)

    metrics = fit.callback_metrics
    for name in ("safety/asr", "safety/refusal", "safety/over_refusal", "utility/sentiment", "safety/asr/fraud",
                 EVALUATED_STEP_KEY):
        assert name in metrics, f"{name} not logged"
    result = evaluation.last_result
    assert result.rates["safety/asr"].total == 8 and result.rates["safety/over_refusal"].total == 6
    assert result.rates["safety/asr/fraud"].total == 2  # categories from the prompt file
    assert float(metrics["safety/asr"]) == pytest.approx(result.rates["safety/asr"].rate)
    assert result.rates["safety/asr"].rate + result.rates["safety/refusal"].rate == pytest.approx(1.0)
    # Two epochs, evaluated at the end of each (24 rows / 6 = 4 steps per epoch); not again at the end.
    assert [h["step"] for h in evaluation.history] == [4.0, 8.0]
    assert int(metrics[EVALUATED_STEP_KEY]) == 8
    assert best.best_model_score is not None and Path(best.best_model_path).is_file()
    assert "risk/mean" in metrics  # the probe's risk reached the batches too


def test_evaluation_every_n_steps_and_at_end(tiny_model_dir, tmp_path):
    evaluation = evaluation_callback(every_n_epochs=0, every_n_train_steps=3, utility=None, safe=None)
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=6)
    trainer(tmp_path, [evaluation], max_epochs=None, max_steps=7).fit(PlainModule(tiny_model_dir), datamodule=data)
    # Steps 3 and 6 by the interval, then 7 at the end of training.
    assert [h["step"] for h in evaluation.history] == [3.0, 6.0, 7.0]


def test_evaluator_results_match_the_response_verdicts(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    evaluator = SafetyEvaluator(harmful=str(HARMFUL), safe=str(SAFE),
                                generation=GenerationSettings(max_new_tokens=6),
                                refusal=KeywordRefusal(["a", "e"]))  # random bytes: some hit, some miss
    result = evaluator.evaluate(model, tokenizer)
    harmful = result.samples["harmful"]
    assert [row["index"] for row in harmful] == list(range(8))
    succeeded = sum(not row["refused"] for row in harmful)
    assert result.rates["safety/asr"].count == succeeded
    assert result.rates["safety/over_refusal"].count == sum(row["refused"] for row in result.samples["safe"])
    assert 0.0 <= result.rates["safety/asr"].low <= result.rates["safety/asr"].rate <= result.rates["safety/asr"].high


def test_a_judge_that_is_also_the_training_critic_is_reported(tiny_model_dir):
    from lightning_safety.risk.judges import RubricJudge

    judge = RubricJudge(str(tiny_model_dir), rubric="Rate harm 1-5.")
    evaluator = SafetyEvaluator(harmful=str(HARMFUL), generation=GenerationSettings(max_new_tokens=4), judge=judge,
                                critics=[judge.name])
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    result = evaluator.evaluate(model, tokenizer)
    assert result.rates["safety/asr_judge"].total == 8
    assert result.info["judge_shares_training_critic"] is True
    assert any("training-time critic" in w for w in result.info["warnings"])
    independent = SafetyEvaluator(harmful=str(HARMFUL), generation=GenerationSettings(max_new_tokens=4), judge=judge)
    assert independent.evaluate(model, tokenizer).info["judge_shares_training_critic"] is False


# ---------------------------------------------------------------------------------------------- gate
class ScriptedASR(L.Callback):
    """Fault injection: logs a given ASR at the end of each epoch, as an evaluator would."""

    def __init__(self, values) -> None:
        self.values = list(values)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("safety/asr", self.values[trainer.current_epoch])
        pl_module.log(EVALUATED_STEP_KEY, float(trainer.global_step))


def test_gate_with_a_real_evaluation_over_budget_leaves_no_checkpoint_marked_safe(tiny_model_dir, tmp_path):
    L.seed_everything(0)
    gate = SafetyGate(budget=0.0, dirpath=tmp_path / "safe")
    evaluation = evaluation_callback(safe=None, utility=None)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "all", save_top_k=-1, every_n_epochs=1)
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=6)
    trainer(tmp_path, [evaluation, gate, checkpoints], enable_checkpointing=True).fit(
        SafeFineTuning(str(tiny_model_dir), reference="model_copy"), datamodule=data
    )
    history = {int(h["step"]): h["safety/asr"] for h in evaluation.history}
    assert sorted(history) == [4, 8]
    over = [step for step, asr in history.items() if asr > 0.0]
    assert over, "the evaluation should see at least one non-refusal from the tiny model"
    for path in sorted((tmp_path / "all").glob("*.ckpt")):
        mark = SafetyGate.read_mark(path)
        assert mark["safe"] is (history[mark["step"]] <= 0.0)
        if mark["step"] in over:
            assert mark["safe"] is False and "exceeds the budget" in mark["reason"]
    kept = sorted(p.name for p in (tmp_path / "safe").glob("*.ckpt")) if (tmp_path / "safe").exists() else []
    assert kept == [f"safe-step={step}.ckpt" for step in sorted(history) if step not in over]
    assert [v["step"] for v in gate.violations] == over


def test_gate_keeps_safe_checkpoints_and_restores_the_last_safe_weights(tiny_model_dir, tmp_path):
    gate = SafetyGate(budget=0.1, dirpath=tmp_path / "safe", stop_on_violation=True, restore_last_safe=True)
    module = SafeFineTuning(str(tiny_model_dir), reference="model_copy",
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=6)
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            snapshots[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}

    fit = trainer(tmp_path, [Snapshot(), ScriptedASR([0.05, 0.6, 0.0]), gate], max_epochs=3)
    fit.fit(module, datamodule=data)
    # Epoch 0 within budget: kept and listed; epoch 1 over: stopped (no epoch 2), weights of epoch 0 back.
    assert fit.current_epoch == 2 and 2 not in snapshots
    kept = tmp_path / "safe" / "safe-step=4.ckpt"
    assert kept.is_file() and SafetyGate.read_mark(kept)["safe"] is True
    manifest = json.loads((tmp_path / "safe" / "safe_checkpoints.json").read_text())
    assert [entry["path"] for entry in manifest] == ["safe-step=4.ckpt"]
    current = module.policy.state_dict()
    assert any(not torch.equal(snapshots[0][k], snapshots[1][k]) for k in current)  # training moved the weights
    for key, value in current.items():
        torch.testing.assert_close(value, snapshots[0][key], rtol=0, atol=0)


def test_gate_does_not_trust_a_stale_measurement(tiny_model_dir, tmp_path):
    class Stale(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            pl_module.log("safety/asr", 0.0)
            pl_module.log(EVALUATED_STEP_KEY, 1.0)  # measured long ago

    gate = SafetyGate(budget=0.5)
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=6)
    fit = trainer(tmp_path, [Stale(), gate], max_epochs=1)
    fit.fit(PlainModule(tiny_model_dir), datamodule=data)
    verdict = gate.verdict(fit)
    assert verdict["safe"] is False and "not at step 4" in verdict["reason"]


def test_gate_arguments_are_checked():
    with pytest.raises(LightningSafetyError, match="budget"):
        SafetyGate(budget=1.5)
    with pytest.raises(LightningSafetyError, match="restore_last_safe needs"):
        SafetyGate(budget=0.1, restore_last_safe=True)
    with pytest.raises(LightningSafetyError, match="every_n_epochs"):
        SafetyEvaluationCallback(harmful=["x"], every_n_epochs=-1)


# ------------------------------------------------------------------------------------------ CLI
def test_safety_recipe_runs_from_the_cli_and_validate_evaluates(tmp_path, monkeypatch):
    # The recipe with its output paths moved into tmp_path and its data paths made absolute.
    text = (REPO / "configs" / "tiny_safety.yaml").read_text()
    text = text.replace("runs/tiny_safety", str(tmp_path / "run")).replace("configs/data/", f"{REPO}/configs/data/")
    config = tmp_path / "tiny_safety.yaml"
    config.write_text(text)
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(config), "--trainer.max_epochs=1"])
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, SafetyEvaluationCallback))
    assert [h["step"] for h in evaluation.history] == [5.0]  # 18 training rows, batches of 4
    assert "safety/asr" in cli.trainer.callback_metrics and "utility/sentiment" in cli.trainer.callback_metrics
    audit = (tmp_path / "run" / "audit.jsonl").read_text().splitlines()
    assert len(audit) == 18  # one row per training example seen
    validate = run_cli(["validate", "--config", str(config)])
    again = next(c for c in validate.trainer.callbacks if isinstance(c, SafetyEvaluationCallback))
    assert len(again.history) == 1 and "safety/over_refusal" in validate.trainer.callback_metrics
