"""An in-memory, map-style torch dataset of tokenised conversations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_safety.data.formatting import tokenize_conversation
from lightning_safety.data.records import ChatRecord, describe_row
from lightning_safety.errors import DataError


def _check_all_or_none(records: Sequence[ChatRecord], attribute: str) -> bool:
    """Whether every record has ``attribute``; error when only some do (a batch needs one dtype)."""
    missing = [r for r in records if getattr(r, attribute) is None]
    if missing and len(missing) < len(records):
        first = missing[0]
        raise DataError(
            f"{describe_row(first.index, first.id)} has no '{attribute}' but other rows do; "
            f"give every row a {attribute} value or none"
        )
    return bool(records) and not missing


class TokenizedChatDataset(Dataset):
    """Tokenised conversations; item ``i`` is a dict with its row ``index`` ``i``.

    Item fields: ``input_ids`` [T] int32, ``labels`` [T] int32, ``prompt_length`` int,
    ``index`` int, ``id`` str, and ``risk`` float / ``is_harmful`` bool when the data has them.
    Token ids are stored as int32 tensors (half the memory of int64); the collator widens them.
    """

    def __init__(self, examples: list[dict[str, Any]], records: Sequence[ChatRecord]) -> None:
        self.examples = examples
        self.records = list(records)
        self.has_risk = _check_all_or_none(self.records, "risk")
        self.has_is_harmful = _check_all_or_none(self.records, "is_harmful")

    @property
    def ids(self) -> list[str]:
        """Example ids in dataset order."""
        return [record.id for record in self.records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.examples[index], "index": index}


def tokenize_records(
    records: Sequence[ChatRecord],
    tokenizer: Any,
    *,
    max_length: int,
    chat_template: str | None = None,
) -> TokenizedChatDataset:
    """Tokenise every record (see :func:`tokenize_conversation`) into a :class:`TokenizedChatDataset`."""
    for attribute in ("risk", "is_harmful"):  # fail before the (slow) tokenisation, not after
        _check_all_or_none(records, attribute)
    examples = []
    for record in records:
        encoded = tokenize_conversation(
            record.messages,
            tokenizer,
            max_length=max_length,
            chat_template=chat_template,
            where=describe_row(record.index, record.id),
        )
        example: dict[str, Any] = {
            "input_ids": torch.tensor(encoded["input_ids"], dtype=torch.int32),
            "labels": torch.tensor(encoded["labels"], dtype=torch.int32),
            "prompt_length": encoded["prompt_length"],
            "truncated": encoded["truncated"],
            "id": record.id,
            "messages": record.messages,  # the text, for judges that score (prompt, response)
        }
        if record.risk is not None:
            example["risk"] = record.risk
        if record.is_harmful is not None:
            example["is_harmful"] = record.is_harmful
        examples.append(example)
    return TokenizedChatDataset(examples, records)
