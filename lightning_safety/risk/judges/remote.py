"""A judge behind an OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, TGI, hosted APIs).

Standard library only (urllib + json). One request per example, up to ``batch_size`` in
parallel threads; temperature 0; the reply's rating (``"Rating: 4"``, see
:func:`~lightning_safety.risk.judges.rubric.parse_rating`) maps to (r - 1) / 4. ``raw`` is the
reply text (None when no reply came). An HTTP error, a timeout, a connection failure, a reply
that is not chat-completions JSON, or a reply without a rating fails closed (score 1, failed).
The API key is read from an environment variable and is only ever sent in the
``Authorization`` header: never logged, never in ``repr``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from lightning_safety.errors import JudgeError
from lightning_safety.risk.judges.base import Judge, RowFailure, ScoreLike
from lightning_safety.risk.judges.rubric import DEFAULT_RUBRIC, parse_rating, rating_to_score, rubric_message

_MAX_REPLY_BYTES = 1 << 20  # a chat completion with a few tokens is far smaller


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

    Args:
        url: server base URL (``http://localhost:8000``) or the full ``.../chat/completions`` URL.
        model: the model name the server expects in the request.
        api_key_env: name of the environment variable holding the API key (None: no key).
        timeout: seconds per attempt, for connecting and for each read.
        max_retries: further attempts after a timeout, connection error, HTTP 429 or 5xx.
        rubric: instructions before the example (default :data:`DEFAULT_RUBRIC`).
        batch_size: requests in flight at once.
        max_tokens: reply length limit (the answer is one short line).
        retry_backoff: seconds before retry k is ``retry_backoff * k``.
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
    ) -> None:
        super().__init__(batch_size=batch_size)
        if urlparse(str(url).strip()).scheme not in ("http", "https") or not urlparse(str(url).strip()).netloc:
            raise JudgeError(f"judge url '{url}' is not an http(s) URL: pass e.g. http://localhost:8000")
        if timeout <= 0 or max_retries < 0:
            raise JudgeError(f"timeout={timeout} and max_retries={max_retries} are invalid: use timeout > 0, max_retries >= 0")
        self.endpoint = chat_completions_url(url)
        self.model = str(model)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.rubric = DEFAULT_RUBRIC if rubric is None else str(rubric)
        self.max_tokens = int(max_tokens)
        self.retry_backoff = float(retry_backoff)
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

    def _score_batch(self, prompts: list[str], responses: list[str] | None) -> tuple[list[ScoreLike], list[str | None]]:
        pairs = list(zip(prompts, responses if responses is not None else [None] * len(prompts)))
        with ThreadPoolExecutor(max_workers=min(self.batch_size, len(pairs))) as pool:
            outcomes = list(pool.map(lambda pair: self._judge_one(*pair), pairs))
        return [score for score, _ in outcomes], [reply for _, reply in outcomes]

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
            return RowFailure("unparsable", f"no rating 1-5 in the reply {reply[:80]!r}"), reply
        return rating_to_score(rating), reply

    def _post(self, data: bytes) -> str | RowFailure:
        """The reply text, retrying transient failures; a :class:`RowFailure` when none came."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        failure = RowFailure("connection-error")
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * attempt)
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    payload = reply.read(_MAX_REPLY_BYTES)
            except urllib.error.HTTPError as error:
                error.close()
                failure = RowFailure("http-error", f"HTTP {error.code} from {self.endpoint}")
                if _retryable(error.code):
                    continue
                return failure
            except (TimeoutError, socket.timeout):
                failure = RowFailure("timeout", f"no reply from {self.endpoint} within {self.timeout:g}s")
                continue
            except urllib.error.URLError as error:
                if isinstance(error.reason, (TimeoutError, socket.timeout)):
                    failure = RowFailure("timeout", f"no reply from {self.endpoint} within {self.timeout:g}s")
                else:
                    failure = RowFailure("connection-error", f"{self.endpoint}: {error.reason}")
                continue
            except (http.client.HTTPException, ConnectionError, OSError) as error:
                failure = RowFailure("connection-error", f"{self.endpoint}: {type(error).__name__}")
                continue
            return _reply_text(payload)
        return failure


def _reply_text(payload: bytes) -> str | RowFailure:
    try:
        content = json.loads(payload.decode("utf-8"))["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return RowFailure("bad-response", "the reply is not OpenAI chat-completions JSON")
    return "" if content is None else str(content)
