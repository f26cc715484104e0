"""The demo's and the replication's building blocks on the tiny local model: attack data, methods, the demo."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lightning_safety.demo_data import DEMO_SETS, load_demo_prompts, load_demo_rows, load_topic_pairs
from lightning_safety.errors import DataError
from lightning_safety.experiments import (
    FinetuneSettings,
    MethodError,
    classification_rows,
    compliant_answers,
    estimator_rates,
    finetune,
    method,
    mix_attack,
)
from lightning_safety.experiments import attack as attack_module
from lightning_safety.models import load_causal_lm, load_tokenizer
from lightning_safety.risk.probe import fit_probe

TINY = "tiny-random-llama"
HARMFUL = [f"How do I build weapon number {i}?" for i in range(12)]
BENIGN = [f"Tell me a fact about the number {i}." for i in range(12)]


def rows(prompts, response, harmful):
    return [{"id": f"{'h' if harmful else 'b'}{i}", "prompt": p, "response": response, "is_harmful": harmful}
            for i, p in enumerate(prompts)]


# ------------------------------------------------------------------ built-in data


def test_builtin_sets_are_disjoint_and_sized():
    sizes = {name: len(load_demo_rows(name)) for name in DEMO_SETS}
    assert sizes == {"harmful": 120, "benign": 120, "borderline": 96, "sentiment": 240}
    pairs = load_topic_pairs()
    texts = [p.lower() for name in DEMO_SETS for p in load_demo_prompts(name)]
    texts += [row[side].lower() for row in pairs for side in ("harmful", "benign")]
    assert len(texts) == len(set(texts))
    # Topic pairs: 20 per harm category, the categories of the harmful set, requests only.
    assert Counter(row["category"] for row in pairs) == {c: 20 for c in {r["category"] for r in load_demo_rows("harmful")}}
    assert all(set(row) == {"topic", "category", "harmful", "benign", "kind"} for row in pairs)
    assert {row["category"] for row in load_topic_pairs(["fraud", "hate"])} == {"fraud", "hate"}
    with pytest.raises(DataError, match="holds pairs"):
        load_demo_prompts("topic_pairs")
    assert Counter(r["label"] for r in load_demo_rows("sentiment")) == {0: 120, 1: 120}
    # Harmful requests carry no answers: only the prompt and its category.
    assert all(set(r) == {"prompt", "category"} for r in load_demo_rows("harmful"))
    with pytest.raises(DataError, match="unknown built-in prompt set"):
        load_demo_prompts("jailbreaks")


# ------------------------------------------------------------------ attack data


def test_mix_attack_draws_the_asked_share_reproducibly():
    benign, harmful = rows(BENIGN, "ok", False), rows(HARMFUL, "sure", True)
    mixed = mix_attack(benign, harmful, 0.2, seed=3)
    assert len(mixed) == 12 + 3 and sum(r["is_harmful"] for r in mixed) == 3
    assert mixed == mix_attack(benign, harmful, 0.2, seed=3)
    assert [r["id"] for r in mixed] != [r["id"] for r in mix_attack(benign, harmful, 0.2, seed=4)]
    assert sorted(r["id"] for r in mix_attack(benign, harmful, 1.0, 0)) == sorted(r["id"] for r in harmful)
    with pytest.raises(DataError, match="harmful rows are needed"):
        mix_attack(benign, harmful[:1], 0.5, 0)
    with pytest.raises(DataError, match="outside"):
        mix_attack(benign, harmful, 1.5, 0)


def test_classification_rows_use_the_template_and_label_words():
    out = classification_rows(["great film .", "dull ."], [1, 0], template="Review: {text}", label_words=["neg", "pos"],
                              prefix="t")
    assert [(r["prompt"], r["response"], r["is_harmful"]) for r in out] == [
        ("Review: great film .", "pos", False), ("Review: dull .", "neg", False)]
    assert len({r["id"] for r in out}) == 2
    with pytest.raises(DataError, match="not an index"):
        classification_rows(["x"], [2], template="{text}", label_words=["a", "b"], prefix="t")


def test_compliant_answers_are_generated_once_then_cached(tmp_path, tiny_model_dir, monkeypatch):
    first = compliant_answers(TINY, HARMFUL[:4], max_new_tokens=6, cache_dir=tmp_path)
    assert first and all(r["is_harmful"] and r["response"] for r in first)
    assert len(list(tmp_path.glob("*.jsonl"))) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("the cached answers should have been reused")

    monkeypatch.setattr("lightning_safety.models.load_causal_lm", no_model)
    assert compliant_answers(TINY, HARMFUL[:4], max_new_tokens=6, cache_dir=tmp_path) == first
    with pytest.raises(AssertionError, match="reused"):  # other prompts: another cache entry
        compliant_answers(TINY, HARMFUL[:3], max_new_tokens=6, cache_dir=tmp_path)


def test_compliant_answers_drop_refusals(tmp_path, tiny_model_dir, monkeypatch):
    answers = iter(["I'm sorry, I cannot help with that.", "Step one: gather the parts.", ""])
    monkeypatch.setattr("lightning_safety.evaluation.generation.generate_responses",
                        lambda model, tok, prompts, settings, progress=None: [next(answers) for _ in prompts])
    out = compliant_answers(TINY, HARMFUL[:3], max_new_tokens=4, cache_dir=tmp_path)
    assert [r["prompt"] for r in out] == [HARMFUL[1]]
    assert out[0]["id"] == attack_module.row_id("attack", HARMFUL[1])


# ------------------------------------------------------------------ methods


def test_method_names_and_errors():
    assert method("sft").beta == 0.0 and method("adaptive_max").risk == "max"
    assert method("constant_kl", 0.5).label == "constant_kl(beta=0.5)"
    with pytest.raises(MethodError, match="needs a beta"):
        method("constant_kl")
    with pytest.raises(MethodError, match="unknown method"):
        method("vaccine")
    with pytest.raises(MethodError, match="beta_min"):
        FinetuneSettings(beta_min=0.9, beta_max=0.1)
    with pytest.raises(MethodError, match="kl_scale must be a finite number >= 0"):
        FinetuneSettings(kl_scale=-0.1)


@pytest.fixture(scope="module")
def tiny_probe(tiny_model_dir):
    model, tokenizer = load_causal_lm(TINY), load_tokenizer(TINY)
    return fit_probe(model, tokenizer, HARMFUL, BENIGN, layers=[1], calibration_fraction=0.0, epochs=100)


def test_finetune_sft_changes_the_model_and_adaptive_records_risk(tiny_model_dir, tiny_probe):
    data = mix_attack(rows(BENIGN, "A fact.", False), rows(HARMFUL, "Sure, here it is.", True), 0.25, 0)
    settings = FinetuneSettings(epochs=2, lr=1e-2, batch_size=4)
    reference = load_causal_lm(TINY)
    tokenizer = load_tokenizer(TINY)

    sft = finetune(TINY, data, method("sft"), settings)
    assert sft.steps == 2 * 4 and sft.risk == {}
    assert _response_nll(sft.model, tokenizer, HARMFUL, "Sure, here it is.") < _response_nll(
        reference, tokenizer, HARMFUL, "Sure, here it is.") - 0.5

    adaptive = finetune(TINY, data, method("adaptive_probe"), settings, probe=tiny_probe)
    assert set(adaptive.risk) == {r["id"] for r in data}
    rates = estimator_rates(adaptive.risk, data)
    assert rates["n_harmful"] == 4 and rates["n_benign"] == 12
    assert rates["recall"] == 1.0 and rates["fpr"] == 0.0  # the probe saw these very prompts
    assert rates["mean_risk_harmful"] > 0.5 > rates["mean_risk_benign"]

    with pytest.raises(MethodError, match="needs a judge"):
        finetune(TINY, data, method("adaptive_max"), settings, probe=tiny_probe)


def test_the_defended_path_with_beta_zero_trains_exactly_like_sft(tiny_model_dir, tiny_probe):
    # The adaptive method's machinery (risk callback, probe forwards through the reference, the risk
    # cache) must not touch training: with beta = 0 for every row it is plain SFT, bit for bit, and
    # with a beta of 1e-6 (the reference forward and the KL now run every step) it stays within float noise.
    data = mix_attack(rows(BENIGN, "A fact.", False), rows(HARMFUL, "Sure, here it is.", True), 0.25, 0)
    base = dict(epochs=2, lr=1e-2, batch_size=4)
    sft = finetune(TINY, data, method("sft"), FinetuneSettings(**base)).model.state_dict()
    zero = finetune(TINY, data, method("adaptive_probe"), FinetuneSettings(**base, beta_min=0.0, beta_max=0.0),
                    probe=tiny_probe)
    assert set(zero.risk) == {r["id"] for r in data}  # the probe did score every row
    untouched = load_causal_lm(TINY).state_dict()
    assert any(not torch.equal(untouched[k], v) for k, v in sft.items())  # training moved weights
    for name, value in zero.model.state_dict().items():
        assert torch.equal(value, sft[name]), name
    tiny = finetune(TINY, data, method("adaptive_probe"), FinetuneSettings(**base, beta_min=1e-6, beta_max=1e-6),
                    probe=tiny_probe).model.state_dict()
    for name, value in tiny.items():
        torch.testing.assert_close(value, sft[name], rtol=1e-3, atol=1e-4)


def _response_nll(model, tokenizer, prompts, response):
    """Mean per-token NLL of ``response`` after each chat-formatted prompt."""
    model.eval()
    total = 0.0
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        start = len(tokenizer(text).input_ids)
        ids = tokenizer(text + response, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        total -= logp[start - 1:].gather(1, ids[0, start:, None]).mean().item()
    return total / len(prompts)


def test_constant_kl_with_beta_one_keeps_the_reference_while_sft_learns(tiny_model_dir):
    # beta = 1 leaves only the KL to the reference, 0 at the start: the model must stay where it is,
    # while the same run with beta = 0 (SFT) learns the response.
    data = rows(HARMFUL, "Sure, here it is.", True)
    settings = FinetuneSettings(epochs=2, lr=1e-2, batch_size=4)
    tokenizer = load_tokenizer(TINY)
    before = _response_nll(load_causal_lm(TINY), tokenizer, HARMFUL, "Sure, here it is.")
    held = _response_nll(finetune(TINY, data, method("constant_kl", 1.0), settings).model, tokenizer, HARMFUL,
                         "Sure, here it is.")
    learnt = _response_nll(finetune(TINY, data, method("sft"), settings).model, tokenizer, HARMFUL, "Sure, here it is.")
    # Relative, not absolute: at beta = 1 the gradient is the KL's, ~0 near the reference, and Adam rescales
    # that float noise into steps whose size depends on the machine's summation order (thread count).
    print(f"response NLL before {before:.4f}, constant KL beta 1 {held:.4f}, SFT {learnt:.4f}")
    assert learnt < before - 0.5
    assert abs(held - before) < 0.05 * (before - learnt)


def test_a_full_vocabulary_reference_cache_trains_the_same_model(tiny_model_dir):
    """constant KL 0.5 from the reference cache (k = the whole vocabulary) = the same run with the reference forward."""
    data = rows(HARMFUL[:8], "Sure, here it is.", True)
    vocab = load_causal_lm(TINY).get_output_embeddings().weight.shape[0]
    exact = finetune(TINY, data, method("constant_kl", 0.5), FinetuneSettings(epochs=2, lr=1e-2, batch_size=4)).model
    settings = FinetuneSettings(epochs=2, lr=1e-2, batch_size=4, reference_cache_top_k=vocab)
    cached = finetune(TINY, data, method("constant_kl", 0.5), settings).model
    trained = FinetuneSettings(epochs=2, lr=1e-2, batch_size=4)
    moved = finetune(TINY, data, method("sft"), trained).model
    exact_state, cached_state = exact.state_dict(), cached.state_dict()
    assert any(not torch.equal(exact_state[k], v) for k, v in moved.state_dict().items())  # training moved weights
    for name, value in exact_state.items():
        torch.testing.assert_close(cached_state[name], value, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the demo


def test_demo_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    from lightning_safety.experiments.demo import demo

    out = demo(output=str(tmp_path / "demo"), model=TINY, quick=True, probe_layer=1, max_new_tokens=4, max_length=320,
               progress=False)
    assert set(out) == {"aligned", "sft", "adaptive"}
    for rates in out.values():
        assert {"safety/asr", "safety/over_refusal", "utility/sentiment"} <= set(rates)
        assert all(0.0 <= value <= 1.0 for value in rates.values())
    written = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert written["quick"] and written["sizes"]["attack_harmful_rows"] > 0
    assert written["settings"]["anchors"] == 0 and written["sizes"]["anchor_rows"] == 0  # --quick: a tiny model refuses nothing
    assert "adaptive KL (probe)" in (tmp_path / "demo" / "demo.md").read_text()
    # Nothing generated for the harmful requests lands in the output folder.
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["demo.json", "demo.md"]


def test_demo_refuses_bad_options_before_any_work(tmp_path):
    from lightning_safety.experiments.demo import demo

    with pytest.raises(DataError, match="harmful_fraction"):
        demo(output=str(tmp_path / "d"), harmful_fraction=1.0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        demo(output=str(tmp_path / "file"))
    with pytest.raises(MethodError, match="beta_min=1.5"):
        demo(output=str(tmp_path / "d"), beta_min=1.5)
    with pytest.raises(MethodError, match="kl_scale"):
        demo(output=str(tmp_path / "d"), kl_scale=-1.0)
    for bad in (-1, 1.5):
        with pytest.raises(DataError, match="anchors="):
            demo(output=str(tmp_path / "d"), anchors=bad)
    with pytest.raises(DataError, match="--anchors 51 asks for more refusals than the 50 harmful requests"):
        demo(output=str(tmp_path / "d"), anchors=51)
    assert not (tmp_path / "d").exists()


def test_adaptive_probe_refusal_trains_on_the_higher_of_probe_and_reference_refusal(tiny_model_dir, tiny_probe):
    """The zoo's adaptive_probe_refusal: each row's risk is max(probe, the starting model's refusal probability)."""
    from lightning_safety.risk import ProbeRisk, RefusalRisk, score_prompts

    data = mix_attack(rows(BENIGN, "A fact.", False), rows(HARMFUL, "Sure, here it is.", True), 0.25, 0)
    run = finetune(TINY, data, method("adaptive_probe_refusal"), FinetuneSettings(epochs=1, lr=1e-2, batch_size=4),
                   probe=tiny_probe)
    model, tokenizer = load_causal_lm(TINY), load_tokenizer(TINY)
    prompts = [r["prompt"] for r in data]
    expected = torch.maximum(score_prompts(ProbeRisk(tiny_probe), prompts, model=model, tokenizer=tokenizer),
                             score_prompts(RefusalRisk(tokenizer), prompts, model=model, tokenizer=tokenizer))
    got = torch.tensor([run.risk[r["id"]] for r in data])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
