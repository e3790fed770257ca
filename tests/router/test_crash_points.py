"""The herder dies at each crash point of a request's life (``llama_tasks.faults``), in one process.

The herder's own code on a real ledger and Redis with the stub transport
(``router.herder.stub``): at the point, the process "dies" (an exception no
handler catches stops the call where it stands, as SIGKILL would; whatever
was committed stays); the same service then goes on as the restarted herder
would, since a herder keeps nothing of its own between calls. Each requester
must get exactly one answer, the one stored, charged once, with the books
balanced. ``tests/chaos/test_crash_points.py`` kills real processes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from llama_tasks import faults
from llama_tasks.scripted import SCRIPTED_TEXT
from router.core import dispatch, forwarding, ledger, metrics
from router.core.models import DONE, JobRow, Transfer
from router.core.request import Submission
from router.core.service import RECONCILE_AFTER_S, HerderService
from router.core.settings import HerderSettings
from router.herder import stub

DEPOSIT = 100_000
JOBS = 3
#: What a tick waits for before it acts on a crash's leftovers: sends, results, deliveries.
AFTER_S = max(dispatch.UNSENT_AFTER_S, RECONCILE_AFTER_S, forwarding.REDELIVER_AFTER_S) + 1
HERDER_POINTS = ["admitted", "claimed", "sent", "settled", "delivered", "marked"]


class Crash(BaseException):
    """The herder died here: no ``except Exception`` on the way catches it."""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def life(tmp_path: Path, redis_url: str, ledger_url: str) -> Iterator[tuple[HerderService, stub.StubTransport, str, Clock]]:
    """A herder with two stub slots on a fresh ledger, and one account."""
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, max_attempts=3)
    transport, clock = stub.StubTransport(), Clock()
    svc = stub.build(settings, transport=transport, slots=2, clock=clock)
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, f"requester-{uuid.uuid4().hex[:6]}", DEPOSIT)
    yield svc, transport, key, clock


def crash_once(monkeypatch: pytest.MonkeyPatch, at: str) -> list[str]:
    """Make the first arrival at point ``at`` a crash; returns the points that crashed."""
    crashed: list[str] = []

    def point(name: str) -> None:
        assert name in faults.POINTS, f"unknown crash point {name}"
        if name == at and not crashed:
            crashed.append(name)
            raise Crash(name)

    monkeypatch.setattr(faults, "point", point)
    return crashed


def flaky_first(svc: HerderService) -> stub.StubWorker:
    """The scripted worker, except that the very first attempt fails (and is retried): the
    retry's dispatch runs on the failure path, so every herder point is on the way."""
    worker = stub.scripted_worker(svc.public_key, svc.counter.models())
    failed: list[str] = []

    def run(envelope: dict[str, Any], task_id: str) -> dict[str, Any]:
        if not failed:
            failed.append(task_id)
            raise RuntimeError("the worker lost its GPU")
        return worker(envelope, task_id)

    return run


def submit(svc: HerderService, key: str, reference: str) -> str:
    """A client's submit: sent again, with its reference, when no herder answered the first."""
    sub = Submission(prompt=f"Say hello {reference}", max_tokens=8, reference=reference)
    try:
        return str(svc.submit(key, sub)["job_id"])
    except Crash:
        return str(svc.submit(key, sub)["job_id"])


def drain(svc: HerderService, transport: stub.StubTransport, clock: Clock, worker: stub.StubWorker,
          jobs: list[str]) -> None:
    """Run what is sent, and tick past every wait, until each job's handle has its
    answer and no delivery is left owed."""
    for _ in range(10):
        while transport.outbox:
            try:
                transport.run_one(svc, worker)
            except Crash:
                pass  # the herder died settling: its result is in the store, its job still running
        with svc.sessions.begin() as s:
            owed = s.scalar(select(func.count()).where(JobRow.id.in_(jobs), JobRow.delivery_due.is_(True)))
        if all(j in transport.responses for j in jobs) and not owed:
            return
        clock.now += AFTER_S
        try:
            svc.tick()
        except Crash:
            pass
    raise AssertionError(f"answers missing after ten ticks: {set(jobs) - set(transport.responses)}")


@pytest.mark.parametrize("point", HERDER_POINTS)
def test_a_herder_dying_at_each_point_loses_no_answer_and_charges_once(
        life: Any, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    svc, transport, key, clock = life
    crashed = crash_once(monkeypatch, point)
    counted: list[str] = []
    monkeypatch.setattr(metrics, "record_outcome", lambda r, response, *times: counted.append(response["job_id"]))

    jobs = [submit(svc, key, f"ref-{point}-{i}") for i in range(JOBS)]
    drain(svc, transport, clock, flaky_first(svc), jobs)

    assert crashed == [point]
    with svc.sessions.begin() as s:
        rows = {r.id: r for r in s.scalars(select(JobRow).where(JobRow.id.in_(jobs)))}
        captures = {j: s.query(Transfer).filter_by(job_id=j, kind="capture").count() for j in jobs}
        problems = ledger.check(s)
        balance = ledger.balance(s, ledger.account_by_key(s, key))
    assert len(rows) == JOBS  # each retried submit found its first admission
    for job_id, row in rows.items():
        answer = transport.responses[job_id]
        assert (row.state, answer["status"], answer["text"]) == (DONE, "done", SCRIPTED_TEXT)
        assert answer["charged"] == row.charged and captures[job_id] == 1
        # Delivered at least once, recorded once: a receiver drops the repeat by its job id.
        assert transport.handle_deliveries[job_id] >= 1
        assert (row.delivery_due, row.delivered) == (False, "handle,")
    assert problems == [] and balance == DEPOSIT - sum(r.charged or 0 for r in rows.values())
    # The outcome is counted in the metrics once per job, however often it was delivered (a
    # herder that dies between recording a delivery and counting it leaves that one uncounted).
    assert len(counted) == len(set(counted)) and set(counted) <= set(jobs)
    assert len(counted) == JOBS - (point == "marked")


def test_a_delivery_that_fails_stays_due_and_the_tick_delivers_it(life: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    svc, transport, key, clock = life
    broken: list[str] = []

    def unreachable(response: dict[str, Any], times: Any) -> None:
        broken.append(response["job_id"])
        raise ConnectionError("Redis is away")

    with monkeypatch.context() as m:
        m.setattr(transport, "to_handle", unreachable)
        job = svc.submit(key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
        transport.join(svc, stub.scripted_worker(svc.public_key, svc.counter.models()))
    assert broken == [job] and job not in transport.responses

    assert svc.tick()["redelivered"] == 0  # too soon: its deliverer may still be at it
    clock.now += forwarding.REDELIVER_AFTER_S + 1
    assert svc.tick()["redelivered"] == 1
    assert transport.responses[job]["text"] == SCRIPTED_TEXT and transport.handle_deliveries[job] == 1
    assert svc.tick()["redelivered"] == 0


def test_an_attempt_sent_and_then_claimed_by_a_worker_is_never_sent_again(life: Any) -> None:
    svc, transport, key, clock = life
    job = svc.submit(key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    clock.now += dispatch.UNSENT_AFTER_S + 1
    assert svc.tick()["resent"] == 0  # recorded sent
    assert [j for j, _, _ in transport.sent] == [job]
