"""Load raw rows from a Python list, a local file or folder, or a ``datasets`` hub name.

Local files (.jsonl, .json, .csv, .tsv, .parquet) are read with the ``datasets`` library into a
temporary cache that is deleted right after (the rows are kept as Python dicts), so nothing
accumulates in the user's ``datasets`` cache and an edited file is never served stale. Hub
datasets use the normal ``datasets`` cache, so a download happens once.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_safety.data.records import FieldMap
from lightning_safety.errors import DataError

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


@dataclass(frozen=True)
class DataSource:
    """Where a data set comes from, and how its fields are named.

    Args:
        path: Local file (.jsonl, .json, .csv, .tsv, .parquet), local folder, or hub dataset name.
        split: Split to read from a hub dataset or folder (files have one split).
        name: Hub dataset configuration name.
        limit: Keep only the first ``limit`` rows.
        fields: Field names of this source (see :class:`FieldMap`).
    """

    path: str
    split: str = "train"
    name: str | None = None
    limit: int | None = None
    fields: FieldMap = FieldMap()


def looks_like_hub_id(source: str) -> bool:
    """``"owner/name"`` or ``"name"`` with no file suffix: something to ask the hub for."""
    return bool(_HUB_ID.match(source)) and Path(source).suffix.lower() not in _FILE_BUILDERS


def is_hub_source(source: Any) -> bool:
    """True for a string that names no local path and looks like a hub dataset id."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    return not Path(source).expanduser().exists() and looks_like_hub_id(str(source))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_file(path: Path) -> list[dict[str, Any]]:
    """Rows of one local file, through ``datasets`` with a throw-away cache."""
    import datasets

    suffix = path.suffix.lower()
    builder = _FILE_BUILDERS.get(suffix)
    if builder is None:
        raise DataError(
            f"unsupported data file type '{suffix or path.name}' ({path}); use .jsonl, .json, .csv, .tsv or .parquet"
        )
    if suffix in (".jsonl", ".json", ".csv", ".tsv") and not path.read_bytes().strip():
        return []  # datasets fails on an empty text file with a bare StopIteration; the caller names it
    # TSV has no quoting convention: a '"' inside a cell is text (e.g. SST-2), so turn CSV quoting off.
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    if suffix == ".jsonl":
        _check_json_lines(path)  # datasets would say only "an error occurred while generating the dataset"
    with tempfile.TemporaryDirectory(prefix="lightning_safety_data_") as cache_dir, _datasets_silenced():
        try:
            dataset = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache_dir, keep_in_memory=True, **options
            )
        except Exception as error:  # datasets raises many types for malformed files
            reason = _first_line(error.__cause__ or error) if "generating the dataset" in str(error) else _first_line(error)
            if "corresponds to no data" in reason:
                raise DataError(f"data file {path} holds no rows (a header alone?): add rows") from None
            raise DataError(f"cannot read {path}: {reason}; check that the file is valid {suffix[1:]}") from None
        return dataset.to_list()


def _check_json_lines(path: Path) -> None:
    """Refuse a JSON Lines file with a line that is not UTF-8 JSON, naming the first such line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                problem = "is not UTF-8 text" if isinstance(error, UnicodeDecodeError) else f"is not JSON ({error})"
                raise DataError(f"line {number} of {path} {problem}: write one JSON object per line") from None


@contextlib.contextmanager
def _datasets_silenced() -> Iterator[None]:
    """Hide datasets' own error log and progress bar while it reads a file: our error says it in one line."""
    import datasets

    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.utils.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars:
            datasets.utils.enable_progress_bars()


def _load_folder(path: Path, split: str, name: str | None) -> list[dict[str, Any]]:
    """Rows of a folder: a ``save_to_disk`` dataset, or data files that ``datasets`` can read."""
    import datasets

    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            with tempfile.TemporaryDirectory(prefix="lightning_safety_data_") as cache_dir:
                dataset = datasets.load_dataset(str(path), name, split=split, cache_dir=cache_dir, keep_in_memory=True)
                return dataset.to_list()
    except KeyError:
        raise DataError(f"folder {path} has no split '{split}'; pick an existing split") from None
    except Exception as error:
        raise DataError(
            f"cannot read data folder {path}: {_first_line(error)}; point to a data file instead"
        ) from error
    return dataset.to_list()


def _load_hub(source: str, split: str, name: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, name, split=split)
    except Exception as error:
        raise DataError(
            f"'{source}' is not a local path and loading it from the hub (split '{split}') failed: "
            f"{_first_line(error)}; no network? download it and pass a local file"
        ) from error
    return dataset.to_list()


def load_records(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    split: str = "train",
    name: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Raw rows (dicts) from a Python list, a local file or folder, or a hub dataset name.

    Args:
        source: A list of dicts (or a ``datasets.Dataset``), a path to a .jsonl/.json/.csv/.tsv/
            .parquet file or a folder, or a ``datasets`` hub name (``"owner/name"``).
        split: Split of a hub dataset or folder.
        name: Configuration name of a hub dataset.
        limit: Keep only the first ``limit`` rows.

    Raises:
        DataError: Missing path, unreadable file, failed hub load, or rows that are not dicts.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit is {limit}; use a non-negative row count or None")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            rows = _load_folder(path, split, name)
        elif path.exists():
            rows = _load_file(path)
        elif looks_like_hub_id(str(source)):
            rows = _load_hub(str(source), split, name)
        else:
            raise DataError(f"data file not found: {source}; check the path (relative paths start at {Path.cwd()})")
    elif hasattr(source, "to_list") and not isinstance(source, Sequence):  # a datasets.Dataset
        rows = source.to_list()
    elif isinstance(source, Sequence):
        rows = list(source)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"row {index} is a {type(row).__name__}, not a dict; give rows as dicts of fields")
    else:
        raise DataError(
            f"data source is a {type(source).__name__}; pass a file path, a hub dataset name or a list of dicts"
        )
    return [dict(row) for row in rows[:limit]] if limit is not None else [dict(row) for row in rows]


def load_source(source: str | Sequence[Mapping[str, Any]] | DataSource) -> list[dict[str, Any]]:
    """Raw rows of a datamodule source: a :class:`DataSource`, a path/hub name, or a list of dicts."""
    if isinstance(source, DataSource):
        return load_records(source.path, split=source.split, name=source.name, limit=source.limit)
    return load_records(source)
