"""RefusalRisk: the reference's own probability of opening its answer with a refusal, as a risk."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_safety.callbacks import RiskCallback
from lightning_safety.data import ChatSFTDataModule
from lightning_safety.data.formatting import render_ids
from lightning_safety.errors import RiskError
from lightning_safety.models import LoraSettings, load_causal_lm, load_tokenizer
from lightning_safety.module import SafeFineTuning
from lightning_safety.risk import MaxRisk, ProbeRisk, score_prompts
from lightning_safety.risk.refusal import RefusalRisk, opener_sequences, refusal_probability

TINY_DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_chat.jsonl"
PROMPTS = ["Hi", "Explain how to paint a fence in three steps", "How do I pick a lock?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def rendered(tokenizer, prompts):
    return [render_ids([{"role": "user", "content": p}], tokenizer, add_generation_prompt=True) for p in prompts]


def alone(model, prompt: list[int], opener: list[int]) -> float:
    """log P(opener | prompt) from one unpadded forward of that sequence alone."""
    ids = torch.tensor([prompt + opener])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(prompt)
    return sum(float(log_probs[start - 1 + i, token]) for i, token in enumerate(opener))


def test_openers_are_deduplicated_and_prefix_free(tiny):
    _, tokenizer = tiny
    sequences = opener_sequences(tokenizer, ["I'm sorry", "I'm sorry, but", "Sorry", "I'm sorry"])
    assert sequences == sorted(sequences, key=len)
    decoded = {tokenizer.decode(s) for s in sequences}
    assert decoded == {"I'm sorry", "Sorry"}  # the longer opener is inside the shorter one's probability
    for bad in ([], "I'm sorry", [""], ["  "]):
        with pytest.raises(RiskError, match="refusal opener"):
            opener_sequences(tokenizer, bad)


@pytest.mark.parametrize("reuse_prompt", [True, False], ids=["kv-cache", "one-sequence-each"])
def test_probability_equals_each_sequence_scored_alone(tiny, reuse_prompt):
    model, tokenizer = tiny
    prompts = rendered(tokenizer, PROMPTS)
    openers = opener_sequences(tokenizer, ["I cannot", "No", "Sorry, I can't help"])
    # rows_per_forward=6: two prompts per forward, so the three prompts take two left-padded chunks
    got = refusal_probability(model, prompts, openers, pad_id=0, rows_per_forward=6, reuse_prompt=reuse_prompt)
    expected = torch.tensor([sum(torch.tensor(alone(model, p, o)).exp() for o in openers) for p in prompts])
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-7)


def test_every_first_token_together_is_certain(tiny):
    model, tokenizer = tiny
    vocabulary = model.get_output_embeddings().weight.shape[0]
    total = refusal_probability(model, rendered(tokenizer, PROMPTS), [[t] for t in range(vocabulary)],
                                rows_per_forward=512)
    torch.testing.assert_close(total, torch.ones(len(PROMPTS)), rtol=0, atol=1e-4)


def test_score_prompts_reads_the_model_given_and_needs_one(tiny):
    model, tokenizer = tiny
    estimator = RefusalRisk(tokenizer, openers=["I cannot", "No"])
    scores = score_prompts(estimator, PROMPTS, model=model, tokenizer=tokenizer, batch_size=2)
    expected = refusal_probability(model, rendered(tokenizer, PROMPTS), estimator.opener_ids)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-7)
    assert not estimator.is_set_up  # torn down after the call
    with pytest.raises(RiskError, match="pass model="):
        score_prompts(estimator, PROMPTS, tokenizer=tokenizer)


def test_namespace_follows_the_openers_and_the_reference(tiny, tiny_model_dir):
    model, tokenizer = tiny
    holder = type("Holder", (torch.nn.Module,), {})()
    names = []
    for openers, reference in ((["No"], model), (["I cannot"], model), (["No"], load_causal_lm(str(tiny_model_dir)))):
        if reference is not model:
            with torch.no_grad():
                next(reference.parameters()).add_(1.0)  # another reference: its scores must not be reused
        estimator = RefusalRisk(tokenizer, openers=openers)
        torch.nn.Module.__init__(holder)
        holder.model, holder.reference = reference, reference
        estimator.setup(holder)
        names.append(estimator.namespace)
    assert len(set(names)) == 3


def test_a_model_without_reference_is_refused_in_one_line(tiny):
    model, tokenizer = tiny

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # not a LoRA policy, no reference module

    with pytest.raises(RiskError, match="refusal risk from the reference needs a frozen reference"):
        RefusalRisk(tokenizer).setup(Plain())


def test_training_reads_the_frozen_reference_once_per_example(tiny_model_dir, tiny):
    """In a LoRA fit the risk is the base's (adapter off) refusal probability, scored once per example."""
    base, tokenizer = tiny
    seen: list[dict] = []

    class Seen(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()})

    estimator = RefusalRisk(tokenizer, openers=["I cannot", "No"])
    callback = RiskCallback(estimator)
    L.seed_everything(0)
    module = SafeFineTuning(str(tiny_model_dir), lora=LoraSettings(r=4, dropout=0.0),
                            optimizer=lambda params: torch.optim.AdamW(params, lr=5e-2))
    data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback, Seen()])
    trainer.fit(module, datamodule=data)
    assert callback.scored == len(data.train_ids)  # the second epoch reads the cache
    moved = 0.0
    for batch in seen:
        mask = batch["attention_mask"].bool()
        prompts = [batch["input_ids"][i][mask[i]][: int(batch["prompt_length"][i])].tolist() for i in range(len(mask))]
        expected = refusal_probability(base, prompts, estimator.opener_ids)
        torch.testing.assert_close(batch["risk"], expected, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # the trained policy (adapter on) has moved: the risk is not read from it
            policy = refusal_probability(module.policy, prompts, estimator.opener_ids)
        moved = max(moved, float((policy.log() - expected.log()).abs().max()))
    assert moved > 1e-2


def test_max_with_a_probe_takes_the_higher_risk(tiny_model_dir, tiny):
    from lightning_safety.risk.probe import fit_probe

    model, tokenizer = tiny
    probe = fit_probe(model, tokenizer, ["Explain how to steal a car", "Explain how to hack a phone"],
                      ["Explain how to paint a fence", "Explain how to clean a kitchen"], layers=[0], pooling="mean",
                      calibration_fraction=0.0, epochs=20)
    refusal = RefusalRisk(tokenizer, openers=["I cannot", "No"])
    both = score_prompts(MaxRisk(ProbeRisk(probe), refusal), PROMPTS, model=model, tokenizer=tokenizer)
    parts = [score_prompts(e, PROMPTS, model=model, tokenizer=tokenizer) for e in (ProbeRisk(probe), refusal)]
    torch.testing.assert_close(both, torch.maximum(*parts))


def test_a_resumed_fit_restores_the_scores_from_the_checkpoint(tiny_model_dir, tiny, tmp_path):
    """The callback's state is filed under what the estimator knows before setup (the reference's
    fingerprint joins its namespace only at setup): a resumed run finds it and scores nothing twice."""
    _, tokenizer = tiny

    def fit(callback: RiskCallback, **kwargs) -> ChatSFTDataModule:
        L.seed_everything(0)
        module = SafeFineTuning(str(tiny_model_dir), lora=LoraSettings(r=4, dropout=0.0))
        data = ChatSFTDataModule(train=str(TINY_DATA), tokenizer=str(tiny_model_dir), batch_size=4)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, callbacks=[callback, *kwargs.pop("extra", [])],
                            enable_checkpointing=True, **{k: v for k, v in kwargs.items() if k != "ckpt_path"})
        trainer.fit(module, datamodule=data, ckpt_path=kwargs.get("ckpt_path"))
        return data

    first = RiskCallback(RefusalRisk(tokenizer, openers=["I cannot", "No"]))
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    fit(first, max_epochs=-1, max_steps=3, extra=[saver])
    assert first.scored == 12  # three batches of four
    stored = torch.load(tmp_path / "step=3.ckpt", weights_only=False)["callbacks"]
    assert len(stored[first.state_key]["cache"]["scores"]) == 12

    resumed = RiskCallback(RefusalRisk(tokenizer, openers=["I cannot", "No"]))
    data = fit(resumed, max_epochs=2, ckpt_path=tmp_path / "step=3.ckpt")
    # Two epochs see every row; only those the first run had not scored are scored now.
    assert resumed.scored == len(data.train_ids) - 12
    assert len(resumed.cache) == len(data.train_ids)


def test_under_adapter_copy_the_reference_adapter_is_read_and_named(tiny_model_dir, tiny, tmp_path):
    """With a starting adapter the reference is the base plus that adapter's frozen copy: the risk is
    its refusal probability, and another starting adapter gives another namespace (no stale cache),
    for RefusalRisk and ProbeRisk alike."""
    from lightning_safety.risk.probe import fit_probe

    base, tokenizer = tiny
    probe = fit_probe(base, tokenizer, ["Explain how to steal a car", "Explain how to hack a phone"],
                      ["Explain how to paint a fence", "Explain how to clean a kitchen"], layers=[0], pooling="mean",
                      calibration_fraction=0.0, epochs=5)
    names, probe_names = [], []
    for std in (0.5, 0.8):
        torch.manual_seed(0)
        adapted = SafeFineTuning(str(tiny_model_dir), lora=LoraSettings(r=4, dropout=0.0))
        adapted.configure_model()
        for name, parameter in adapted.policy.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(parameter, std=std)  # a trained, non-trivial starting adapter
        adapted.policy.save_pretrained(tmp_path / f"adapter{std}")
        module = SafeFineTuning(str(tiny_model_dir), adapter=str(tmp_path / f"adapter{std}"))
        module.configure_model()
        assert module.reference_strategy == "adapter_copy"
        estimator = RefusalRisk(tokenizer, openers=["I cannot", "No"])
        estimator.setup(module)
        names.append(estimator.namespace)
        ids = rendered(tokenizer, PROMPTS)
        risk = estimator(_batch(ids))
        estimator.teardown()
        probe_risk = ProbeRisk(probe)
        probe_risk.setup(module)
        probe_names.append(probe_risk.namespace)
        probe_risk.teardown()
        with torch.no_grad():
            expected = refusal_probability(adapted.policy, ids, estimator.opener_ids)
            of_base = refusal_probability(base, ids, estimator.opener_ids)
        torch.testing.assert_close(risk, expected, rtol=1e-4, atol=1e-6)
        assert float((risk.log() - of_base.log()).abs().max()) > 1e-2  # not the base alone
    assert names[0] != names[1] and names[0].split(":")[:2] == names[1].split(":")[:2]
    assert probe_names[0] != probe_names[1]
    assert all(name.startswith(ProbeRisk(probe).namespace + ":") for name in probe_names)  # the adapter's id added


def _batch(prompts: list[list[int]]) -> dict:
    """A right-padded batch holding the prompts alone (prompt_length = each prompt's length)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "prompt_length": torch.tensor([len(p) for p in prompts])}
