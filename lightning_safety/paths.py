"""Where the library caches converted models, and how it writes caches without half-files."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "LIGHTNING_SAFETY_CACHE"


def cache_root() -> Path:
    """The cache folder: ``$LIGHTNING_SAFETY_CACHE`` or ``~/.cache/lightning_safety``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_safety"


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` only if the block completes.

    A crash or an exception inside the block leaves no partial ``target`` behind. If another
    process created ``target`` meanwhile, its copy wins and ours is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
