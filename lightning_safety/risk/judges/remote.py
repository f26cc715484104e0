"""A judge behind an OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, TGI, hosted APIs).

Standard library only (urllib + json). One request per example, at most ``batch_size`` in flight
(a pool of worker threads: a slow row holds up one worker, not a batch); temperature 0; the reply's
rating (``"Rating: 4"``, see :func:`~lightning_safety.risk.judges.rubric.parse_rating`) maps to
(r - 1) / 4. ``raw`` is the reply text (None when no reply came). An HTTP error, a timeout, a
connection failure, a reply that is not chat-completions JSON, or a reply without a rating fails
closed (score 1, failed); so does a row left over once the judge's budget (``max_seconds``,
``max_failures``) is spent, without a request. The API key is read from an environment variable
and is only ever sent in the ``Authorization`` header: never logged, never in ``repr``.
"""

from __future__ import annotations

import functools
import http.client
import json
import math
import numbers
import operator
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from lightning_safety.errors import JudgeError
from lightning_safety.risk.judges.base import Judge, JudgeResult, RowFailure, ScoreLike
from lightning_safety.risk.judges.rubric import DEFAULT_RUBRIC, parse_rating, rating_to_score, rubric_message

_MAX_REPLY_BYTES = 1 << 20  # a chat completion with a few tokens is far smaller
BUDGET_EXHAUSTED = "budget-exhausted"


def chat_completions_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1/chat/completions``; a full endpoint stays."""
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _retryable(code: int) -> bool:
    return code == 429 or code >= 500


class HTTPJudge(Judge):
    """The 1-5 rubric asked of a model served over HTTP (OpenAI chat-completions API).

    Retries: a timeout, a connection error, HTTP 429 or 5xx is retried up to ``max_retries``
    times; retry k waits a random time in [d/2, d], d = ``min(max_backoff, retry_backoff *
    2 ** (k - 1))`` (exponential backoff with jitter, so rows that failed together do not retry
    together). Other HTTP errors, replies that are not chat-completions JSON and replies without a
    rating are not retried. A row whose attempts all failed fails closed with its last attempt's
    failure kind.

    Budget, so that a dead or flapping server cannot stall a training run: each attempt is cut at
    ``timeout`` seconds in all (connecting, sending and reading the whole reply; a server that
    trickles its reply is cut too); ``max_seconds`` bounds one :meth:`score` call (no attempt or
    retry starts after it, and an attempt is cut when it runs out); ``max_failures`` bounds the
    failed rows over the judge's life (every row after it fails fast). A row for which no request
    was sent because the budget was spent fails closed as ``"budget-exhausted"``.

    Args:
        url: server base URL (``http://localhost:8000``) or the full ``.../chat/completions`` URL.
        model: the model name the server expects in the request.
        api_key_env: name of the environment variable holding the API key (None: no key).
        timeout: seconds per attempt, in all.
        max_retries: further attempts after a timeout, connection error, HTTP 429 or 5xx.
        rubric: instructions before the example (default :data:`DEFAULT_RUBRIC`).
        batch_size: requests in flight at once.
        max_tokens: reply length limit (the answer is one short line).
        retry_backoff: the first retry's backoff in seconds; it doubles with each further retry.
        max_backoff: the cap on one backoff, in seconds.
        max_seconds: wall-clock budget of one :meth:`score` call (None: no limit).
        max_failures: failed rows (any kind but ``"budget-exhausted"``) after which every row
            fails fast without a request, until :meth:`reset_budget` (None: no limit).

    Attributes:
        requests: requests sent so far (first attempts and retries).
        retries: the retries among them.
        attempt_failures: failed attempts by kind, retried or not (``failures_by_kind`` counts
            failed rows, each once, under its final kind).
    """

    def __init__(
        self,
        url: str,
        *,
        model: str,
        api_key_env: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 1,
        rubric: str | None = None,
        batch_size: int = 4,
        max_tokens: int = 16,
        retry_backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_seconds: float | None = None,
        max_failures: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        if urlparse(str(url).strip()).scheme not in ("http", "https") or not urlparse(str(url).strip()).netloc:
            raise JudgeError(f"judge url '{url}' is not an http(s) URL: pass e.g. http://localhost:8000")
        if not _is_number(timeout) or timeout <= 0 or not _is_count(max_retries) or max_retries < 0:
            raise JudgeError(f"timeout={timeout} and max_retries={max_retries} are invalid: use timeout > 0, max_retries >= 0")
        for name, value in (("retry_backoff", retry_backoff), ("max_backoff", max_backoff)):
            if not _is_number(value) or value < 0:
                raise JudgeError(f"HTTPJudge {name}={value!r} is invalid: use a number of seconds >= 0")
        if max_seconds is not None and (not _is_number(max_seconds) or max_seconds <= 0):
            raise JudgeError(f"HTTPJudge max_seconds={max_seconds!r} is invalid: use seconds > 0, or None for no limit")
        if max_failures is not None and (not _is_count(max_failures) or max_failures < 1):
            raise JudgeError(f"HTTPJudge max_failures={max_failures!r} is invalid: use an integer >= 1, or None for no limit")
        self.endpoint = chat_completions_url(url)
        self.model = str(model)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.rubric = DEFAULT_RUBRIC if rubric is None else str(rubric)
        self.max_tokens = int(max_tokens)
        self.retry_backoff = float(retry_backoff)
        self.max_backoff = float(max_backoff)
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.max_failures = None if max_failures is None else int(max_failures)
        self.requests = 0
        self.retries = 0
        self.attempt_failures: Counter[str] = Counter()
        self._failed_rows = 0  # toward max_failures
        self._deadline: float | None = None  # of the running score call (max_seconds)
        self._lock = threading.Lock()  # the counters above are updated from worker threads
        self._jitter = random.Random()
        self._api_key: str | None = None
        if api_key_env is not None:
            self._api_key = os.environ.get(api_key_env) or None
            if self._api_key is None:
                raise JudgeError(
                    f"environment variable {api_key_env} (the judge's API key) is not set: export it, or "
                    "pass api_key_env=None for a server without a key"
                )

    @property
    def name(self) -> str:
        return f"http:{self.model}"

    def score(self, prompts: Sequence[str], responses: Sequence[str] | None = None) -> JudgeResult:
        """As :meth:`Judge.score`; ``max_seconds`` counts from the start of this call."""
        self._deadline = None if self.max_seconds is None else time.monotonic() + self.max_seconds
        try:
            return super().score(prompts, responses)
        finally:
            self._deadline = None

    def reset_budget(self) -> None:
        """Forget the failed rows counted toward ``max_failures``: requests are sent again."""
        with self._lock:
            self._failed_rows = 0

    def retry_delay(self, retry: int) -> float:
        """Seconds to wait before retry ``retry`` (1, 2, ...): jittered in [d/2, d], see the class doc."""
        ceiling = min(self.max_backoff, self.retry_backoff * 2.0 ** min(retry - 1, 64))
        return ceiling * (0.5 + 0.5 * self._jitter.random())

    def _batch_rows(self) -> int:
        return sys.maxsize  # the whole call: the pool below keeps batch_size requests in flight

    def _score_batch(self, prompts: list[str], responses: list[str] | None) -> tuple[list[ScoreLike], list[str | None]]:
        pairs = list(zip(prompts, responses if responses is not None else [None] * len(prompts)))
        with ThreadPoolExecutor(max_workers=min(self.batch_size, len(pairs))) as pool:
            outcomes = list(pool.map(lambda pair: self._judge_row(*pair), pairs))
        return [score for score, _ in outcomes], [reply for _, reply in outcomes]

    def _judge_row(self, prompt: str, response: str | None) -> tuple[ScoreLike, str | None]:
        score, reply = self._judge_one(prompt, response)
        if isinstance(score, RowFailure) and score.kind != BUDGET_EXHAUSTED:
            with self._lock:
                self._failed_rows += 1
        return score, reply

    def _judge_one(self, prompt: str, response: str | None) -> tuple[ScoreLike, str | None]:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": rubric_message(self.rubric, prompt, response)}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        reply = self._post(json.dumps(body).encode("utf-8"))
        if isinstance(reply, RowFailure):
            return reply, None
        rating = parse_rating(reply)
        if rating is None:
            failure = RowFailure("unparsable", f"no rating 1-5 in the reply {reply[:80]!r}")
            self._count_attempt_failure(failure)
            return failure, reply
        return rating_to_score(rating), reply

    def _post(self, data: bytes) -> str | RowFailure:
        """The reply text, retrying transient failures; a :class:`RowFailure` when none came."""
        failure: RowFailure | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.retry_delay(attempt)
                if self._deadline is not None and time.monotonic() + delay >= self._deadline:
                    break  # the retry could not start within max_seconds
                time.sleep(delay)
            limit, spent = self._budget()
            if spent is not None:
                return spent if failure is None else failure
            with self._lock:
                self.requests += 1
                self.retries += attempt > 0
            outcome, retry = self._attempt(data, limit)
            if isinstance(outcome, str):
                return outcome
            self._count_attempt_failure(outcome)
            failure = outcome
            if not retry:
                break
        assert failure is not None  # the loop runs at least once and returns on success
        return failure

    def _budget(self) -> tuple[float, RowFailure | None]:
        """(seconds the next attempt may take, or the failure to give when the budget is spent)."""
        with self._lock:
            failed = self._failed_rows
        if self.max_failures is not None and failed >= self.max_failures:
            detail = f"{failed} rows failed (max_failures={self.max_failures}): no requests until judge.reset_budget()"
            return 0.0, RowFailure(BUDGET_EXHAUSTED, detail)
        if self._deadline is None:
            return self.timeout, None
        left = self._deadline - time.monotonic()
        if left <= 0:
            return 0.0, RowFailure(BUDGET_EXHAUSTED, f"the score call ran past max_seconds={self.max_seconds:g}")
        return min(self.timeout, left), None

    def _attempt(self, data: bytes, limit: float) -> tuple[str | RowFailure, bool]:
        """One request cut at ``limit`` seconds: (reply text or failure, whether to retry)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        cutoff = _Cutoff()
        opener = urllib.request.build_opener(_CutHTTPHandler(cutoff), _CutHTTPSHandler(cutoff))
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        timed_out = RowFailure("timeout", f"no reply from {self.endpoint} within {limit:g}s")
        watchdog = threading.Timer(limit, cutoff.cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            with opener.open(request, timeout=limit) as reply:
                payload = reply.read(_MAX_REPLY_BYTES)
        except urllib.error.HTTPError as error:
            error.close()
            return RowFailure("http-error", f"HTTP {error.code} from {self.endpoint}"), _retryable(error.code)
        except (http.client.HTTPException, OSError) as error:  # URLError, timeouts and resets are OSErrors
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            if cutoff.fired or isinstance(reason, TimeoutError):
                return timed_out, True
            return RowFailure("connection-error", f"{self.endpoint}: {str(reason) or type(reason).__name__}"), True
        finally:
            watchdog.cancel()
        text = _reply_text(payload)
        if isinstance(text, RowFailure) and cutoff.fired:
            return timed_out, True  # the reply was cut short at the deadline
        return text, False

    def _count_attempt_failure(self, failure: RowFailure) -> None:
        with self._lock:
            self.attempt_failures[failure.kind] += 1


class _Cutoff:
    """Shuts an attempt's socket down when its time is up.

    urllib's timeout bounds each socket operation, not the request: a server that sends a byte
    every few seconds would hold a worker for hours. Shutting the socket down from the watchdog
    thread wakes the blocked read at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:  # the deadline passed while connecting
                _shut(sock)

    def cut(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: leaves TLS state alone
    except OSError:
        pass  # already closed


class _CutConnection:
    """Connection mixin: hands the connected socket to the attempt's :class:`_Cutoff`."""

    sock: socket.socket

    def __init__(self, *args: Any, cutoff: _Cutoff, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cutoff = cutoff

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._cutoff.attach(self.sock)


class _CutHTTPConnection(_CutConnection, http.client.HTTPConnection):
    pass


class _CutHTTPSConnection(_CutConnection, http.client.HTTPSConnection):
    pass


class _CutHandler:
    """Handler mixin: opens connections that a :class:`_Cutoff` can cut."""

    def __init__(self, cutoff: _Cutoff) -> None:
        super().__init__()
        self.cutoff = cutoff


class _CutHTTPHandler(_CutHandler, urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_CutHTTPConnection, cutoff=self.cutoff), req)


class _CutHTTPSHandler(_CutHandler, urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_CutHTTPSConnection, cutoff=self.cutoff)
        return self.do_open(connection, req, context=self._context, check_hostname=self._check_hostname)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _reply_text(payload: bytes) -> str | RowFailure:
    try:
        content = json.loads(payload.decode("utf-8"))["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return RowFailure("bad-response", "the reply is not OpenAI chat-completions JSON")
    return "" if content is None else str(content)
