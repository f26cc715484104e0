"""Real 2-process DDP on CPU (gloo): metrics synced over ranks with uneven data and update counts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from metrics_ddp_worker import RANK0_SIZES, RANK1_SIZES, TOTAL, batch, case_data

WORKER = Path(__file__).with_name("metrics_ddp_worker.py")


def run_two_ranks(out_dir: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    init_file = out_dir / "init"  # a file store: no free port to find, no port race with other tests
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out_dir), str(rank), "2", str(init_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:  # a rank stuck in a collective after its peer crashed
            if rank.poll() is None:
                rank.kill()
    for rank, (_, stderr) in zip(ranks, outputs):
        assert rank.returncode == 0, stderr[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def same_value(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-6


def test_metrics_sync_over_two_ranks_with_uneven_updates(tmp_path):
    ranks = run_two_ranks(tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sum(RANK0_SIZES) == 7 and sum(RANK1_SIZES) == 2
    for name, (factory, rows) in case_data().items():
        idle = name.endswith("idle_rank1")
        results = [r["results"][name] for r in ranks]
        assert [r["updates"] for r in results] == [3, 0 if idle else 1], name
        # The single-process value on all prompts of both ranks, in one update (the idle rank 1 has none).
        n_prompts = sum(RANK0_SIZES) if idle else TOTAL
        single = factory()
        single.update(*batch(rows[:n_prompts]))
        expected = single.compute()
        if name == "risk_auroc":
            assert 0.0 < float(expected) < 1.0  # both classes present: a real AUROC, not NaN
        else:
            assert single.report().total == n_prompts
        for rank, result in enumerate(results):
            assert same_value(result["value"], expected), f"{name} rank {rank}: {result['value']} != {expected}"
            synced = result["synced_state"]
            for state, value in single.metric_state.items():
                assert torch.equal(synced[state], value), f"{name} rank {rank}: synced {state} differs"
            # compute()/report() restored the rank's own counts, so it can go on accumulating.
            for state, value in result["local_state_before"].items():
                assert torch.equal(result["local_state_after"][state], value), f"{name}: local {state} changed"
            if "report" in result:
                report = single.report().as_dict()
                assert result["report"]["count"] == report["count"] and result["report"]["total"] == n_prompts, name
                assert result["report_again"] == result["report"]
                for key in ("rate", "low", "high"):
                    assert same_value(torch.tensor(result["report"][key]), torch.tensor(report[key])), (name, key)
            else:  # the AUROC histograms: every prompt counted once over both ranks
                assert int(synced["positive"].sum() + synced["negative"].sum()) == n_prompts
        # Each rank alone held only its own prompts.
        local = [r["local_state_before"] for r in results]
        if "counts" in local[0]:
            assert [int(s["counts"][1]) for s in local] == [7, 0 if idle else 2], name
