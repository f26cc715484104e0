"""pad_batch: the one routine that pads token-id sequences into [B, T] tensors."""

from __future__ import annotations

import pytest
import torch

from lightning_safety.data import pad_batch
from lightning_safety.data.formatting import IGNORE_INDEX
from lightning_safety.errors import DataError

ROWS = [[5, 6, 7], [8], [9, 10]]


def test_right_padding_puts_the_padding_after_each_row():
    padded = pad_batch(ROWS, pad_id=0)
    assert set(padded) == {"input_ids", "attention_mask"}
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert all(t.dtype == torch.long and t.shape == (3, 3) for t in padded.values())


def test_left_padding_ends_every_row_in_the_last_column():
    padded = pad_batch(ROWS, pad_id=2, side="left")
    assert padded["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8], [2, 9, 10]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_are_padded_like_their_rows_with_the_ignore_index(side):
    labels = [[IGNORE_INDEX, 6, 7], [8], [IGNORE_INDEX, 10]]
    padded = pad_batch(ROWS, pad_id=0, side=side, labels=labels)
    mask = padded["attention_mask"].bool()
    assert (padded["labels"][~mask] == IGNORE_INDEX).all()
    kept = [row[m].tolist() for row, m in zip(padded["labels"], mask)]
    assert kept == labels and padded["labels"].dtype == torch.long


def test_tensor_rows_a_multiple_of_the_length_and_a_device():
    rows = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6])]
    padded = pad_batch(rows, pad_id=0, labels=rows, pad_to_multiple_of=4, device="cpu")
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"].sum(dim=1).tolist() == [5, 1]
    assert padded["labels"][1].tolist() == [6] + [IGNORE_INDEX] * 7


def test_bad_inputs_are_refused():
    with pytest.raises(DataError, match="no sequences"):
        pad_batch([], pad_id=0)
    with pytest.raises(DataError, match="one label per token"):
        pad_batch(ROWS, pad_id=0, labels=[[1, 2], [3], [4, 5]])
    with pytest.raises(DataError, match="side="):
        pad_batch(ROWS, pad_id=0, side="middle")  # type: ignore[arg-type]
