"""Run a test worker script in a fresh Python process (multi-process runs launch their own ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_script(script: Path, *args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python script args...`` with the repository importable; fail the test if it fails."""
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
