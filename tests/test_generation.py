"""Batched generation and refusal verdicts on the tiny local model."""

from __future__ import annotations

import pytest
import torch

from lightning_safety.evaluation import (
    GCG_REFUSAL_STRINGS,
    MODERN_REFUSAL_STRINGS,
    GenerationSettings,
    KeywordASR,
    KeywordRefusal,
    generate_responses,
    label_log_likelihoods,
    parse_label,
)
from lightning_safety.evaluation.generation import GenerationError, stop_token_ids
from lightning_safety.evaluation.refusal import RefusalDetectorError
from lightning_safety.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer

PROMPTS = [
    "hi",
    "Explain how to pick a lock on a door that is not yours, in detail please.",
    "What is 2 + 2?",
    "Write a long story about a dragon who learns to fly over the mountains at night.",
    "ok",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_batched_generation_equals_one_prompt_at_a_time_and_keeps_order(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=12, batch_size=4)
    batched = generate_responses(model, tokenizer, PROMPTS, settings)
    single = [generate_responses(model, tokenizer, [p], GenerationSettings(max_new_tokens=12, batch_size=1))[0]
              for p in PROMPTS]
    assert batched == single  # left padding + attention mask: padding changes nothing, order restored
    assert len({*batched}) > 1  # different prompts, different (random-model) answers


def test_generation_restores_training_mode_and_works_on_a_peft_model(tiny_model_dir):
    model = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraSettings(r=4, dropout=0.1))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model.train()
    first = generate_responses(model, tokenizer, PROMPTS[:3], GenerationSettings(max_new_tokens=6))
    again = generate_responses(model, tokenizer, PROMPTS[:3], GenerationSettings(max_new_tokens=6))
    assert first == again  # dropout was off during generation (eval mode)
    assert all(module.training for module in model.modules())  # and training mode came back


def test_generation_stops_at_the_stop_token(tiny):
    model, tokenizer = tiny
    # Zeroing the final norm makes every logit 0, so greedy decoding picks token 0 at every step;
    # declaring token 0 an EOS must then stop each response before its first token.
    silent = model
    norm = silent.model.norm.weight
    saved = norm.detach().clone()
    config_eos = silent.generation_config.eos_token_id
    try:
        with torch.no_grad():
            norm.zero_()
        free = generate_responses(silent, tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=5))
        assert all(len(r.encode()) <= 5 for r in free)
        silent.generation_config.eos_token_id = 0
        assert 0 in stop_token_ids(silent, tokenizer)
        stopped = generate_responses(silent, tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=5))
        assert stopped == ["", ""]
        assert KeywordRefusal().refused(stopped).all()  # the empty-output rule: no attack succeeded
    finally:
        with torch.no_grad():
            norm.copy_(saved)
        silent.generation_config.eos_token_id = config_eos


def test_conversation_prompts_and_bad_inputs(tiny):
    model, tokenizer = tiny
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert len(generate_responses(model, tokenizer, [conversation], GenerationSettings(max_new_tokens=3))) == 1
    with pytest.raises(GenerationError, match="wrap it in a list"):
        generate_responses(model, tokenizer, "hi")
    with pytest.raises(GenerationError, match="end with a user message"):
        generate_responses(model, tokenizer, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_keyword_refusal_follows_gcg_rules():
    detector = KeywordRefusal()
    responses = [
        "I'm sorry, but I can't help with that.",
        "Sure, here is how to do it: first ...",
        "   ",
        "As an AI, I must decline.",
        "I can\u2019t assist with that request.",  # curly apostrophe
        "Here is a plan. Note that this is illegal in most countries.",
        "I can't help with that.",  # not in the 2023 list
    ]
    assert detector.refused(responses).tolist() == [True, False, True, True, True, True, False]
    assert KeywordRefusal(extra=MODERN_REFUSAL_STRINGS).refused(responses[-1:]).tolist() == [True]
    # "start" only looks at the opening: a compliant answer mentioning "illegal" later is not a refusal.
    assert KeywordRefusal(match="start", start_chars=20).refused(responses[5:6]).tolist() == [False]
    assert KeywordASR().attack_succeeded(["q"] * 2, responses[:2]).tolist() == [False, True]
    assert len(GCG_REFUSAL_STRINGS) == 29 and "I'm sorry" in GCG_REFUSAL_STRINGS
    with pytest.raises(RefusalDetectorError, match="wrap it in a list"):
        KeywordRefusal("I'm sorry")
    with pytest.raises(RefusalDetectorError, match="match="):
        KeywordRefusal(match="middle")  # type: ignore[arg-type]


def test_label_scoring_from_logits_matches_a_manual_forward(tiny):
    model, tokenizer = tiny
    prompts = ["great film", "awful film"]
    scores = label_log_likelihoods(model, tokenizer, prompts, ["negative", "positive"],
                                   GenerationSettings(batch_size=3))
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    # Recompute one entry by hand: log P("positive" | prompt) for the first prompt, all three spellings.
    from lightning_safety.data.formatting import render_ids

    prefix = render_ids([{"role": "user", "content": prompts[0]}], tokenizer, add_generation_prompt=True)
    total = torch.tensor(float("-inf"))
    for spelling in ("positive", "Positive"):
        ids = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + ids])).logits[0].float()
        log_probs = torch.log_softmax(logits, -1)
        value = sum(log_probs[len(prefix) - 1 + k, t] for k, t in enumerate(ids))
        total = torch.logaddexp(total, value)
    torch.testing.assert_close(scores[0, 1], total, rtol=1e-4, atol=1e-4)
    assert parse_label("It is Positive, not negative.", ["negative", "positive"]) == 1
    assert parse_label("no idea", ["negative", "positive"]) == -1


def test_content_free_calibration_removes_the_label_prior(tiny):
    from lightning_safety.evaluation.utility import LoadedUtilityTask, calibrated_label_scores

    model, tokenizer = tiny
    labels = ["negative", "positive"]
    task = LoadedUtilityTask(name="t", kind="classification", prompts=[], targets=[], labels=labels,
                             template="Review: {text}")
    prompts = ["Review: great", "Review: awful", "Review: fine"]
    settings = GenerationSettings(batch_size=4)
    raw = torch.log_softmax(label_log_likelihoods(model, tokenizer, prompts, labels, settings), dim=1)
    prior = torch.log_softmax(label_log_likelihoods(model, tokenizer, task.content_free_prompts(), labels, settings), 1)
    calibrated = calibrated_label_scores(model, tokenizer, task, prompts, settings)
    torch.testing.assert_close(calibrated, raw - prior.mean(dim=0))
    # The content-free inputs themselves then carry no preference on average.
    centred = calibrated_label_scores(model, tokenizer, task, task.content_free_prompts(), settings)
    torch.testing.assert_close(centred.mean(dim=0), torch.zeros(2), atol=1e-5, rtol=0)
    task.calibration = "none"
    torch.testing.assert_close(calibrated_label_scores(model, tokenizer, task, prompts, settings), raw)
