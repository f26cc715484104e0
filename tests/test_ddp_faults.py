"""DDP faults: a rank that raises (in a risk estimator, in the safety evaluation) stops the whole job, no hang.

Two real gloo processes started by the CLI (Lightning's launcher runs the command again for rank 1).
The fault is injected on one rank only; the other rank then waits in a collective for a peer that is
gone. The job must end, with a non-zero status and the failing rank's error in its output, well before
any collective timeout (gloo's default is 30 minutes), and leave no process behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Lightning's launcher polls its children every 5 s; set-up of two tiny ranks takes ~10-20 s here.
DEADLINE_S = 240


def run_ddp(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "lightning_safety.cli", *args, "--config", "configs/tiny_ddp.yaml",
         "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S + 60,
    )
    return result, time.perf_counter() - started


def leftover_processes(marker: str) -> list[str]:
    """Processes whose command line mentions ``marker`` (the run's own folder), other than this check."""
    done = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if marker in line and "ps -eo" not in line]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--model.risk", "faults.FailingRisk", "--model.risk.rank", "1"],
         "injected fault in a risk estimator on rank 1"),
        (["fit", "--model.risk", "faults.FailingRisk", "--model.risk.rank", "0"],
         "injected fault in a risk estimator on rank 0"),
        (["validate", "--data.val_fraction", "0.25", "--trainer.callbacks+=faults.FailingEvaluation",
          "--trainer.callbacks.rank", "1"], "injected fault in the safety evaluation on rank 1"),
        (["validate", "--data.val_fraction", "0.25", "--trainer.callbacks+=faults.FailingEvaluation",
          "--trainer.callbacks.rank", "0"], "injected fault in the safety evaluation on rank 0"),
    ],
    ids=["risk-rank1", "risk-rank0", "evaluation-rank1", "evaluation-rank0"],
)
def test_a_failing_rank_stops_the_whole_job(tmp_path, args, message):
    result, seconds = run_ddp(tmp_path, *args)
    assert result.returncode != 0, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    print(f"{message}: stopped in {seconds:.1f} s with status {result.returncode}")
    assert seconds < DEADLINE_S, f"the job took {seconds:.0f} s to stop"
    time.sleep(1)  # a killed rank's exit is reaped asynchronously
    assert leftover_processes(str(tmp_path)) == []
