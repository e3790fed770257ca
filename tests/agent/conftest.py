"""Fixtures of the agent's tests: its databases on SQLite and PostgreSQL, chat rooms on the
session's real Redis, and real agent worker processes beside the ``stack``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import OperationalError

from agent.exchange import FixedPrice, PaperExchange
from agent.settings import AgentSettings
from agent.store import OutcomeStore, Summary, Tick
from agent.world import World
from router.core.db import make_engine
from tests.processes import CeleryProcess, wait_for

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: Opening balance of a test agent's paper account, and its price.
DEPOSIT, PRICE = 100_000, 250


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'agent' / 'db.sqlite'}"
        return
    configured = os.environ.get("LLAMAS_TEST_POSTGRES_URL")
    base = configured or DEFAULT_POSTGRES_URL
    probe_url = make_url(base).update_query_dict({"connect_timeout": "3"})
    admin = make_engine(probe_url.render_as_string(hide_password=False))
    schema = f"agent_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        if configured:
            pytest.fail(f"LLAMAS_TEST_POSTGRES_URL is set but PostgreSQL does not answer: {exc.orig}")
        pytest.skip(f"no PostgreSQL answers at {base}")
    try:
        yield make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[OutcomeStore]:
    s = OutcomeStore.open(db_url)
    yield s
    s.close()


@pytest.fixture
def exchange(db_url: str) -> Iterator[PaperExchange]:
    x = PaperExchange.open(db_url, FixedPrice(PRICE))
    yield x
    x.close()


@pytest.fixture
def world(r: Any) -> World:
    return World(r)


@pytest.fixture
def room() -> str:
    """A room no other test uses."""
    return f"room-{uuid.uuid4().hex[:8]}"


class AgentProcess:
    """A real ``celery -A agent worker -B`` with its own queue, databases and beat."""

    def __init__(self, env: dict[str, str], tmp: Path, name: str) -> None:
        self.queue = f"agent-{name}"
        self.env = env | {
            "LLAMAS_AGENT_QUEUE": self.queue,
            "LLAMAS_AGENT_DATABASE_URL": f"sqlite:///{tmp / f'{name}-agent.db'}",
            "LLAMAS_AGENT_EXCHANGE_URL": f"sqlite:///{tmp / f'{name}-exchange.db'}",
            "LLAMAS_AGENT_PRICE": str(PRICE),
            "LLAMAS_AGENT_EXCHANGE_DEPOSIT": str(DEPOSIT),
        }
        self.settings = AgentSettings(**{k.removeprefix("LLAMAS_").lower(): v for k, v in self.env.items()
                                         if k.startswith("LLAMAS_AGENT_")})
        self.process = CeleryProcess("agent", self.queue, f"agent-{name}", 1, self.env, tmp / f"{name}.log",
                                     extra=["-B", "-s", str(tmp / f"{name}-beat")])
        self.process.wait_log("ready.")
        self.store = OutcomeStore.open(self.settings.database_url)
        self.exchange = PaperExchange.open(self.settings.exchange_url, FixedPrice(PRICE))

    def summary(self) -> Summary:
        return self.store.summary()

    def ticks(self) -> list[Tick]:
        return self.store.recent(100)

    def log(self) -> str:
        return self.process.output()

    def wait(self, condition: Callable[[], Any], what: str, timeout_s: float = 90.0) -> Any:
        return wait_for(condition, timeout_s, what, lambda: self.log()[-4000:])

    def stop(self) -> None:
        self.process.stop()
        self.store.close()
        self.exchange.close()


@pytest.fixture
def start_agent(stack: Any, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agent workers against the running ``stack``; all stop when the test ends."""
    started: list[AgentProcess] = []

    def start(api_key: str, room: str, **settings: str) -> AgentProcess:
        env = dict(stack.env, LLAMAS_AGENT_API_KEY=api_key, LLAMAS_AGENT_ROOM=room,
                   LLAMAS_AGENT_INTERVAL_S="0.5",
                   **{f"LLAMAS_AGENT_{k.upper()}": v for k, v in settings.items()})
        agent = AgentProcess(env, tmp_path, f"a{len(started)}-{uuid.uuid4().hex[:6]}")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
