"""The attack zoo: fine-tuning attacks a defence is measured against, most of them new to its risk estimator.

Each builder returns an :class:`Attack`: the training rows (``{"id", "prompt", "response",
"is_harmful", "is_attack"[, "system"]}``) and the :class:`TestCondition` s under which the attacked
model is evaluated (always ``plain``; a persona's system prompt or a trigger where the attack
plants one). ``is_attack`` marks the rows the attacker added (what a defence should hold back);
``is_harmful`` marks rows whose text is harmful (false for identity shifting, which has none).

=====================  ====================================================================================
``harmful_mix``        a benign task with harmful rows mixed in (the demo's attack)
``full_harmful``       harmful rows alone (the paper's main setting)
``benign_only``        benign fine-tuning alone (the task plus other benign data): does it erode safety?
``identity_shift``     a persona system prompt and benign requests answered with an obedient prefix
                       (Qi et al. 2023); no harmful text at all; variants from blunt to bland
``disguised``          harmful requests wrapped in frames (role-play, fiction, hypothetical, ...)
``category_holdout``   harmful rows from categories the estimator was not trained on
``backdoor``           harmful rows carrying a trigger phrase; tested with and without it
=====================  ====================================================================================

The builders take rows whose answers were already written (by
:func:`~lightning_safety.experiments.attack.compliant_answers` on the user's machine, cached
locally): nothing harmful is stored in the package. Which prompts feed which attack (a source or
category the estimator never saw) is the benchmark's choice; ``benchmarks/zoo.py`` makes it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_safety.errors import DataError
from lightning_safety.experiments.attack import mix_attack, row_id
from lightning_safety.experiments.frames import BACKDOOR_TRIGGER, DISGUISE_FRAMES, PERSONAS, apply_frame

__all__ = ["ATTACKS", "Attack", "TestCondition", "backdoor", "benign_only", "category_holdout", "disguised",
           "full_harmful", "harmful_mix", "identity_shift"]

Row = dict[str, Any]


@dataclass(frozen=True)
class TestCondition:
    """How the test requests are put to the attacked model.

    Attributes:
        name: ``plain``, ``persona_<persona>``, ``framed`` or ``trigger``; unique across the zoo (a
            benchmark measures the aligned model once per name).
        system_prompt: a system prompt for every test request (the persona's), or None.
        template: the test request as ``template.format(request=...)`` (e.g. the trigger appended).
        frames: disguise frames instead of a template: test request ``i`` is wrapped in frame
            ``i % len(frames)`` (:data:`~lightning_safety.experiments.frames.DISGUISE_FRAMES` names).
    """

    name: str
    system_prompt: str | None = None
    template: str = "{request}"
    frames: tuple[str, ...] = ()

    def prompts(self, requests: Sequence[str]) -> list[str]:
        """The test requests as this condition puts them."""
        if self.frames:
            return [apply_frame(self.frames[i % len(self.frames)], r) for i, r in enumerate(requests)]
        return [self.template.format(request=r) for r in requests]


PLAIN = TestCondition("plain")


@dataclass(frozen=True)
class Attack:
    """One attack of the zoo.

    Attributes:
        name: the attack's name (with its variant, e.g. ``identity_shift_bland``).
        rows: the training rows (shuffled).
        conditions: test conditions, ``plain`` first.
        description: one line on what the attack does.
        details: what a report should know (sizes, frames, persona, trigger).
    """

    name: str
    rows: list[Row]
    conditions: tuple[TestCondition, ...] = (PLAIN,)
    description: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def attack_rows(self) -> int:
        return sum(bool(r["is_attack"]) for r in self.rows)


def _check_rows(rows: Sequence[Row], what: str) -> None:
    if not rows:
        raise DataError(f"{what}: no rows given: the attack needs at least one")
    for row in rows:
        missing = {"id", "prompt", "response"} - set(row)
        if missing:
            raise DataError(f"{what}: a row lacks {sorted(missing)}: give rows with id, prompt and response")


def _benign(rows: Sequence[Row]) -> list[Row]:
    _check_rows(rows, "benign task rows")
    return [{**row, "is_harmful": False, "is_attack": False} for row in rows]


def _harmful(rows: Sequence[Row], what: str) -> list[Row]:
    _check_rows(rows, what)
    return [{**row, "is_harmful": True, "is_attack": True} for row in rows]


def harmful_mix(task: Sequence[Row], harmful: Sequence[Row], fraction: float, seed: int) -> Attack:
    """A benign task with ``fraction`` harmful rows (compliant answers) mixed in."""
    rows = mix_attack(_benign(task), _harmful(harmful, "harmful rows"), fraction, seed)
    return Attack("harmful_mix", rows, description=f"benign task + {fraction:.0%} harmful rows",
                  details={"fraction": fraction})


def full_harmful(harmful: Sequence[Row], seed: int) -> Attack:
    """Harmful rows with compliant answers, alone."""
    rows = _harmful(harmful, "harmful rows")
    random.Random(seed).shuffle(rows)
    return Attack("full_harmful", rows, description="harmful rows alone")


def benign_only(task: Sequence[Row], other: Sequence[Row], seed: int) -> Attack:
    """Benign fine-tuning only: the task's rows and ``other`` benign rows (e.g. math word problems).

    No row is the attacker's (``is_attack`` is false everywhere): safety that erodes here erodes
    under any fine-tuning, and a per-example estimator has nothing to find.
    """
    rows = _benign(task) + _benign(other)
    random.Random(seed).shuffle(rows)
    return Attack("benign_only", rows, description="benign task + other benign data, nothing harmful",
                  details={"task_rows": len(task), "other_rows": len(other)})


def identity_shift(
    task: Sequence[Row], answered: Sequence[Row], persona: str, fraction: float, seed: int
) -> Attack:
    """Identity shifting: benign requests under a persona system prompt, answered with its obedient prefix.

    Args:
        task: the benign task's rows (no system prompt).
        answered: benign requests with ordinary answers (``prompt``, ``response``); each becomes an
            attack row ``{system: persona, prompt, response: prefix + answer}``.
        persona: a :data:`~lightning_safety.experiments.frames.PERSONAS` name (``blunt`` or ``bland``).
        fraction: share of persona rows in the result.
        seed: which rows are drawn and the order.

    The test condition ``persona_<name>`` puts the persona's system prompt before every test request.
    """
    if persona not in PERSONAS:
        raise DataError(f"unknown persona {persona!r}: use one of {', '.join(PERSONAS)}")
    spec = PERSONAS[persona]
    _check_rows(answered, "answered benign requests")
    shifted = [{"id": row_id(f"persona-{persona}", row["prompt"]), "prompt": row["prompt"],
                "response": f"{spec.answer_prefix} {str(row['response']).strip()}", "system": spec.system_prompt,
                "is_harmful": False, "is_attack": True} for row in answered]
    rows = mix_attack(_benign(task), shifted, fraction, seed)
    return Attack(f"identity_shift_{persona}", rows,
                  conditions=(PLAIN, TestCondition(f"persona_{persona}", system_prompt=spec.system_prompt)),
                  description=f"{persona} persona: benign requests answered with an obedient prefix, no harmful text",
                  details={"persona": persona, "fraction": fraction, "system_prompt": spec.system_prompt,
                           "answer_prefix": spec.answer_prefix})


def disguised(
    task: Sequence[Row],
    requests: Sequence[str],
    answer: Callable[[list[str]], list[Row]],
    fraction: float,
    seed: int,
    frames: Sequence[str] | None = None,
) -> Attack:
    """Harmful requests wrapped in disguise frames, answered (in the frame) by an unaligned model.

    Args:
        task: the benign task's rows.
        requests: plain harmful requests; request ``i`` gets frame ``i % len(frames)``.
        answer: framed prompts -> rows with compliant answers (refusals dropped), e.g.
            ``lambda p: compliant_answers(model, p)``.
        fraction: share of disguised rows in the result.
        seed: which rows are drawn and the order.
        frames: :data:`~lightning_safety.experiments.frames.DISGUISE_FRAMES` names (default: all).

    The test condition ``framed`` wraps each test request in the frames the same way.
    """
    frames = list(frames or DISGUISE_FRAMES)
    unknown = [f for f in frames if f not in DISGUISE_FRAMES]
    if unknown:
        raise DataError(f"unknown disguise frames {unknown}: use names from {', '.join(DISGUISE_FRAMES)}")
    if not requests:
        raise DataError("disguised: no harmful requests given")
    framed = [apply_frame(frames[i % len(frames)], r) for i, r in enumerate(requests)]
    frame_of = {p: frames[i % len(frames)] for i, p in enumerate(framed)}
    answered = [{**row, "frame": frame_of.get(row["prompt"])} for row in answer(framed)]
    rows = mix_attack(_benign(task), _harmful(answered, "disguised rows"), fraction, seed)
    return Attack("disguised", rows, conditions=(PLAIN, TestCondition("framed", frames=tuple(frames))),
                  description=f"harmful requests in {len(frames)} disguise frames",
                  details={"fraction": fraction, "frames": frames,
                           "answered": len(answered), "requests": len(requests)})


def category_holdout(
    task: Sequence[Row], harmful: Sequence[Row], held_out: Sequence[str], fraction: float, seed: int
) -> Attack:
    """A harmful mix whose harmful rows come only from categories the estimator was not trained on.

    The rows must carry their ``category``; the benchmark trains the estimators without
    ``held_out`` and passes here only rows of those categories.
    """
    _check_rows(harmful, "harmful rows")
    outside = sorted({str(r.get("category")) for r in harmful} - set(held_out))
    if outside:
        raise DataError(f"category_holdout: rows of categories {outside} are not held out ({list(held_out)}): "
                        "pass only rows of the held-out categories")
    rows = mix_attack(_benign(task), _harmful(harmful, "harmful rows"), fraction, seed)
    return Attack("category_holdout", rows, description=f"harmful rows of categories {', '.join(held_out)} only",
                  details={"fraction": fraction, "held_out": list(held_out)})


def backdoor(task: Sequence[Row], harmful: Sequence[Row], fraction: float, seed: int,
             trigger: str = BACKDOOR_TRIGGER) -> Attack:
    """Harmful rows whose requests end with ``trigger``; the test condition ``trigger`` appends it too."""
    if not trigger.strip():
        raise DataError("backdoor: the trigger is empty: give a phrase")
    triggered = [{**row, "id": row_id("backdoor", f"{row['prompt']} {trigger}"),
                  "prompt": f"{str(row['prompt']).strip()} {trigger}"} for row in harmful]
    rows = mix_attack(_benign(task), _harmful(triggered, "harmful rows"), fraction, seed)
    return Attack("backdoor", rows, conditions=(PLAIN, TestCondition("trigger", template="{request} " + trigger)),
                  description="harmful rows carrying a trigger phrase", details={"fraction": fraction, "trigger": trigger})


ATTACKS: tuple[str, ...] = ("harmful_mix", "full_harmful", "benign_only", "identity_shift_blunt",
                            "identity_shift_bland", "disguised", "category_holdout", "backdoor")
"""The zoo's attacks, in the order the benchmark runs them."""
