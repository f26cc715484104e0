"""Checkpoints that survive a crash: written to a temporary file and renamed, never torn in place.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives
in the system temp folder. When that folder is on another file system than the checkpoints (a
``tmpfs`` ``/tmp``, a scratch disk, a network volume), the final "rename" is a copy into the final
name: a process killed during the copy leaves a truncated ``last.ckpt`` that a resume then reads,
and the temporary copy of the whole checkpoint is left behind in ``/tmp``. It also holds the
checkpoint twice in memory (serialised to a buffer first).

:class:`AtomicCheckpointIO` writes the checkpoint into a hidden temporary file *in the checkpoint's
own folder*, fsyncs it and renames it over the final name, so a reader finds the previous complete
file or the new one, never half of one. Temporary files of processes that died are removed at the
next save into that folder; until then their names (``.<name>.<host>.<pid>.<random>.partial``)
match no checkpoint pattern (``*.ckpt``, ``last*.ckpt``). Loading a damaged checkpoint (one torn by
another writer) is refused with a one-line :class:`~lightning_safety.errors.ModelLoadError`.

:class:`AtomicCheckpoints` is a callback that installs it on any trainer whose strategy uses
Lightning's default checkpoint IO, and makes ``ModelCheckpoint(save_last="link")`` replace
``last.ckpt`` atomically (Lightning deletes the old link before making the new one: a crash in
between leaves no ``last.ckpt``, and ``ckpt_path="last"`` then silently trains from scratch).

Example::

    trainer = L.Trainer(callbacks=[AtomicCheckpoints(), ModelCheckpoint(save_last=True)])
    # or: L.Trainer(plugins=[AtomicCheckpointIO()])
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_safety.errors import ModelLoadError
from lightning_safety.paths import default_mode

__all__ = ["AtomicCheckpointIO", "AtomicCheckpoints", "remove_stale_partials"]

PARTIAL_SUFFIX = ".partial"
# .<final name>.<host>.<pid>.<random>.partial: host and pid tell whether its writer is still alive.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.partial$")


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform opens folders)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def remove_stale_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary checkpoint files in ``folder`` left by dead processes of this host.

    Files of live processes (a save in progress) and of other hosts (whose processes cannot be
    checked from here) are kept. Returns the files removed.
    """
    removed = []
    host = _host()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _PARTIAL.match(name)
        if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        path = Path(folder) / name
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _is_damaged(path: _PATH) -> bool:
    """A local file that is not a complete zip archive (torch's format): its end was never written."""
    if not isinstance(get_filesystem(path), LocalFileSystem) or not os.path.isfile(path):
        return False
    try:
        return not zipfile.is_zipfile(path)
    except OSError:
        return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written checkpoint under its final name.

    Local paths: ``torch.save`` into a hidden temporary file beside the target, ``fsync``, rename
    over the target, ``fsync`` the folder. Remote paths (``s3://`` ...) and ``storage_options``
    go to Lightning's implementation. Loading refuses a damaged local file with a one-line
    :class:`~lightning_safety.errors.ModelLoadError`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[str] = set()  # folders whose dead temporary files were removed

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = os.path.abspath(target.parent)
        if folder not in self._swept:
            remove_stale_partials(folder)
            self._swept.add(folder)
        handle, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.{_host()}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=target.parent
        )
        os.close(handle)
        try:
            torch.save(checkpoint, tmp)  # straight to the file: no second copy of the checkpoint in memory
            descriptor = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # the bytes reach the disk before the name points at them
            finally:
                os.close(descriptor)
            os.chmod(tmp, default_mode(directory=False))  # mkstemp makes it private; a plain save does not
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_directory(target.parent)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as error:
            # Only a file that is not a complete archive; other failures (a wrong map_location, a
            # weights_only refusal of a complete file) keep their own message.
            if not _is_damaged(path):
                raise
            raise ModelLoadError(
                f"checkpoint {path} is damaged or incomplete (a save cut short?): resume from an earlier "
                f"checkpoint or delete it ({type(error).__name__}: {str(error)[:120]})"
            ) from error


def _atomic_link(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
    """``ModelCheckpoint._link_checkpoint`` with the new link renamed over the old one.

    Lightning removes ``linkpath`` and then links it: a crash in between leaves no ``last.ckpt``.
    """
    if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
        if os.path.isdir(linkpath) and not os.path.islink(linkpath):
            shutil.rmtree(linkpath)
        folder = os.path.dirname(os.path.abspath(linkpath))
        name = os.path.basename(linkpath)
        tmp = os.path.join(folder, f".{name}.{_host()}.{os.getpid()}.link{PARTIAL_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.symlink(os.path.relpath(filepath, folder), tmp)
        except OSError:  # no symlinks (Windows without the privilege): a copy, as Lightning falls back to
            shutil.copy(filepath, tmp)
        os.replace(tmp, linkpath)
    trainer.strategy.barrier()


class AtomicCheckpoints(L.Callback):
    """Make a trainer's checkpoints crash-safe: :class:`AtomicCheckpointIO` and atomic ``last.ckpt`` links.

    At ``setup`` (before a resume reads its checkpoint) a strategy using Lightning's default
    ``TorchCheckpointIO`` gets :class:`AtomicCheckpointIO`; a checkpoint IO chosen by the user
    (``plugins=[...]``, XLA, async) is left alone. Every ``ModelCheckpoint`` gets a ``last.ckpt``
    link (``save_last="link"``) that replaces the old one in a single rename.
    """

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and hasattr(callback, "_link_checkpoint"):
                callback._link_checkpoint = _atomic_link  # this instance only
