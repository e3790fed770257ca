"""How the gateway answers a job that ended without an answer: by whose limit or fault it ended, never a 500.

The real gateway app and herder core in one process; the stub worker fails
every attempt with the exception under test as soon as the job is sent, so
each request ends by itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from llama_tasks.errors import BadGrammar, GenerationTimedOut, Replayed
from router.core import ledger
from router.core.models import JobRow
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway import openai_shapes
from router.gateway.app import create_app
from router.herder import stub


class Failing(stub.StubTransport):
    """A stub transport whose worker fails every attempt with ``error`` the moment it is sent."""

    def __init__(self, handles: redis.Redis, error: Exception) -> None:
        super().__init__(handles)
        self.error = error
        self.service: HerderService | None = None
        self._draining = False

    def send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        super().send(row, envelope)
        if self.service is None or self._draining:
            return  # the drain already running picks it up (an attempt queued again)
        self._draining = True
        try:
            self.join(self.service, self._fail)
        finally:
            self._draining = False

    def _fail(self, envelope: dict[str, Any], task_id: str) -> dict[str, Any]:
        raise self.error


def _gateway(tmp_path: Path, redis_url: str, error: Exception) -> tuple[TestClient, str]:
    """The gateway of a herder whose every attempt fails with ``error``, and a funded key."""
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, max_attempts=2)
    transport = Failing(redis.Redis.from_url(redis_url), error)
    svc = stub.build(settings, transport=transport)
    transport.service = svc
    with svc.sessions.begin() as session:
        _, key = ledger.create_account(session, "requester", deposit=100_000)
    return TestClient(create_app(lambda: svc)), key


BODY = {"model": "smollm2", "prompt": "Say a:", "max_tokens": 4}


@pytest.mark.parametrize(("error", "status"), [
    # The service's own failures: sent again, they may well succeed.
    (RuntimeError("the worker's process died"), 503),  # retried, then every attempt used
    (Replayed("job-1", 1), 503),
    # The worker's time limit, not the requester's deadline.
    (GenerationTimedOut(3.0), 504),
    # The worker refused the request itself: sending it again fails again.
    (BadGrammar("root ::= ("), 422),
], ids=["attempts-exhausted", "replayed", "generation-timed-out", "bad-grammar"])
def test_a_failed_job_is_answered_by_whose_fault_it_was(tmp_path, redis_url, error, status):
    client, key = _gateway(tmp_path, redis_url, error)
    with client:
        reply = client.post("/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == status, reply.text
    body = reply.json()["error"]
    assert body["type"] == type(error).__name__ and body["code"] == "failed" and body["job_id"]
    if status == 503:
        assert reply.headers["retry-after"] == str(openai_shapes.RETRY_AFTER_S)
        assert body["retry_after_s"] == openai_shapes.RETRY_AFTER_S
    else:
        assert "retry-after" not in reply.headers and "retry_after_s" not in body


def test_a_stream_whose_job_failed_ends_with_the_status_it_would_have_had(tmp_path, redis_url):
    client, key = _gateway(tmp_path, redis_url, Replayed("job-1", 1))
    with client:
        reply = client.post("/v1/completions", json={**BODY, "stream": True},
                            headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200  # sent before the job ended
    events = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "Replayed" and error["status"] == 503
    assert error["retry_after_s"] == openai_shapes.RETRY_AFTER_S


def _ended(status: str, error: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"job_id": "j1", "status": status, "error": error, "message": "…", **fields}


def test_the_requesters_own_deadline_and_cancel_keep_their_statuses():
    assert openai_shapes.failed(_ended("expired", "Expired"))[0] == 408
    assert openai_shapes.failed(_ended("cancelled"))[0] == 409
    # Whatever the herder writes as a failure's name, known or not, is the service's: a 503, never a 500.
    for name in ("WorkerLost", "LeaseExpired", "UnknownFailure", "NoSuchError", None):
        status, _, headers = openai_shapes.failed(_ended("failed", name))
        assert status == 503 and headers == {"Retry-After": str(openai_shapes.RETRY_AFTER_S)}


def test_a_generation_cut_by_its_time_limit_keeps_what_it_was_charged_for():
    resp = _ended("failed", "GenerationTimedOut", charged=40, offered=100, refunded=60, prompt_tokens=3,
                  completion_tokens=37, choices=[{"index": 0, "text": "abc", "finish_reason": "length"}])
    status, body, headers = openai_shapes.failed(resp)
    assert status == 504 and headers == {}
    assert body["error"]["usage"]["charged"] == 40 and body["error"]["usage"]["completion_tokens"] == 37
    assert body["error"]["choices"] == [{"index": 0, "text": "abc", "finish_reason": "length"}]
