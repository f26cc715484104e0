"""Where the library caches converted models, and how it writes caches without half-files."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "LIGHTNING_SAFETY_CACHE"


def cache_root() -> Path:
    """The cache folder: ``$LIGHTNING_SAFETY_CACHE`` or ``~/.cache/lightning_safety``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_safety"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool) -> int:
    """Permissions a plain ``open``/``mkdir`` would give (temporary files start private)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(tmp, default_mode(directory=False))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` only if the block completes.

    A crash or an exception inside the block leaves no partial ``target`` behind. If another
    process created ``target`` meanwhile, its copy wins and ours is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, default_mode(directory=True))
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


@contextlib.contextmanager
def replacing_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh path beside ``target`` to write a folder at; when the block completes, that folder
    takes ``target``'s place (an existing ``target`` is set aside, replaced and then removed).

    A crash or an exception inside the block leaves ``target`` as it was and nothing else behind;
    a crash between the two renames leaves the old folder as ``.NAME.old-PID`` beside it, never a mix
    of old and new files.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_pretrained_here(model: Any, folder: Path) -> None:
    """``model.save_pretrained(folder)`` that writes the weights in this process, whatever its rank.

    Under an initialised ``torch.distributed`` process group transformers writes a model only on
    rank 0 (``should_save_on_this_rank``). The caches write into a private temporary folder that
    is then renamed into place, so a rank that wrote no weights would publish a folder without
    them (seen: a 2-process DDP run with a cold cache got a tiny-model folder holding only the
    tokenizer). The folder is this process's own, so this process writes it.
    """
    if hasattr(type(model), "should_save_on_this_rank"):
        model.should_save_on_this_rank = lambda is_main_process=True: True  # this instance only
        try:
            model.save_pretrained(folder)
        finally:
            del model.should_save_on_this_rank
    else:
        model.save_pretrained(folder)
