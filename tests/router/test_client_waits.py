"""The Python client keeps what it paid for when no herder answers it.

A real ``Herder`` client whose calls reach the herder's core in this process
instead of through Celery (its ``_send``, the one place that talks to the
broker, is replaced), on a real ledger and Redis: each test loses or fails a
call at the moment it means to, then drains and asserts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError as BrokerUnreachable
from sqlalchemy import select

from router import client as client_module
from router.client import Herder, JobHandle
from router.core import ledger
from router.core.errors import ResultTimeout, UnknownJob
from router.core.models import JobRow
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.herder import stub

DEPOSIT = 100_000
#: ``_send``'s signature: ``(task, args, kwargs, secret) -> the herder's answer``.
Send = Callable[[str, tuple[Any, ...], dict[str, Any], bool], Any]


@pytest.fixture
def herd(tmp_path: Path, redis_url: str) -> tuple[HerderService, stub.StubTransport, str]:
    """The herder's core with a stub worker that runs only when drained, and a funded key."""
    transport = stub.StubTransport(redis.Redis.from_url(redis_url))
    svc = stub.build(HerderSettings(home=tmp_path, redis_url=redis_url), transport=transport)
    with svc.sessions.begin() as session:
        _, key = ledger.create_account(session, "requester", deposit=DEPOSIT)
    return svc, transport, key


def _client(monkeypatch: pytest.MonkeyPatch, key: str, redis_url: str, send: Send) -> Herder:
    herder = Herder(key, redis_url=redis_url)
    monkeypatch.setattr(herder, "_send", send)
    return herder


def _jobs(svc: HerderService) -> list[JobRow]:
    with svc.sessions() as session:
        return list(session.scalars(select(JobRow)))


# --- a submit whose answer was lost -------------------------------------------------


def _admit_then_lose_the_first_answer(svc: HerderService, sent: list[dict[str, Any]]) -> Send:
    """The herder admits every submit and commits; the first answer never reaches the client."""

    def send(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], secret: bool) -> Any:
        assert task == "router.submit"
        sent.append(args[1])
        doc = svc.submit(args[0], Submission.from_dict(args[1]))
        if len(sent) == 1:
            raise CeleryTimeout("the herder died after committing the admission, before it answered")
        return doc

    return send


def test_a_submit_without_a_reference_whose_answer_was_lost_names_one_job_held_once(monkeypatch, herd, redis_url):
    svc, _, key = herd
    sent: list[dict[str, Any]] = []
    herder = _client(monkeypatch, key, redis_url, _admit_then_lose_the_first_answer(svc, sent))
    handle = herder.run("Say a:", 4)
    # Sent twice, with the one reference the client made for it.
    assert len(sent) == 2 and sent[0]["reference"] == sent[1]["reference"]
    assert re.fullmatch(r"[0-9a-f]{32}", sent[0]["reference"])
    (row,) = _jobs(svc)
    assert row.id == handle.id and row.reference == sent[0]["reference"]
    with svc.sessions() as session:
        assert ledger.held_for(session, row.id) == row.offered
        assert ledger.balance(session, ledger.account_by_key(session, key)) == DEPOSIT - row.offered


def test_the_callers_own_reference_is_kept(monkeypatch, herd, redis_url):
    svc, _, key = herd
    sent: list[dict[str, Any]] = []
    herder = _client(monkeypatch, key, redis_url, _admit_then_lose_the_first_answer(svc, sent))
    handle = herder.run("Say a:", 4, reference="order-17")
    assert [doc["reference"] for doc in sent] == ["order-17", "order-17"]
    assert [(row.id, row.reference) for row in _jobs(svc)] == [(handle.id, "order-17")]


def test_two_submits_without_references_are_two_jobs(monkeypatch, herd, redis_url):
    svc, _, key = herd

    def send(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], secret: bool) -> Any:
        return svc.submit(args[0], Submission.from_dict(args[1]))

    herder = _client(monkeypatch, key, redis_url, send)
    first, second = herder.run("Say a:", 4), herder.run("Say a:", 4)
    assert first.id != second.id and len(_jobs(svc)) == 2


# --- a status poll no herder answered -----------------------------------------------


@pytest.mark.parametrize("unanswered", [
    TaskRevokedError("expired in the queue while the herder was down"),
    CeleryTimeout("no herder answered in time"),
    BrokerUnreachable("the broker refused the connection"),
    redis.ConnectionError("the result backend went away"),
], ids=lambda exc: type(exc).__name__)
def test_a_poll_no_herder_answered_leaves_the_wait_going_until_the_response(monkeypatch, herd, redis_url, unanswered):
    svc, transport, key = herd
    polls: list[str] = []

    def send(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], secret: bool) -> Any:
        polls.append(task)
        # While the poll went unanswered, the job ran and its response was written for the handle.
        transport.join(svc, stub.scripted_worker(svc.public_key, svc.counter.models()))
        raise unanswered

    herder = _client(monkeypatch, key, redis_url, send)
    handle = JobHandle(herder, svc.submit(key, Submission(prompt="Say a:", max_tokens=4)))
    monkeypatch.setattr(client_module, "STATUS_POLL_S", 0.0)  # poll at once, not after 5 s
    response = handle.response(timeout=60)
    assert polls == ["router.status"]
    assert response["job_id"] == handle.id and response["status"] == "done"


def test_polls_no_herder_answered_end_in_the_callers_own_timeout(monkeypatch, herd, redis_url):
    svc, _, key = herd

    def send(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], secret: bool) -> Any:
        raise TaskRevokedError("expired in the queue while the herder was down")

    herder = _client(monkeypatch, key, redis_url, send)
    handle = JobHandle(herder, svc.submit(key, Submission(prompt="Say a:", max_tokens=4)))
    with pytest.raises(ResultTimeout):
        handle.response(timeout=0)


def test_a_herders_refusal_of_the_poll_still_raises(monkeypatch, herd, redis_url):
    svc, _, key = herd

    def send(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], secret: bool) -> Any:
        raise UnknownJob(args[1])

    herder = _client(monkeypatch, key, redis_url, send)
    handle = JobHandle(herder, svc.submit(key, Submission(prompt="Say a:", max_tokens=4)))
    with pytest.raises(UnknownJob):
        handle.response(timeout=0)
