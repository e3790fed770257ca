"""A whole running service for end-to-end tests: herder with beat, a SmolLM2
worker, a requester's own Celery app and (on demand) the HTTP gateway, on
one ledger (SQLite or a fresh PostgreSQL database)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from llama_tasks import stream as token_stream
from router import Herder
from router.client import JobHandle
from router.core import ledger
from router.core.db import make_engine, make_sessionmaker, upgrade
from router.core.errors import JobNotQueued
from router.core.models import JobRow, Transfer
from tests.processes import ROOT, CeleryProcess, llama_worker


def postgres_database() -> str | None:
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


def fresh_ledger(kind: str, tmp: Path) -> str:
    """URL of an empty ledger: a SQLite file in ``tmp``, or a new PostgreSQL database (skips when none answers)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'ledger.db'}"
    found = postgres_database()
    if found is None:
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 and LLAMAS_TEST_POSTGRES_URL is unset")
    return found


def drop_postgres_database(db_url: str) -> None:
    import psycopg

    base, name = db_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)
    with psycopg.connect(base + "/test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: A job that holds the stack worker's only slot until it is released: 2,000
#: letters take far longer than any test step that needs the slot busy.
BLOCKER = dict(prompt="Letters:", tokens=2000, grammar="root ::= [a-z]{2000}", temperature=0.0)


class Stack:
    """Herder + one inference worker + a requester app, sharing one ledger."""

    def __init__(self, tmp: Path, db_url: str, env: dict[str, str]) -> None:
        self.db_url, self.env, self.tmp = db_url, env, tmp
        self._gateway: subprocess.Popen[bytes] | None = None
        upgrade(db_url)
        self.sessions = make_sessionmaker(make_engine(db_url))
        self.r = redis_lib.Redis.from_url(env["LLAMAS_REDIS_URL"])
        # A previous stack of this test session shares the Redis database: its
        # queued and unacknowledged messages must not reach this stack's worker.
        self.r.delete("llama.smollm2", "herder", "requester", "unacked", "unacked_index")
        self.worker = llama_worker("llama", 1, env, tmp / "llama.log")
        self._worker_starts = 1
        self.herder = CeleryProcess("router", "herder", "herder", 2, env, tmp / "herder.log",
                                    extra=["-B", "-s", str(tmp / "beat-schedule")])
        self.requester = CeleryProcess("tests.router.requester_app", "requester", "requester", 1, env,
                                       tmp / "requester.log")
        self.worker.wait_ready(self.r)
        self.herder.wait_log("ready.")
        self.requester.wait_log("ready.")

    def replace_worker(self) -> None:
        """Reap a killed inference worker and start another, as ``llamas up``'s supervisor does."""
        self.worker.proc.wait(timeout=10)
        self.worker.stop()
        self._worker_starts += 1
        self.worker = llama_worker("llama", 1, self.env, self.tmp / f"llama-{self._worker_starts}.log")
        self.worker.wait_ready(self.r)

    def occupy(self, herder: Herder) -> JobHandle:
        """Start a ``BLOCKER`` and return once it holds the only slot (it has streamed a token)."""
        handle = herder.run(**BLOCKER)
        next(e for e in token_stream.follow(self.r, handle.id, timeout_s=30) if e["event"] == "token")
        return handle

    def release(self, handle: JobHandle) -> dict[str, Any]:
        """Stop a blocker (a running job stops at the worker's next step) and return its result."""
        try:
            handle.cancel()
        except JobNotQueued:
            pass  # it had ended already
        return handle.result(timeout=60)

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

    def gateway_url(self) -> str:
        """Start the HTTP gateway (once) and return its base URL."""
        if self._gateway is None:
            port = free_port()
            self._gateway_log = open(self.tmp / "gateway.log", "wb")
            self._gateway = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "router.api:app", "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT, env=self.env, stdout=self._gateway_log, stderr=subprocess.STDOUT,
            )
            self._gateway_port = port
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if self._gateway.poll() is not None:
                        raise RuntimeError((self.tmp / "gateway.log").read_text()) from None
                    time.sleep(0.1)
        return f"http://127.0.0.1:{self._gateway_port}"

    def stop(self) -> None:
        if self._gateway is not None:
            self._gateway.terminate()
            self._gateway.wait(timeout=20)
            self._gateway_log.close()
        for p in (self.requester, self.herder, self.worker):
            p.stop()


def running_stack(kind: str, tmp_path_factory: pytest.TempPathFactory,
                  prepare: Callable[[str, Path], dict[str, str]] | None = None) -> Iterator[Stack]:
    """Run a stack on ``kind`` ("sqlite" or "postgresql") for the duration of a fixture.

    ``prepare(db_url, tmp)`` runs on the migrated ledger before any process
    starts, and returns settings to add to every process's environment.
    """
    tmp = tmp_path_factory.mktemp(f"stack-{kind}")
    db_url = fresh_ledger(kind, tmp)
    extra: dict[str, str] = {}
    if prepare is not None:
        upgrade(db_url)
        extra = prepare(db_url, tmp)
    env = dict(
        os.environ,
        LLAMAS_DATABASE_URL=db_url,
        LLAMAS_TICK_S="0.5",
        # One llama.cpp thread per worker: a test that adds a second worker must
        # not oversubscribe two cores (llama.cpp's threads spin-wait on each other).
        LLAMAS_THREADS="1",
        LLAMAS_SOFT_TIME_LIMIT_S="25",
        LLAMAS_TIME_LIMIT_S="30",
        LLAMAS_VISIBILITY_TIMEOUT_S="60",
        LLAMAS_LEASE_GRACE_S="5",
        # The webhook tests' receiver listens on loopback, which webhooks may not reach by default.
        LLAMAS_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        **extra,
    )
    s = Stack(tmp, db_url, env)
    try:
        yield s
    finally:
        s.stop()
        s.sessions.kw["bind"].dispose()
        if kind == "postgresql":
            drop_postgres_database(db_url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    """The whole service, once per test module and ledger backend."""
    yield from running_stack(request.param, tmp_path_factory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
