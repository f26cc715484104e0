"""The disguise wrappers of the estimators' training mix (``default_estimator_data(framed=...)``)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lightning_safety.demo_data import (
    WRAPPER_SET,
    add_wrapped_copies,
    default_estimator_data,
    load_demo_prompts,
    load_demo_rows,
    load_wrappers,
    wrap,
)
from lightning_safety.errors import DataError
from lightning_safety.experiments.frames import DISGUISE_FRAMES


def _words(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z']+", text.lower().replace("{request}", " | "))
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _unwrap(text: str, templates: dict[str, str]) -> tuple[str, str] | None:
    """(template name, request) if ``text`` is a wrapped request, else None."""
    for name, template in templates.items():
        head, tail = template.split("{request}")
        if text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail):
            return name, text[len(head) : len(text) - len(tail)]
    return None


def test_wrappers_are_templates_with_one_slot_and_none_of_the_zoo_frames():
    rows = load_demo_rows(WRAPPER_SET)
    templates = load_wrappers()
    assert 10 <= len(templates) == len(rows) <= 14 and all(set(r) == {"name", "template"} for r in rows)
    assert all(t.count("{request}") == 1 for t in templates.values())
    assert len({t.lower() for t in templates.values()}) == len(templates)
    zoo = set().union(*(_words(frame, 3) for frame in DISGUISE_FRAMES.values()))
    for name, template in templates.items():  # the zoo's frames are the held-out attack: no phrase of them here
        assert not _words(template, 3) & zoo, name
        assert not any(frame.split("{request}")[0].strip().lower() in template.lower() for frame in DISGUISE_FRAMES.values())
    assert wrap("A {request} B", "  ask  ") == "A ask B" and wrap('{"x": "{request}"}', "q") == '{"x": "q"}'
    with pytest.raises(DataError, match="use load_wrappers"):
        load_demo_prompts(WRAPPER_SET)


def test_framed_adds_wrapped_copies_on_both_sides_with_the_same_templates():
    plain_h, plain_b = default_estimator_data(pairs=0, framed=0)
    harmful, benign = default_estimator_data(pairs=0, framed=96)
    assert harmful[: len(plain_h)] == plain_h and benign[: len(plain_b)] == plain_b  # the plain mix comes first
    assert (len(harmful), len(benign)) == (len(plain_h) + 96, len(plain_b) + 96)
    assert not {p.lower() for p in harmful} & {p.lower() for p in benign}
    assert len({p.lower() for p in harmful + benign}) == len(harmful) + len(benign)
    templates = load_wrappers()
    used = {}
    for side, plain, copies in (("harmful", plain_h, harmful[len(plain_h) :]), ("benign", plain_b, benign[len(plain_b) :])):
        unwrapped = [_unwrap(text, templates) for text in copies]
        assert None not in unwrapped
        assert {request for _, request in unwrapped} <= set(plain)  # each copy wraps a prompt of its own side
        assert len({request for _, request in unwrapped}) == 96  # 96 distinct prompts wrapped once each
        used[side] = Counter(name for name, _ in unwrapped)
    assert set(used["harmful"]) == set(used["benign"]) == set(templates)  # every template on both sides
    # None: every prompt of both sides, once; the templates about equally often on each side.
    harmful, benign = default_estimator_data(framed=None)
    plain_h, plain_b = default_estimator_data(framed=0)
    assert (len(harmful), len(benign)) == (2 * len(plain_h), 2 * len(plain_b))
    for copies in (harmful[len(plain_h) :], benign[len(plain_b) :]):
        counts = Counter(_unwrap(text, templates)[0] for text in copies)
        assert set(counts) == set(templates) and max(counts.values()) <= 3 * min(counts.values())
    assert default_estimator_data(pairs=0, framed=10_000) == default_estimator_data(pairs=0, framed=None)
    with pytest.raises(DataError, match="framed=-1"):
        default_estimator_data(framed=-1)


def test_framed_mix_is_seeded_and_stable_when_a_category_is_held_out():
    first = default_estimator_data(framed=120, seed=3)
    assert default_estimator_data(framed=120, seed=3) == first
    assert default_estimator_data(framed=120, seed=4) != first
    assert default_estimator_data(framed=0, seed=4) == default_estimator_data(framed=0)  # the seed only picks wrappers
    assert default_estimator_data(framed=None) == default_estimator_data()  # the default: every prompt wrapped
    # Holding a category out drops its prompts' copies; every other prompt keeps its wrapper.
    held_h, held_b = default_estimator_data(framed=None, exclude_categories=["fraud"])
    full_h, full_b = default_estimator_data(framed=None)
    assert set(held_h) <= set(full_h) and set(held_b) <= set(full_b)
    fraud = {r["prompt"] for r in load_demo_rows("harmful") if r["category"] == "fraud"}
    assert not any(request in text for text in held_h for request in fraud)


def test_wrapped_copies_of_a_list_follow_each_prompt_not_the_list():
    canaries = [r["prompt"] for r in load_demo_rows("harmful")[:20]]
    framed = add_wrapped_copies(canaries)
    assert framed[:20] == canaries and len(framed) == 40
    templates = load_wrappers()
    unwrapped = [_unwrap(text, templates) for text in framed[20:]]
    assert [request for _, request in unwrapped] == canaries  # each request once, in order
    assert len({name for name, _ in unwrapped}) >= 5  # spread over the templates
    # A prompt's wrapper depends on the prompt and the seed alone, not on its neighbours.
    assert add_wrapped_copies(canaries[5:])[15:] == framed[25:]
    assert add_wrapped_copies(canaries, seed=1)[20:] != framed[20:]
    assert add_wrapped_copies([" A ", "a", ""], 0) == ["A"]  # stripped, repeats and blanks dropped
    assert len(add_wrapped_copies(canaries, 7)) == 27
    with pytest.raises(DataError, match="count=-1"):
        add_wrapped_copies(canaries, -1)
