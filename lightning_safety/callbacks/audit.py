"""A per-example audit log of training: which example was trained on, when, with what risk and weight.

The log answers "was this example regularized toward the reference, and how strongly?" after the
fact, one row per example per training batch, in JSON Lines or CSV. It reads per-example values
from what ``training_step`` returns (see :meth:`SafeFineTuning.training_step
<lightning_safety.module.SafeFineTuning.training_step>` for the contract) and works with any
LightningModule: values the module does not return are written as null.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_safety.errors import LightningSafetyError

__all__ = ["AUDIT_COLUMNS", "RiskAuditLog", "read_audit_log"]

AuditFormat = Literal["jsonl", "csv"]

#: Columns of every row, in file order.
AUDIT_COLUMNS = ("step", "epoch", "batch_idx", "rank", "id", "risk", "beta", "kl", "nll", "tokens", "regularized")
_INT_COLUMNS = frozenset({"step", "epoch", "batch_idx", "rank", "tokens"})
_FLOAT_COLUMNS = frozenset({"risk", "beta", "kl", "nll"})
# Values read per example from the training step's outputs; `id` and `risk` fall back to the batch.
_PER_EXAMPLE = ("id", "risk", "beta", "kl", "nll", "tokens")
_FROM_BATCH = ("id", "risk")
_SUFFIXES: dict[str, AuditFormat] = {".jsonl": "jsonl", ".csv": "csv"}
_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def _resolve_format(path: Path, format: str | None) -> AuditFormat:
    if format is None:
        resolved = _SUFFIXES.get(path.suffix.lower())
        if resolved is None:
            raise LightningSafetyError(
                f"cannot tell the audit log format of '{path.name}': use a .jsonl or .csv path, "
                "or pass format='jsonl' or format='csv'"
            )
        return resolved
    if format not in ("jsonl", "csv"):
        raise LightningSafetyError(f"audit log format must be 'jsonl' or 'csv', got {format!r}")
    return format  # type: ignore[return-value]


def _shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 (0.05 rather than 0.05000000074505806).

    Values that were float32 (or narrower) in the model read back exactly as they were, and the
    log shows the numbers a person would write.
    """
    if not math.isfinite(value):
        return value
    target = struct.pack("<f", value)
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == target:
            return candidate
    return value


def _per_example(value: Any, size: int, column: str) -> list[Any] | None:
    """``value`` as a list of ``size`` typed entries, or None when it is not one value per example.

    Scalars are batch aggregates (a mean KL, say), not per-example values, even when ``size`` is 1.
    """
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.shape[0] != size:
            return None
        value = value.detach().cpu()
        entries = value.tolist()
        if column in _FLOAT_COLUMNS and value.dtype in _LOW_PRECISION:
            return [_shortest_float32(float(v)) for v in entries]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != size:
            return None
        entries = [v.item() if isinstance(v, Tensor) else v for v in value]
    else:
        return None
    if column in _FLOAT_COLUMNS:
        return [None if v is None else float(v) for v in entries]
    if column in _INT_COLUMNS:
        return [None if v is None else int(v) for v in entries]
    return [None if v is None else str(v) for v in entries]


def _batch_size(batch: Any, outputs: Any) -> int:
    """Examples in the batch: ``input_ids`` / ``id`` / any batched tensor, else the step's outputs."""
    candidates: list[Any] = []
    if isinstance(batch, Mapping):
        candidates = [batch.get("input_ids"), batch.get("id"), *batch.values()]
    elif isinstance(batch, Tensor):
        candidates = [batch]
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        candidates = list(batch)  # e.g. (inputs, targets)
    if isinstance(outputs, Mapping):
        candidates += [outputs.get(key) for key in _PER_EXAMPLE]
    ids = batch.get("id") if isinstance(batch, Mapping) else None
    for value in candidates:
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
        if value is ids and isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            return len(value)
    raise LightningSafetyError(
        f"RiskAuditLog cannot tell how many examples a {type(batch).__name__} batch holds: "
        "use dict batches with 'input_ids' or 'id', or return per-example [B] tensors from training_step"
    )


def _repair_tail(path: Path) -> int:
    """Cut an incomplete last line (a write interrupted by a crash); returns the bytes removed."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        keep, end = 0, size
        while end > 0:  # scan backwards in blocks: the file may be large, the tail is short
            start = max(0, end - 65536)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return size - keep


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _csv_header() -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(AUDIT_COLUMNS)
    return buffer.getvalue().encode("utf-8")


class RiskAuditLog(L.Callback):
    """Write one row per training example per batch: its id, risk, beta, KL, NLL and tokens.

    Columns: ``step`` (``trainer.global_step`` when the batch started, i.e. the 0-based optimizer
    step the example contributes to; with gradient accumulation every micro-batch of a step shares
    it), ``epoch``, ``batch_idx``, ``rank`` (global rank), ``id``, ``risk``, ``beta``, ``kl``,
    ``nll``, ``tokens`` and ``regularized`` (``beta > 0``).

    Where values come from: the ``outputs`` of ``on_train_batch_end`` (what ``training_step``
    returned) when it is a dict with per-example [B] tensors or lists under ``id``, ``risk``,
    ``beta``, ``kl``, ``nll``, ``tokens``; ``id`` and ``risk`` otherwise come from ``batch["id"]``
    and ``batch["risk"]``. Anything else (a module that returns only the loss, a scalar mean) is
    null in JSON Lines and an empty cell in CSV; ``regularized`` is null when beta is unknown.
    :class:`~lightning_safety.module.SafeFineTuning` returns all of them. Non-finite values are
    written as ``NaN`` / ``Infinity`` in JSON Lines (as Python's ``json`` does), ``nan`` / ``inf``
    in CSV.

    Crash safety: each batch's rows go to the file in one unbuffered write (then ``os.fsync`` when
    ``fsync``), so a crash loses no row of a completed batch. Reopening a log to append (a resumed
    fit) first cuts an incomplete last line left by a crash mid-write.

    Existing files: a fresh fit refuses to write over a non-empty log unless ``overwrite=True``; a
    fit resumed from a checkpoint (``ckpt_path``) appends, and so does a later fit with the same
    callback in the same process. Steps replayed after the checkpoint are then logged again (a
    warning says so): deduplicate by ``(rank, step, batch_idx, id)`` keeping the last row.

    Several processes: with ``world_size > 1`` each rank writes its own file, named after the
    path with the rank before the suffix: ``audit.jsonl`` becomes ``audit.rank0.jsonl``,
    ``audit.rank1.jsonl``, ... (:meth:`rank_path`). Read them one by one with
    :func:`read_audit_log`.

    Args:
        path: the log file; its parent folders are created.
        format: ``"jsonl"`` or ``"csv"``; ``None`` takes it from the suffix (``.jsonl`` / ``.csv``).
        overwrite: let a fresh fit replace an existing non-empty log.
        fsync: force every batch's rows to disk (turn off on slow network file systems if losing
            the last rows on a machine crash, not a process crash, is acceptable).

    Example::

        trainer = L.Trainer(callbacks=[RiskAuditLog("runs/audit.jsonl")])
        trainer.fit(SafeFineTuning("smollm2-135m-instruct"), datamodule=data)
        rows = read_audit_log("runs/audit.jsonl")
        risky = [row["id"] for row in rows if row["regularized"]]

    Raises:
        LightningSafetyError: ``path`` is not a file path, a flag is not a bool or the format is
            unknown (at construction); a rank cannot open its log (at fit start, on every rank);
            a resumed run's log is missing or not a valid audit log (when loading its state).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        format: AuditFormat | None = None,
        overwrite: bool = False,
        fsync: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise LightningSafetyError(f"RiskAuditLog path must be a file path, got {path!r}")
        for name, flag in (("overwrite", overwrite), ("fsync", fsync)):
            if not isinstance(flag, bool):
                raise LightningSafetyError(f"RiskAuditLog {name} must be True or False, got {flag!r}")
        self.path = Path(path)
        self.format = _resolve_format(self.path, format)
        self.overwrite = overwrite
        self.fsync = fsync
        self.rows_written = 0  # rows this callback wrote in this process
        self._fd: int | None = None
        self._open_path: Path | None = None
        self._rank = 0
        self._size = 0  # bytes in the open file, kept in checkpoints
        self._own_files: set[Path] = set()  # files this callback wrote: a later fit appends
        self._restored: dict[str, Any] | None = None
        self._batch_start: tuple[int, int] | None = None
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=str(self.path))

    def rank_path(self, rank: int, world_size: int) -> Path:
        """The file that ``rank`` writes: ``path`` itself in a single process."""
        if world_size <= 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")

    # ------------------------------------------------------------------ opening and closing
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fail before the sanity check when we already know whether this fit resumes; strategies
        # that restore checkpoints after setup only know it at on_train_start.
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._open(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()
        self._restored = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception.
        self._close()
        self._restored = None

    def _open(self, trainer: L.Trainer) -> None:
        if self._fd is not None:
            return
        path = self.rank_path(trainer.global_rank, trainer.world_size)
        resumed = trainer.ckpt_path is not None or self._restored is not None or path in self._own_files
        try:
            problem = self._prepare(path, append=resumed)
        except OSError as error:
            problem = f"cannot open the audit log {path}: {error}"
        # Every rank decides together: one rank raising while the others train on would hang them.
        if trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            raise LightningSafetyError(problem or "another rank could not open its audit log (see its error)")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self._fd = os.open(path, flags, 0o644)
        self._open_path, self._rank = path, trainer.global_rank
        self._own_files.add(path)
        self._size = os.fstat(self._fd).st_size
        if self.format == "csv" and self._size == 0:
            self._write(_csv_header())
        self._warn_if_replaying(path, trainer.global_rank)

    def _prepare(self, path: Path, *, append: bool) -> str | None:
        """Make ``path`` ready to append to; returns why it cannot be used, or None."""
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        if size == 0:
            return None
        if not append:
            if not self.overwrite:
                return (
                    f"the audit log {path} already exists and is not empty: pass overwrite=True "
                    "to replace it, or choose another path"
                )
            path.write_bytes(b"")
            return None
        removed = _repair_tail(path)
        if removed:
            warnings.warn(f"removed an incomplete last line ({removed} bytes) from {path}, left by an interrupted run")
        if self.format == "csv" and path.stat().st_size > 0:
            with open(path, "rb") as handle:
                header = handle.readline()
            if header != _csv_header():
                return f"cannot append to {path}: its header is not the audit log's columns {','.join(AUDIT_COLUMNS)}"
        return None

    def _warn_if_replaying(self, path: Path, rank: int) -> None:
        state = self._restored
        if not state or state.get("rank") != rank or state.get("file") != str(path):
            return
        if self._size > int(state.get("bytes", 0)):
            warnings.warn(
                f"{path} has rows written after the checkpoint this fit resumes from; the replayed steps are "
                "logged again (deduplicate by rank, step, batch_idx, id keeping the last row)"
            )

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:  # os.write may write less than asked; append-mode writes never interleave
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)
        self._size += len(data)

    # ------------------------------------------------------------------ rows
    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # global_step moves inside the step (at the optimizer step), so read it before.
        self._batch_start = (trainer.global_step, trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._fd is None or batch is None:
            return
        step, epoch = self._batch_start or (trainer.global_step, trainer.current_epoch)
        self._batch_start = None
        rows = self.rows(outputs, batch, step=step, epoch=epoch, batch_idx=batch_idx, rank=trainer.global_rank)
        self._write(self._encode(rows))
        self.rows_written += len(rows)

    def rows(
        self, outputs: Any, batch: Any, *, step: int, epoch: int, batch_idx: int, rank: int
    ) -> list[dict[str, Any]]:
        """The rows of one batch (what ``on_train_batch_end`` writes)."""
        size = _batch_size(batch, outputs)
        columns: dict[str, list[Any] | None] = {}
        for key in _PER_EXAMPLE:
            value = None
            if isinstance(outputs, Mapping) and key in outputs:
                value = _per_example(outputs[key], size, key)
                if value is None:
                    self._warn_once(f"outputs['{key}']", size)
            if value is None and key in _FROM_BATCH and isinstance(batch, Mapping) and key in batch:
                value = _per_example(batch[key], size, key)
                if value is None:
                    self._warn_once(f"batch['{key}']", size)
            columns[key] = value
        rows = []
        for i in range(size):
            row: dict[str, Any] = {"step": step, "epoch": epoch, "batch_idx": batch_idx, "rank": rank}
            for key in _PER_EXAMPLE:
                row[key] = None if columns[key] is None else columns[key][i]
            row["regularized"] = None if row["beta"] is None else row["beta"] > 0
            rows.append({name: row[name] for name in AUDIT_COLUMNS})
        return rows

    def _warn_once(self, where: str, size: int) -> None:
        if where not in self._warned:
            self._warned.add(where)
            rank_zero_warn(f"RiskAuditLog: {where} is not one value per example (expected [{size}]); written as null")

    def _encode(self, rows: list[dict[str, Any]]) -> bytes:
        if self.format == "jsonl":
            return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for row in rows:
            writer.writerow([_csv_cell(row[name]) for name in AUDIT_COLUMNS])
        return buffer.getvalue().encode("utf-8")

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        # Saved from rank 0: how far its file was when the checkpoint was taken, so that a resume
        # can tell that rows after it will be written again.
        path = self._open_path if self._open_path is not None else self.path
        return {"file": str(path), "rank": self._rank, "bytes": self._size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)


def _typed_csv_row(row: dict[str, str]) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for name, cell in row.items():
        if cell is None or cell == "":
            typed[name] = None
        elif name in _INT_COLUMNS:
            typed[name] = int(cell)
        elif name in _FLOAT_COLUMNS:
            typed[name] = float(cell)
        elif name == "regularized":
            typed[name] = cell.lower() == "true"
        else:
            typed[name] = cell
    return typed


def read_audit_log(path: str | os.PathLike[str], format: AuditFormat | None = None) -> list[dict[str, Any]]:
    """Rows of an audit log written by :class:`RiskAuditLog`, with typed values (None for null).

    An incomplete last line (a crash in the middle of a write) holds no complete row: it is
    skipped with a warning. Under DDP, read each rank's file (``audit.rank0.jsonl``, ...).

    Args:
        path: the JSON Lines or CSV log.
        format: ``"jsonl"`` or ``"csv"``; ``None`` takes it from the suffix.

    Example::

        rows = read_audit_log("runs/audit.csv")
        assert all(row["regularized"] == (row["beta"] > 0) for row in rows)
    """
    path = Path(path)
    kind = _resolve_format(path, format)
    if not path.is_file():
        raise LightningSafetyError(f"audit log {path} not found")
    data = path.read_bytes()
    # Complete lines only, cut before decoding: a crash may also split a multi-byte character.
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        warnings.warn(
            f"skipped an incomplete last line ({len(data) - complete} bytes) of {path}, left by an interrupted "
            "write; a resumed fit removes it"
        )
    text = data[:complete].decode("utf-8")
    if kind == "csv":
        try:
            return [_typed_csv_row(row) for row in csv.DictReader(io.StringIO(text))]
        except ValueError as error:
            raise LightningSafetyError(f"{path} is not a valid audit log: {error}") from None
    rows = []
    # split("\n"), not splitlines(): ids may hold U+2028 and friends, which JSON leaves unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise LightningSafetyError(f"{path} line {number} is not valid JSON: {error}") from None
        if not isinstance(row, dict):
            raise LightningSafetyError(f"{path} line {number} is not a JSON object")
        rows.append(row)
    return rows
