"""A crash at every step: the herder or the worker killed at each crash point, in turn.

Each point of ``llama_tasks.faults.POINTS`` is a place in a request's life
where a process can die with work half done. Here the component that holds
it is started with that point armed (``LLAMAS_TEST_CRASH_AT``): the first
request to reach it SIGKILLs the component, whole, at exactly that step (no
timer). The test then starts the component again, as ``llamas up``'s
supervisor would, and follows every requester — Python client handles,
a callback receiver, plain HTTP and a streamed HTTP reader — to its end:
each must get exactly one answer, the text the ledger stored, and be
charged once; the audit of the scenario checks the books. ``make chaos``
runs every point on SQLite and PostgreSQL, ``make test`` the few in ``QUICK``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama_tasks import faults
from router import Herder
from router.core import views
from tests.chaos.audit import Scenario
from tests.chaos.harness import (
    CALLBACK,
    FULL,
    SETTLE_S,
    STORY_GRAMMAR,
    ChaosStack,
    first_token,
    prompt,
    size,
    wait_for,
)
from tests.chaos.test_faults import SseReader, shown_text
from tests.router.requester_app import DROPPED_KEY, RECEIVED_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HERDER = ("admitted", "claimed", "sent", "settled", "delivered", "marked")
WORKER = ("started", "first_token", "generated", "published", "finished")
#: One point per way back, the ones ``make test`` runs: an unsent claim sent again, a worker's
#: attempt lost, an answer redelivered, a finished attempt's message redelivered.
QUICK = ("admitted", "started", "settled", "finished")
#: A requester's RPC wait: a herder killed holding its submit answers the retry once restarted.
RPC_TIMEOUT_S = 10.0
TOKENS = 8


def test_every_crash_point_is_exercised() -> None:
    assert set(HERDER) | set(WORKER) == set(faults.POINTS)


class Requester(threading.Thread):
    """One requester, waiting for its answer in a thread; ``job_id``, ``text`` and ``answered_at`` once it has one."""

    def __init__(self, kind: str, run: Callable[[Requester], None]) -> None:
        super().__init__(daemon=True, name=f"requester-{kind}")
        self.kind, self._run = kind, run
        self.job_id = ""
        self.texts: list[str] = []
        self.answered_at: float | None = None
        self.error = ""

    def got(self, job_id: str, text: str) -> None:
        self.job_id = job_id
        self.texts.append(text)
        self.answered_at = time.time()

    def run(self) -> None:
        try:
            self._run(self)
        except Exception as exc:  # noqa: BLE001 -- whatever it is, this requester has no answer
            self.error = f"{type(exc).__name__}: {exc}"


def client_requester(herder: Herder, i: int, tokens: int = TOKENS, grammar: str | None = None) -> Requester:
    def run(me: Requester) -> None:
        handle = herder.run(prompt(f"Count to three ({i})."), tokens, grammar=grammar,
                            reference=f"crash-{uuid.uuid4().hex}")
        me.job_id = handle.id
        me.got(handle.id, handle.result(timeout=SETTLE_S)["text"])

    return Requester("client", run)


def callback_requester(stack: ChaosStack, herder: Herder) -> Requester:
    def run(me: Requester) -> None:
        handle = herder.run(prompt("Name a fruit."), TOKENS, reference=f"crash-cb-{uuid.uuid4().hex}",
                            callback=CALLBACK)
        me.job_id = handle.id

        def received() -> list[dict[str, Any]] | None:
            got = [json.loads(r) for r in stack.r.lrange(RECEIVED_KEY, 0, -1)]
            mine = [g for g in got if g["job_id"] == handle.id]
            return mine or None

        for response in wait_for(received, f"the callback of job {handle.id}", SETTLE_S, every_s=0.1):
            me.got(handle.id, response["text"])

    return Requester("callback", run)


def http_requester(scenario: Scenario, api_key: str) -> Requester:
    def run(me: Requester) -> None:
        with scenario.http(timeout_s=SETTLE_S) as http:
            reply = http.post("/v1/completions", headers={"Authorization": f"Bearer {api_key}"},
                              json={"model": "smollm2", "prompt": prompt("Name a colour."), "max_tokens": TOKENS})
        if reply.status_code != 200:
            raise AssertionError(f"HTTP {reply.status_code}: {reply.text[:200]}")
        body = reply.json()
        me.got(body["id"].split("-", 1)[1], body["choices"][0]["text"])  # "cmpl-<job id>"

    return Requester("http", run)


def sse_requester(scenario: Scenario, api_key: str) -> Requester:
    def run(me: Requester) -> None:
        reader = SseReader(scenario, api_key, {"model": "smollm2", "prompt": prompt("Name a bird."),
                                               "max_tokens": TOKENS, "stream": True})
        reader.run()
        if reader.status != 200:
            raise AssertionError(f"HTTP {reader.status}")
        me.got(reader.job_id, shown_text(reader.pieces))

    return Requester("sse", run)


def crashed_at(stack: ChaosStack, marker: Path, component: str) -> float:
    """Wait for the armed component to die at its point, start it again, and return when it died."""
    proc = stack.herder.proc if component == "herder" else stack.worker.proc
    wait_for(lambda: marker.exists() and proc.poll() is not None, f"the {component} to crash", SETTLE_S,
             every_s=0.02)
    at = float(marker.read_text())
    if component == "herder":
        stack.herder.stop()  # closes its log: its whole process group is gone
        stack.start_herder()
    else:
        stack.replace_worker()
    return at


def lose_the_worker_mid_job(stack: ChaosStack, victim: Requester) -> None:
    """For ``claimed``: the tick's dispatch claims only jobs that went back to the queue, so send one back."""
    job_id = wait_for(lambda: victim.job_id or None, "the long job's id", SETTLE_S)
    first_token(stack, job_id)
    stack.worker.proc.kill()  # SIGKILL: its attempt is lost, and the herder's tick queues it again
    stack.replace_worker()


def arm(stack: ChaosStack, point: str) -> Path:
    """Start the component that holds ``point`` again with it armed; returns the marker file of its crash."""
    marker = stack.tmp / f"crashed-{point}-{uuid.uuid4().hex[:6]}"
    armed = {faults.CRASH_AT_ENV: point, faults.CRASH_MARKER_ENV: str(marker)}
    if point in HERDER:
        stack.restart_herder(armed)
    else:
        stack.restart_worker(armed)
    return marker


def requester(stack: ChaosStack) -> tuple[str, Herder]:
    key, _ = stack.account(10_000_000)
    return key, Herder(key, app=stack.client_app, redis_url=stack.redis_url, timeout_s=RPC_TIMEOUT_S)


def audit_requesters(scenario: Scenario, stack: ChaosStack, requesters: list[Requester], fault_at: float,
                     what: str) -> None:
    """Wait for every requester, count its outcome in the scenario's row, and fail on any answer lost or doubled."""
    for r in requesters:
        r.join(SETTLE_S + 60)
    problems = []
    for r in requesters:
        stored = views.response(stack.job(r.job_id))["text"] if r.job_id else None
        lost = not r.texts or r.texts[-1] != stored or bool(r.error)
        duplicated = len(r.texts) > 1
        scenario.requester(lost, duplicated, max(0.0, r.answered_at - fault_at) if r.answered_at else None)
        if lost or duplicated:
            matching = "matching" if r.texts and r.texts[-1] == stored else "not matching"
            problems.append(f"{r.kind} requester of job {r.job_id or '?'}: {len(r.texts)} answer(s), {matching} "
                            f"the stored text {r.error and '(' + r.error + ')'}")
        elif stack.captures(r.job_id) != 1:
            problems.append(f"job {r.job_id} captured {stack.captures(r.job_id)} times")
    dropped = len(stack.r.lrange(DROPPED_KEY, 0, -1))
    assert not problems, f"{what}: " + "; ".join(problems) + f" (callback repeats dropped so far: {dropped})"


@pytest.mark.chaos("crash point")
@pytest.mark.parametrize("point", [p for p in faults.POINTS if FULL or p in QUICK])
def test_a_crash_at_each_point_loses_no_answer_and_charges_nothing_twice(
        scenario: Scenario, chaos: ChaosStack, point: str) -> None:
    marker = arm(chaos, point)
    key, herder = requester(chaos)
    requesters = [client_requester(herder, 0), client_requester(herder, 1), callback_requester(chaos, herder),
                  http_requester(scenario, key), sse_requester(scenario, key)]
    scenario.sent(len(requesters))
    for r in requesters:
        r.start()
    if point == "claimed":
        victim = client_requester(herder, 2, tokens=300, grammar=STORY_GRAMMAR)
        requesters.append(victim)
        scenario.sent()
        victim.start()
        lose_the_worker_mid_job(chaos, victim)
    fault_at = crashed_at(chaos, marker, "herder" if point in HERDER else "worker")
    audit_requesters(scenario, chaos, requesters, fault_at, f"a crash at {point}")


def mixed_requester(scenario: Scenario, stack: ChaosStack, key: str, herder: Herder, i: int) -> Requester:
    """Requester ``i`` of a mix: a client handle, a callback, plain HTTP, SSE, in turn."""
    kind = i % 4
    if kind == 0:
        return client_requester(herder, i)
    if kind == 1:
        return callback_requester(stack, herder)
    return http_requester(scenario, key) if kind == 2 else sse_requester(scenario, key)


#: In flight when the herder dies settling one of them, as in the report this guards against.
IN_FLIGHT = 10


@pytest.mark.chaos("herder killed as a settlement commits")
def test_the_herder_killed_as_it_settles_loses_no_answer_time_after_time(scenario: Scenario, chaos: ChaosStack) -> None:
    # Ten jobs in flight from client handles, callbacks, HTTP and SSE; the herder dies the
    # moment the first of them is committed done, before it is delivered; and again.
    for round_ in range(size(2, 20)):
        marker = arm(chaos, "settled")
        key, herder = requester(chaos)
        requesters = [mixed_requester(scenario, chaos, key, herder, i) for i in range(IN_FLIGHT)]
        scenario.sent(len(requesters))
        for r in requesters:
            r.start()
        fault_at = crashed_at(chaos, marker, "herder")
        audit_requesters(scenario, chaos, requesters, fault_at, f"round {round_ + 1}")


def test_the_crash_hook_is_inert_without_its_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Armed without a marker file to record the crash, nothing happens: the hook never kills by accident.
    monkeypatch.setenv(faults.CRASH_AT_ENV, "settled")
    monkeypatch.delenv(faults.CRASH_MARKER_ENV, raising=False)
    faults.point("settled")
    # With one already there, the crash happened before: the restarted process carries on.
    marker = tmp_path / "crashed"
    marker.write_text("1")
    monkeypatch.setenv(faults.CRASH_MARKER_ENV, str(marker))
    faults.point("settled")
    assert marker.read_text() == "1"

