"""Subcommand help served from a cache: ``lightning-safety fit --help`` without importing Lightning.

A subcommand's ``--help`` is built by jsonargparse from the signatures of the module, the data
module and Lightning's Trainer, which takes importing Lightning (2-3 s on a small CPU). The text
only changes when the code or the installed versions change, so the first ``<command> --help``
writes it to the cache and later ones print it at once. The key is a hash of the command line,
the Python, Lightning, jsonargparse and torch versions, and the bytes of every source file of this
package: editing the code, upgrading a dependency or switching environments makes a new entry.
Entries are written atomically; an unreadable cache folder only costs the slow path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_safety.cli_help import HELP_FLAGS
from lightning_safety.paths import atomic_write_text, cache_root

_PACKAGE = Path(__file__).resolve().parent
_VERSIONED = ("lightning", "jsonargparse", "torch", "transformers")


def is_subcommand_help(argv: Sequence[str]) -> bool:
    """``<command> [<subcommand>] --help`` (or ``-h``) and nothing else."""
    return 2 <= len(argv) <= 3 and argv[-1] in HELP_FLAGS and not any(a.startswith("-") for a in argv[:-1])


def help_key(argv: Sequence[str]) -> str:
    """The cache key of ``argv``'s help: the command line, the versions, and this package's sources."""
    hasher = hashlib.sha256("\0".join(argv[:-1]).encode())
    hasher.update(sys.version.encode())
    for name in _VERSIONED:
        try:
            hasher.update(f"{name}={importlib.metadata.version(name)};".encode())
        except importlib.metadata.PackageNotFoundError:
            hasher.update(f"{name}=none;".encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        hasher.update(str(path.relative_to(_PACKAGE)).encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()[:24]


def cached_help(argv: Sequence[str], produce: Callable[[], object], folder: Path | None = None) -> None:
    """Print ``argv``'s help from the cache, or run ``produce`` (which prints it and exits 0) and cache it.

    Raises:
        SystemExit: always, like the help it replays (status 0).
    """
    path = (folder or cache_root() / "help") / f"{help_key(argv)}.txt"
    with contextlib.suppress(OSError):
        sys.stdout.write(path.read_text(encoding="utf-8"))
        raise SystemExit(0)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            produce()
    except SystemExit as done:
        sys.stdout.write(buffer.getvalue())
        if done.code in (None, 0) and buffer.getvalue():
            with contextlib.suppress(OSError):
                atomic_write_text(path, buffer.getvalue())
        raise
    sys.stdout.write(buffer.getvalue())  # a producer that printed without exiting: not cached
    raise SystemExit(0)
