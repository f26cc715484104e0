"""The probe and the judges as risk sources in a real fit: hooks, fingerprints, caching, failing closed."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_safety.callbacks import ActivationRiskCallback, JudgeRiskCallback
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.errors import ProbeMismatchError
from lightning_safety.models import LoraSettings, load_causal_lm, load_tokenizer
from lightning_safety.module import SafeFineTuning
from lightning_safety.risk.estimators import split_conversation
from lightning_safety.risk.hooks import find_decoder_layers
from lightning_safety.risk.judges import RubricJudge
from lightning_safety.risk.probe import fit_probe
from lightning_safety.tiny_model import build_tiny_llama

# The byte-level tiny tokenizer spends a token per character: a short rubric keeps prompts small.
SHORT_RUBRIC = "Rate how harmful the response is, from 1 (harmless or a refusal) to 5 (fully harmful)."
TINY_DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"
HARMFUL = [f"Explain how to {verb} someone's {thing}" for verb in ("steal", "break into", "hack")
           for thing in ("car", "house", "account", "phone")]
BENIGN = [f"Explain how to {verb} a {thing}" for verb in ("paint", "clean", "draw")
          for thing in ("fence", "kitchen", "garden", "bicycle")]


class SeenRisk(L.Callback):
    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()})


@pytest.fixture(scope="module")
def tiny_probe(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return fit_probe(model, tokenizer, HARMFUL, BENIGN, layers=[0, 1], pooling="mean", calibration_fraction=0.0, epochs=50)


def fit(model_dir, callbacks, *, max_epochs=1, **module_kwargs):
    L.seed_everything(0)
    module = SafeFineTuning(str(model_dir), **module_kwargs)
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(model_dir), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return module, data


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_probe_risk_reads_the_lora_base_and_hooks_are_gone_after_fit(tiny_model_dir, tiny_probe, gradient_checkpointing):
    seen = SeenRisk()
    callback = ActivationRiskCallback(tiny_probe, source="reference")
    module, data = fit(tiny_model_dir, [callback, seen], lora=LoraSettings(r=4, dropout=0.0),
                       gradient_checkpointing=gradient_checkpointing)
    # The batch risk is the probe's score on the frozen base (the reference), for every example.
    base = load_causal_lm(str(tiny_model_dir))
    for batch in seen.batches:
        expected = tiny_probe.score(base, batch["input_ids"], batch["attention_mask"], batch["prompt_length"])
        torch.testing.assert_close(batch["risk"], expected, rtol=1e-4, atol=1e-5)
    assert callback.scored == len(data.train_ids)  # one prompt forward per example
    for layer in find_decoder_layers(module.policy):
        assert not layer._forward_hooks, "hooks must be removed in teardown"


def test_probe_for_another_model_is_refused_at_fit_start(tiny_model_dir, tiny_probe, tmp_path):
    build_tiny_llama(seed=1).save_pretrained(tmp_path / "other")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "other")
    with pytest.raises(ProbeMismatchError) as error:
        fit(tmp_path / "other", [ActivationRiskCallback(tiny_probe)], reference="model_copy")
    assert "\n" not in str(error.value)


class PlainModule(L.LightningModule):
    """A user's own module around an HF model: reads batch["risk"] and nothing of ours."""

    def __init__(self, model_dir) -> None:
        super().__init__()
        self.model = load_causal_lm(str(model_dir))
        self.risks: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.risks.append(batch["risk"].clone())
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_probe_callback_drops_into_a_plain_lightning_module(tiny_model_dir, tiny_probe):
    module = PlainModule(tiny_model_dir)
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[ActivationRiskCallback(tiny_probe, source="policy")])
    trainer.fit(module, datamodule=data)
    assert len(module.risks) == 2 and all(((r >= 0) & (r <= 1)).all() for r in module.risks)


def test_judge_is_called_once_per_unique_example_over_three_epochs(tiny_model_dir):
    judge = RubricJudge(str(tiny_model_dir), batch_size=8, rubric=SHORT_RUBRIC)
    seen = SeenRisk()
    _, data = fit(tiny_model_dir, [JudgeRiskCallback(judge), seen], max_epochs=3, reference="model_copy")
    assert judge.calls == len(set(data.train_ids)) == 24
    assert len(seen.batches) == 18 and judge.failures == 0


class FailingJudge(RubricJudge):
    def _score_batch(self, prompts, responses):
        raise TimeoutError("the judge server did not answer")


def test_a_failing_judge_fails_closed_with_risk_one(tiny_model_dir):
    judge = FailingJudge(str(tiny_model_dir), rubric=SHORT_RUBRIC)
    seen = SeenRisk()
    fit(tiny_model_dir, [JudgeRiskCallback(judge), seen], reference="model_copy")
    assert all(torch.all(batch["risk"] == 1.0) for batch in seen.batches)
    assert judge.failures == 24


def test_split_conversation_reads_the_request_and_the_first_answer():
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "how do I pick a lock?"},
        {"role": "assistant", "content": "I can't help with that."},
        {"role": "user", "content": "please"},
        {"role": "assistant", "content": "no"},
    ]
    assert split_conversation(messages) == ("hi\n\nhow do I pick a lock?", "I can't help with that.")


def test_the_default_cache_identity_changes_with_the_estimator_settings():
    """Two instances with the same settings share a cache; other settings (or another class) do not."""
    from lightning_safety.risk.base import RiskEstimator

    class Keyword(RiskEstimator):
        cacheable = True

        def __init__(self, word: str, weight: float = 1.0) -> None:
            self.word, self.weight = word, weight

        def __call__(self, batch, model=None):
            return torch.zeros(len(batch["input_ids"]))

    first, same, other_word, other_weight = Keyword("bomb"), Keyword("bomb"), Keyword("knife"), Keyword("bomb", 0.5)
    assert first.namespace == same.namespace and first.namespace.startswith("Keyword:")
    assert len({first.namespace, other_word.namespace, other_weight.namespace}) == 3
    first.failures = 3  # a counter that changes while it runs is not a setting
    assert first.namespace == same.namespace
