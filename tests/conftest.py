"""Shared fixtures: an isolated model cache and the tiny local model."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Before anything imports the library: converted models and tiny test models go to a cache of the
# test session's own (also inherited by the CLI and DDP subprocesses the tests start), unless the
# caller points LIGHTNING_SAFETY_CACHE somewhere already (e.g. to reuse the SmolLM2 conversion).
_OWN_CACHE = None if os.environ.get("LIGHTNING_SAFETY_CACHE") else tempfile.mkdtemp(prefix="lightning-safety-test-cache-")
if _OWN_CACHE is not None:
    os.environ["LIGHTNING_SAFETY_CACHE"] = _OWN_CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Folder with the tiny random Llama and its byte-level ChatML tokenizer."""
    from lightning_safety.tiny_model import tiny_model_folder

    return tiny_model_folder()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public data folder next to the repository; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {SHARED_DATA} not found (it sits beside the repository)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI reads sys.argv when given no args; keep pytest's own flags out of its way."""
    import sys

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def _repository_changes() -> set[str] | None:
    """``git status`` lines of the repository (untracked files included); None outside a git checkout."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


def pytest_sessionstart(session):
    session.config._repository_before = _repository_changes()


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves nothing behind: its own model cache is removed, and a file it wrote (or changed)
    in the repository fails the session."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
    before = getattr(session.config, "_repository_before", None)
    after = _repository_changes()
    if before is None or after is None:
        return
    left = sorted(after - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the tests left files in the repository (write under tmp_path instead): " + ", ".join(left[:10])
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
