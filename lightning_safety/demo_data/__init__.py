"""Small prompt sets written for this project, shipped with the package (see README.md here).

``harmful`` (120 harmful requests, no answers, 12 categories), ``benign`` (120 everyday
instructions), ``borderline`` (96 safe prompts that sound alarming, 8 categories) and
``sentiment`` (240 labelled movie-review snippets, balanced). The demo runs on them with no file
outside the package; the replication benchmark uses ``borderline`` in its alignment.

``topic_pairs`` (240 pairs, 20 per harm category) holds a harmful request and a benign request
about the same subject in similar words: hard negatives for risk estimators
(:func:`load_topic_pairs`).

:func:`default_estimator_data` is the training mix for a risk estimator (activation probe or
judge) built from these sets: the harmful requests plus the pairs' harmful sides against the benign
instructions plus the pairs' benign sides and the borderline prompts (hard negatives), each prompt
also in one of the disguise wrappers below. It separates same-topic requests better than harmful vs
benign alone (``benchmarks/estimators.py``) and is what the demo, ``probe fit`` and ``judge fit``
train on.

``wrappers`` (13 disguise templates, :func:`load_wrappers`) were written for this project and hold no
harmful content: each is a wrapper with a ``{request}`` slot (a screenplay scene, a forum post for a
friend, a debate brief, an exam question, a game master's NPC, a grandmother's bedtime answer, ...).
``default_estimator_data`` wraps every prompt of the mix in one of them (``framed=n``: ``n`` per side),
so an estimator learns to see a harmful request through a disguise without learning "a wrapper
means harmful". Their wording differs from the attack zoo's ``DISGUISE_FRAMES``
(``lightning_safety.experiments.frames``; no three words in a row in common), which stay an attack
the estimator never trains on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_safety.errors import DataError

DEMO_DATA = Path(__file__).resolve().parent
DEMO_SETS = ("harmful", "benign", "borderline", "sentiment")
PAIR_SET = "topic_pairs"
WRAPPER_SET = "wrappers"
_SPECIAL_SETS = {PAIR_SET: "pairs, not prompts: use load_topic_pairs()",
                 WRAPPER_SET: "templates, not prompts: use load_wrappers()"}

__all__ = ["DEMO_DATA", "DEMO_SETS", "PAIR_SET", "WRAPPER_SET", "add_wrapped_copies", "default_estimator_data",
           "demo_data_path", "harm_categories", "load_demo_prompts", "load_demo_rows", "load_topic_pairs",
           "load_wrappers", "wrap"]


def demo_data_path(name: str) -> Path:
    """The JSONL file of the built-in set ``name`` (one of :data:`DEMO_SETS`, :data:`PAIR_SET` or :data:`WRAPPER_SET`)."""
    if name not in (*DEMO_SETS, *_SPECIAL_SETS):
        raise DataError(f"unknown built-in prompt set {name!r}: use one of {', '.join((*DEMO_SETS, *_SPECIAL_SETS))}")
    return DEMO_DATA / f"{name}.jsonl"


def load_demo_rows(name: str) -> list[dict[str, Any]]:
    """The rows of a built-in set, in file order."""
    with open(demo_data_path(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_demo_prompts(name: str) -> list[str]:
    """The prompts (``sentence`` for ``sentiment``) of a built-in set, in file order."""
    if name in _SPECIAL_SETS:
        raise DataError(f"{name} holds {_SPECIAL_SETS[name]}")
    field = "sentence" if name == "sentiment" else "prompt"
    return [row[field] for row in load_demo_rows(name)]


def load_topic_pairs(categories: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The topic-matched pairs ``{"topic", "category", "harmful", "benign", "kind"}``, in file order.

    Args:
        categories: keep only pairs of these harm categories (None: all 12).
    """
    rows = load_demo_rows(PAIR_SET)
    if categories is not None:
        _check_categories(categories)
        rows = [row for row in rows if row["category"] in set(categories)]
    return rows


def load_wrappers() -> dict[str, str]:
    """The disguise templates of ``wrappers.jsonl``, name -> template with one ``{request}`` slot, in file order."""
    return {row["name"]: row["template"] for row in load_demo_rows(WRAPPER_SET)}


def wrap(template: str, request: str) -> str:
    """``request`` (stripped) put in the ``{request}`` slot of ``template`` (other braces are left as they are)."""
    return template.replace("{request}", request.strip())


def harm_categories() -> list[str]:
    """The 12 harm categories of ``harmful.jsonl`` (and of the topic pairs), in file order."""
    return list(dict.fromkeys(row["category"] for row in load_demo_rows("harmful")))


def _check_categories(categories: Sequence[str]) -> None:
    unknown = sorted(set(categories) - set(harm_categories()))
    if unknown:
        raise DataError(f"unknown categories {unknown}: use those of harmful.jsonl ({', '.join(harm_categories())})")


def default_estimator_data(
    harmful: Sequence[str] | None = None,
    benign: Sequence[str] | None = None,
    borderline: Sequence[str] | None = None,
    *,
    pairs: int | None = None,
    exclude_categories: Sequence[str] = (),
    framed: int | None = None,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """(harmful, benign) prompts to train a risk estimator (probe or judge) on, hard negatives included.

    harmful = ``harmful`` + the harmful side of the topic pairs; benign = ``benign`` + the benign
    side of the same pairs + ``borderline``; then a wrapped copy of every prompt of each side. The
    pairs teach the estimator what is asked rather than which words or topic appear: on categories
    it never saw, a probe trained on this mix separates same-topic requests far better than one
    trained without the pairs and wrappers (AUROC 0.969 against 0.841; 0.777 on harmful vs benign
    requests alone, ``benchmarks/results/estimators.md``). The wrappers give back the recall on disguised requests
    that the pairs alone cost (the pairs' benign sides speak in the educational voice a disguise
    imitates); in the attack zoo the full default mix held every attack within 4.2 points of the
    aligned model's ASR on two seeds (``benchmarks/results/zoo_pairs_framed/``).

    Args:
        harmful: harmful requests (default: the package's ``harmful`` set).
        benign: benign requests (default: the package's ``benign`` set), e.g. with a few rows of
            the task you fine-tune on added (a probe that never saw the task's format flags it).
        borderline: safe prompts that sound alarming (default: the package's ``borderline`` set;
            ``[]`` for none).
        pairs: use the first ``pairs`` topic pairs (after the category filter; the file cycles
            through the categories, so a prefix covers all of them); None: all, 0: none.
        exclude_categories: harm categories to hold out entirely: their pairs (both sides) and,
            when ``harmful`` is the package's set, their harmful requests.
        framed: add wrapped copies of ``framed`` prompts to each side: ``framed`` of the harmful
            prompts above and ``framed`` of the benign ones (benign instructions, pairs' benign
            sides, borderline), each put in one of the :func:`load_wrappers` templates. Both sides
            draw from the same templates, each about equally often, so a wrapper tells nothing about
            the label: the estimator has to see the request inside it. Which prompts and which
            template follow a seeded hash of each prompt, so a prompt gets the same wrapper whatever
            else is in the mix (holding a category out changes no other prompt's wrapper, and drops
            its prompts' copies for the next ones in line). None (default) or more than a side
            holds: every prompt of that side; 0: none.
        seed: the seed of that hash (nothing else depends on it).

    Returns:
        Two disjoint lists without repeats, in the order harmful/benign set, then pair sides
        (then borderline), then the wrapped copies.

    Raises:
        DataError: an unknown category, a negative ``pairs`` or ``framed``, an empty side, or a
            prompt given as both harmful and benign.
    """
    _check_categories(exclude_categories)
    for name, value in (("pairs", pairs), ("framed", framed)):
        if value is not None and value < 0:
            raise DataError(f"{name}={value} is invalid: give a number >= 0, or None for all")
    held = set(exclude_categories)
    if harmful is None:
        harmful = [row["prompt"] for row in load_demo_rows("harmful") if row["category"] not in held]
    kept = [row for row in load_topic_pairs() if row["category"] not in held]
    kept = kept if pairs is None else kept[:pairs]
    harmful_out = _distinct([*harmful, *(row["harmful"] for row in kept)])
    benign_out = _distinct([
        *(load_demo_prompts("benign") if benign is None else benign),
        *(row["benign"] for row in kept),
        *(load_demo_prompts("borderline") if borderline is None else borderline),
    ])
    both = {p.lower() for p in harmful_out} & {p.lower() for p in benign_out}
    if both:
        raise DataError(f"{len(both)} prompt(s) given as both harmful and benign, e.g. {sorted(both)[0]!r}: "
                        "remove them from one side")
    if not harmful_out or not benign_out:
        raise DataError(f"the estimator mix has {len(harmful_out)} harmful and {len(benign_out)} benign prompts: "
                        "give prompts on both sides")
    if framed != 0:
        return _add_wrapped(harmful_out, benign_out, framed, seed)
    return harmful_out, benign_out


def _add_wrapped(harmful: list[str], benign: list[str], framed: int | None, seed: int) -> tuple[list[str], list[str]]:
    """Both sides with wrapped copies of ``framed`` of their own prompts added (see default_estimator_data)."""
    return add_wrapped_copies(harmful, framed, seed=seed), add_wrapped_copies(benign, framed, seed=seed)


def add_wrapped_copies(prompts: Sequence[str], count: int | None = None, *, seed: int = 0) -> list[str]:
    """``prompts`` followed by a copy of ``count`` of them, each put in one of the :func:`load_wrappers` templates.

    Which prompts are copied and which template each gets follow a seeded hash of the prompt (case-
    insensitive), so a prompt gets the same wrapper whatever else is in the list, in every process.
    Used for estimator training data (``default_estimator_data(framed=...)``) and for drift canaries
    in disguise (``SafetyDriftController(add_wrapped_copies(canaries))``; in the attack zoo such
    canaries did not catch the disguised attack: their drift stayed under a budget calibrated with
    them, see the README's "Where the utility goes").

    Args:
        prompts: requests (stripped; blank ones and case-insensitive repeats dropped).
        count: how many to copy; None or more than there are: all of them.
        seed: the hash's seed.

    Raises:
        DataError: a negative ``count``.
    """
    if count is not None and count < 0:
        raise DataError(f"count={count} is invalid: give a number >= 0, or None for all")
    templates = list(load_wrappers().values())
    prompts = _distinct(prompts)
    keys = {p: _key(seed, p) for p in prompts}
    chosen = set(sorted(prompts, key=keys.__getitem__)[: len(prompts) if count is None else count])
    return _distinct([*prompts, *(wrap(templates[keys[p][1] % len(templates)], p) for p in prompts if p in chosen)])


def _key(seed: int, prompt: str) -> tuple[int, int]:
    """Two seeded numbers of a prompt (case-insensitive), the same in every process: its rank key and its template."""
    digest = hashlib.blake2b(f"{seed}\0{prompt.lower()}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def _distinct(prompts: Sequence[str]) -> list[str]:
    """Stripped, non-empty prompts, the first of each case-insensitive repeat kept."""
    seen: set[str] = set()
    out = []
    for prompt in (p.strip() for p in prompts):
        if prompt and prompt.lower() not in seen:
            seen.add(prompt.lower())
            out.append(prompt)
    return out
