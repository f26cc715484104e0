"""Padding token-id sequences into batch tensors: the one routine the collator, generation, judges and scorers share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_safety.data.formatting import IGNORE_INDEX
from lightning_safety.errors import DataError

__all__ = ["pad_batch"]


def pad_batch(
    sequences: Sequence[Sequence[int] | Tensor],
    pad_id: int,
    *,
    side: Literal["left", "right"] = "right",
    labels: Sequence[Sequence[int] | Tensor] | None = None,
    pad_to_multiple_of: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Pad ``B`` token-id sequences to one length ``T`` (the longest, rounded up to ``pad_to_multiple_of``).

    Right padding keeps positions natural (training, teacher-forced scoring: causal attention makes
    the padding after a row's last token change nothing before it). Left padding puts every row's
    last token in the last column (generation, and judges that read the last position's logits).

    Args:
        sequences: ``B`` >= 1 lists (or 1-D tensors) of token ids; they may differ in length.
        pad_id: the id written into the padded positions of ``input_ids`` (masked out anyway).
        side: ``"right"`` or ``"left"``: where the padding goes.
        labels: per sequence, its labels (as long as the sequence), padded like it with ``-100``.
        pad_to_multiple_of: round ``T`` up to a multiple of this (tensor-core friendly); None: the longest.
        device: where the tensors go (default: the CPU).

    Returns:
        ``input_ids``: [B, T] long, ``pad_id`` on padding; ``attention_mask``: [B, T] long, 1 on the
        sequence's tokens and 0 on padding; with ``labels`` also ``labels``: [B, T] long,
        :data:`~lightning_safety.data.formatting.IGNORE_INDEX` (-100) on padding.

    Example::

        pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
        # {"input_ids": tensor([[5, 6, 7], [0, 0, 8]]), "attention_mask": tensor([[1, 1, 1], [0, 0, 1]])}
    """
    if side not in ("left", "right"):
        raise DataError(f"side={side!r} is invalid: pad on the 'left' or the 'right'")
    if not sequences:
        raise DataError("pad_batch got no sequences: give at least one")
    if labels is not None and [len(row) for row in labels] != [len(row) for row in sequences]:
        raise DataError("pad_batch needs one label per token: the label rows differ in number or length from the sequences")
    length = max(len(row) for row in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    size = len(sequences)
    padded = {
        "input_ids": torch.full((size, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((size, length), dtype=torch.long),
    }
    if labels is not None:
        padded["labels"] = torch.full((size, length), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(sequences):
        count = len(ids)
        columns = slice(0, count) if side == "right" else slice(length - count, length)
        padded["input_ids"][row, columns] = torch.as_tensor(ids, dtype=torch.long)
        padded["attention_mask"][row, columns] = 1
        if labels is not None:
            padded["labels"][row, columns] = torch.as_tensor(labels[row], dtype=torch.long)
    return padded if device is None else {name: tensor.to(device) for name, tensor in padded.items()}
