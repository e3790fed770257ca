"""Faults: a worker or the herder killed, Redis flushed or stopped, deadlines passing in the queue.

Each scenario drives the real stack, waits for what it caused to play out
(polling, never sleeping), and leaves the books to the audit in
``scenario``'s teardown.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from router import Herder
from router.client import JobHandle
from router.core import views
from router.core.errors import JobFailed, StreamRestarted
from tests.chaos.audit import Scenario
from tests.chaos.harness import (
    CALLBACK,
    FULL,
    GHOST,
    LETTERS,
    LETTERS_GRAMMAR,
    SETTLE_S,
    STORY_GRAMMAR,
    ChaosStack,
    Ghost,
    first_token,
    prompt,
    size,
    wait_for,
)
from tests.processes import alive
from tests.router.requester_app import RECEIVED_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def shown_text(pieces: list[tuple[str, str]]) -> str:
    """What a reader ends up holding: the text after the last restart signal."""
    text = ""
    for kind, piece in pieces:
        text = "" if kind == "restart" else text + piece
    return text


class SseReader(threading.Thread):
    """Reads one streamed completion from the gateway, keeping every piece and restart signal."""

    def __init__(self, scenario: Scenario, api_key: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.scenario, self.api_key, self.body = scenario, api_key, body
        self.pieces: list[tuple[str, str]] = []
        self.job_id = ""
        self.status = 0
        self.started = threading.Event()

    def run(self) -> None:
        try:
            with self.scenario.http() as http, http.stream(
                "POST", "/v1/completions", json=self.body, headers={"Authorization": f"Bearer {self.api_key}"}
            ) as reply:
                self.status, self.job_id = reply.status_code, reply.headers.get("X-Llamas-Job", "")
                self.started.set()
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "llamas_restart" in chunk:
                        self.pieces.append(("restart", ""))
                    for choice in chunk.get("choices", []):
                        self.pieces.append(("token", choice["text"]))
        finally:
            self.started.set()


class ClientReader(threading.Thread):
    """Follows a job with ``JobHandle.stream()``, restarting when told to, as its docstring says."""

    def __init__(self, handle: JobHandle) -> None:
        super().__init__(daemon=True)
        self.handle = handle
        self.pieces: list[tuple[str, str]] = []

    def run(self) -> None:
        while True:
            try:
                for piece in self.handle.stream(timeout=SETTLE_S):
                    self.pieces.append(("token", piece))
                return
            except StreamRestarted:
                self.pieces.append(("restart", ""))


def post_plain(scenario: Scenario, api_key: str, body: dict[str, Any]) -> httpx.Response:
    with scenario.http(timeout_s=SETTLE_S + 60) as http:
        return http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {api_key}"})


def waiting_http(scenario: Scenario, pool: ThreadPoolExecutor, api_key: str, n: int,
                 tag: str) -> list[tuple[str, Future[httpx.Response]]]:
    """``n`` plain HTTP requests left waiting for their answers in threads: (reference, future)."""
    out = []
    for i in range(n):
        ref = f"{tag}-http-{i}-{uuid.uuid4().hex[:8]}"
        body = {"model": "smollm2", "prompt": prompt(f"Name a colour ({i})."), "max_tokens": 6, "reference": ref}
        out.append((ref, pool.submit(post_plain, scenario, api_key, body)))
    scenario.sent(n)
    return out


def admitted(stack: ChaosStack, refs: list[str]) -> list[str]:
    """Job ids of the references, once every one of them has been admitted."""
    def ids() -> list[str] | None:
        rows = [stack.by_reference(r) for r in refs]
        return [row.id for row in rows if row is not None] if all(rows) else None

    return wait_for(ids, "the HTTP requests to be admitted")


def client_jobs(scenario: Scenario, herder: Herder, n: int, tag: str, **extra: Any) -> list[JobHandle]:
    handles = [herder.run(prompt(f"Count to {i}."), 8, reference=f"{tag}-{i}-{uuid.uuid4().hex[:8]}",
                          callback=CALLBACK, **extra) for i in range(n)]
    scenario.sent(n)
    return handles


def blocker(scenario: Scenario, herder: Herder) -> JobHandle:
    """A job that holds the only real slot for a while (it cannot stop before its last letter)."""
    handle = herder.run(prompt("Letters:"), LETTERS, grammar=LETTERS_GRAMMAR, temperature=0.0, callback=CALLBACK)
    scenario.sent()
    return handle


def all_done(stack: ChaosStack, handles: list[JobHandle], http: list[tuple[str, Future[httpx.Response]]]) -> None:
    """Every client job and every waiting HTTP request ended done, and callbacks arrived."""
    for h in handles:
        assert h.result(timeout=SETTLE_S)["status"] == "done", h.id
    for ref, future in http:
        reply = future.result(timeout=SETTLE_S + 60)
        assert reply.status_code == 200, (ref, reply.status_code, reply.text[:300])
        row = stack.by_reference(ref)
        assert row is not None and row.state == "done" and reply.json()["choices"][0]["text"] == views.response(row)["text"]


def callbacks_arrive(stack: ChaosStack, handles: list[JobHandle]) -> None:
    """Each client job's Inference-Response reached the requester's queue (at most once: the audit)."""
    wanted = {h.id for h in handles}

    def arrived() -> bool:
        return wanted <= {json.loads(r)["job_id"] for r in stack.r.lrange(RECEIVED_KEY, 0, -1)}

    wait_for(arrived, "every callback to arrive", SETTLE_S)


@pytest.mark.chaos("worker SIGKILL mid-generation, then restart")
def test_a_worker_killed_mid_generation_loses_nothing(chaos: ChaosStack, scenario: Scenario) -> None:
    key, herder = chaos.account(1_000_000)
    story = {"prompt": prompt("Write a long story about a llama who learns to sail."), "max_tokens": 48,
             "temperature": 1.0, "grammar": STORY_GRAMMAR, "stream": True}
    sse = SseReader(scenario, key, story)
    sse.start()
    assert sse.started.wait(60) and sse.status == 200, sse.status
    scenario.sent()
    others = client_jobs(scenario, herder, size(3, 8), "kill", temperature=1.0, grammar=STORY_GRAMMAR)
    # The first job streams over HTTP and through the client at once; in the full run the next one dies too.
    victims = [herder.job(sse.job_id), *others[: 1 if FULL else 0]]
    readers = [ClientReader(v) for v in victims]
    for reader in readers:
        reader.start()
    for victim in victims:
        # The worker is one process batching every job it runs: they all go down with it.
        os.kill(first_token(chaos, victim.id), signal.SIGKILL)
        chaos.replace_worker()

    for h in [*victims, *others]:
        assert h.result(timeout=SETTLE_S)["status"] == "done", h.id
    sse.join(SETTLE_S)
    for reader in readers:
        reader.join(SETTLE_S)
    assert not sse.is_alive() and not any(r.is_alive() for r in readers)
    callbacks_arrive(chaos, others)
    for reader in readers:
        row = chaos.job(reader.handle.id)
        starts = [e for e in chaos.stream_events(row.id) if e["event"] == "start"]
        assert len(starts) >= 2, f"job {row.id} was not generated again after its worker died"
        assert chaos.captures(row.id) == 1
        readers_text = [shown_text(reader.pieces)] + ([shown_text(sse.pieces)] if row.id == sse.job_id else [])
        wrong = [t for t in readers_text if t != views.response(row)["text"]]
        scenario.duplicated_streams += len(wrong)
        assert not wrong, f"job {row.id}: readers were shown {wrong!r}, the answer is {views.response(row)['text']!r}"


@pytest.mark.chaos("herder SIGKILL with jobs queued and running, then restart")
def test_a_killed_herder_restarts_and_every_job_ends_once(chaos: ChaosStack, scenario: Scenario) -> None:
    key, herder = chaos.account(1_000_000)
    first = blocker(scenario, herder)
    queued = client_jobs(scenario, herder, size(3, 8), "herder")
    first_token(chaos, first.id)
    old_log = chaos.herder.log
    family = chaos.kill_herder()
    # Two pool children (-c 2) and the embedded beat (-B), a process of its own.
    assert len(family) >= 3, f"the herder had only {family} below it: no beat process to check"
    # Children die with their parent: an orphaned beat would keep sending ticks beside the new herder's.
    wait_for(lambda: not any(alive(p) for p in family), "the dead herder's pool children and beat to die", 15)
    with ThreadPoolExecutor(8) as pool:
        # No herder runs, yet the gateway admits: it calls the admission code itself.
        http = waiting_http(scenario, pool, key, size(2, 6), "herder")
        admitted(chaos, [ref for ref, _ in http])
        quiet_size = old_log.stat().st_size
        chaos.start_herder()
        all_done(chaos, [first, *queued], http)
    callbacks_arrive(chaos, [first, *queued])
    # Nothing of the old herder writes any more: no orphaned beat is logging "Sending due task".
    assert old_log.stat().st_size == quiet_size, old_log.read_text()[-2000:]


@pytest.mark.chaos("Redis FLUSHDB with jobs queued")
def test_a_flushed_redis_loses_no_job(chaos: ChaosStack, scenario: Scenario) -> None:
    key, herder = chaos.account(1_000_000)
    first = blocker(scenario, herder)
    first_token(chaos, first.id)
    queued = client_jobs(scenario, herder, size(3, 10), "flush")
    with ThreadPoolExecutor(8) as pool:
        http = waiting_http(scenario, pool, key, size(2, 6), "flush")
        admitted(chaos, [ref for ref, _ in http])
        chaos.r.flushdb()  # every queue, result, stream, heartbeat and claim: gone
        if FULL:
            # Again the moment the next job is dispatched, so its message may be lost on the way.
            wait_for(lambda: any(chaos.job(h.id).state == "running" for h in queued), "a queued job to start")
            chaos.r.flushdb()
        all_done(chaos, [first, *queued], http)


@pytest.mark.chaos("Redis stopped for 10 s, then started again")
def test_redis_down_for_ten_seconds_every_job_ends_once(chaos: ChaosStack, scenario: Scenario) -> None:
    key, herder = chaos.account(1_000_000)
    first = blocker(scenario, herder)
    first_token(chaos, first.id)
    queued = client_jobs(scenario, herder, size(2, 8), "outage")
    with ThreadPoolExecutor(8) as pool:
        http = waiting_http(scenario, pool, key, size(2, 6), "outage")
        admitted(chaos, [ref for ref, _ in http])
        chaos.redis_outage(10.0)
        chaos.worker.wait_ready(chaos.r)
        # The blocker's message waits out the outage and starts late: on a starved CPU it may reach
        # its lease's end before its last letter and end cut short by its time limit, charged for
        # what it made. Either way it ends once (the audit checks the money).
        ended = first.response(timeout=SETTLE_S)
        assert ended["status"] == "done" or ended["error"] == "GenerationTimedOut", (ended["status"], ended["error"])
        all_done(chaos, queued, http)


@pytest.mark.chaos("deadline expiry while queued")
def test_a_deadline_passed_in_the_queue_is_refunded_in_full(chaos: ChaosStack, scenario: Scenario,
                                                            ghost: Ghost) -> None:
    key, herder = chaos.account(100_000)
    doomed = [herder.run(prompt(f"Too late ({i})."), 8, model=GHOST, deadline_s=0.5) for i in range(size(3, 10))]
    scenario.sent(len(doomed))
    body = {"model": GHOST, "prompt": prompt("Too late over HTTP."), "max_tokens": 8, "deadline_s": 0.5}
    reply = post_plain(scenario, key, body)
    scenario.sent()
    assert reply.status_code == 408, reply.text
    assert reply.json()["error"]["code"] == "expired"
    for h in doomed:
        response = h.response(timeout=60)
        assert response["status"] == "expired", response
        assert response["charged"] == 0 and response["refunded"] == response["offered"]
    streamed_sse = {"model": GHOST, "prompt": prompt("Stream me, too late."), "max_tokens": 8, "deadline_s": 0.5,
                    "stream": True}
    with scenario.http() as http:
        reply = http.post("/v1/completions", json=streamed_sse, headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200 and '"expired"' in reply.text and reply.text.rstrip().endswith("[DONE]"), \
        reply.text
    scenario.sent(2)
    # A client following a job that expires in the queue: it hears of the end, or waits its whole timeout.
    follower = herder.run(prompt("Follow me, too late."), 8, model=GHOST, deadline_s=0.5)
    started = time.monotonic()
    try:
        shown = list(follower.stream(timeout=8))
        ended: BaseException | None = None
    except (JobFailed, TimeoutError) as exc:
        shown, ended = [], exc
    except redis.RedisError as exc:
        pytest.fail(f"stream(timeout=8) of a job waiting in the queue raised {type(exc).__module__}."
                    f"{type(exc).__name__} ({exc}) after {time.monotonic() - started:.1f}s")
    waited = time.monotonic() - started
    assert shown == [] and (ended is None or isinstance(ended, JobFailed) or waited >= 8), (shown, ended, waited)
    assert chaos.balance(key) == 100_000

