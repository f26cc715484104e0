"""DataLoaders whose order is a pure function of (seed, epoch) and that resume mid-epoch.

Why this shape (Lightning 2.x):

* Lightning saves and restores a train loader's position only if the DataLoader object itself has
  ``state_dict()``/``load_state_dict()`` (``CombinedLoader._state_dicts``, ``FitLoop``); it calls
  ``load_state_dict`` before it calls ``iter()`` on the loader. :class:`ResumableDataLoader`
  counts the batches it yielded this epoch and skips that many after a restore.
* Lightning leaves a loader alone (no re-instantiation) when its sampler already is a
  ``DistributedSampler`` (``DataConnector._requires_distributed_sampler``), and calls
  ``set_epoch`` on it every epoch. So the loaders here always use one, with the replica count and
  rank given explicitly: single-process and DDP runs take the same path, and the order of an
  epoch depends only on the seed and the epoch number.
* Lightning does not prefetch from a loader with a length, so batches yielded equals batches
  consumed when a checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_safety.errors import DataError


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that can resume mid-epoch: ``state_dict()`` is ``{"batches_yielded": n}``.

    After ``load_state_dict``, the next ``__iter__`` skips the first ``n`` batches (they are
    loaded and dropped, cheap for in-memory tokenised data), then the skip is cleared, so later
    epochs start from the beginning. With a seeded ``DistributedSampler`` (epoch set by the
    caller) the remaining batches are exactly those of an uninterrupted run. Takes the same
    arguments as ``DataLoader``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        # Take the skip and reset the count now (not lazily), so a state_dict taken between iter()
        # and the first batch already describes the new epoch.
        skip, self._skip = self._skip, 0
        self._batches_yielded = skip
        return self._batches(skip)

    def _batches(self, skip: int) -> Iterator[Any]:
        iterator = super().__iter__()
        for _ in range(skip):
            if next(iterator, _END) is _END:
                return
        for batch in iterator:
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"batches_yielded": n, "num_batches": len(self)}``; ``n`` is 0 once an epoch is complete."""
        total = len(self)
        done = self._batches_yielded if self._batches_yielded < total else 0
        return {"batches_yielded": done, "num_batches": total}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip ``state_dict["batches_yielded"]`` batches at the start of the next iteration."""
        skip = int(state_dict.get("batches_yielded", 0))
        saved_total = state_dict.get("num_batches")
        if skip and saved_total is not None and int(saved_total) != len(self):
            raise DataError(
                f"cannot resume mid-epoch: the checkpoint's train loader had {saved_total} batches per epoch, "
                f"this one has {len(self)} (data, batch_size or device count changed); resume with the same "
                "settings or from an end-of-epoch checkpoint"
            )
        self._skip = skip


_END = object()


def build_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
    num_workers: int = 0,
) -> ResumableDataLoader:
    """Shuffled, sharded, resumable train loader (last partial batch kept, ``drop_last=False``)."""
    sampler = DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def build_eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """In-order, sharded evaluation loader.

    ``DistributedSampler`` pads the data with repeated rows so that every rank gets the same
    number: with several devices a few rows count twice, harmless for a validation loss.
    """
    sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
