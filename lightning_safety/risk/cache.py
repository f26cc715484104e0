"""Per-example risk computed once: a cache keyed by example id, persisted and shared across ranks.

Risk from a frozen model (the reference's activations, a judge) depends only on the example, so
it is a property of the example: computing it again every epoch (the authors' code called its
judge 6,000 times for 300 examples x 20 epochs) is waste. The cache is

* keyed by the data's stable example id (``batch["id"]``, a content hash when the data has none);
* tagged with the estimator that filled it (``namespace``): a cache written by one probe or judge
  is refused by another, never silently reused;
* saved atomically as JSON (a crash leaves the previous file, never half a file);
* restored on resume through the owning callback's ``state_dict``;
* merged across data-parallel ranks (each rank scores its own rows; after a sync every rank
  knows every score).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_safety.errors import RiskError
from lightning_safety.paths import atomic_write_text

_FORMAT = "lightning_safety.risk_cache/1"


class RiskCache:
    """Risk scores in [0, 1] by example id, for one estimator (``namespace``).

    Args:
        namespace: identifies the estimator (e.g. probe fingerprint, judge name); entries written
            under another namespace are refused.
        path: JSON file to load from (if it exists) and save to.
    """

    def __init__(self, namespace: str, path: str | Path | None = None) -> None:
        self.namespace = namespace
        self.path = Path(path) if path is not None else None
        self._scores: dict[str, float] = {}
        self._unsynced: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            self.load_file(self.path)

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._scores

    def lookup(self, ids: Sequence[str]) -> tuple[Tensor, list[int]]:
        """Scores [B] (NaN where unknown) and the positions of the unknown ids."""
        values = [self._scores.get(example_id, math.nan) for example_id in ids]
        missing = [i for i, value in enumerate(values) if math.isnan(value)]
        return torch.tensor(values, dtype=torch.float32), missing

    def update(self, ids: Sequence[str], scores: Tensor | Iterable[float]) -> None:
        """Record scores (validated: finite, in [0, 1]) for ``ids``."""
        values = [float(v) for v in (scores.tolist() if isinstance(scores, Tensor) else scores)]
        if len(values) != len(ids):
            raise RiskError(f"{len(ids)} ids but {len(values)} risk scores: give one score per example")
        bad = [v for v in values if not (0.0 <= v <= 1.0)]  # NaN fails both comparisons
        if bad:
            raise RiskError(f"refusing to cache {len(bad)} risk scores outside [0, 1] (e.g. {bad[0]}): fix the estimator")
        for example_id, value in zip(ids, values):
            self._scores[str(example_id)] = value
            self._unsynced[str(example_id)] = value

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "namespace": self.namespace, "scores": dict(self._scores)}

    def load_state_dict(self, state: Mapping[str, Any], *, source: str = "checkpoint") -> None:
        if state.get("format") != _FORMAT:
            raise RiskError(f"the risk cache in {source} has an unknown format: delete it to rebuild it")
        if state.get("namespace") != self.namespace:
            raise RiskError(
                f"the risk cache in {source} was written by estimator '{state.get('namespace')}', not "
                f"'{self.namespace}': delete it or point the callback at another cache_path"
            )
        try:
            scores = {str(k): float(v) for k, v in state["scores"].items()}
        except (KeyError, AttributeError, TypeError, ValueError):
            raise RiskError(f"the risk cache in {source} holds scores that are not numbers: delete it to rebuild it") from None
        self.update(list(scores), list(scores.values()))  # validates
        self._unsynced.clear()

    def save(self, path: str | Path | None = None) -> Path:
        """Write the cache as JSON atomically (temporary file + rename in the same folder)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise RiskError("this risk cache has no path: pass one to save()")
        atomic_write_text(target, json.dumps(self.state_dict()))
        return target

    def load_file(self, path: str | Path) -> None:
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RiskError(f"cannot read the risk cache {path} ({type(error).__name__}): delete it to rebuild it") from error
        self.load_state_dict(state, source=str(path))

    # ------------------------------------------------------------------ data parallel
    def sync(self) -> int:
        """Merge the entries every rank added since the last sync (all ranks must call it).

        Returns the number of entries this rank learned from others. A no-op without an
        initialised process group.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            self._unsynced.clear()
            return 0
        gathered: list[dict[str, float] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self._unsynced)
        learned = 0
        for entries in gathered:
            for example_id, value in (entries or {}).items():
                if example_id not in self._scores:
                    learned += 1
                self._scores[example_id] = value
        self._unsynced.clear()
        return learned
