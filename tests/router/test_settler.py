"""The herder's reader of the results stream, on a real Redis and ledger (SQLite)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from router.core import ledger
from router.herder import stub
from router.core.parts import StoredResult
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.herder.result_reader import Settler

DEPOSIT = 100_000


@pytest.fixture
def herder(tmp_path: Path, redis_url: str) -> Iterator[tuple[HerderService, stub.StubTransport, str, redis.Redis]]:
    transport = stub.StubTransport()
    svc = stub.build(HerderSettings(home=tmp_path, redis_url=redis_url), transport=transport, slots=8)
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "requester", DEPOSIT)
    r = redis.Redis.from_url(redis_url)
    yield svc, transport, key, r
    r.close()


def settler(svc: HerderService, r: redis.Redis, stream: str, consumer: str = "herder-a") -> Settler:
    s = Settler(lambda: svc, r, consumer, stream=stream, group="test-herders", batch=16)
    s.ensure_group()
    return s


def published(svc: HerderService, transport: stub.StubTransport, r: redis.Redis, stream: str, n: int,
              key: str) -> list[str]:
    """Admit ``n`` jobs and publish each one's scripted result on ``stream``, as workers do."""
    worker = stub.scripted_worker(svc.public_key, svc.counter.models())
    jobs = [svc.submit(key, Submission(prompt=f"Say hello {i}", max_tokens=16))["job_id"] for i in range(n)]
    while transport.outbox:
        task_id, envelope = transport.outbox.popleft()
        doc = worker(envelope, task_id)
        transport.stored[task_id] = StoredResult("done", document=doc)
        r.xadd(stream, {"doc": json.dumps(doc)})
    return jobs


def test_a_batch_of_results_is_settled_in_one_read_then_deleted(herder: Any) -> None:
    svc, transport, key, r = herder
    stream = f"test:results:{uuid.uuid4().hex}"
    reader = settler(svc, r, stream)
    jobs = published(svc, transport, r, stream, 8, key)

    assert reader.run_once(block_ms=None) == 8
    assert set(jobs) == set(transport.responses)
    assert all(transport.responses[j]["status"] == "done" for j in jobs)
    assert r.xlen(stream) == 0  # settled entries leave Redis
    with svc.sessions.begin() as s:
        assert ledger.check(s) == []
    r.delete(stream)


def test_an_entry_that_is_not_a_result_is_dropped_and_the_rest_settle(herder: Any) -> None:
    svc, transport, key, r = herder
    stream = f"test:results:{uuid.uuid4().hex}"
    reader = settler(svc, r, stream)
    r.xadd(stream, {"doc": "not json"})
    r.xadd(stream, {"other": "field"})
    jobs = published(svc, transport, r, stream, 2, key)

    assert reader.run_once(block_ms=None) == 4
    assert set(transport.responses) == set(jobs)
    assert r.xlen(stream) == 0
    r.delete(stream)


def test_entries_a_dead_herder_took_are_reclaimed_by_another_and_settled_once(herder: Any) -> None:
    svc, transport, key, r = herder
    stream = f"test:results:{uuid.uuid4().hex}"
    dead, alive = settler(svc, r, stream, "herder-dead"), settler(svc, r, stream, "herder-alive")
    jobs = published(svc, transport, r, stream, 3, key)
    # The dead herder read them and never settled nor acknowledged them.
    r.xreadgroup("test-herders", dead.consumer, {stream: ">"}, count=10)

    assert alive.run_once(block_ms=None) == 0  # nothing new for the live one
    assert alive.reclaim(min_idle_ms=0) == 3
    assert set(transport.responses) == set(jobs)
    assert r.xpending(stream, "test-herders")["pending"] == 0
    # The same results published again (a worker's redelivered message) change nothing.
    for stored in transport.stored.values():
        r.xadd(stream, {"doc": json.dumps(stored.document)})
    assert alive.run_once(block_ms=None) == 3
    with svc.sessions.begin() as s:
        assert ledger.check(s) == []
        charged = sum(transport.responses[j]["charged"] for j in jobs)
        assert ledger.balance(s, ledger.account_by_key(s, key)) == DEPOSIT - charged
    r.delete(stream)


def test_a_result_that_fails_to_settle_does_not_hold_up_the_rest_of_its_batch(herder: Any) -> None:
    svc, transport, key, r = herder

    class Refusing:
        """The real counter, except that it cannot count one text (a stand-in for any failure mid-batch)."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def completion_tokens(self, model: str, text: str) -> int:
            if text == "boom":
                raise RuntimeError("cannot count")
            return int(self.real.completion_tokens(model, text))

    svc.counter = Refusing(svc.counter)
    worker = stub.scripted_worker(svc.public_key, svc.counter.models())
    jobs = [svc.submit(key, Submission(prompt=f"Say hello {i}", max_tokens=16))["job_id"] for i in range(3)]
    batch = []
    for i, (task_id, envelope) in enumerate(list(transport.outbox)):
        doc = worker(envelope, task_id)
        batch.append((task_id, doc | {"text": "boom", "choices": None} if i == 1 else doc))

    assert svc.on_results(batch) == 2
    assert set(transport.responses) == {jobs[0], jobs[2]}
    with svc.sessions.begin() as s:
        assert ledger.check(s) == []
