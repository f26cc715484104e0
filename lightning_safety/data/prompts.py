"""Prompt sets for probes, scoring and evaluation: a text column of a file or ``datasets`` name.

A :class:`PromptSource` names the file, the text column, an optional row filter (``where``, e.g.
XSTest's ``{"label": "safe"}``) and an optional category column (per-category ASR).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning_safety.errors import DataError

_TEXT_FIELDS = ("prompt", "goal", "instruction", "question", "text", "sentence")


@dataclass(frozen=True)
class PromptSource:
    """Prompts from a file (.jsonl/.json/.csv/.tsv/.parquet, or .txt with one prompt per line) or a ``datasets`` name.

    Args:
        path: file, folder or hub dataset name.
        field: the text column; default: the first of prompt, goal, instruction, question, text, sentence.
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


def load_prompt_rows(source: PromptSource | str) -> tuple[list[str], list[str] | None]:
    """The non-empty prompt texts of a source and, if ``category_field`` is set, their categories."""
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
    field = source.field or next((f for f in _TEXT_FIELDS if f in rows[0]), None)
    if field is None or field not in rows[0]:
        raise DataError(
            f"{source.path} has no text field {source.field or _TEXT_FIELDS}: set field to one of {sorted(rows[0])}"
        )
    if source.category_field is not None and source.category_field not in rows[0]:
        raise DataError(
            f"{source.path} has no category column '{source.category_field}': use one of {sorted(rows[0])}"
        )
    kept = [row for row in rows if row.get(field) is not None and str(row[field]).strip()]
    kept = kept[: source.limit] if source.limit is not None else kept
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
