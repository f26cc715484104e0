"""Worker for tests/test_metrics_ddp.py: one rank of a 2-process gloo group that updates every metric.

Run as ``python tests/metrics_ddp_worker.py OUT_DIR RANK WORLD_SIZE INIT_FILE``. Rank 0 gets 7 prompts
in 3 ``update`` calls, rank 1 gets 2 prompts in 1 call (and none at all for the "idle" case), so the
ranks differ both in data size and in the number of updates. Each rank saves what it fed in and what
``compute()`` / ``report()`` returned to ``OUT_DIR/rank{RANK}.pt``; the test asserts in the parent.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric

from lightning_safety.metrics import (
    AttackSuccessRate,
    ExactMatch,
    OverRefusalRate,
    RefusalRate,
    RiskAUROC,
    UtilityAccuracy,
)

RANK0_SIZES = (3, 2, 2)  # 7 prompts, 3 updates
RANK1_SIZES = (2,)  # 2 prompts, 1 update
TOTAL = sum(RANK0_SIZES) + sum(RANK1_SIZES)

_ANSWERS = ["#### 18", "#### 1,000", "42", "#### -3.5", "#### 7", "#### 3", "#### 12", "#### 0", "#### 5"]
_PREDS = ["It is $18.", "1000.00", "#### 42", "-3.50", "I can't help.", "4", "The answer: 12.", "0", "5 apples"]


def case_data() -> dict[str, tuple[Callable[[], Metric], list[tuple[Any, ...]]]]:
    """Each case: a metric factory and the update arguments of all ``TOTAL`` prompts, in order."""
    generator = torch.Generator().manual_seed(0)
    flags = torch.rand(TOTAL, generator=generator) < 0.5
    harmful = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    risk = (torch.randint(0, 5, (TOTAL,), generator=generator) / 4).to(torch.float32)  # ties on purpose
    target = torch.randint(0, 4, (TOTAL,), generator=generator)
    indices = torch.where(
        torch.rand(TOTAL, generator=generator) < 0.2, -1, torch.randint(0, 4, (TOTAL,), generator=generator)
    )
    indices[:5] = target[:5]  # a few right answers, so the accuracy is not ~0
    logits = torch.randn(TOTAL, 4, generator=generator)
    return {
        "attack_success": (AttackSuccessRate, [(f,) for f in flags]),
        "refusal": (RefusalRate, [(f,) for f in ~flags]),
        "over_refusal": (OverRefusalRate, [(f,) for f in flags.long()]),
        "accuracy_indices": (UtilityAccuracy, list(zip(indices, target))),
        "accuracy_logits": (UtilityAccuracy, list(zip(logits, target))),
        "exact_match": (ExactMatch, list(zip(_PREDS, _ANSWERS))),
        "risk_auroc": (lambda: RiskAUROC(bins=8), list(zip(risk, harmful))),
        "attack_success_idle_rank1": (AttackSuccessRate, [(f,) for f in flags]),
    }


def batch(rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Stack per-prompt rows into the arguments of one ``update`` call."""
    columns = list(zip(*rows))
    return tuple(torch.stack(col) if torch.is_tensor(col[0]) else list(col) for col in columns)


def rank_chunks(rows: list[tuple[Any, ...]], rank: int, idle_rank1: bool = False) -> list[tuple[Any, ...]]:
    """The ``update`` arguments of ``rank``: rank 0 owns the first 7 prompts, rank 1 the last 2."""
    if rank == 1:
        return [] if idle_rank1 else [batch(rows[sum(RANK0_SIZES) :])]
    chunks, start = [], 0
    for size in RANK0_SIZES:
        chunks.append(batch(rows[start : start + size]))
        start += size
    return chunks


def main(out_dir: Path, rank: int, world_size: int, init_file: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    warnings.filterwarnings("ignore", message=".*before the ``update``")  # the idle rank's compute()
    results: dict[str, dict[str, Any]] = {}
    for name, (factory, rows) in case_data().items():
        metric = factory()
        chunks = rank_chunks(rows, rank, idle_rank1=name.endswith("idle_rank1"))
        for args in chunks:
            metric.update(*args)
        local_state = {k: v.clone() for k, v in metric.metric_state.items()}
        result: dict[str, Any] = {"updates": len(chunks), "value": metric.compute()}
        if hasattr(metric, "report"):
            result["report"] = metric.report().as_dict()
            result["report_again"] = metric.report().as_dict()  # the local state survived the sync
        with metric.sync_context():  # what every rank sees when synced: the sum over ranks
            result["synced_state"] = {k: v.clone() for k, v in metric.metric_state.items()}
        result["local_state_after"] = {k: v.clone() for k, v in metric.metric_state.items()}
        result["local_state_before"] = local_state
        results[name] = result
    torch.save({"world_size": dist.get_world_size(), "results": results}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
