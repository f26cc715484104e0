"""Small prompt sets written for this project, shipped with the package (see README.md here).

``harmful`` (120 harmful requests, no answers, 12 categories), ``benign`` (120 everyday
instructions), ``borderline`` (96 safe prompts that sound alarming, 8 categories) and
``sentiment`` (240 labelled movie-review snippets, balanced). The demo runs on them with no file
outside the package; the replication benchmark uses ``borderline`` in its alignment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_safety.errors import DataError

DEMO_DATA = Path(__file__).resolve().parent
DEMO_SETS = ("harmful", "benign", "borderline", "sentiment")

__all__ = ["DEMO_DATA", "DEMO_SETS", "demo_data_path", "load_demo_prompts", "load_demo_rows"]


def demo_data_path(name: str) -> Path:
    """The JSONL file of the built-in set ``name``."""
    if name not in DEMO_SETS:
        raise DataError(f"unknown built-in prompt set {name!r}: use one of {', '.join(DEMO_SETS)}")
    return DEMO_DATA / f"{name}.jsonl"


def load_demo_rows(name: str) -> list[dict[str, Any]]:
    """The rows of a built-in set, in file order."""
    with open(demo_data_path(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_demo_prompts(name: str) -> list[str]:
    """The prompts (``sentence`` for ``sentiment``) of a built-in set, in file order."""
    field = "sentence" if name == "sentiment" else "prompt"
    return [row[field] for row in load_demo_rows(name)]
