"""The frozen reference's output per response token, computed once and read back every epoch.

The reference model is frozen, so its distribution at a response token depends only on the
example. A multi-epoch run that runs the reference forward every step pays it once per example
per epoch; with this cache it pays it once per example (``lightning-safety precompute-reference``)
and then reads a few hundred bytes per token from disk.

What is stored, per response token (in the order :func:`lightning_safety.losses.adaptive_kl_loss`
visits them: a response token is a shifted label that is not ``-100``, each example's tokens in
position order):

* ``token_ids`` int32 ``[N, k]``: the ids of the reference's ``k`` most likely tokens (default 64),
  most likely first;
* ``logprobs`` float32 (or float16) ``[N, k]``: their log-probabilities (float32 log-softmax);
* ``tail`` float32 ``[N]``: ``log(1 - sum_k p_k)``, the log of the mass outside the top ``k``,
  summed directly over the other ``V - k`` tokens (not as ``1 - sum_k p_k``, which keeps no digit
  of a small tail) and floored at ``log(float32 tiny) ~ -87.3`` so that it is finite even when the
  top ``k`` hold all the mass (``k = V``).

Disk: per token ``k * (4 + b) + 4`` bytes, ``b`` the bytes of one log-probability. For ``k = 64``:
float32 log-probabilities 516 bytes/token, ~0.52 GB per 1M response tokens; float16 388 bytes/token,
~0.39 GB per 1M. float16 saves a quarter of the disk (half of the log-probabilities) and rounds
each log-probability to ~3 significant digits: tests/test_reference_cache.py measures a median
0.15% change of the per-token KL (at most 2%), against a median 0.9% for the top-64 truncation
itself, and the rounded value is no longer a strict lower bound of the exact KL. The default is
float32.

Layout of a cache folder: ``meta.json`` (format, version, ``top_k``, ``vocab_size``, counts,
the reference ``fingerprint``, dtypes), ``index.json`` (example ids and their token counts, in
storage order; offsets are the running sum) and the three ``.npy`` arrays, which
:meth:`ReferenceCache.open` memory-maps read-only, so any number of processes (data-parallel
ranks) share one copy in the page cache.

Writing (:class:`ReferenceCacheWriter`) streams: each chunk of tokens is appended to raw files in
a private temporary folder as it is computed, so memory stays at one chunk whatever the data's
size; on a clean exit the raw files become ``.npy`` files (header + copy, so the arrays transiently
take twice their disk) and the folder is renamed into place (:func:`lightning_safety.paths.atomic_directory`).
An exception leaves nothing behind; a hard crash leaves nothing at the target path (only the
hidden temporary folder beside it).

The approximation: :func:`topk_kl` computes the KL between the policy and the reference
coarse-grained to ``k + 1`` outcomes (the ``k`` cached tokens and "everything else"). By the
data-processing inequality a KL between coarse-grained distributions never exceeds the KL between
the full ones, so it is a lower bound of the exact KL (forward and reverse), and it is exact when
``k = V``. For peaked distributions like a language model's the top ``k`` hold nearly all the mass
and the bound is tight (measured in the tests: see :func:`topk_kl`).

Keying, and why lookups fail closed: entries are keyed by the data's stable example id
(``batch["id"]``) and checked against the example's number of response tokens at every lookup.
If the data, the chat template, the tokenizer or ``max_length`` changed since the cache was
built, a cached row would silently describe another text and the KL would pull toward the wrong
distribution; an unknown id or a different token count is therefore an error that says to rebuild
the cache, never a silent fallback. The reference itself is pinned by ``fingerprint`` (given by
the caller when writing and checked when opening). The id + length check cannot see a change that
keeps every response's token count, such as another system prompt or chat template on data with
explicit ids (the prompt changes the reference's distribution, not the response length): fold
such settings into the fingerprint (e.g. a hash of the reference's fingerprint, the chat template,
the system prompt and ``max_length``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from lightning_safety.errors import LightningSafetyError
from lightning_safety.paths import atomic_directory

__all__ = [
    "CachedTokens",
    "DEFAULT_TOP_K",
    "LOGPROB_DTYPES",
    "ReferenceCache",
    "ReferenceCacheError",
    "ReferenceCacheWriter",
    "coarse_kl",
    "policy_coarse_log_probs",
    "topk_kl",
]

DEFAULT_TOP_K = 64
FORMAT = "lightning_safety.reference_cache"
VERSION = 1
REBUILD = "rebuild it with `lightning-safety precompute-reference`"

#: Allowed dtypes of the stored log-probabilities. float16 makes the cache 25% smaller for k = 64
#: (388 instead of 516 bytes per token) and changes the KL by a median 0.15% (measured in the tests).
LOGPROB_DTYPES = ("float32", "float16")

META_FILE = "meta.json"
INDEX_FILE = "index.json"
ARRAYS = ("token_ids", "logprobs", "tail")  # each stored as NAME.npy

# log of the smallest normal float32: the floor of a stored or computed log tail mass.
LOG_TINY = float(np.log(np.finfo(np.float32).tiny))
# Stored log-probabilities are floored here (a -inf logit, e.g. a masked vocabulary slot), which
# float16 can hold and whose exp is exactly 0 in float32.
LOGPROB_FLOOR = -1.0e4
# Fills the cached ids' slots when summing the rest of a distribution: finite (unlike -inf), so
# an all-masked row (k = V) gives finite values and zero gradients instead of NaN.
_MASKED = -1.0e30

Direction = Literal["forward", "reverse"]


class ReferenceCacheError(LightningSafetyError):
    """A reference cache is missing, unreadable, built for another reference, or stale for the data."""


class _RowIndexable(Protocol):
    """Logits that can be indexed as ``logits[rows, positions] -> [n, V]`` (a tensor or ProjectedLogits)."""

    def __getitem__(self, index: Any) -> Tensor: ...


# --------------------------------------------------------------------------------------------
# What a lookup returns, and the KL computed from it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedTokens:
    """The reference's top-k output for ``M`` response tokens.

    Attributes:
        token_ids: ``[M, k]`` int64 ids of the cached tokens, most likely first.
        logprobs: ``[M, k]`` float32 reference log-probabilities of those ids.
        tail: ``[M]`` float32 log of the reference mass outside them (floored at ``LOG_TINY``).

    ``tokens[a:b]`` (or a 1-D index tensor) selects tokens; :meth:`split` cuts it into chunks
    like ``Tensor.split``.
    """

    token_ids: Tensor
    logprobs: Tensor
    tail: Tensor

    def __len__(self) -> int:
        return int(self.tail.shape[0])

    @property
    def num_tokens(self) -> int:
        return len(self)

    @property
    def top_k(self) -> int:
        return int(self.token_ids.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.tail.device

    def __getitem__(self, index: slice | Tensor) -> "CachedTokens":
        if isinstance(index, int) or not isinstance(index, (slice, Tensor)):
            raise TypeError(
                f"CachedTokens takes a slice or a 1-D index tensor; got {type(index).__name__}: "
                "use tokens[a:b] to keep the token dimension"
            )
        return CachedTokens(self.token_ids[index], self.logprobs[index], self.tail[index])

    def split(self, size: int) -> tuple["CachedTokens", ...]:
        """Consecutive chunks of ``size`` tokens (the last may be shorter)."""
        return tuple(self[start : start + size] for start in range(0, len(self), size))

    def to(self, device: torch.device | str | None) -> "CachedTokens":
        return CachedTokens(self.token_ids.to(device), self.logprobs.to(device), self.tail.to(device))


def topk_kl(
    policy_logits: Tensor,
    cached: CachedTokens,
    direction: Direction = "forward",
    lse: Tensor | None = None,
) -> Tensor:
    """Per-token KL between the policy and the cached reference, coarse-grained to ``k + 1`` outcomes.

    The ``k + 1`` outcomes are the ``k`` cached token ids and "everything else". With ``p`` the
    policy and ``q`` the reference (all in float32)::

        log p_i    = policy_logits[ids_i] - lse                       (gathered, i = 1..k)
        log p_tail = log sum_{v not cached} exp(policy_logits[v] - lse)
        forward:  KL(q || p) = sum_i q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail)
        reverse:  KL(p || q) = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

    Bound: coarse-graining never increases a KL (data-processing inequality), so this is a lower
    bound of the exact full-vocabulary KL in both directions, and exact when ``k = V`` (the tail is
    empty). The gap is the KL carried by the tail: for peaked, language-model-like references
    (``k = 32`` of ``V = 1000``, every logit of the policy perturbed) the tests measure a median
    relative error of 2.3% when the top 32 hold a median 99.2% of the mass and 0.28% at 99.95%
    (forward and reverse alike); ~9.5% for a flatter reference (94.6%).

    ``log p_tail`` is summed directly over the tokens outside the cached ids (a masked
    log-sum-exp, one extra float32 ``[m, V]`` temporary like the log-sum-exp itself) rather than as
    ``log(1 - sum_i p_i)``, which in float32 cannot resolve a tail below ~1e-6 and would give noisy
    values and gradients on the confident tokens that dominate real text. It is floored at
    ``log(float32 tiny)``.

    Args:
        policy_logits: ``[m, V]`` policy logits (any float dtype) at the cached tokens' positions.
        cached: the ``m`` tokens' :class:`CachedTokens` (same device).
        direction: "forward" for ``KL(pi_ref || pi_theta)``, "reverse" for ``KL(pi_theta || pi_ref)``.
        lse: ``[m]`` ``logsumexp(policy_logits.float(), -1)`` if the caller already has it (the NLL
            needs it too); computed here when None.

    Returns:
        ``[m]`` float32 KL per token, differentiable with respect to ``policy_logits`` (and ``lse``).
    """
    if direction not in ("forward", "reverse"):
        raise LightningSafetyError(f"direction must be 'forward' or 'reverse'; got {direction!r}")
    if not isinstance(policy_logits, Tensor) or policy_logits.dim() != 2:
        got = tuple(policy_logits.shape) if isinstance(policy_logits, Tensor) else type(policy_logits).__name__
        raise ReferenceCacheError(f"policy_logits must be an [m, V] tensor; got {got}: gather the response tokens first")
    if policy_logits.shape[0] != len(cached):
        raise ReferenceCacheError(
            f"policy_logits has {policy_logits.shape[0]} tokens but the cached reference {len(cached)}: "
            "look up the same examples, in the same order, as the logits' rows"
        )
    x = policy_logits.float()  # [m, V]
    if lse is None:
        lse = torch.logsumexp(x, dim=-1)
    return coarse_kl(*policy_coarse_log_probs(x, cached, lse), cached, direction)


def policy_coarse_log_probs(x: Tensor, cached: CachedTokens, lse: Tensor) -> tuple[Tensor, Tensor]:
    """The policy's log-probabilities of the cached ids ``[m, k]`` and of the rest ``[m]``.

    ``x`` is ``[m, V]`` float32 logits and ``lse`` their ``[m]`` log-sum-exp. The rest is summed over
    the other tokens (a masked log-sum-exp), not taken as ``1 - sum p``, which float32 cannot resolve
    for tiny tails; it is floored at ``LOG_TINY``.
    """
    ids = cached.token_ids.long()  # [m, k]
    logp_ids = x.gather(-1, ids) - lse[:, None]  # [m, k]
    rest = x.scatter(-1, ids, _MASKED)  # [m, V]: the cached ids removed
    logp_tail = (torch.logsumexp(rest, dim=-1) - lse).clamp_min(LOG_TINY)  # [m]
    return logp_ids, logp_tail


def coarse_kl(logp_ids: Tensor, logp_tail: Tensor, cached: CachedTokens, direction: Direction) -> Tensor:
    """KL ``[m]`` over the ``k + 1`` outcomes from the policy's (:func:`policy_coarse_log_probs`) and the cache's log-probs."""
    logq = torch.cat([cached.logprobs.float(), cached.tail.float()[:, None]], dim=-1)  # [m, k + 1]
    logp = torch.cat([logp_ids, logp_tail[:, None]], dim=-1)  # [m, k + 1]
    if direction == "forward":
        return (logq.exp() * (logq - logp)).sum(dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _reference_topk(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[n, V]`` reference logits -> top-k ids ``[n, k]``, log-probs ``[n, k]``, log tail ``[n]`` (float32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    top, ids = logprobs.topk(top_k, dim=-1)  # sorted, most likely first
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)  # [n]; -inf when k = V
    return ids, top.clamp_min(LOGPROB_FLOOR), tail.clamp_min(LOG_TINY)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ReferenceCacheWriter:
    """Build a reference cache at ``path``; a context manager that publishes it on a clean exit.

    ::

        with ReferenceCacheWriter(path, 64, vocab_size, fingerprint) as writer:
            for batch in loader:
                if all(i in writer for i in batch["id"]):
                    continue  # skip the forward
                logits = reference(batch["input_ids"], batch["attention_mask"])  # [B, T, V]
                writer.add_batch(batch["id"], logits, batch["labels"])

    Ids already added are skipped (a repeated example, or a padded last batch under DDP). Tokens
    are processed ``chunk_tokens`` at a time (one float32 ``[chunk_tokens, V]`` log-softmax and its
    masked copy on the logits' device) and appended to files in a temporary folder, which becomes
    ``path`` only when the ``with`` block completes; an exception leaves nothing at ``path``.

    Args:
        path: the cache folder to create; must not exist yet.
        top_k: ``k``, tokens kept per position (at most ``vocab_size``).
        vocab_size: ``V`` of the reference.
        fingerprint: identifies the reference model (e.g. ``model_fingerprint``); checked by
            :meth:`ReferenceCache.open`.
        logprob_dtype: "float32" (default) or "float16" (a quarter less disk at k = 64).
        chunk_tokens: tokens per log-softmax/top-k chunk.
    """

    def __init__(
        self,
        path: str | Path,
        top_k: int = DEFAULT_TOP_K,
        vocab_size: int | None = None,
        fingerprint: str | None = None,
        *,
        logprob_dtype: str = "float32",
        chunk_tokens: int = 512,
    ) -> None:
        if not _positive_int(vocab_size):
            raise ReferenceCacheError(
                f"vocab_size must be a positive integer; got {vocab_size!r}: pass the reference's vocabulary size"
            )
        if not _positive_int(top_k) or top_k > vocab_size:
            raise ReferenceCacheError(f"top_k must be an integer in [1, vocab_size={vocab_size}]; got {top_k!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ReferenceCacheError("fingerprint must be a non-empty string: pass the reference model's fingerprint")
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ReferenceCacheError(f"logprob_dtype must be one of {', '.join(LOGPROB_DTYPES)}; got {logprob_dtype!r}")
        if not _positive_int(chunk_tokens):
            raise ReferenceCacheError(f"chunk_tokens must be a positive integer; got {chunk_tokens!r}")
        self.path = Path(path)
        self.top_k = int(top_k)
        self.vocab_size = int(vocab_size)
        self.fingerprint = fingerprint
        self.logprob_dtype = logprob_dtype
        self.chunk_tokens = int(chunk_tokens)
        self._dtypes = {"token_ids": np.dtype(np.int32), "logprobs": np.dtype(logprob_dtype), "tail": np.dtype(np.float32)}
        self._ids: list[str] = []
        self._lengths: list[int] = []
        self._known: set[str] = set()
        self._num_tokens = 0
        self._stack: ExitStack | None = None
        self._folder: Path | None = None
        self._files: dict[str, BinaryIO] = {}

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "ReferenceCacheWriter":
        if self._stack is not None or self._files:
            raise ReferenceCacheError("this ReferenceCacheWriter is already in use: make a new one per cache")
        if self.path.exists():
            raise ReferenceCacheError(
                f"{self.path} already exists: open it with ReferenceCache.open, or delete it to rebuild it"
            )
        stack = ExitStack()
        self._folder = stack.enter_context(atomic_directory(self.path))
        self._stack = stack
        for name in ARRAYS:
            self._files[name] = open(self._folder / f"{name}.bin", "wb")
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        if exc_type is not None:
            self._close_files()
            stack.__exit__(exc_type, exc, traceback)  # removes the temporary folder
            return False
        with stack:  # renames the folder into place, or removes it if finishing fails
            try:
                self._finish()
            finally:
                self._close_files()
        return False

    def __contains__(self, example_id: object) -> bool:
        return str(example_id) in self._known

    @property
    def num_examples(self) -> int:
        return len(self._ids)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    # ------------------------------------------------------------------ adding
    def add(self, example_id: str, logits: Tensor) -> bool:
        """Add one example from its reference logits ``[n, V]`` at its ``n`` response positions, in order.

        Returns False (and stores nothing) when the id was already added.
        """
        self._require_open()
        example_id = str(example_id)
        if example_id in self._known:
            return False
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ReferenceCacheError(f"logits must be an [n, V] tensor of one example's response positions; got {got}")
        with self._all_or_nothing():
            for start in range(0, logits.shape[0], self.chunk_tokens):
                self._append(logits[start : start + self.chunk_tokens])
        self._record(example_id, int(logits.shape[0]))
        return True

    def add_batch(
        self,
        ids: Sequence[str],
        logits: Tensor | _RowIndexable,
        labels: Tensor,
        logits_offset: int = 0,
        *,
        ignore_index: int = -100,
    ) -> int:
        """Add a batch's examples from its reference logits; returns how many were new.

        Response positions are found as :func:`lightning_safety.losses.adaptive_kl_loss` finds them:
        position ``t`` (predicting ``labels[:, t + 1]``) for every shifted label that is not
        ``ignore_index``, row by row, in position order.

        Args:
            ids: ``B`` example ids (``batch["id"]``).
            logits: ``[B, T - logits_offset, V]`` reference logits, or an object indexed as
                ``logits[rows, positions] -> [n, V]`` such as :class:`~lightning_safety.losses.ProjectedLogits`.
            labels: ``[B, T]`` labels of the input (unshifted).
            logits_offset: leading positions the logits do not cover (Hugging Face
                ``logits_to_keep = T - logits_offset``): logits row ``j`` is position ``j + logits_offset``.
            ignore_index: label value of tokens that are not trained on.
        """
        self._require_open()
        ids = [str(example_id) for example_id in ids]
        if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.is_floating_point():
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ReferenceCacheError(f"labels must be an integer [B, T] tensor; got {got}: pass batch['labels']")
        batch, seq_len = labels.shape
        if len(ids) != batch:
            raise ReferenceCacheError(f"{len(ids)} ids for {batch} label rows: pass batch['id'] with its batch's labels")
        if isinstance(logits_offset, bool) or not isinstance(logits_offset, int) or not 0 <= logits_offset < seq_len:
            raise ReferenceCacheError(f"logits_offset must be an integer in [0, {seq_len}); got {logits_offset!r}")
        shape = getattr(logits, "shape", None)
        if shape is not None and (len(shape) != 3 or shape[0] != batch or shape[1] + logits_offset != seq_len):
            raise ReferenceCacheError(
                f"logits of shape {tuple(shape)} with logits_offset {logits_offset} do not cover labels of "
                f"shape {(batch, seq_len)}: pass [B, T - logits_offset, V] logits"
            )
        new: list[int] = []  # rows to add: ids not added before, first occurrence in this batch
        seen = set(self._known)
        for row, example_id in enumerate(ids):
            if example_id not in seen:
                seen.add(example_id)
                new.append(row)
        if not new:
            return 0
        mask = labels[new, 1:] != ignore_index  # [b, T-1]: position t predicts labels[:, t + 1]
        local_rows, positions = mask.nonzero(as_tuple=True)  # row-major: each example contiguous
        if positions.numel() and int(positions.min()) < logits_offset:
            raise ReferenceCacheError(
                f"response tokens start before logits_offset {logits_offset}: keep logits from one position "
                "before the first response token"
            )
        rows = torch.tensor(new, dtype=torch.long, device=labels.device)[local_rows]
        device = getattr(logits, "device", None)
        rows, positions = rows.to(device), (positions - logits_offset).to(device)
        with self._all_or_nothing():
            for start in range(0, rows.shape[0], self.chunk_tokens):
                stop = start + self.chunk_tokens
                self._append(logits[rows[start:stop], positions[start:stop]])
        for row, length in zip(new, mask.sum(dim=1).tolist()):
            self._record(ids[row], int(length))
        return len(new)

    # ------------------------------------------------------------------ internals
    def _require_open(self) -> None:
        if self._stack is None:
            raise ReferenceCacheError(
                "the ReferenceCacheWriter is not open: use it as `with ReferenceCacheWriter(...) as writer:`"
            )

    @contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Undo the tokens appended inside the block if it fails, so that a caller who catches the
        error and goes on writing cannot shift every later example's offsets."""
        positions = {name: file.tell() for name, file in self._files.items()}
        num_tokens = self._num_tokens
        try:
            yield
        except BaseException:
            for name, file in self._files.items():
                file.seek(positions[name])
                file.truncate()
            self._num_tokens = num_tokens
            raise

    def _append(self, logits: Tensor) -> None:
        """Top-k one chunk ``[c, V]`` of reference logits and append it to the files."""
        if logits.dim() != 2 or logits.shape[-1] != self.vocab_size:
            raise ReferenceCacheError(
                f"reference logits have shape {tuple(logits.shape)}, expected [n, {self.vocab_size}]: "
                "pass the logits of the reference the cache was made for"
            )
        if logits.shape[0] == 0:
            return
        with torch.no_grad():
            ids, logprobs, tail = _reference_topk(logits.detach(), self.top_k)
        if bool(torch.isnan(logprobs).any() or torch.isnan(tail).any()):
            raise ReferenceCacheError("the reference logits contain NaN: check the reference model and its dtype")
        for name, values in (("token_ids", ids), ("logprobs", logprobs), ("tail", tail)):
            array = values.cpu().numpy().astype(self._dtypes[name], copy=False)
            self._files[name].write(np.ascontiguousarray(array).tobytes())
        self._num_tokens += int(logits.shape[0])

    def _record(self, example_id: str, length: int) -> None:
        self._ids.append(example_id)
        self._lengths.append(length)
        self._known.add(example_id)

    def _close_files(self) -> None:
        for file in self._files.values():
            file.close()
        self._files = {}

    def _finish(self) -> None:
        """Turn the raw files into ``.npy`` arrays and write the index and the metadata (last)."""
        assert self._folder is not None
        for file in self._files.values():
            file.flush()
        for name in ARRAYS:
            shape = (self._num_tokens,) if name == "tail" else (self._num_tokens, self.top_k)
            raw = self._folder / f"{name}.bin"
            with open(self._folder / f"{name}.npy", "wb") as out, open(raw, "rb") as source:
                header = {"descr": np.lib.format.dtype_to_descr(self._dtypes[name]), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(out, header)
                shutil.copyfileobj(source, out, length=1 << 22)
            raw.unlink()
        index = {"ids": self._ids, "lengths": self._lengths}
        (self._folder / INDEX_FILE).write_text(json.dumps(index))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "num_examples": len(self._ids),
            "num_tokens": self._num_tokens,
            "fingerprint": self.fingerprint,
            "token_id_dtype": "int32",
            "logprob_dtype": self.logprob_dtype,
            "tail_dtype": "float32",
        }
        (self._folder / META_FILE).write_text(json.dumps(meta, indent=1))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class ReferenceCache:
    """A reference cache opened read-only: arrays memory-mapped, lookups by example id and length.

    Use :meth:`open`. Safe to open from several processes at once (nothing is written).

    Attributes (from ``meta.json``): ``top_k``, ``vocab_size``, ``num_examples``, ``num_tokens``
    (int), ``fingerprint`` (the reference it was built for), ``logprob_dtype`` ("float32"/"float16").
    """

    def __init__(self, path: Path, meta: dict[str, Any], index_bytes: bytes, ids: list[str],
                 lengths: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.top_k, self.vocab_size = int(meta["top_k"]), int(meta["vocab_size"])
        self.num_examples, self.num_tokens = int(meta["num_examples"]), int(meta["num_tokens"])
        self.fingerprint, self.logprob_dtype = str(meta["fingerprint"]), str(meta["logprob_dtype"])
        self._digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode() + b"\0" + index_bytes).hexdigest()[:16]
        self._rows = {example_id: row for row, example_id in enumerate(ids)}
        self._lengths = lengths  # [E] int64
        self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(ids) else lengths
        self._arrays = arrays

    @classmethod
    def open(cls, path: str | Path, *, fingerprint: str | None = None) -> "ReferenceCache":
        """Open the cache at ``path``; with ``fingerprint``, refuse one built for another reference.

        Raises:
            ReferenceCacheError: missing or unreadable files, another format version, arrays that
                disagree with the metadata, or a fingerprint mismatch.
        """
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise ReferenceCacheError(f"no reference cache at {path} ({META_FILE} not found): {REBUILD}")
        meta = _read_json(path, META_FILE)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ReferenceCacheError(f"{path} is not a reference cache ({META_FILE} has another format): {REBUILD}")
        if meta.get("version") != VERSION:
            raise ReferenceCacheError(
                f"the reference cache {path} has format version {meta.get('version')!r}, this library reads "
                f"version {VERSION}: {REBUILD}"
            )
        fields = ("top_k", "vocab_size", "num_examples", "num_tokens")
        if not all(isinstance(meta.get(key), int) and meta[key] >= 0 for key in fields) or \
                meta.get("logprob_dtype") not in LOGPROB_DTYPES or not isinstance(meta.get("fingerprint"), str):
            raise ReferenceCacheError(f"the reference cache {path} has a damaged {META_FILE}: delete it and {REBUILD}")
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            raise ReferenceCacheError(
                f"the reference cache {path} was built for reference {meta['fingerprint']!r}, not {fingerprint!r}: "
                f"point to the cache of this reference or {REBUILD}"
            )
        index_bytes = _read_bytes(path, INDEX_FILE)
        ids, lengths = _parse_index(path, index_bytes, meta)
        num_tokens, top_k = meta["num_tokens"], meta["top_k"]
        expected = {
            "token_ids": (np.dtype(np.int32), (num_tokens, top_k)),
            "logprobs": (np.dtype(meta["logprob_dtype"]), (num_tokens, top_k)),
            "tail": (np.dtype(np.float32), (num_tokens,)),
        }
        arrays = {}
        for name, (dtype, shape) in expected.items():
            try:
                array = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ReferenceCacheError(
                    f"cannot read {name}.npy of the reference cache {path} ({type(error).__name__}): delete it and {REBUILD}"
                ) from error
            if array.dtype != dtype or array.shape != shape:
                raise ReferenceCacheError(
                    f"{name}.npy of the reference cache {path} is {array.dtype} {array.shape}, its {META_FILE} says "
                    f"{dtype} {shape}: delete it and {REBUILD}"
                )
            arrays[name] = array
        return cls(path, meta, index_bytes, ids, lengths, arrays)

    # ------------------------------------------------------------------ properties
    @property
    def bytes_per_token(self) -> int:
        """Disk bytes per response token: ``k * (4 + logprob bytes) + 4``."""
        return sum(array.dtype.itemsize * (array.shape[1] if array.ndim == 2 else 1) for array in self._arrays.values())

    @property
    def digest(self) -> str:
        """16 hex digits identifying the cache (hash of its metadata and index, not of the arrays)."""
        return self._digest

    @property
    def example_ids(self) -> list[str]:
        """The cached example ids, in storage order."""
        return list(self._rows)

    def __contains__(self, example_id: object) -> bool:
        return str(example_id) in self._rows

    def __len__(self) -> int:
        return self.num_examples

    def length(self, example_id: str) -> int:
        """Number of cached response tokens of ``example_id`` (KeyError if absent)."""
        return int(self._lengths[self._rows[str(example_id)]])

    def __repr__(self) -> str:
        return (f"ReferenceCache({str(self.path)!r}, examples={self.num_examples}, tokens={self.num_tokens}, "
                f"top_k={self.top_k}, digest={self.digest!r})")

    # ------------------------------------------------------------------ lookup
    def lookup(
        self,
        ids: Sequence[str],
        lengths: Sequence[int] | Tensor,
        device: torch.device | str | None = None,
    ) -> CachedTokens:
        """The cached tokens of ``ids``, concatenated in the given order (each in position order).

        Args:
            ids: ``E`` example ids (e.g. the ids of a batch's rows that need a KL, in row order).
            lengths: ``[E]`` their numbers of response tokens now (``tokens_per_example``); a
                tensor costs one host sync.
            device: where the returned tensors go (CPU when None).

        Returns:
            :class:`CachedTokens` of ``M = sum(lengths)`` tokens.

        Raises:
            ReferenceCacheError: an id is not in the cache, or its length differs from the cached
                one (the data or tokenization changed since the cache was built).
        """
        ids = [str(example_id) for example_id in ids]
        wanted = np.asarray(lengths.tolist() if isinstance(lengths, Tensor) else list(lengths), dtype=np.int64)
        if wanted.shape != (len(ids),):
            raise ReferenceCacheError(f"{len(ids)} ids but {wanted.size} lengths: pass one response length per id")
        missing = [example_id for example_id in ids if example_id not in self._rows]
        if missing:
            raise ReferenceCacheError(
                f"the reference cache {self.path} has no entry for {len(missing)} example(s) (e.g. {missing[0]!r}): "
                f"the data changed since it was built; {REBUILD}"
            )
        rows = np.fromiter((self._rows[example_id] for example_id in ids), dtype=np.int64, count=len(ids))
        stale = np.flatnonzero(self._lengths[rows] != wanted)
        if stale.size:
            first = int(stale[0])
            raise ReferenceCacheError(
                f"example {ids[first]!r} has {int(wanted[first])} response tokens but the reference cache {self.path} "
                f"holds {int(self._lengths[rows[first]])} ({stale.size} example(s) differ): the data or tokenization "
                f"changed since it was built; {REBUILD}"
            )
        total = int(wanted.sum())
        # Output token p of example j (starting at out_start_j) is stored at offset_j + p - out_start_j.
        out_start = np.cumsum(wanted) - wanted
        flat = np.repeat(self._offsets[rows] - out_start, wanted) + np.arange(total, dtype=np.int64)
        token_ids = torch.from_numpy(np.asarray(self._arrays["token_ids"][flat]))
        logprobs = torch.from_numpy(np.asarray(self._arrays["logprobs"][flat]))
        tail = torch.from_numpy(np.asarray(self._arrays["tail"][flat]))
        return CachedTokens(
            token_ids=token_ids.to(device=device, dtype=torch.int64),
            logprobs=logprobs.to(device=device, dtype=torch.float32),
            tail=tail.to(device=device, dtype=torch.float32),
        )


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        return (path / name).read_bytes()
    except OSError as error:
        raise ReferenceCacheError(
            f"cannot read {name} of the reference cache {path} ({type(error).__name__}): delete it and {REBUILD}"
        ) from error


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(_read_bytes(path, name))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReferenceCacheError(
            f"{name} of the reference cache {path} is not valid JSON: delete it and {REBUILD}"
        ) from error


def _parse_index(path: Path, index_bytes: bytes, meta: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Example ids and ``[E]`` int64 lengths from ``index.json``, checked against ``meta.json``."""
    damaged = ReferenceCacheError(
        f"{INDEX_FILE} of the reference cache {path} is damaged or disagrees with {META_FILE}: delete it and {REBUILD}"
    )
    try:
        index = json.loads(index_bytes)
        ids, lengths = index["ids"], np.asarray(index["lengths"], dtype=np.int64)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OverflowError):
        raise damaged from None
    if (
        not isinstance(ids, list)
        or not all(isinstance(example_id, str) for example_id in ids)
        or len(set(ids)) != len(ids)
        or lengths.shape != (len(ids),)
        or len(ids) != meta["num_examples"]
        or (lengths < 0).any()
        or int(lengths.sum()) != meta["num_tokens"]
    ):
        raise damaged
    return ids, lengths
