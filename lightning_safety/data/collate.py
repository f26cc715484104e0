"""Batch tokenised examples with dynamic right-padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_safety.data.padding import pad_batch
from lightning_safety.errors import DataError


@dataclass(frozen=True)
class ChatCollator:
    """Pad a list of examples to the longest one (right padding) and stack the per-example fields.

    A plain dataclass so it pickles into DataLoader worker processes.

    Args:
        pad_token_id: Id written into padded ``input_ids`` positions (masked out anyway).
        pad_to_multiple_of: Round the padded length up to a multiple of this (tensor-core friendly).

    Returns (from ``__call__``):
        ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long (0 on padding), ``labels``
        [B, T] long (-100 on padding and prompt), ``prompt_length`` [B] long, ``index`` [B] long
        (dataset row), ``id`` list[str] of length B, ``messages`` (the conversations, for judges
        that read text) when the examples carry them, and when the data has them ``risk`` [B]
        float32 and ``is_harmful`` [B] bool.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise DataError("cannot collate an empty batch; check the dataset is not empty")
        size = len(examples)
        batch: dict[str, Any] = {
            **pad_batch([example["input_ids"] for example in examples], self.pad_token_id,
                        labels=[example["labels"] for example in examples], pad_to_multiple_of=self.pad_to_multiple_of),
            "prompt_length": torch.tensor([example["prompt_length"] for example in examples], dtype=torch.long),
            "index": torch.tensor([example["index"] for example in examples], dtype=torch.long),
            "id": [example["id"] for example in examples],
        }
        if all("messages" in example for example in examples):
            batch["messages"] = [example["messages"] for example in examples]
        for key, dtype in (("risk", torch.float32), ("is_harmful", torch.bool)):
            present = sum(key in example for example in examples)
            if present == size:
                batch[key] = torch.tensor([example[key] for example in examples], dtype=dtype)
            elif present:
                raise DataError(
                    f"'{key}' is set on some rows of a batch but not others; give every row a {key} or none"
                )
        return batch
