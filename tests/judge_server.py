"""A chat-completions server on 127.0.0.1 that misbehaves on a seeded schedule, for HTTPJudge tests.

Request n (0, 1, ... in order of arrival) gets ``schedule(n)``, one of :data:`BEHAVIOURS`. The
server logs (n, row tag, behaviour) per request, the row tag being the number in ``ROW#<k>#`` in
the prompt, and counts requests in flight: from the moment a request is read to the moment its
answer starts (or, for a request it never answers, until the client hangs up), so the count never
includes a request the client has already given up on.
"""

from __future__ import annotations

import json
import random
import re
import select
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

BEHAVIOURS = (
    "ok",  # 200, "Rating: r" with r = 1 + row % 5
    "slow-ok",  # the same after slow_seconds (meant to be well within the client's timeout)
    "http-500",
    "http-429",
    "http-400",
    "not-json",  # 200 with an HTML body
    "no-choices",  # 200 with JSON that is not a chat completion
    "no-rating",  # a chat completion without a rating
    "hang",  # no answer until the client hangs up
    "drip",  # a good reply, one byte per drip_seconds: longer in all than the client's timeout
    "drop",  # the connection closed without an answer
)
ROW_TAG = re.compile(r"ROW#(\d+)#")


def row_prompt(row: int) -> str:
    """A prompt the server can tell apart: its row number travels inside the request."""
    return f"ROW#{row}# How do I fix my bike?"


def rating_of(row: int) -> int:
    return 1 + row % 5


def seeded_schedule(weights: Mapping[str, float], seed: int) -> Callable[[int], str]:
    """Request number -> behaviour, drawn with ``weights``; the same for the same (n, seed)."""
    names, chances = list(weights), list(weights.values())
    assert set(names) <= set(BEHAVIOURS), set(names) - set(BEHAVIOURS)
    return lambda n: random.Random(f"{seed}:{n}").choices(names, chances)[0]


@dataclass(frozen=True)
class Served:
    number: int
    row: int | None
    behaviour: str


class FlakyJudgeServer:
    """Context manager: ``with FlakyJudgeServer(schedule) as server: HTTPJudge(server.url, ...)``.

    Attributes:
        url: the server's base URL.
        log: one :class:`Served` per request, in order of arrival.
        max_in_flight: the most requests in flight at once so far.
    """

    def __init__(self, schedule: Callable[[int], str], *, slow_seconds: float = 0.05, drip_seconds: float = 0.02) -> None:
        self.schedule = schedule
        self.slow_seconds = slow_seconds
        self.drip_seconds = drip_seconds
        self.log: list[Served] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._http = _Server(("127.0.0.1", 0), _Handler)
        self._http.owner = self
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self.log)

    def __enter__(self) -> FlakyJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.closing.set()  # hanging and dripping handlers stop within one poll
        self._http.shutdown()
        self._http.server_close()  # joins the handler threads (block_on_close)
        self._thread.join(timeout=5)

    def admit(self, row: int | None) -> str:
        with self._lock:
            behaviour = self.schedule(len(self.log))
            self.log.append(Served(len(self.log), row, behaviour))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return behaviour

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    request_queue_size = 64  # a burst of connects must not meet a full backlog
    owner: FlakyJudgeServer

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that gave up mid-reply: expected here
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        owner = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        match = ROW_TAG.search(json.loads(body)["messages"][0]["content"])
        row = int(match.group(1)) if match else None
        behaviour = owner.admit(row)
        released = False
        try:
            if behaviour in ("hang", "drop"):
                if behaviour == "hang":
                    self._wait_for_hangup(owner.closing, None)
                self.close_connection = True
                return  # the connection closes without an answer
            if behaviour == "slow-ok":
                owner.closing.wait(owner.slow_seconds)
            status, payload = _answer(behaviour, 0 if row is None else rating_of(row))
            head = f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            data = f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            if behaviour == "drip":
                for i in range(len(data)):
                    if self._wait_for_hangup(owner.closing, owner.drip_seconds):
                        return
                    self.connection.sendall(data[i : i + 1])
                return
            owner.release()  # before answering: the client's next request cannot overlap this one
            released = True
            self.connection.sendall(data)
            self.close_connection = True
        finally:
            if not released:
                owner.release()

    def _wait_for_hangup(self, closing: threading.Event, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: until closing) or until the client hangs up; True if it did."""
        while not closing.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05 if seconds is None else seconds)
            if readable:  # the request was read in full: what is left to read is the hang-up
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True
            if seconds is not None:
                return False
        return True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server name
        pass


def _answer(behaviour: str, rating: int) -> tuple[int, bytes]:
    def completion(content: str) -> bytes:
        return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()

    if behaviour in ("ok", "slow-ok", "drip"):
        return 200, completion(f"Rating: {rating}")
    if behaviour.startswith("http-"):
        return int(behaviour[5:]), b'{"error": {"message": "injected"}}'
    if behaviour == "not-json":
        return 200, b"<html><body>502 Bad Gateway</body></html>"
    if behaviour == "no-choices":
        return 200, b'{"error": {"message": "overloaded"}}'
    if behaviour == "no-rating":
        return 200, completion("I cannot rate this.")
    raise ValueError(f"no answer for behaviour {behaviour!r}")
