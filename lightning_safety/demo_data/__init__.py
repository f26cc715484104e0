"""Small prompt sets written for this project, shipped with the package (see README.md here).

``harmful`` (120 harmful requests, no answers, 12 categories), ``benign`` (120 everyday
instructions), ``borderline`` (96 safe prompts that sound alarming, 8 categories) and
``sentiment`` (240 labelled movie-review snippets, balanced). The demo runs on them with no file
outside the package; the replication benchmark uses ``borderline`` in its alignment.

``topic_pairs`` (240 pairs, 20 per harm category) holds a harmful request and a benign request
about the same subject in similar words: hard negatives for risk estimators
(:func:`load_topic_pairs`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_safety.errors import DataError

DEMO_DATA = Path(__file__).resolve().parent
DEMO_SETS = ("harmful", "benign", "borderline", "sentiment")
PAIR_SET = "topic_pairs"

__all__ = ["DEMO_DATA", "DEMO_SETS", "PAIR_SET", "demo_data_path", "load_demo_prompts", "load_demo_rows",
           "load_topic_pairs"]


def demo_data_path(name: str) -> Path:
    """The JSONL file of the built-in set ``name`` (one of :data:`DEMO_SETS`, or :data:`PAIR_SET`)."""
    if name not in (*DEMO_SETS, PAIR_SET):
        raise DataError(f"unknown built-in prompt set {name!r}: use one of {', '.join((*DEMO_SETS, PAIR_SET))}")
    return DEMO_DATA / f"{name}.jsonl"


def load_demo_rows(name: str) -> list[dict[str, Any]]:
    """The rows of a built-in set, in file order."""
    with open(demo_data_path(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_demo_prompts(name: str) -> list[str]:
    """The prompts (``sentence`` for ``sentiment``) of a built-in set, in file order."""
    if name == PAIR_SET:
        raise DataError(f"{PAIR_SET} holds pairs, not prompts: use load_topic_pairs()")
    field = "sentence" if name == "sentiment" else "prompt"
    return [row[field] for row in load_demo_rows(name)]


def load_topic_pairs(categories: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The topic-matched pairs ``{"topic", "category", "harmful", "benign", "kind"}``, in file order.

    Args:
        categories: keep only pairs of these harm categories (None: all 12).
    """
    rows = load_demo_rows(PAIR_SET)
    if categories is not None:
        unknown = sorted(set(categories) - {row["category"] for row in rows})
        if unknown:
            raise DataError(f"unknown categories {unknown}: use those of harmful.jsonl")
        rows = [row for row in rows if row["category"] in set(categories)]
    return rows
