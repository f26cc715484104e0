"""The judge contract: batched harm scores in [0, 1] that fail closed.

A judge scores training examples (a user request, and optionally the dataset's assistant
response) for harm: 0 = benign, 1 = certainly harmful. Backends implement ``_score_batch``;
:meth:`Judge.score` does everything else the same way for all of them: input checks,
sanitising (:func:`~lightning_safety.risk.text.sanitize_for_judge`), length-sorted batching, and
failing closed.

Fail-closed: a judge that cannot give a valid score for a row scores it 1.0 (treated as
harmful: the example is held close to the safe reference) and marks it ``failed``. That covers an
exception or a timeout in a batch (every row of that batch), and per row a missing or unparsable
answer, NaN/inf, or a value outside [0, 1]. Each failed row adds one to ``judge.failures`` and to
``judge.failures_by_kind[kind]``; the first failure of each kind logs a warning. A failure is never
scored 0. Misconfiguration (:class:`~lightning_safety.errors.JudgeError`) is raised, not scored.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_safety.errors import JudgeError
from lightning_safety.risk.text import sanitize_for_judge

logger = logging.getLogger("lightning_safety.risk.judges")

# Numerical slack for a backend's [0, 1] score (an expectation can land at 1 + 1e-7).
_RANGE_SLACK = 1e-5


@dataclass
class JudgeResult:
    """Scores of one :meth:`Judge.score` call, in the order of the inputs.

    Attributes:
        score: float32 [N] harm score in [0, 1] (1.0 where ``failed``).
        raw: the backend's own output per row (expected 1-5 rating, P(unsafe), label probability,
            reply text, ...); None where there was none.
        failed: bool [N], True where the row could not be scored and was set to 1 (fail-closed).
    """

    score: Tensor
    raw: list[float | str | None]
    failed: Tensor

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @property
    def num_failed(self) -> int:
        return int(self.failed.sum())


@dataclass(frozen=True)
class RowFailure:
    """What a backend returns instead of a score for a row it could not score.

    ``kind`` names the failure ("timeout", "http-error", ...) for the counters and the
    once-per-kind warning; ``detail`` is one short line for that warning (never secrets).
    """

    kind: str
    detail: str = ""


ScoreLike = float | None | RowFailure


class Judge(ABC):
    """Base class of harm judges. Subclasses implement :meth:`_score_batch`.

    Attributes:
        batch_size: rows per ``_score_batch`` call (``HTTPJudge``: requests in flight at once).
        tokenizer: the judge's tokenizer (None for remote judges); its control tokens are
            neutralised in the example text.
        calls: examples scored so far (every row of every :meth:`score` call, failed or not).
        failures: rows that failed and were scored 1.0.
        failures_by_kind: the same, per failure kind.
    """

    tokenizer: Any = None

    def __init__(self, *, batch_size: int) -> None:
        if int(batch_size) < 1:
            raise JudgeError(f"judge batch_size={batch_size} is invalid: use a positive integer")
        self.batch_size = int(batch_size)
        self.calls = 0
        self.failures = 0
        self.failures_by_kind: Counter[str] = Counter()
        self._warned: set[str] = set()

    @property
    def name(self) -> str:
        """Short description for logs and metadata, e.g. ``rubric:SmolLM2-135M-Instruct``."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"

    def score(self, prompts: Sequence[str], responses: Sequence[str] | None = None) -> JudgeResult:
        """Harm scores for ``prompts`` (user requests) and, if given, their ``responses``.

        ``responses=None`` judges each request alone; otherwise row i is the example
        (prompts[i], responses[i]). Rows are sorted by length into batches (less padding) and
        the results returned in input order.

        Raises:
            JudgeError: inputs are not lists of strings of the same length, or the judge is not
                ready (e.g. an untrained head). Scoring failures do not raise: they fail closed.
        """
        prompts, responses = _check_inputs(prompts, responses)
        self._check_ready()
        count = len(prompts)
        prompts = [sanitize_for_judge(text, self.tokenizer) for text in prompts]
        if responses is not None:
            responses = [sanitize_for_judge(text, self.tokenizer) for text in responses]
        scores = torch.ones(count, dtype=torch.float32)
        failed = torch.zeros(count, dtype=torch.bool)
        raw: list[float | str | None] = [None] * count

        def length(i: int) -> int:
            return len(prompts[i]) + (len(responses[i]) if responses is not None else 0)

        order = sorted(range(count), key=length, reverse=True)  # longest first: memory errors show early
        step = self._batch_rows()
        for start in range(0, count, step):
            rows = order[start : start + step]
            batch_responses = None if responses is None else [responses[i] for i in rows]
            self._run_batch(rows, [prompts[i] for i in rows], batch_responses, scores, failed, raw)
        self.calls += count
        return JudgeResult(score=scores, raw=raw, failed=failed)

    @abstractmethod
    def _score_batch(
        self, prompts: list[str], responses: list[str] | None
    ) -> tuple[Sequence[ScoreLike] | Tensor, Sequence[float | str | None] | None]:
        """Scores in [0, 1] (or None / :class:`RowFailure` per failed row) and raw outputs.

        Receives sanitised text. May raise: the whole batch then fails closed.
        """

    def _batch_rows(self) -> int:
        """Rows per :meth:`_score_batch` call: ``batch_size``. A backend that bounds its own
        concurrency (``HTTPJudge``) takes the whole call, so a slow row holds up one worker, not a
        batch."""
        return self.batch_size

    def _check_ready(self) -> None:
        """Raise :class:`JudgeError` if the judge cannot score yet (override where needed)."""

    def _run_batch(
        self,
        rows: list[int],
        prompts: list[str],
        responses: list[str] | None,
        scores: Tensor,
        failed: Tensor,
        raw: list[float | str | None],
    ) -> None:
        try:
            values, outputs = self._score_batch(prompts, responses)
            values = values.tolist() if isinstance(values, Tensor) else list(values)
            outputs = [None] * len(rows) if outputs is None else list(outputs)
            if len(values) != len(rows) or len(outputs) != len(rows):
                raise ValueError(f"backend returned {len(values)} scores for {len(rows)} rows")
        except JudgeError:
            raise  # misconfiguration is the caller's to fix, not a score
        except Exception as error:  # noqa: BLE001 - any runtime failure fails closed
            kind = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
            self._record_failure(rows, kind, _one_line(error), failed)
            return
        for row, value, output in zip(rows, values, outputs):
            raw[row] = _plain(output)
            checked, kind, detail = _check_value(value)
            if kind is None:
                scores[row] = checked
            else:
                self._record_failure([row], kind, detail, failed)

    def _record_failure(self, rows: list[int], kind: str, detail: str, failed: Tensor) -> None:
        failed[rows] = True  # their score stays at 1.0
        self.failures += len(rows)
        self.failures_by_kind[kind] += len(rows)
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(
                "%s: %d example(s) could not be scored (%s: %s); scored 1.0 (fail-closed). Further "
                "'%s' failures are counted in judge.failures without a warning.",
                self.name, len(rows), kind, detail, kind,
            )


def _check_inputs(prompts: Sequence[str], responses: Sequence[str] | None) -> tuple[list[str], list[str] | None]:
    if isinstance(prompts, str):
        raise JudgeError("judge.score takes a list of prompts, got one string: wrap it in a list")
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise JudgeError("judge.score prompts must all be strings: convert or drop the other values")
    if responses is None:
        return prompts, None
    if isinstance(responses, str):
        raise JudgeError("judge.score takes a list of responses, got one string: wrap it in a list")
    responses = list(responses)
    if len(responses) != len(prompts):
        raise JudgeError(
            f"judge.score got {len(prompts)} prompts but {len(responses)} responses: pass one response "
            "per prompt, or responses=None to judge the requests alone"
        )
    if not all(isinstance(r, str) for r in responses):
        raise JudgeError("judge.score responses must all be strings: use '' for an empty response")
    return prompts, responses


def _check_value(value: Any) -> tuple[float, str | None, str]:
    """(score, failure kind or None, detail) for one backend value."""
    if isinstance(value, RowFailure):
        return 1.0, value.kind, value.detail
    if value is None:
        return 1.0, "unparsable", "the judge's output had no score"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 1.0, "unparsable", f"score {value!r} is not a number"
    if not math.isfinite(number):
        return 1.0, "non-finite", f"score {number}"
    if not -_RANGE_SLACK <= number <= 1.0 + _RANGE_SLACK:
        return 1.0, "out-of-range", f"score {number} is outside [0, 1]"
    return min(max(number, 0.0), 1.0), None, ""


def _plain(output: Any) -> float | str | None:
    if output is None or isinstance(output, str):
        return output
    if isinstance(output, Tensor):
        output = output.item()
    try:
        return float(output)
    except (TypeError, ValueError):
        return str(output)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]
