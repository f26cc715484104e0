"""Worker for tests/test_reference_cache.py: one rank of a 2-process gloo group reading a shared cache.

Started by ``torch.multiprocessing.spawn(main, args=(CACHE, FINGERPRINT, OUT_DIR, WORLD_SIZE, INIT_FILE))``.
Every rank memory-maps the same cache, looks up its own share of the examples (ids sorted, rank
``r`` takes ``ids[r::world_size]``) and all-gathers a checksum of what it read; it saves its
tokens and the gathered checksums to ``OUT_DIR/rank{RANK}.pt`` for the test to compare with a
single-process lookup.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_safety.reference_cache import CachedTokens, ReferenceCache


def rank_ids(all_ids: list[str], rank: int, world_size: int) -> list[str]:
    return sorted(all_ids)[rank::world_size]


def checksum(tokens: CachedTokens) -> float:
    """A float64 digest of the looked-up tokens that depends on their order."""
    weights = torch.arange(1, len(tokens) + 1, dtype=torch.float64)
    rows = tokens.token_ids.double().sum(1) + tokens.logprobs.double().sum(1) + tokens.tail.double()
    return float((weights * rows).sum())


def main(rank: int, cache_path: Path, fingerprint: str, out_dir: Path, world_size: int, init_file: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    cache = ReferenceCache.open(cache_path, fingerprint=fingerprint)
    ids = rank_ids(cache.example_ids, rank, world_size)
    tokens = cache.lookup(ids, [cache.length(i) for i in ids])
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, {"rank": rank, "ids": ids, "checksum": checksum(tokens), "digest": cache.digest})
    torch.save({"ids": ids, "tokens": tokens, "gathered": gathered}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()

