"""Data at rest: what a copy of the home or the ledger file gives away, and for how long.

The attacks: another user of the machine reads ``ledger.db`` (and its
``-wal``/``-shm``), the keys, passwords, run records and logs; whoever copies
the ledger file reads the webhook secrets and signs webhooks as the herder;
and every prompt and completion ever sent stays in the ledger forever. Each
test makes the attack and audits the books afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from llama_tasks import signing, stream
from router.core import ledger, private_files, sealing
from router.core.db import alembic_config, make_engine, make_sessionmaker, open_ledger, upgrade
from router.core.errors import SecretUnreadable
from router.core.keys import NOTIFY_PREFIX, RESPONSE_PREFIX
from router.core.models import Account, Base, JobRow
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway.app import create_app
from router.herder import stub
from router.local.run_record import RunRecord
from router.local.supervisor import Component
from router.local.up import home_secret
from tests.router import conftest as router_fixtures

postgres_url = router_fixtures.postgres_url
ledger_url = router_fixtures.ledger_url

#: What the attacker hopes to find in a copied ledger file.
PROMPT = "The vault access code for customer Alice is 7391"
COMPLETION = "Noted: zebra-quartz-7391 stays between us."


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The usual umask (022), as a shell gives it, restored afterwards whatever the test set."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def ledger_bytes(db_file: Path) -> bytes:
    """Everything a copy of the SQLite ledger holds: the database and its side files."""
    return b"".join(p.read_bytes() for p in (db_file, *(db_file.with_name(db_file.name + s) for s in ("-wal", "-shm")))
                    if p.exists())


# --- modes -------------------------------------------------------------------


def test_a_new_ledger_its_log_files_and_its_home_are_for_the_owner_alone(tmp_path: Path, open_umask: None) -> None:
    home = tmp_path / "home"
    db_file = home / "ledger.db"
    sessions, _ = open_ledger(f"sqlite:///{db_file}")
    with sessions.begin() as s:
        ledger.create_account(s, "alice", 100)  # a write: the -wal and -shm files now exist
    try:
        assert db_file.with_name("ledger.db-wal").exists() and db_file.with_name("ledger.db-shm").exists()
        assert mode(home) == 0o700
        for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
            assert mode(home / name) == 0o600, name
        with sessions.begin() as s:
            assert ledger.check(s) == []
    finally:
        sessions.kw["bind"].dispose()


def _old_home(home: Path) -> list[Path]:
    """A home as an older version left it: 0755, every file 0644 (the ledger with data in it)."""
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    signing.generate_keypair(home)
    signing.generate_keypair(home, "house")
    connection = sqlite3.connect(home / "ledger.db")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (x)")
    connection.execute("INSERT INTO t VALUES ('prompt text')")
    connection.commit()
    connection.close()
    (home / "logs").mkdir(mode=0o755)
    # The -wal and -shm a herder killed mid-write leaves beside the ledger.
    for name in ("ledger.db-wal", "ledger.db-shm", "flower.password", "admin.key", "demo.key", "up.json",
                 "celerybeat-schedule", "logs/herder.log"):
        (home / name).write_text("secret\n")
    files = [p for p in home.rglob("*") if p.is_file()]
    for path in files:
        path.chmod(0o644)
    (home / "logs").chmod(0o755)
    return files


def test_an_older_homes_open_files_are_closed_when_the_herder_starts(tmp_path: Path, open_umask: None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from router.herder import app as herder_app

    home = tmp_path / "old-home"
    files = _old_home(home)
    assert {mode(p) for p in files} == {0o644} and mode(home) == 0o755
    monkeypatch.setattr(herder_app, "get_settings", lambda: HerderSettings(home=home))

    # The herder's main process, before it forks its pool and beat.
    herder_app._check_before_fork(sender=SimpleNamespace(app=herder_app.app))

    assert mode(home) == 0o700 and mode(home / "logs") == 0o700
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    # What the herder, its pool and its beat write from now on is private too (their umask).
    (home / "written-later").write_text("x")
    assert mode(home / "written-later") == 0o600


def test_llamas_ups_secrets_run_record_and_logs_are_private(tmp_path: Path, open_umask: None) -> None:
    home = tmp_path / "home"
    home_secret(home / "flower.password")
    RunRecord.new(home / "up.json", {"gateway": 1}).save()
    (home / "logs").mkdir()
    (home / "logs" / "gateway.log").write_bytes(b"an older, open log\n")
    (home / "logs" / "gateway.log").chmod(0o644)
    component = Component(name="x", argv=[sys.executable, "-c", "print('hello')"], env=dict(os.environ),
                          log=home / "logs" / "gateway.log")
    component.start()
    assert component.proc is not None and component.proc.wait(timeout=30) == 0
    component.stop()
    assert mode(home) == 0o700
    assert mode(home / "flower.password") == 0o600 and mode(home / "up.json") == 0o600
    assert mode(home / "logs" / "gateway.log") == 0o600 and b"hello" in (home / "logs" / "gateway.log").read_bytes()


# --- webhook secrets ------------------------------------------------------------


def test_a_copied_ledger_file_holds_no_webhook_secret(tmp_path: Path) -> None:
    db_file = tmp_path / "home" / "ledger.db"
    sessions, _ = open_ledger(f"sqlite:///{db_file}")
    try:
        with sessions.begin() as s:
            accounts = [ledger.create_account(s, f"requester-{i}", 10)[0] for i in range(3)]
        with sessions.begin() as s:
            secrets = [s.get(Account, a.id).webhook_secret for a in accounts]  # type: ignore[union-attr]
            stored = list(s.execute(text("SELECT webhook_secret FROM accounts WHERE kind = 'user'")).scalars())
            assert ledger.check(s) == []
    finally:
        sessions.kw["bind"].dispose()
    assert all(len(secret) == 64 for secret in secrets) and len(set(secrets)) == 3

    # The attacker's copy: every byte of the database and its side files.
    copy = tmp_path / "stolen"
    copy.mkdir()
    for path in db_file.parent.glob("ledger.db*"):
        shutil.copy(path, copy / path.name)
    stolen = ledger_bytes(copy / "ledger.db")
    for secret in secrets:
        assert secret.encode() not in stolen and bytes.fromhex(secret) not in stolen
    # What the column holds is sealed, and a key other than the herder's opens none of it.
    assert all(sealing.is_sealed(value) for value in stored)
    with pytest.raises(SecretUnreadable):
        sealing.SecretBox(os.urandom(sealing.KEY_BYTES)).open(stored[0])
    # The herder's own key is not in the database either: it is a 0600 file of the home.
    key_file = Path(os.environ["LLAMAS_HOME"]) / sealing.KEY_FILE
    assert mode(key_file) == 0o600 and key_file.read_bytes().strip() not in stolen


def test_the_migration_seals_existing_secrets_and_the_downgrade_opens_them(ledger_url: str) -> None:
    upgrade(ledger_url, "0007")
    engine = make_engine(ledger_url)
    plain = "ab" * 32
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO accounts (name, kind, api_key_hash, webhook_secret, balance) "
                           "VALUES ('old', 'user', 'h', :secret, 0)"), {"secret": plain})
        upgrade(ledger_url)
        with engine.connect() as c:
            raw = c.execute(text("SELECT webhook_secret FROM accounts WHERE name = 'old'")).scalar_one()
            # What the models declare is what the migrations made, the widened column included.
            assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
        assert sealing.is_sealed(raw) and plain not in raw
        with make_sessionmaker(engine).begin() as s:
            assert ledger.account_by_name(s, "old").webhook_secret == plain
            assert ledger.check(s) == []

        command.downgrade(alembic_config(ledger_url), "0007")
        with engine.connect() as c:
            assert c.execute(text("SELECT webhook_secret FROM accounts WHERE name = 'old'")).scalar_one() == plain
        upgrade(ledger_url)
    finally:
        engine.dispose()


# --- retention -----------------------------------------------------------------


class Clock:
    """Time the test moves by hand (from now: workers check envelopes' expiry against real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Life:
    """A herder on the stub transport, its handles in Redis, and a requester."""

    svc: HerderService
    transport: stub.StubTransport
    key: str
    other: str
    clock: Clock
    r: redis.Redis

    def erase(self) -> int:
        return self.svc.erase_text(result_key)

    def row(self, job_id: str) -> JobRow:
        with self.svc.sessions.begin() as s:
            row = s.scalars(select(JobRow).where(JobRow.id == job_id)).one()
            s.expunge(row)
            return row

    def books(self) -> list[str]:
        with self.svc.sessions.begin() as s:
            return ledger.check(s)


def result_key(task_id: str) -> str:
    """Where these tests put a stored result (Celery's backend names its own)."""
    return f"test-result:{task_id}"


@pytest.fixture
def life(tmp_path: Path, redis_url: str, ledger_url: str) -> Iterator[Life]:
    r = redis.Redis.from_url(redis_url)
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, text_retention_s=600,
                              webhook_allow_hosts="127.0.0.1")
    transport, clock = stub.StubTransport(handles=r), Clock()
    svc = stub.build(settings, transport=transport, slots=1, clock=clock)
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "requester", 100_000)
        _, other = ledger.create_account(s, "someone-else", 100_000)
    yield Life(svc, transport, key, other, clock, r)
    svc.sessions.kw["bind"].dispose()


def figures(row: JobRow) -> dict[str, Any]:
    """Everything of a job that receipts, ``ledger check`` and audits read."""
    kept = ("id", "state", "prompt_tokens", "max_tokens", "completion_tokens", "cached_tokens", "n", "quote",
            "offered", "bid_ppm", "charged", "refunded", "base_fee", "fee_per_token", "worker", "model_id",
            "timings", "request_hash", "created_at", "dispatched_at", "finished_at", "error", "attempt")
    doc = {name: getattr(row, name) for name in kept}
    doc["choices"] = [{k: c[k] for k in ("index", "finish_reason", "completion_tokens")}
                      for c in json.loads(row.choices or "[]")]
    return doc


def _run_two(life: Life) -> list[str]:
    chat = Submission(messages=[{"role": "user", "content": PROMPT}], max_tokens=24, stop=["zebra-x"],
                      logprobs=True, top_logprobs=2, webhook_url="http://127.0.0.1:9/hook")
    plain = Submission(prompt=PROMPT, max_tokens=24, grammar='root ::= [a-z :.7391-]+', n=2)
    jobs = [life.svc.submit(life.key, sub)["job_id"] for sub in (chat, plain)]
    life.transport.join(life.svc, stub.scripted_worker(life.svc.public_key, life.svc.counter.models(), COMPLETION))
    for job_id in jobs:
        task_id = life.row(job_id).task_id
        assert task_id is not None
        life.r.set(result_key(task_id), json.dumps({"text": COMPLETION}))  # the result store's copy
    return jobs


def test_text_is_erased_after_delivery_and_retention_and_every_figure_stays(life: Life) -> None:
    jobs = _run_two(life)
    http = TestClient(create_app(lambda: life.svc), raise_server_exceptions=False)
    before = {j: figures(life.row(j)) for j in jobs}
    receipts = {j: life.svc.receipt(life.key, j)["payload"] for j in jobs}
    assert all(life.row(j).state == "done" and PROMPT in life.row(j).request for j in jobs)
    assert life.r.exists(RESPONSE_PREFIX + jobs[0])

    # Within delivery plus retention, nothing goes.
    life.clock.now += life.svc.settings.text_kept_s - 1
    assert life.erase() == 0
    assert http.get(f"/jobs/{jobs[0]}", headers={"Authorization": f"Bearer {life.key}"}).json()["response"][
        "text"] == COMPLETION

    life.clock.now += 2
    assert life.erase() == 2
    for job_id in jobs:
        row = life.row(job_id)
        request = json.loads(row.request)
        assert not {"prompt", "messages", "stop", "grammar", "json_schema"} & set(request)
        assert request["max_tokens"] == 24 and "temperature" in request  # the generation's figures stay
        assert PROMPT not in row.request and COMPLETION not in (row.choices or "")
        assert all(c["text"] == "" and c["logprobs"] is None for c in json.loads(row.choices or "[]"))
        assert row.text_erased_at == life.clock.now
        assert figures(row) == before[job_id]
        # A receipt says the same as before, and the books still balance.
        again = life.svc.receipt(life.key, job_id)["payload"]
        assert {k: v for k, v in again.items() if k != "issued_at"} == {
            k: v for k, v in receipts[job_id].items() if k != "issued_at"}
        # Redis's copies went with it: the waiting response, the stream, the stored result.
        assert not life.r.exists(RESPONSE_PREFIX + job_id, NOTIFY_PREFIX + job_id, stream.key(job_id),
                                 result_key(row.task_id or ""))

        # Read over HTTP, an erased job answers its figures and says the text was erased.
        reply = http.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {life.key}"})
        assert reply.status_code == 200
        doc = reply.json()
        assert doc["state"] == "done" and doc["text_erased_at"] == row.text_erased_at
        response = doc["response"]
        assert response["text"] is None and response["text_erased_at"] == row.text_erased_at
        assert all(c["text"] is None and c["logprobs"] is None for c in response["choices"])
        assert (response["charged"], response["refunded"], response["completion_tokens"]) == (
            row.charged, row.refunded, row.completion_tokens)
        # Another account still learns nothing, not even that the job exists.
        assert http.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {life.other}"}).status_code == 404
    assert life.erase() == 0  # erased once
    assert life.books() == []


def test_a_copied_sqlite_ledger_holds_no_text_once_erased(life: Life) -> None:
    if life.svc.settings.ledger_url.startswith("postgresql"):
        pytest.skip("a file-level check: PostgreSQL's files are the server's (VACUUM reclaims dead rows)")
    db_file = Path(life.svc.settings.ledger_url.removeprefix("sqlite:///"))
    _run_two(life)
    held = ledger_bytes(db_file)
    assert PROMPT.encode() in held and COMPLETION.encode() in held  # the attack works on kept text

    life.clock.now += life.svc.settings.text_kept_s + 1
    assert life.erase() == 2

    stolen = ledger_bytes(db_file)
    assert PROMPT.encode() not in stolen and COMPLETION.encode() not in stolen
    assert b"7391" not in stolen
    assert life.books() == []


def test_a_queued_or_running_job_is_never_erased(life: Life) -> None:
    worker = stub.scripted_worker(life.svc.public_key, life.svc.counter.models(), COMPLETION)
    running = life.svc.submit(life.key, Submission(prompt=PROMPT, max_tokens=8))["job_id"]
    queued = life.svc.submit(life.key, Submission(prompt=PROMPT, max_tokens=8))["job_id"]  # one slot: it waits
    assert (life.row(running).state, life.row(queued).state) == ("running", "queued")

    life.clock.now += 30 * 86400
    assert life.erase() == 0
    assert PROMPT in life.row(running).request and PROMPT in life.row(queued).request

    life.transport.join(life.svc, worker)
    assert {life.row(j).state for j in (running, queued)} == {"done"}
    assert life.erase() == 0  # finished just now (by the clock): their delivery and retention start now
    life.clock.now += life.svc.settings.text_kept_s + 1
    assert life.erase() == 2
    assert life.books() == []


def test_a_job_whose_response_is_still_owed_keeps_its_text_until_delivered(life: Life,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    worker = stub.scripted_worker(life.svc.public_key, life.svc.counter.models(), COMPLETION)
    with monkeypatch.context() as m:
        # Redis is away as the job ends: its response cannot reach the handle, and stays owed.
        m.setattr(life.transport, "to_handle", lambda response, times: (_ for _ in ()).throw(ConnectionError()))
        job = life.svc.submit(life.key, Submission(prompt=PROMPT, max_tokens=8))["job_id"]
        life.transport.join(life.svc, worker)
    life.clock.now += life.svc.settings.text_kept_s + 1
    assert life.erase() == 0 and life.row(job).delivery_due
    assert life.svc.tick()["redelivered"] == 1
    assert life.transport.responses[job]["text"] == COMPLETION  # the whole answer, however late
    assert life.erase() == 1


def test_retention_starts_after_the_longest_webhook_delivery() -> None:
    settings = HerderSettings(text_retention_s=0, webhook_timeout_s=10, webhook_attempts=5, webhook_backoff_s=2)
    # Five tries of 10 s, and pauses of 2, 4, 8 and 16 s between them.
    assert settings.webhook_delivery_s == 50 + 30
    assert settings.text_kept_s == 80
    assert [settings.webhook_pause_s(n) for n in range(8)] == [2, 4, 8, 16, 32, 60, 60, 60]


def test_files_made_private_stay_private_when_rewritten(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "k"
    path.write_text("old")
    path.chmod(0o644)
    private_files.write_private(path, b"new")
    assert mode(path) == 0o600 and path.read_bytes() == b"new"
