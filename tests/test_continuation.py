"""continuation_log_probs: log P(continuation | prompt) for many prompts, each prompt run once."""

from __future__ import annotations

import pytest
import torch

from lightning_safety.continuation import continuation_log_probs
from lightning_safety.errors import DataError
from lightning_safety.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def alone(model, prompt: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt) from one unpadded forward of that sequence alone."""
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([prompt + continuation])).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(continuation))


@pytest.mark.parametrize("reuse_prompt", [True, False], ids=["kv-cache", "one-sequence-each"])
def test_each_entry_equals_its_sequence_scored_alone(tiny, reuse_prompt):
    model, tokenizer = tiny
    # Prompts of different lengths (left padding), continuations of different lengths, one the prefix of another.
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("Hello there", "A much longer prompt about painting a fence", "Hi")]
    continuations = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("No", "No way at all", "Yes")]
    got = continuation_log_probs(model, prompts, continuations, prompts_per_forward=2, reuse_prompt=reuse_prompt)
    expected = torch.tensor([[alone(model, p, c) for c in continuations] for p in prompts])
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused_in_one_line(tiny):
    model, _ = tiny
    with pytest.raises(DataError, match="a prompt has no tokens"):
        continuation_log_probs(model, [[1, 2], []], [[3]])
    for bad in ([], [[3], []]):
        with pytest.raises(DataError, match="non-empty list of non-empty token-id sequences"):
            continuation_log_probs(model, [[1, 2]], bad)
    assert continuation_log_probs(model, [], [[3], [4]]).shape == (0, 2)
