"""Refusal anchors: the reference's own refusals, plain and wrapped, and nothing it answered."""

from __future__ import annotations

import pytest

from lightning_safety.anchors import refusal_anchors
from lightning_safety.demo_data import add_wrapped_copies, load_demo_prompts
from lightning_safety.errors import DataError
from lightning_safety.evaluation.generation import GenerationSettings
from lightning_safety.models import load_causal_lm, load_tokenizer

GENERATION = GenerationSettings(max_new_tokens=4)


class EveryOther:
    """A refusal detector that takes every other response it sees for a refusal (the tiny model refuses nothing)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def is_refusal(self, response: str) -> bool:
        self.seen.append(response)
        return len(self.seen) % 2 == 0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_anchors_keep_only_refusals_plain_first_then_wrapped(tiny):
    prompts = load_demo_prompts("harmful")[:12]
    detector = EveryOther()
    rows = refusal_anchors(*tiny, prompts, count=3, generation=GENERATION, detector=detector)
    assert len(rows) == 6 and all(row["anchor"] for row in rows)
    plain, wrapped = rows[:3], rows[3:]
    # Every other request was "answered": the anchors are the 2nd, 4th, 6th of each kind, never the others.
    assert [r["prompt"] for r in plain] == [prompts[1], prompts[3], prompts[5]]
    copies = add_wrapped_copies(prompts)[len(prompts):]
    assert [r["prompt"] for r in wrapped] == [copies[1], copies[3], copies[5]]
    assert len({r["id"] for r in rows}) == 6
    # The response is the model's own greedy answer to the request.
    again = refusal_anchors(*tiny, prompts, count=3, generation=GENERATION, detector=EveryOther())
    assert [r["response"] for r in again] == [r["response"] for r in rows]


def test_plain_only_and_too_few_refusals_fail_in_one_line(tiny):
    prompts = load_demo_prompts("harmful")[:6]
    rows = refusal_anchors(*tiny, prompts, count=2, wrapped=False, generation=GENERATION, detector=EveryOther())
    assert [r["prompt"] for r in rows] == [prompts[1], prompts[3]]
    # The tiny random model refuses nothing under the default keyword detector: fail closed, no partial anchors.
    with pytest.raises(DataError, match=r"refused only 0 of 6 plain requests.*lower count"):
        refusal_anchors(*tiny, prompts, count=2, generation=GENERATION)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="count="):
            refusal_anchors(*tiny, prompts, count=bad)
    with pytest.raises(DataError, match="no prompts"):
        refusal_anchors(*tiny, ["", "  "], count=1)
