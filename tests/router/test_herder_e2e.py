"""The herder end to end: real Redis, a real ledger (SQLite and PostgreSQL),
a real herder worker with beat, and real SmolLM2 workers."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from llama_tasks import stream
from llama_tasks.errors import BadGrammar
from router import Herder, ledger, webhooks
from router.db import make_engine, make_sessionmaker, upgrade
from router.errors import InsufficientFee, JobFailed
from router.models import JobRow, Transfer
from tests.conftest import CeleryProcess, llama_worker
from tests.router.requester_app import RECEIVED_KEY

pytestmark = pytest.mark.slow

# Exactly 200 letters: a job long enough to hold the slot while others queue.
LONG = dict(prompt="Letters:", tokens=200, grammar="root ::= [a-z]{200}", temperature=0.0)


def _postgres_database() -> str | None:
    import psycopg

    base = os.environ.get("LLAMAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    base = base.replace("postgresql+psycopg://", "postgresql://")
    name = f"llamas_e2e_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(base, autocommit=True, connect_timeout=2) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        if os.environ.get("LLAMAS_TEST_POSTGRES_URL"):
            raise
        return None
    return base.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name


def _drop_postgres_database(db_url: str) -> None:
    import psycopg

    base, name = db_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)
    with psycopg.connect(base + "/test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stack:
    """Herder + one inference worker + a requester app, sharing one ledger."""

    def __init__(self, tmp: Path, db_url: str, env: dict[str, str]) -> None:
        self.db_url, self.env, self.tmp = db_url, env, tmp
        upgrade(db_url)
        self.sessions = make_sessionmaker(make_engine(db_url))
        self.worker = llama_worker("llama", 1, env, tmp / "llama.log")
        self.herder = CeleryProcess("router", "herder", "herder", 2, env, tmp / "herder.log",
                                    extra=["-B", "-s", str(tmp / "beat-schedule")])
        self.requester = CeleryProcess("tests.router.requester_app", "requester", "requester", 1, env,
                                       tmp / "requester.log")
        self.r = redis_lib.Redis.from_url(env["LLAMAS_REDIS_URL"])
        self.worker.wait_ready(self.r)
        self.herder.wait_log("ready.")
        self.requester.wait_log("ready.")

    def account(self, deposit: int) -> tuple[str, Herder]:
        with self.sessions.begin() as s:
            _, key = ledger.create_account(s, f"acct-{uuid.uuid4().hex[:8]}", deposit)
        return key, Herder(key)

    def balance(self, key: str) -> int:
        with self.sessions.begin() as s:
            return ledger.balance(s, ledger.account_by_key(s, key))

    def books(self) -> list[str]:
        with self.sessions.begin() as s:
            return ledger.check(s)

    def job(self, job_id: str) -> JobRow:
        with self.sessions.begin() as s:
            row = s.query(JobRow).filter_by(id=job_id).one()
            s.expunge(row)
            return row

    def captures(self, job_id: str) -> int:
        with self.sessions.begin() as s:
            return s.query(Transfer).filter_by(job_id=job_id, kind="capture").count()

    def stop(self) -> None:
        for p in (self.requester, self.herder, self.worker):
            p.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, tmp_path_factory, redis_url):
    tmp = tmp_path_factory.mktemp(f"stack-{request.param}")
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp / 'ledger.db'}"
    else:
        db_url = _postgres_database()
        if db_url is None:
            pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 and LLAMAS_TEST_POSTGRES_URL is unset")
    env = dict(
        os.environ,
        LLAMAS_DATABASE_URL=db_url,
        LLAMAS_TICK_S="0.5",
        LLAMAS_SOFT_TIME_LIMIT_S="25",
        LLAMAS_TIME_LIMIT_S="30",
        LLAMAS_VISIBILITY_TIMEOUT_S="60",
        LLAMAS_LEASE_GRACE_S="5",
    )
    s = Stack(tmp, db_url, env)
    yield s
    s.stop()
    s.sessions.kw["bind"].dispose()
    if request.param == "postgresql":
        _drop_postgres_database(db_url)


def test_a_paid_request_is_charged_for_actual_tokens_and_the_rest_returned(stack):
    key, herder = stack.account(10_000)
    handle = herder.run("Say hi.", 64, multiplier=2, stop=["."], temperature=0.0)
    doc = handle.result(timeout=60)
    row = stack.job(handle.id)
    assert doc["status"] == "done" and row.state == "done"
    assert doc["offered"] == 2 * row.quote
    assert doc["charged"] == 2 * (1 + 1 * (row.prompt_tokens + doc["completion_tokens"]))
    assert doc["charged"] + doc["refunded"] == doc["offered"]
    assert stack.balance(key) == 10_000 - doc["charged"]
    assert stack.books() == []


def test_bids_are_served_highest_first_while_the_only_slot_is_busy(stack):
    key, herder = stack.account(100_000)
    blocker = herder.run(**LONG)
    # Wait until the blocker holds the slot, so the rest queue up.
    next(e for e in stream.follow(stack.r, blocker.id, timeout_s=30) if e["event"] == "token")
    jobs = {m: herder.run(f"Name a colour ({m}).", 4, multiplier=m) for m in (1.0, 2.0, 1.5)}
    assert [jobs[m].position() for m in (2.0, 1.5, 1.0)] == [1, 2, 3]
    for h in [blocker, *jobs.values()]:
        h.result(timeout=120)
    started = {m: stack.job(h.id).dispatched_at for m, h in jobs.items()}
    assert started[2.0] < started[1.5] < started[1.0]


def test_refusal_holds_nothing(stack):
    key, herder = stack.account(1_000)
    with pytest.raises(InsufficientFee) as info:
        herder.run("Hello there", 50, fee=3)
    assert info.value.needed > 3
    assert stack.balance(key) == 1_000


def test_a_failed_job_returns_the_whole_hold(stack):
    key, herder = stack.account(1_000)
    handle = herder.run("Pick:", 5, grammar="root ::= [1-5")  # the worker cannot parse it
    with pytest.raises(JobFailed) as info:
        handle.result(timeout=60)
    assert info.value.error == BadGrammar.__name__
    row = stack.job(handle.id)
    assert (row.state, row.charged, row.refunded) == ("failed", 0, row.offered)
    assert stack.balance(key) == 1_000 and stack.books() == []


def test_expiry_and_cancel_return_everything(stack):
    key, herder = stack.account(100_000)
    blocker = herder.run(**LONG)
    next(e for e in stream.follow(stack.r, blocker.id, timeout_s=30) if e["event"] == "token")
    doomed = herder.run("Too late.", 8, deadline_s=0.2)
    cancelled = herder.run("Never mind.", 8)
    cancelled.cancel()
    assert doomed.response(timeout=30)["status"] == "expired"
    assert cancelled.response(timeout=30)["status"] == "cancelled"
    done = blocker.result(timeout=120)
    assert stack.balance(key) == 100_000 - done["charged"]
    assert stack.books() == []


def test_forwarding_to_the_requesters_celery_task_carries_the_reference(stack):
    key, herder = stack.account(10_000)
    reference = f"ref-{uuid.uuid4().hex}"
    handle = herder.run("Say yes.", 4, reference=reference,
                        callback=("requester.inference_response", "requester"))
    handle.result(timeout=60)
    deadline = time.monotonic() + 30
    received: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not received:
        received = [json.loads(x) for x in stack.r.lrange(RECEIVED_KEY, 0, -1)]
        received = [x for x in received if x["reference"] == reference]
        time.sleep(0.05)
    assert len(received) == 1 and received[0]["job_id"] == handle.id and received[0]["status"] == "done"
    # Resubmitting with the same reference returns the same job and delivers nothing new.
    again = herder.run("Say yes.", 4, reference=reference, callback=("requester.inference_response", "requester"))
    assert again.id == handle.id


class _Receiver(http.server.BaseHTTPRequestHandler):
    secret = ""
    seen: set[str] = set()
    accepted: list[dict[str, Any]] = []
    rejected: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            doc = webhooks.verify(self.secret, body, self.headers[webhooks.SIGNATURE_HEADER],
                                  self.headers[webhooks.DELIVERY_HEADER], self.seen)
            self.accepted.append(doc)
            self.send_response(204)
        except webhooks.WebhookRejected as exc:
            self.rejected.append(str(exc))
            self.send_response(400)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_webhook_arrives_once_with_a_valid_signature(stack):
    key, herder = stack.account(10_000)
    with stack.sessions.begin() as s:
        _Receiver.secret = ledger.account_by_key(s, key).webhook_secret
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        handle = herder.run("Say ok.", 4, webhook=url, reference="hook-1")
        handle.result(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not [d for d in _Receiver.accepted if d["job_id"] == handle.id]:
            time.sleep(0.05)
        time.sleep(1.0)  # any duplicate would arrive within this window
        mine = [d for d in _Receiver.accepted if d["job_id"] == handle.id]
        assert len(mine) == 1 and mine[0]["reference"] == "hook-1"
        assert _Receiver.rejected == []
    finally:
        server.shutdown()


def test_a_forged_result_or_one_for_an_unknown_job_changes_nothing(stack):
    from router.app import app

    key, herder = stack.account(100_000)
    blocker = herder.run(**LONG)
    next(e for e in stream.follow(stack.r, blocker.id, timeout_s=30) if e["event"] == "token")
    row = stack.job(blocker.id)
    forged = {"task_id": row.task_id, "job_id": row.id, "attempt": row.attempt, "text": "",
              "finish_reason": "stop", "worker": "evil", "timings": {}}
    app.send_task("router.settle", args=[forged], queue="herder")
    app.send_task("router.settle", args=[forged | {"task_id": uuid.uuid4().hex, "job_id": "nope"}], queue="herder")
    app.send_task("router.settle_error", args=[uuid.uuid4().hex], queue="herder")
    done = blocker.result(timeout=120)
    assert done["worker"] != "evil" and len(done["text"]) == 200
    assert stack.captures(blocker.id) == 1
    assert stack.books() == []


def test_sigkill_of_a_worker_mid_job_charges_once_and_delivers_once(stack):
    key, herder = stack.account(100_000)
    reference = f"kill-{uuid.uuid4().hex}"
    handle = herder.run(**LONG, reference=reference, callback=("requester.inference_response", "requester"))
    first = next(stream.follow(stack.r, handle.id, timeout_s=30))
    next(e for e in stream.follow(stack.r, handle.id, timeout_s=30) if e["event"] == "token")
    os.kill(int(first["pid"]), signal.SIGKILL)
    doc = handle.result(timeout=120)
    assert doc["status"] == "done" and len(doc["text"]) == 200
    assert stack.captures(handle.id) == 1
    time.sleep(1.0)
    received = [json.loads(x) for x in stack.r.lrange(RECEIVED_KEY, 0, -1)]
    assert len([x for x in received if x["reference"] == reference]) == 1
    assert stack.books() == []


def test_flushall_with_jobs_queued_still_completes_them_all(stack):
    key, herder = stack.account(100_000)
    blocker = herder.run(**LONG)
    next(e for e in stream.follow(stack.r, blocker.id, timeout_s=30) if e["event"] == "token")
    queued = [herder.run(f"Count to {i}.", 6) for i in range(4)]
    stack.r.flushdb()  # the test database: everything Redis knew is gone
    for h in [blocker, *queued]:
        assert h.result(timeout=120)["status"] == "done"
    assert stack.books() == []
