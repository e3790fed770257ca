"""The herder's reader of the results RESULTS_STREAM, on a real Redis and ledger (SQLite)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from llama_tasks.constants import RESULTS_GROUP, RESULTS_STREAM
from router.core import ledger
from router.core.parts import StoredResult
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.herder import stub
from router.herder.result_reader import ResultReader

DEPOSIT = 100_000


@pytest.fixture
def herder(tmp_path: Path, redis_url: str,
           private_redis_url: str) -> Iterator[tuple[HerderService, stub.StubTransport, str, redis.Redis]]:
    transport = stub.StubTransport()
    svc = stub.build(HerderSettings(home=tmp_path, redis_url=redis_url, account_max_in_flight=8), transport=transport, slots=8)
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "requester", DEPOSIT)
    # The readers read the herders' own stream and group, in a database no herder process of this session reads.
    r = redis.Redis.from_url(private_redis_url)
    yield svc, transport, key, r
    r.close()


def reader_for(svc: HerderService, r: redis.Redis, consumer: str = "herder-a") -> ResultReader:
    s = ResultReader(lambda: svc, r, consumer)
    s.ensure_group()
    return s


def published(svc: HerderService, transport: stub.StubTransport, r: redis.Redis, n: int, key: str) -> list[str]:
    """Admit ``n`` jobs and publish each one's scripted result on the results stream, as workers do."""
    worker = stub.scripted_worker(svc.public_key, svc.counter.models())
    jobs = [svc.submit(key, Submission(prompt=f"Say hello {i}", max_tokens=16))["job_id"] for i in range(n)]
    while transport.outbox:
        task_id, envelope = transport.outbox.popleft()
        doc = worker(envelope, task_id)
        transport.stored[task_id] = StoredResult("done", document=doc)
        r.xadd(RESULTS_STREAM, {"doc": json.dumps(doc)})
    return jobs


def test_a_batch_of_results_is_settled_in_one_read_then_deleted(herder: Any) -> None:
    svc, transport, key, r = herder
    reader = reader_for(svc, r)
    jobs = published(svc, transport, r, 8, key)

    assert reader.run_once(block_ms=None) == 8
    assert set(jobs) == set(transport.responses)
    assert all(transport.responses[j]["status"] == "done" for j in jobs)
    assert r.xlen(RESULTS_STREAM) == 0  # settled entries leave Redis
    with svc.sessions.begin() as s:
        assert ledger.check(s) == []


def test_an_entry_that_is_not_a_result_is_dropped_and_the_rest_settle(herder: Any) -> None:
    svc, transport, key, r = herder
    reader = reader_for(svc, r)
    r.xadd(RESULTS_STREAM, {"doc": "not json"})
    r.xadd(RESULTS_STREAM, {"other": "field"})
    jobs = published(svc, transport, r, 2, key)

    assert reader.run_once(block_ms=None) == 4
    assert set(transport.responses) == set(jobs)
    assert r.xlen(RESULTS_STREAM) == 0


def test_entries_a_dead_herder_took_are_reclaimed_by_another_and_settled_once(herder: Any) -> None:
    svc, transport, key, r = herder
    dead, alive = reader_for(svc, r, "herder-dead"), reader_for(svc, r, "herder-alive")
    jobs = published(svc, transport, r, 3, key)
    # The dead herder read them and never settled nor acknowledged them.
    r.xreadgroup(RESULTS_GROUP, dead.consumer, {RESULTS_STREAM: ">"}, count=10)

    assert alive.run_once(block_ms=None) == 0  # nothing new for the live one
    assert alive.reclaim(min_idle_ms=0) == 3
    assert set(transport.responses) == set(jobs)
    assert r.xpending(RESULTS_STREAM, RESULTS_GROUP)["pending"] == 0
    # The same results published again (a worker's redelivered message) change nothing.
    for stored in transport.stored.values():
        r.xadd(RESULTS_STREAM, {"doc": json.dumps(stored.document)})
    assert alive.run_once(block_ms=None) == 3
    with svc.sessions.begin() as s:
        assert ledger.check(s) == []
        charged = sum(transport.responses[j]["charged"] for j in jobs)
        assert ledger.balance(s, ledger.account_by_key(s, key)) == DEPOSIT - charged


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
        batch.append((task_id, doc | {"choices": [{"index": 0, "text": "boom", "finish_reason": "stop"}]} if i == 1 else doc))

    assert svc.on_results(batch) == 2
    assert set(transport.responses) == {jobs[0], jobs[2]}
    with svc.sessions.begin() as s:
        assert ledger.check(s) == []
