"""Shared fixtures: an isolated model cache and the tiny local model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports the library: converted models and tiny test models go to a cache of the
# test session's own (also inherited by the CLI and DDP subprocesses the tests start), unless the
# caller points LIGHTNING_SAFETY_CACHE somewhere already (e.g. to reuse the SmolLM2 conversion).
os.environ.setdefault("LIGHTNING_SAFETY_CACHE", tempfile.mkdtemp(prefix="lightning-safety-test-cache-"))
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
