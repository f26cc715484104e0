"""Prompt sets for probes, scoring and evaluation: a text column of a file or ``datasets`` name.

A :class:`PromptSource` names the file, the text column, an optional row filter (``where``, e.g.
XSTest's ``{"label": "safe"}``) and an optional category column (per-category ASR).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_safety.errors import DataError

TEXT_FIELDS = ("prompt", "goal", "instruction", "question", "text", "sentence")
"""The text columns a prompt source reads when it names none, in this order."""


@dataclass(frozen=True)
class PromptSource:
    """Prompts from a file (.jsonl/.json/.csv/.tsv/.parquet, or .txt with one prompt per line) or a ``datasets`` name.

    Args:
        path: file, folder or hub dataset name.
        field: the text column; default: the first of prompt, goal, instruction, question, text, sentence
            (names compared without case).
        where: keep rows whose columns equal these values (e.g. ``{"label": "unsafe"}``).
        split: split of a hub dataset.
        name: configuration of a hub dataset.
        limit: keep the first ``limit`` prompts (after filtering).
        category_field: column holding each prompt's category (reports break results down by it).
    """

    path: str
    field: str | None = None
    where: dict[str, str] | None = None
    split: str = "train"
    name: str | None = None
    limit: int | None = None
    category_field: str | None = None


def read_prompt_file(source: PromptSource | str) -> list[dict[str, Any]]:
    """Every row of a source (a ``.txt`` file: one row ``{"prompt": line}`` per non-blank line), filtered
    by ``where``; ``limit`` is applied later, to the rows that hold a prompt."""
    from lightning_safety.data.sources import load_records

    if isinstance(source, str):
        source = PromptSource(source)
    if source.limit is not None and int(source.limit) < 1:
        raise DataError(f"limit={source.limit} for {source.path} is invalid: use a positive integer or leave it out")
    if Path(source.path).suffix.lower() == ".txt" and Path(source.path).is_file():
        rows = _text_lines(Path(source.path))
    else:
        rows = load_records(source.path, split=source.split, name=source.name)
    if source.where:
        rows = [row for row in rows if all(str(row.get(k)) == str(v) for k, v in source.where.items())]
    if not rows:
        raise DataError(f"no rows in {source.path} (after the filter {source.where}): check the path and the filter")
    return rows


def prompt_table(
    source: PromptSource | str, rows: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """The rows of a source that hold a non-empty prompt (at most ``limit``), and the name of the text field.

    Args:
        source: the prompt source.
        rows: its rows, if :func:`read_prompt_file` has read them already.
    """
    if isinstance(source, str):
        source = PromptSource(source)
    rows = read_prompt_file(source) if rows is None else rows
    field = source.field or default_text_field(rows[0])
    if field is None or field not in rows[0]:
        raise DataError(
            f"{source.path} has no text field {source.field or TEXT_FIELDS}: set field to one of {sorted(rows[0])}"
        )
    if source.category_field is not None and source.category_field not in rows[0]:
        raise DataError(
            f"{source.path} has no category column '{source.category_field}': use one of {sorted(rows[0])}"
        )
    kept = [row for row in rows if row.get(field) is not None and str(row[field]).strip()]
    return (kept[: source.limit] if source.limit is not None else kept), field


def default_text_field(row: dict[str, Any]) -> str | None:
    """The column of ``row`` a source without ``field`` reads: the first of :data:`TEXT_FIELDS` it has, its
    name compared without case (``Goal`` is AdvBench's ``goal``); None when it has none."""
    by_lower: dict[str, Any] = {}
    for column in row:
        by_lower.setdefault(str(column).lower(), column)
    return next((by_lower[name] for name in TEXT_FIELDS if name in by_lower), None)


def load_prompt_rows(source: PromptSource | str) -> tuple[list[str], list[str] | None]:
    """The non-empty prompt texts of a source and, if ``category_field`` is set, their categories."""
    if isinstance(source, str):
        source = PromptSource(source)
    kept, field = prompt_table(source)
    prompts = [str(row[field]).strip() for row in kept]
    if source.category_field is None:
        return prompts, None
    return prompts, [str(row.get(source.category_field)) for row in kept]


def _text_lines(path: Path) -> list[dict[str, str]]:
    """A ``.txt`` file read as one prompt per non-blank line (field ``prompt``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: save it as UTF-8 (one prompt per line)") from None
    return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]


def load_prompts(source: PromptSource | str) -> list[str]:
    """The non-empty prompt texts of a source."""
    return load_prompt_rows(source)[0]
