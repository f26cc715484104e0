"""HTTPJudge under load and faults: real sockets against a local server that flaps on a seeded schedule.

Each test checks the client's accounting against the server's own log: which rows got a good
reply, which failed and how (fail-closed: score 1, counted by kind), how many requests and
retries were sent, how many were in flight at once, and that budgets stop the requests.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from lightning_safety.errors import JudgeError
from lightning_safety.risk.judges import HTTPJudge, JudgeResult
from lightning_safety.risk.judges.remote import BUDGET_EXHAUSTED
from judge_server import FlakyJudgeServer, Served, rating_of, row_prompt, seeded_schedule

# behaviour -> (the client's failure kind, None for a good reply; whether the client retries it)
OUTCOMES: dict[str, tuple[str | None, bool]] = {
    "ok": (None, False),
    "slow-ok": (None, False),
    "http-500": ("http-error", True),
    "http-429": ("http-error", True),
    "http-400": ("http-error", False),
    "not-json": ("bad-response", False),
    "no-choices": ("bad-response", False),
    "no-rating": ("unparsable", False),
    "hang": ("timeout", True),
    "drip": ("timeout", True),
    "drop": ("connection-error", True),
}
FLAPPING = {
    "ok": 0.50, "slow-ok": 0.10, "http-500": 0.07, "http-429": 0.05, "http-400": 0.02, "not-json": 0.03,
    "no-choices": 0.03, "no-rating": 0.03, "hang": 0.06, "drip": 0.04, "drop": 0.07,
}


def score_within(judge: HTTPJudge, prompts: list[str], seconds: float) -> tuple[JudgeResult, float]:
    """``judge.score(prompts)`` and its wall time, failing the test (not hanging it) past ``seconds``."""
    box: dict[str, JudgeResult] = {}
    worker = threading.Thread(target=lambda: box.update(result=judge.score(prompts)), daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"judge.score still running after {seconds:.1f}s"
    return box["result"], time.monotonic() - started


def worst_row_seconds(judge: HTTPJudge) -> float:
    """The longest one row can take: every attempt cut at the timeout, every backoff at its ceiling."""
    backoffs = sum(min(judge.max_backoff, judge.retry_backoff * 2 ** (k - 1)) for k in range(1, judge.max_retries + 1))
    return (judge.max_retries + 1) * judge.timeout + backoffs


def expected_outcomes(log: list[Served], rows: int, max_retries: int) -> dict[int, str | None]:
    """Each row's final failure kind (None: scored) from the behaviours its requests met, in order."""
    by_row: dict[int, list[str]] = {row: [] for row in range(rows)}
    for served in log:
        by_row[served.row].append(served.behaviour)
    outcomes: dict[int, str | None] = {}
    for row, behaviours in by_row.items():
        assert behaviours, f"row {row} sent no request"
        for attempt, behaviour in enumerate(behaviours):
            kind, retried = OUTCOMES[behaviour]
            if kind is None or not retried or attempt == max_retries:
                assert attempt == len(behaviours) - 1, f"row {row} sent requests after its outcome: {behaviours}"
                outcomes[row] = kind
    return outcomes


def test_flapping_server_every_failure_fails_closed_and_is_counted():
    rows, batch_size = 300, 8
    with FlakyJudgeServer(seeded_schedule(FLAPPING, seed=0), slow_seconds=0.05, drip_seconds=0.02) as server:
        judge = HTTPJudge(
            server.url, model="judge", timeout=0.3, max_retries=2, retry_backoff=0.02, max_backoff=0.05,
            batch_size=batch_size,
        )
        bound = rows / batch_size * worst_row_seconds(judge) + worst_row_seconds(judge)  # list scheduling
        result, wall = score_within(judge, [row_prompt(row) for row in range(rows)], bound + 10)
        log = list(server.log)
        max_in_flight = server.max_in_flight

    outcomes = expected_outcomes(log, rows, judge.max_retries)
    for row, kind in outcomes.items():
        if kind is None:
            assert not result.failed[row] and result.raw[row] == f"Rating: {rating_of(row)}"
            assert float(result.score[row]) == (rating_of(row) - 1) / 4
        else:
            assert result.failed[row] and float(result.score[row]) == 1.0, (row, kind)  # fail-closed
    final = Counter(kind for kind in outcomes.values() if kind is not None)
    attempts = Counter(kind for served in log if (kind := OUTCOMES[served.behaviour][0]) is not None)
    assert judge.failures_by_kind == final and judge.failures == result.num_failed == sum(final.values())
    assert judge.attempt_failures == attempts
    assert judge.requests == len(log) and judge.retries == len(log) - rows and judge.calls == rows
    assert 1 < max_in_flight <= batch_size
    assert wall < bound
    assert {served.behaviour for served in log} == set(FLAPPING)  # every fault was met
    served = Counter(s.behaviour for s in log)
    waited = (attempts["timeout"] * judge.timeout + served["slow-ok"] * 0.05) / batch_size  # the server's delays alone
    print(
        f"\nHTTPJudge vs flapping server: {rows} rows, {len(log)} requests ({judge.retries} retries), "
        f"served {dict(sorted(served.items()))}; failed attempts {dict(sorted(attempts.items()))}; "
        f"failed rows {result.num_failed} {dict(sorted(final.items()))}; max in flight {max_in_flight}/{batch_size}; "
        f"wall {wall:.2f}s (the server's delays / concurrency {waited:.2f}s, bound {bound:.1f}s)"
    )


def test_failure_budget_stops_requests_until_reset():
    with FlakyJudgeServer(lambda n: "http-500") as server:
        judge = HTTPJudge(server.url, model="judge", timeout=1, max_retries=1, retry_backoff=0, batch_size=4, max_failures=5)
        result, _ = score_within(judge, [row_prompt(row) for row in range(60)], 30)
        sent = server.requests
        assert result.failed.all() and (result.score == 1).all()
        spent = judge.failures_by_kind["http-error"]
        assert 5 <= spent <= 5 + judge.batch_size - 1  # rows already in flight when the budget ran out
        assert judge.failures_by_kind == {"http-error": spent, BUDGET_EXHAUSTED: 60 - spent}
        assert spent <= sent == judge.requests <= 2 * spent  # at most one retry each, nothing for the rest

        again, wall = score_within(judge, [row_prompt(row) for row in range(50)], 30)
        assert again.failed.all() and server.requests == sent  # no request once the budget is spent
        assert judge.failures_by_kind[BUDGET_EXHAUSTED] == 60 - spent + 50 and wall < judge.timeout

        judge.reset_budget()
        score_within(judge, [row_prompt(0)], 30)
        assert server.requests == sent + 2


@pytest.fixture(params=["hang", "blackhole"])
def dead_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Callable[[], int] | None]]:
    """URL of a server that never answers: one that reads requests and hangs, or one that never accepts."""
    if request.param == "hang":
        with FlakyJudgeServer(lambda n: "hang") as server:
            yield server.url, lambda: server.requests
        return
    with socket.create_server(("127.0.0.1", 0), backlog=1) as listener:  # connects queue, then stall
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", None


def test_dead_server_is_bounded_by_the_time_budget(dead_server):
    url, requests = dead_server
    judge = HTTPJudge(url, model="judge", timeout=0.2, max_retries=3, retry_backoff=0.01, batch_size=4, max_seconds=0.6)
    result, wall = score_within(judge, [row_prompt(row) for row in range(200)], 10)
    assert wall < judge.max_seconds + judge.timeout  # attempts are cut at the deadline
    assert result.failed.all() and (result.score == 1).all()
    assert judge.failures_by_kind["timeout"] + judge.failures_by_kind[BUDGET_EXHAUSTED] == 200
    assert judge.requests <= judge.batch_size * (math.floor(judge.max_seconds / judge.timeout) + 1)
    assert judge.failures_by_kind[BUDGET_EXHAUSTED] >= 200 - judge.requests
    if requests is not None:
        sent = requests()
        assert sent == judge.requests
        time.sleep(judge.timeout)
        assert requests() == sent  # nothing left running after score returned


def test_backoff_is_exponential_jittered_and_capped():
    judge = HTTPJudge("http://127.0.0.1:9", model="m", retry_backoff=0.1, max_backoff=0.5, max_retries=10_000)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (10_000, 0.5)):
        delays = [judge.retry_delay(retry) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), retry
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not one value
    assert HTTPJudge("http://127.0.0.1:9", model="m", retry_backoff=0).retry_delay(3) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_seconds": 0}, "max_seconds=0 is invalid: use seconds > 0, or None"),
        ({"max_seconds": math.inf}, "max_seconds=inf is invalid"),
        ({"max_failures": 0}, "max_failures=0 is invalid: use an integer >= 1, or None"),
        ({"max_failures": 2.5}, "max_failures=2.5 is invalid"),
        ({"retry_backoff": -1}, "retry_backoff=-1 is invalid: use a number of seconds >= 0"),
        ({"max_backoff": math.nan}, "max_backoff=nan is invalid"),
        ({"timeout": math.nan}, "timeout=nan and max_retries=1 are invalid"),
        ({"max_retries": 1.5}, "max_retries=1.5 are invalid"),
    ],
)
def test_bad_budget_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(JudgeError, match=message) as error:
        HTTPJudge("http://127.0.0.1:9", model="m", **kwargs)
    assert "\n" not in str(error.value)
